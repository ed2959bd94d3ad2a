//! Where the control plane is and the admin token: flags, then `ZTP_SERVER`,
//! `ZTP_TOKEN`, `ZTP_API_CA`, then `~/.config/ztp/config.toml`, then the default server
//! `http://127.0.0.1:9780`. For `connect`, the same for the gateway and the user's
//! files: `ZTP_VIA`, `ZTP_CERT`, `ZTP_KEY`, `ZTP_CA` and the keys `via`, `cert`,
//! `key`, `ca`.
//!
//! The config file is TOML: its keys at the top, or under `[api]` (`server`, `token`,
//! `api_ca`) and `[connect]` (`via`, `cert`, `key`, `ca`). A file that cannot be read or
//! parsed does not stop a command whose flags and environment give all it needs: it is
//! named in one warning. When the command does need it, the error names the file and what
//! is wrong with it, on one line.

use std::path::{Path, PathBuf};

use anyhow::bail;
use serde::Deserialize;

use crate::connect::ConnectArgs;

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:9780";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Settings {
    pub server: String,
    pub token: Option<String>,
    pub api_ca: Option<PathBuf>,
    /// `connect`: the gateway, your certificate, key, and the gateway's CA.
    pub via: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// The config file's keys.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    server: Option<String>,
    token: Option<String>,
    api_ca: Option<String>,
    via: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
    #[serde(default)]
    api: ApiSection,
    #[serde(default)]
    connect: ConnectSection,
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiSection {
    server: Option<String>,
    token: Option<String>,
    api_ca: Option<String>,
}

#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectSection {
    via: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
}

/// The file's values, each from the top or its section; a key in both is an error.
#[derive(Debug, Default, PartialEq, Eq)]
struct FileValues {
    server: Option<String>,
    token: Option<String>,
    api_ca: Option<String>,
    via: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
}

/// Parses the file; the error is one line: where, and what is wrong.
fn parse_file(text: &str) -> Result<FileValues, String> {
    let f: FileSettings = toml::from_str(text).map_err(|e| one_line(text, &e))?;
    let pick = |top: Option<String>, section: Option<String>, name: &str, table: &str| match (
        top, section,
    ) {
        (Some(_), Some(_)) => Err(format!(
            "`{name}` is given both at the top and in [{table}]"
        )),
        (a, b) => Ok(a.or(b)),
    };
    Ok(FileValues {
        server: pick(f.server, f.api.server, "server", "api")?,
        token: pick(f.token, f.api.token, "token", "api")?,
        api_ca: pick(f.api_ca, f.api.api_ca, "api_ca", "api")?,
        via: pick(f.via, f.connect.via, "via", "connect")?,
        cert: pick(f.cert, f.connect.cert, "cert", "connect")?,
        key: pick(f.key, f.connect.key, "key", "connect")?,
        ca: pick(f.ca, f.connect.ca, "ca", "connect")?,
    })
}

/// A TOML error (several lines, with the offending source) as `line L: message`.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ztp").join("config.toml"))
}

/// The config file's values, or why it is unusable (`PATH: line N: …`). No file is no
/// values.
fn load(path: Option<&Path>) -> Result<FileValues, String> {
    let Some(path) = path else {
        return Ok(FileValues::default());
    };
    match std::fs::read_to_string(path) {
        Ok(text) => parse_file(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileValues::default()),
        Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// What flags and the environment did not give, and the file would have to.
fn missing<'a>(wanted: &[(&'a str, bool)]) -> Vec<&'a str> {
    wanted
        .iter()
        .filter(|(_, given)| !given)
        .map(|(n, _)| *n)
        .collect()
}

/// The file's values; a broken file is a warning when nothing is `missing`, else the
/// error: one line naming the file.
fn file_or_warn(path: Option<&Path>, missing: &[&str]) -> anyhow::Result<FileValues> {
    match load(path) {
        Ok(f) => Ok(f),
        Err(problem) if missing.is_empty() => {
            eprintln!("ztpctl: warning: config file ignored: {problem}");
            Ok(FileValues::default())
        }
        Err(problem) => bail!(
            "{} not given, and the config file is unusable: {problem}",
            missing.join(" and ")
        ),
    }
}

/// Settings of the admin commands: the control plane and the token.
pub fn resolve_api(
    server: Option<String>,
    token: Option<String>,
    api_ca: Option<PathBuf>,
) -> anyhow::Result<Settings> {
    let server = server.or_else(|| env("ZTP_SERVER"));
    let token = token.or_else(|| env("ZTP_TOKEN"));
    let api_ca = api_ca.or_else(|| env("ZTP_API_CA").map(PathBuf::from));
    let need = missing(&[
        ("--server (or ZTP_SERVER)", server.is_some()),
        ("--token (or ZTP_TOKEN)", token.is_some()),
    ]);
    let file = file_or_warn(config_path().as_deref(), &need)?;
    Ok(Settings {
        server: server
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
        token: token.or(file.token),
        api_ca: api_ca.or(file.api_ca.map(PathBuf::from)),
        ..Settings::default()
    })
}

/// Settings of `connect`: the gateway and the user's files.
pub fn resolve_connect(args: &ConnectArgs) -> anyhow::Result<Settings> {
    let path =
        |flag: &Option<PathBuf>, var: &str| flag.clone().or_else(|| env(var).map(PathBuf::from));
    let via = args.via.clone().or_else(|| env("ZTP_VIA"));
    let cert = path(&args.cert, "ZTP_CERT");
    let key = path(&args.key, "ZTP_KEY");
    let ca = path(&args.ca, "ZTP_CA");
    let need = missing(&[
        ("--via (or ZTP_VIA)", via.is_some()),
        ("--cert (or ZTP_CERT)", cert.is_some()),
        ("--key (or ZTP_KEY)", key.is_some()),
        ("--ca (or ZTP_CA)", ca.is_some()),
    ]);
    let file = file_or_warn(config_path().as_deref(), &need)?;
    Ok(Settings {
        via: via.or(file.via),
        cert: cert.or(file.cert.map(PathBuf::from)),
        key: key.or(file.key.map(PathBuf::from)),
        ca: ca.or(file.ca.map(PathBuf::from)),
        ..Settings::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_is_toml() {
        let f = parse_file(
            "# ztp\nserver = 'http://h:1'  # single quotes, a comment after\n\n\
             token = \"ztp_x\"\n[connect]\nvia = 'gw:9743'\ncert = \"/c.pem\"\n",
        )
        .unwrap();
        assert_eq!(f.server.as_deref(), Some("http://h:1"));
        assert_eq!(f.token.as_deref(), Some("ztp_x"));
        assert_eq!(f.via.as_deref(), Some("gw:9743"));
        assert_eq!(f.cert.as_deref(), Some("/c.pem"));
        let f = parse_file("[api]\nserver = \"https://a\"\napi_ca = 'ca.pem'\n").unwrap();
        assert_eq!(f.server.as_deref(), Some("https://a"));
        assert_eq!(f.api_ca.as_deref(), Some("ca.pem"));
        assert_eq!(parse_file("").unwrap(), FileValues::default());
    }

    #[test]
    fn config_file_errors_are_one_line_with_where() {
        for (text, needles) in [
            ("server = \"x\"\nsever = \"y\"\n", &["line 2", "sever"][..]),
            ("server = x\n", &["line 1"][..]),
            (
                "server = \"x\"\n[api]\nserver = \"y\"\n",
                &["server", "[api]"][..],
            ),
            ("[nope]\n", &["nope"][..]),
            ("server = \"unterminated\n", &["line 1"][..]),
        ] {
            let e = parse_file(text).unwrap_err();
            assert!(!e.contains('\n'), "{text:?}: {e:?}");
            for n in needles {
                assert!(e.contains(n), "{text:?}: {e:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn a_broken_file_matters_only_when_needed() {
        let dir = std::env::temp_dir().join(format!("ztpctl-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "server = http://nope\n").unwrap();
        // Everything given elsewhere: the file is only warned about.
        assert_eq!(
            file_or_warn(Some(&path), &[]).unwrap(),
            FileValues::default()
        );
        let e = file_or_warn(Some(&path), &["--server (or ZTP_SERVER)"])
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e:?}");
        assert!(
            e.contains("--server")
                && e.contains(&path.display().to_string())
                && e.contains("line 1"),
            "{e}"
        );
        // No file: no values, no error.
        let none = dir.join("absent.toml");
        assert_eq!(
            file_or_warn(Some(&none), &["x"]).unwrap(),
            FileValues::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
