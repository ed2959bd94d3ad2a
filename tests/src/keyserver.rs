//! A guard around the real `ztp-keyserver` binary (DESIGN.md "Keyless"), for tests where
//! a data plane signs through it (`ztp-dataplane --key keyless://127.0.0.1:PORT`).
//!
//! [`Keyserver::start`] writes, in a private temporary directory:
//! - `ca.pem`: the [`TestPki`]'s CA, the key server's `--client-ca` (node certificates
//!   from [`TestPki::node`] are admitted) and also the CA its own certificate chains to
//!   (give it to the data plane as `--keyless-ca`);
//! - `keyserver.pem`, `keyserver.key`: its certificate, for `DNS:localhost`,
//!   `IP:127.0.0.1` and `IP:::1`, issued by that CA;
//! - `keys/NAME.key` (mode 0600) and `keys/NAME.nodes` for each [`KeyFile`];
//!
//! and starts `ztp-keyserver` on `127.0.0.1:0` (client and admin ports) with JSON logs,
//! returning once both listeners are logged. The process is killed (SIGKILL) on drop; its
//! output is printed then if the test is failing, and checked for secrets
//! ([`crate::secret_lines`]) when it is not.
//!
//! The binary is located (and built once per test process) by [`crate::bins`];
//! `ZTP_KEYSERVER_BIN=PATH` runs another one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::bins::Bin;
use crate::pki::{TestCert, TestPki, OID_SUBJECT_ALT_NAME};
use crate::process::{Process, Stream};
use crate::tempdir::TempDir;

/// Bound on the key server's startup (until both listeners are logged) and on a reload.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A signing key to give the key server: `keys/NAME.key`, and `keys/NAME.nodes` when
/// `nodes` is `Some` (the node IDs allowed to use it; without the file, every node).
#[derive(Debug, Clone, Copy)]
pub struct KeyFile<'a> {
    /// The key's name (the file's stem; the `key` label of its metrics).
    pub name: &'a str,
    /// The private key, PEM (PKCS#8, SEC1 or PKCS#1), e.g. `pki.server.key_pem`.
    pub pem: &'a str,
    /// The node IDs of `NAME.nodes`, if any.
    pub nodes: Option<&'a [&'a str]>,
}

/// A running `ztp-keyserver` (see the module docs).
pub struct Keyserver {
    process: Process,
    dir: TempDir,
    addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl std::fmt::Debug for Keyserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyserver")
            .field("pid", &self.process.pid())
            .field("addr", &self.addr)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// The key server's certificate: `DNS:localhost`, `IP:127.0.0.1`, `IP:::1`, serverAuth.
pub fn keyserver_cert(pki: &TestPki) -> TestCert {
    // rcgen's SAN list is reached through the builder's raw extension: a SEQUENCE of
    // dNSName [2] and iPAddress [7] names.
    let mut names = vec![0x82, 9];
    names.extend_from_slice(b"localhost");
    names.extend_from_slice(&[0x87, 4, 127, 0, 0, 1]);
    names.extend_from_slice(&[0x87, 16]);
    names.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    let mut san = vec![0x30, names.len() as u8];
    san.extend_from_slice(&names);
    pki.builder()
        .cn("ztp-keyserver")
        .server_auth()
        .raw_extension(OID_SUBJECT_ALT_NAME, &san)
        .issue()
}

impl Keyserver {
    /// Starts a key server with `keys` (see the module docs), the standard flags and
    /// `extra_args` (which may override `--listen`, `--admin-listen` or add limits such
    /// as `--max-inflight`).
    ///
    /// # Panics
    /// If it does not log both listening addresses within [`STARTUP_TIMEOUT`] (its
    /// output is in the message).
    pub async fn start(pki: &TestPki, keys: &[KeyFile<'_>], extra_args: &[&str]) -> Keyserver {
        let dir = TempDir::new("keyserver");
        std::fs::write(dir.join("ca.pem"), &pki.ca_pem).expect("write ca.pem");
        keyserver_cert(pki)
            .write(dir.path(), "keyserver")
            .expect("write the key server's certificate");
        std::fs::create_dir(dir.join("keys")).expect("create keys/");
        let mut ks = KeysDir(dir.join("keys"));
        for k in keys {
            ks.write(k);
        }
        let mut cmd = Command::new(Bin::Keyserver.path());
        let has = |flag: &str| extra_args.iter().any(|a| a.split('=').next() == Some(flag));
        if !has("--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !has("--admin-listen") {
            cmd.args(["--admin-listen", "127.0.0.1:0"]);
        }
        cmd.arg("--cert")
            .arg(dir.join("keyserver.pem"))
            .arg("--key")
            .arg(dir.join("keyserver.key"))
            .arg("--client-ca")
            .arg(dir.join("ca.pem"))
            .arg("--keys")
            .arg(dir.join("keys"))
            .args(["--log-format", "json"])
            .args(extra_args)
            .env_remove("RUST_LOG");
        if let Some(filter) = std::env::var_os("ZTP_TESTS_RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let mut process = Process::spawn("ztp-keyserver", cmd);
        let addr_of = |line: &str| -> SocketAddr {
            let v: Value = serde_json::from_str(line).expect("a JSON log line");
            v["addr"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .expect("an addr field")
        };
        let is = |msg: &'static str| {
            move |l: &str| serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"] == msg)
        };
        let addr = addr_of(
            &process
                .wait_for_line(Stream::Stderr, is("listening"), STARTUP_TIMEOUT)
                .await,
        );
        let admin_addr = addr_of(
            &process
                .wait_for_line(Stream::Stderr, is("admin listening"), STARTUP_TIMEOUT)
                .await,
        );
        Keyserver {
            process,
            dir,
            addr: crate::dataplane::connectable(addr),
            admin_addr: crate::dataplane::connectable(admin_addr),
        }
    }

    /// Where clients connect (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `keyless://127.0.0.1:PORT`, for the data plane's `--key`.
    pub fn url(&self) -> String {
        format!("keyless://{}", self.addr)
    }

    /// The admin port (`/healthz`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The CA the key server's certificate chains to (the PKI's): `--keyless-ca`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The `--keys` folder.
    pub fn keys_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }

    /// Writes (or replaces) a key and its `.nodes` file (removed when `nodes` is
    /// `None`); the server reads it on the next [`Keyserver::reload`].
    pub fn write_key(&self, key: &KeyFile<'_>) {
        KeysDir(self.keys_dir()).write(key);
    }

    /// Removes `NAME.key` and `NAME.nodes`; the server forgets the key on the next
    /// [`Keyserver::reload`].
    pub fn remove_key(&self, name: &str) {
        for ext in ["key", "nodes"] {
            let _ = std::fs::remove_file(self.keys_dir().join(format!("{name}.{ext}")));
        }
    }

    /// Sends SIGHUP and waits for the reload's outcome: `true` if it was taken (a
    /// `reloaded` line), `false` if refused (the server logged why and kept its keys).
    ///
    /// # Panics
    /// If neither is logged within [`STARTUP_TIMEOUT`].
    pub async fn reload(&mut self) -> bool {
        let outcome = |v: &Value| {
            let m = v["message"].as_str().unwrap_or("");
            m == "reloaded"
                || m.starts_with("reload: ")
                || m == "reload failed; keeping the running keys and TLS files"
        };
        let before = self.logs().iter().filter(|v| outcome(v)).count();
        self.process.signal("HUP");
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            let done: Vec<Value> = self.logs().into_iter().filter(outcome).collect();
            if done.len() > before {
                // One reload logs its refusals before its end; the last line says.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let done: Vec<Value> = self.logs().into_iter().filter(outcome).collect();
                return done[before..].iter().all(|v| v["message"] == "reloaded");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ztp-keyserver did not log a reload within {STARTUP_TIMEOUT:?}; {}",
                self.process.output_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (a `kill` name: `HUP`, `TERM`, `STOP`, `CONT`...) by PID.
    pub fn signal(&mut self, signal: &str) {
        self.process.signal(signal);
    }

    /// Kills it with SIGKILL (as a crash would) and reaps it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Whether it has exited (and how).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.process.try_wait()
    }

    /// Its log lines so far, parsed (lines that are not JSON are left out).
    pub fn logs(&self) -> Vec<Value> {
        self.process
            .lines(Stream::Stderr)
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (bounded) for a log line matching `pred`.
    pub async fn wait_for_log<F>(&self, pred: F, bound: Duration) -> Option<Value>
    where
        F: Fn(&Value) -> bool,
    {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if let Some(v) = self.logs().into_iter().find(|v| pred(v)) {
                return Some(v);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The count of `ztp_keyserver_signatures_total` for `key` (all operations), read
    /// from `/metrics`.
    pub async fn signatures(&self, key: &str) -> u64 {
        let resp = crate::http::request(self.admin_addr, "GET", "/metrics", &[], None)
            .await
            .expect("GET /metrics");
        let prefix = format!("ztp_keyserver_signatures_total{{key=\"{key}\",");
        resp.text()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Keyserver {
    fn drop(&mut self) {
        self.process.kill();
        if !std::thread::panicking() {
            let leaked = crate::secret_lines(&self.process.lines(Stream::Stderr));
            assert!(
                leaked.is_empty(),
                "ztp-keyserver logged secrets: {leaked:?}"
            );
        }
    }
}

struct KeysDir(PathBuf);

impl KeysDir {
    fn write(&mut self, key: &KeyFile<'_>) {
        let path = self.0.join(format!("{}.key", key.name));
        crate::pki::write_private(&path, key.pem)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let nodes = self.0.join(format!("{}.nodes", key.name));
        match key.nodes {
            Some(ids) => {
                let mut text = String::from("# node IDs allowed to use this key\n");
                for id in ids {
                    text.push_str(id);
                    text.push('\n');
                }
                std::fs::write(&nodes, text).expect("write the .nodes file");
            }
            None => {
                let _ = std::fs::remove_file(&nodes);
            }
        }
    }
}

/// The key id of the key a certificate names (DESIGN.md "Keyless"): SHA-256 of the
/// certificate's SubjectPublicKeyInfo, DER. `None` if the certificate does not parse.
pub fn key_id_of_cert(cert_der: &[u8]) -> Option<[u8; 32]> {
    let spki = spki_of_cert(cert_der)?;
    Some(Sha256::digest(spki).into())
}

/// The SubjectPublicKeyInfo (whole TLV) of a DER certificate.
fn spki_of_cert(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, cert, _) = tlv(cert)?.0 else {
        return None;
    };
    let (0x30, mut tbs, _) = tlv(cert)?.0 else {
        return None;
    };
    // [0] version (optional), serial, signature, issuer, validity, subject, SPKI.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.0 .2;
    }
    for _ in 0..5 {
        tbs = tlv(tbs)?.0 .2;
    }
    let ((0x30, _, _), raw) = tlv(tbs)? else {
        return None;
    };
    Some(raw)
}

type Tlv<'a> = ((u8, &'a [u8], &'a [u8]), &'a [u8]);

/// One DER TLV: ((tag, contents, rest), the whole TLV).
fn tlv(b: &[u8]) -> Option<Tlv<'_>> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    let contents = rest.get(..len)?;
    let header = b.len() - rest.len();
    Some(((tag, contents, &rest[len..]), &b[..header + len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_of_cert_hashes_the_spki() {
        let pki = TestPki::new();
        let cert = pki.node("n1");
        // rcgen made the key: its public key, wrapped as an SPKI, is what is hashed.
        let key = rcgen::KeyPair::from_pem(&cert.key_pem).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let want: [u8; 32] = Sha256::digest(&spki).into();
        assert_eq!(key_id_of_cert(&cert.cert_der), Some(want));
        assert_eq!(key_id_of_cert(b"junk"), None);
    }
}
