//! A guard around the real `ztp-dataplane` binary, running from a snapshot file
//! ([`Dataplane::start`]) or subscribed to a control plane ([`Dataplane::start_control`]).
//!
//! The binary is located (and built once per test process) by [`crate::bins`];
//! `ZTP_TESTS_NO_BUILD=1` uses an existing binary as it is, `ZTP_DATAPLANE_BIN=PATH` another
//! binary altogether.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bins::{run_bounded_with, Bin};
use crate::http;
use crate::pki::TestPki;
use crate::tempdir::TempDir;

/// Bound on the data plane's startup (until both listeners are logged).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on a one-shot run such as `--check`.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(20);

pub use crate::bins::workspace_root;

/// The path of the `ztp-dataplane` binary (see [`crate::bins`]).
///
/// # Panics
/// If the binary is missing and cannot be built.
pub fn dataplane_bin() -> PathBuf {
    Bin::Dataplane.path()
}

/// Runs `ztp-dataplane ARGS` to completion, bounded by `bound`.
///
/// # Panics
/// If the process cannot be started or is still running after `bound` (it is killed).
pub fn run_bounded<I, S>(args: I, bound: Duration) -> Output
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    run_bounded_with(Bin::Dataplane, args, &[], bound)
}

/// Runs `ztp-dataplane --check FILE` (bounded by [`RUN_TIMEOUT`]).
///
/// The contract: exit 0 and `ok` on stdout for a valid file; exit 1 and stderr lines naming
/// the offending field (e.g. `services[0].address: ...`) for an invalid one.
pub fn check(file: &Path) -> Output {
    run_bounded(
        [OsString::from("--check"), file.as_os_str().to_owned()],
        RUN_TIMEOUT,
    )
}

/// A running `ztp-dataplane` on loopback ephemeral ports, killed (by its `Child`) on drop.
///
/// It runs in a private temporary directory holding `ca.pem`, `server.pem`, `server.key`
/// and `snapshot.yaml` (or, subscribed to a control plane, `node.pem` and `node.key`
/// instead of the snapshot), with `--log-format json`; every stdout and stderr line is
/// kept. `RUST_LOG` is removed from its environment (set `ZTP_TESTS_RUST_LOG` to pass one).
pub struct Dataplane {
    child: Child,
    dir: TempDir,
    node_id: Option<String>,
    addr: SocketAddr,
    listen_addr: SocketAddr,
    admin_addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

/// Whether `args` set `flag` (as `--flag VALUE` or `--flag=VALUE`).
fn has_flag(args: &[&str], flag: &str) -> bool {
    args.iter()
        .any(|a| *a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
}

/// The address a client on this host connects to for a listener bound to `bound`: a
/// wildcard (`[::]` dual-stack, or `0.0.0.0`) becomes `127.0.0.1` with the same port.
pub fn connectable(bound: SocketAddr) -> SocketAddr {
    if bound.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], bound.port()))
    } else {
        // `[::ffff:127.0.0.1]` is reached as 127.0.0.1.
        SocketAddr::new(bound.ip().to_canonical(), bound.port())
    }
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pid", &self.child.id())
            .field("addr", &self.addr)
            .field("listen_addr", &self.listen_addr)
            .field("admin_addr", &self.admin_addr)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Dataplane {
    /// Writes `pki`'s files and `snapshot_yaml` into a fresh temporary directory and starts
    /// the data plane there with the standard flags plus `extra_args`.
    ///
    /// The standard flags include `--listen 127.0.0.1:0`, `--admin-listen 127.0.0.1:0` and
    /// `--key server.key` unless `extra_args` set that flag themselves (e.g. `["--listen",
    /// "[::1]:0"]`, or `["--key", "keyless://…"]`).
    ///
    /// # Panics
    /// If it does not log both listening addresses within [`STARTUP_TIMEOUT`] (the logs
    /// are in the panic message).
    pub async fn start(pki: &TestPki, snapshot_yaml: &str, extra_args: &[&str]) -> Dataplane {
        let dir = TempDir::new("dataplane");
        pki.write_files(dir.path()).expect("write PKI files");
        Self::start_in(dir, snapshot_yaml, extra_args).await
    }

    /// Like [`Dataplane::start`] in a directory that already holds `ca.pem`,
    /// `server.pem` and `server.key` (e.g. made with the openssl CLI).
    pub async fn start_in(dir: TempDir, snapshot_yaml: &str, extra_args: &[&str]) -> Dataplane {
        std::fs::write(dir.join("snapshot.yaml"), snapshot_yaml).expect("write snapshot.yaml");
        let source = [
            OsString::from("--snapshot"),
            dir.join("snapshot.yaml").into_os_string(),
        ];
        Self::spawn(dir, None, &source, extra_args).await
    }

    /// Starts a data plane subscribed to the control plane at `control_url` (e.g.
    /// `https://localhost:PORT`, see [`crate::Control::grpc_url`]) instead of a snapshot
    /// file: node certificate `pki.node(node_id)` (URI SAN
    /// `spiffe://ztp.internal/node/NODE_ID`), `--control-ca` the PKI's CA, and the standard
    /// flags plus `extra_args` as in [`Dataplane::start`].
    ///
    /// It returns once both listeners are logged; until its first snapshot `/readyz`
    /// answers 503 and no service exists: see [`Dataplane::wait_ready`].
    pub async fn start_control(
        pki: &TestPki,
        control_url: &str,
        node_id: &str,
        extra_args: &[&str],
    ) -> Dataplane {
        let dir = TempDir::new("dataplane");
        pki.write_files(dir.path()).expect("write PKI files");
        pki.node(node_id)
            .write(dir.path(), "node")
            .expect("write the node certificate");
        let source = [
            OsString::from("--control"),
            OsString::from(control_url),
            OsString::from("--node-cert"),
            dir.join("node.pem").into_os_string(),
            OsString::from("--node-key"),
            dir.join("node.key").into_os_string(),
            OsString::from("--control-ca"),
            dir.join("ca.pem").into_os_string(),
        ];
        Self::spawn(dir, Some(node_id.to_string()), &source, extra_args).await
    }

    async fn spawn(
        dir: TempDir,
        node_id: Option<String>,
        source_args: &[OsString],
        extra_args: &[&str],
    ) -> Dataplane {
        let mut cmd = Command::new(dataplane_bin());
        cmd.current_dir(dir.path());
        if !has_flag(extra_args, "--listen") {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        if !has_flag(extra_args, "--admin-listen") {
            cmd.arg("--admin-listen").arg("127.0.0.1:0");
        }
        if !has_flag(extra_args, "--key") {
            cmd.arg("--key").arg(dir.join("server.key"));
        }
        cmd.arg("--cert")
            .arg(dir.join("server.pem"))
            .arg("--client-ca")
            .arg(dir.join("ca.pem"))
            .args(source_args)
            .arg("--log-format")
            .arg("json")
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        if let Some(filter) = std::env::var_os("ZTP_TESTS_RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let mut child = cmd.spawn().expect("spawn ztp-dataplane");
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect_lines(child.stderr.take().expect("stderr"), lines.clone());
        collect_lines(child.stdout.take().expect("stdout"), lines.clone());

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let (listen_addr, admin_addr) = loop {
            let found = {
                let lines = lines.lock().expect("log lock");
                let find = |msg: &str| {
                    lines
                        .iter()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                        .find(|v| v["message"] == msg)
                        .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()))
                };
                (find("listening"), find("admin listening"))
            };
            if let (Some(a), Some(b)) = found {
                break (a, b);
            }
            let exited: Option<ExitStatus> = child.try_wait().expect("try_wait");
            if exited.is_some() || Instant::now() > deadline {
                if exited.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                // Give the reader threads a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                let logs = lines.lock().expect("log lock").join("\n");
                panic!(
                    "ztp-dataplane did not log `listening` and `admin listening` \
                     (exit: {exited:?}, waited up to {STARTUP_TIMEOUT:?}); output:\n{logs}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Dataplane {
            child,
            dir,
            node_id,
            addr: connectable(listen_addr),
            listen_addr,
            admin_addr: connectable(admin_addr),
            lines,
        }
    }

    /// Runs `ztp-dataplane --check FILE`; the same as [`check`].
    pub fn check(file: &Path) -> Output {
        check(file)
    }

    /// The address clients connect to: the TLS listener's address, with a wildcard
    /// (`[::]:PORT`, `0.0.0.0:PORT`) replaced by `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS listener's address as the data plane logged it (e.g. `[::]:PORT`).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// The admin (health, metrics) listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The node id, for a data plane started with [`Dataplane::start_control`].
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// The status of `GET /readyz` on the admin listener (200: it holds a snapshot; 503:
    /// not yet).
    ///
    /// # Errors
    /// If the request fails or is not answered within [`http::REQUEST_TIMEOUT`].
    pub async fn readyz(&self) -> std::io::Result<u16> {
        http::request(self.admin_addr, "GET", "/readyz", &[], None)
            .await
            .map(|r| r.status)
    }

    /// Waits (polling, bounded by `bound`) until `/readyz` answers 200; `false` if it does
    /// not within `bound` or the process exited.
    pub async fn wait_ready(&mut self, bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if matches!(self.readyz().await, Ok(200)) {
                return true;
            }
            if self.try_wait().is_some() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The working directory (holding the PKI files and `snapshot.yaml`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The snapshot file the data plane was started with.
    pub fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.yaml")
    }

    /// Every output line so far, verbatim.
    pub fn raw_logs(&self) -> Vec<String> {
        self.lines.lock().expect("log lock").clone()
    }

    /// Every output line so far, parsed as JSON (a line that is not JSON becomes a JSON
    /// string).
    pub fn logs(&self) -> Vec<Value> {
        self.raw_logs()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.clone())))
            .collect()
    }

    /// Waits (polling, bounded by `bound`) for a log line matching `pred`.
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

    /// Waits (bounded) for the `connection` event of the client whose local address is
    /// `client_addr`.
    pub async fn wait_for_connection_event(
        &self,
        client_addr: SocketAddr,
        bound: Duration,
    ) -> Option<Value> {
        let want = client_addr.to_string();
        self.wait_for_log(
            |v| v["message"] == "connection" && v["client.addr"] == want.as_str(),
            bound,
        )
        .await
    }

    /// Replaces `snapshot.yaml` and sends SIGHUP (via `kill -HUP <pid>` on this child's
    /// pid) so that the data plane reloads it.
    pub fn reload_snapshot(&self, snapshot_yaml: &str) {
        std::fs::write(self.snapshot_path(), snapshot_yaml).expect("write snapshot.yaml");
        self.sighup();
    }

    /// Sends SIGHUP to this data plane (by its pid).
    pub fn sighup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill -HUP");
        assert!(status.success(), "kill -HUP {} failed", self.child.id());
    }

    /// Whether the process has exited (and with what status).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (a `kill` signal name such as `TERM`) to this child's pid, unless it
    /// has already exited and been reaped (its pid could be reused).
    ///
    /// # Panics
    /// If it is still running and `kill` fails.
    pub fn signal(&mut self, signal: &str) {
        if self.try_wait().is_some() {
            return;
        }
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(&pid)
            .status()
            .expect("run kill");
        assert!(
            status.success() || self.try_wait().is_some(),
            "kill -{signal} {pid} failed"
        );
    }

    /// Sends SIGTERM (DESIGN.md: the data plane stops accepting and drains).
    pub fn terminate(&mut self) {
        self.signal("TERM");
    }

    /// Waits (polling, bounded by `bound`) for the process to exit; `None` if it is still
    /// running then (it is not killed: the guard does that on drop).
    pub async fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
            let secrets = crate::secret_lines(&lines);
            assert!(
                secrets.is_empty(),
                "ztp-dataplane logged secret material: {secrets:?}"
            );
        }
        if std::thread::panicking() {
            let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
            let tail = lines.len().saturating_sub(60);
            eprintln!(
                "---- ztp-dataplane output (last {} lines) ----\n{}\n----",
                lines.len() - tail,
                lines[tail..].join("\n")
            );
        }
    }
}

/// Appends every line `r` yields to `into` (from a thread of its own, until EOF).
pub(crate) fn collect_lines<R: Read + Send + 'static>(r: R, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if let Ok(mut v) = into.lock() {
                        v.push(line);
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{connectable, has_flag};
    use std::net::SocketAddr;

    #[test]
    fn flags_and_connectable_addresses() {
        assert!(has_flag(&["--listen", "[::1]:0"], "--listen"));
        assert!(has_flag(&["--listen=[::1]:0"], "--listen"));
        assert!(!has_flag(&["--listen-x", "a"], "--listen"));
        assert!(!has_flag(&["--admin-listen", "a"], "--listen"));
        let c = |s: &str| connectable(s.parse::<SocketAddr>().unwrap()).to_string();
        assert_eq!(c("[::]:9743"), "127.0.0.1:9743");
        assert_eq!(c("0.0.0.0:5"), "127.0.0.1:5");
        assert_eq!(c("[::1]:5"), "[::1]:5");
        assert_eq!(c("127.0.0.1:5"), "127.0.0.1:5");
    }
}
