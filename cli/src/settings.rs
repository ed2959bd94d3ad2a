//! Where the control plane is and the admin token: flags, then `ZTP_SERVER`,
//! `ZTP_TOKEN`, `ZTP_API_CA`, then `~/.config/ztp/config.toml`, then the default server
//! `http://127.0.0.1:9780`. For `connect`, the same for the gateway and the user's
//! files: `ZTP_VIA`, `ZTP_CERT`, `ZTP_KEY`, `ZTP_CA` and the keys `via`, `cert`,
//! `key`, `ca`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

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

/// The config file's keys: `server`, `token`, `api_ca`, each `key = "value"`.
#[derive(Debug, Default, PartialEq, Eq)]
struct FileSettings {
    server: Option<String>,
    token: Option<String>,
    api_ca: Option<String>,
    via: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
}

fn parse_file(path: &Path, text: &str) -> anyhow::Result<FileSettings> {
    let mut f = FileSettings::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("{}:{}: expected key = \"value\"", path.display(), n + 1);
        let (k, v) = line.split_once('=').with_context(bad)?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .with_context(bad)?
            .to_owned();
        match k.trim() {
            "server" => f.server = Some(v),
            "token" => f.token = Some(v),
            "api_ca" => f.api_ca = Some(v),
            "via" => f.via = Some(v),
            "cert" => f.cert = Some(v),
            "key" => f.key = Some(v),
            "ca" => f.ca = Some(v),
            other => bail!(
                "{}:{}: unknown key {other:?} (known: server, token, api_ca, via, cert, key, ca)",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(f)
}

fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ztp").join("config.toml"))
}

pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    api_ca: Option<PathBuf>,
) -> anyhow::Result<Settings> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let file = match config_path() {
        Some(p) if p.exists() => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            parse_file(&p, &text)?
        }
        _ => FileSettings::default(),
    };
    Ok(Settings {
        server: server
            .or_else(|| env("ZTP_SERVER"))
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
        token: token.or_else(|| env("ZTP_TOKEN")).or(file.token),
        api_ca: api_ca
            .or_else(|| env("ZTP_API_CA").map(PathBuf::from))
            .or(file.api_ca.map(PathBuf::from)),
        via: env("ZTP_VIA").or(file.via),
        cert: env("ZTP_CERT")
            .map(PathBuf::from)
            .or(file.cert.map(PathBuf::from)),
        key: env("ZTP_KEY")
            .map(PathBuf::from)
            .or(file.key.map(PathBuf::from)),
        ca: env("ZTP_CA")
            .map(PathBuf::from)
            .or(file.ca.map(PathBuf::from)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file() {
        let p = Path::new("config.toml");
        let f = parse_file(p, "# ztp\nserver = \"http://h:1\"\n\ntoken = \"ztp_x\"\n").unwrap();
        assert_eq!(f.server.as_deref(), Some("http://h:1"));
        assert_eq!(f.token.as_deref(), Some("ztp_x"));
        let e = parse_file(p, "sever = \"x\"").unwrap_err().to_string();
        assert!(e.contains("config.toml:1") && e.contains("sever"), "{e}");
        assert!(parse_file(p, "server = x").is_err());
    }
}
