//! A guard around the real `ztp-control` binary, and the `ztpctl` runner.
//!
//! [`Control::start`] runs a control plane on loopback ephemeral ports with a fresh store
//! (or, [`Control::start_with`], a given data folder) and its gRPC config stream on
//! (the [`TestPki`] server certificate, whose SANs include `localhost`, and the PKI's CA as
//! `--node-ca`). It learns the API and gRPC addresses from the JSON logs (`api listening`,
//! `grpc listening`) and reads the admin token from `DATA/admin-token`.
//! [`Control::kill9`] SIGKILLs it; [`Control::restart`] starts it again on the same data
//! folder and the same ports, so that data planes find it where they left it (the ports
//! were free a moment ago; another process could take one in between, which the restart
//! then reports).
//!
//! [`Control::api`] and friends speak raw HTTP/1.1 to the REST API with the admin token
//! ([`crate::http`]); [`Control::ztpctl`] runs the CLI with `ZTP_SERVER` and `ZTP_TOKEN`
//! set.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bins::Bin;
use crate::dataplane::collect_lines;
use crate::http::{self, HttpResponse};
use crate::pki::TestPki;
use crate::tempdir::TempDir;

/// Bound on the control plane's startup (until its listeners are logged).
pub const CONTROL_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on one `ztpctl` run.
pub const ZTPCTL_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start a control plane (see [`Control::start_with`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct ControlOptions<'a> {
    /// The data folder; `None`: `data/` in a fresh temporary directory (created by
    /// `ztp-control` itself).
    pub data_dir: Option<&'a Path>,
    /// Leave the gRPC config stream off (no `--grpc-cert`, `--grpc-key`, `--node-ca`).
    pub no_grpc: bool,
    /// Extra flags. `--api-listen` and `--grpc-listen` given here replace the harness's
    /// `127.0.0.1:0`.
    pub args: &'a [&'a str],
    /// An admin token put in the data folder before the start: an instance joining a
    /// shared store (`--store etcd`) that another initialized writes none of its own.
    pub admin_token: Option<&'a str>,
}

/// A running `ztp-control` on loopback, killed (by its `Child`) on drop.
///
/// It runs with `--log-format json`; every output line of every run is kept. `RUST_LOG`
/// is removed from its environment (set `ZTP_TESTS_RUST_LOG` to pass one).
pub struct Control {
    child: Option<Child>,
    root: TempDir,
    data_dir: PathBuf,
    grpc: bool,
    extra_args: Vec<String>,
    api_addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    token: String,
    /// Each run's output lines, oldest run first.
    runs: Vec<Arc<Mutex<Vec<String>>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("api_addr", &self.api_addr)
            .field("grpc_addr", &self.grpc_addr)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Whether `args` set `flag` (as `--flag VALUE` or `--flag=VALUE`).
fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for a query value).
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Control {
    /// A control plane with a fresh store and the gRPC stream on, with `pki`'s server
    /// certificate and CA.
    pub async fn start(pki: &TestPki) -> Control {
        Self::start_with(pki, ControlOptions::default()).await
    }

    /// Two instances on one shared store (`args`: its `--store` flags), the gRPC stream
    /// on: the first initializes the store and writes the admin token; the second joins
    /// it with that token (it writes none of its own).
    pub async fn start_pair(pki: &TestPki, args: &[&str]) -> (Control, Control) {
        let first = Self::start_with(
            pki,
            ControlOptions {
                args,
                ..Default::default()
            },
        )
        .await;
        let second = Self::start_with(
            pki,
            ControlOptions {
                args,
                admin_token: Some(first.token()),
                ..Default::default()
            },
        )
        .await;
        (first, second)
    }

    /// A control plane with a fresh store and the REST API only (no gRPC stream).
    pub async fn start_api_only(pki: &TestPki) -> Control {
        Self::start_with(
            pki,
            ControlOptions {
                no_grpc: true,
                ..Default::default()
            },
        )
        .await
    }

    /// A control plane as `opts` say.
    ///
    /// # Panics
    /// If it does not log its listeners within [`CONTROL_STARTUP_TIMEOUT`] (the logs are
    /// in the message), or the admin token cannot be read.
    pub async fn start_with(pki: &TestPki, opts: ControlOptions<'_>) -> Control {
        let root = TempDir::new("control");
        pki.server
            .write(root.path(), "grpc")
            .expect("write the gRPC certificate");
        std::fs::write(root.join("node-ca.pem"), &pki.ca_pem).expect("write node-ca.pem");
        std::fs::create_dir_all(root.join("xdg")).expect("create the ztpctl config home");
        let data_dir = opts
            .data_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.join("data"));
        if let Some(token) = opts.admin_token {
            std::fs::create_dir_all(&data_dir).expect("create the data folder");
            std::fs::write(data_dir.join("admin-token"), format!("{token}\n"))
                .expect("write the admin token");
        }
        let mut control = Control {
            child: None,
            root,
            data_dir,
            grpc: !opts.no_grpc,
            extra_args: opts.args.iter().map(|a| a.to_string()).collect(),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_addr: if opts.no_grpc {
                None
            } else {
                Some(SocketAddr::from(([127, 0, 0, 1], 0)))
            },
            token: String::new(),
            runs: Vec::new(),
        };
        control.spawn().await;
        control
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(Bin::Control.path());
        cmd.current_dir(self.root.path())
            .arg("--data-dir")
            .arg(&self.data_dir);
        if !has_flag(&self.extra_args, "--api-listen") {
            cmd.arg("--api-listen").arg(self.api_addr.to_string());
        }
        if let Some(grpc) = self.grpc_addr {
            if !has_flag(&self.extra_args, "--grpc-listen") {
                cmd.arg("--grpc-listen").arg(grpc.to_string());
            }
            cmd.arg("--grpc-cert")
                .arg(self.root.join("grpc.pem"))
                .arg("--grpc-key")
                .arg(self.root.join("grpc.key"))
                .arg("--node-ca")
                .arg(self.root.join("node-ca.pem"));
        }
        cmd.arg("--log-format")
            .arg("json")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        if let Some(filter) = std::env::var_os("ZTP_TESTS_RUST_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let mut child = cmd.spawn().expect("spawn ztp-control");
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect_lines(child.stderr.take().expect("stderr"), lines.clone());
        collect_lines(child.stdout.take().expect("stdout"), lines.clone());
        self.runs.push(lines.clone());

        let deadline = Instant::now() + CONTROL_STARTUP_TIMEOUT;
        let (api, grpc) = loop {
            let found = {
                let lines = lines.lock().expect("log lock");
                let find = |msg: &str| -> Option<SocketAddr> {
                    lines
                        .iter()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                        .find(|v| v["message"] == msg)
                        .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()))
                };
                (find("api listening"), find("grpc listening"))
            };
            match found {
                (Some(api), grpc) if grpc.is_some() || !self.grpc => break (api, grpc),
                _ => {}
            }
            let exited: Option<ExitStatus> = child.try_wait().expect("try_wait");
            if exited.is_some() || Instant::now() > deadline {
                if exited.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                std::thread::sleep(Duration::from_millis(100));
                let logs = lines.lock().expect("log lock").join("\n");
                panic!(
                    "ztp-control did not log `api listening`{} (exit: {exited:?}, waited up \
                     to {CONTROL_STARTUP_TIMEOUT:?}); output:\n{logs}",
                    if self.grpc {
                        " and `grpc listening`"
                    } else {
                        ""
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.child = Some(child);
        self.api_addr = api;
        self.grpc_addr = grpc;
        let token_path = self.data_dir.join("admin-token");
        self.token = std::fs::read_to_string(&token_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", token_path.display()))
            .trim()
            .to_string();
    }

    /// The REST API's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The REST API's URL, `http://127.0.0.1:PORT` (what `ZTP_SERVER` is set to).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// The gRPC config stream's address.
    ///
    /// # Panics
    /// If the stream is off.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr.expect("the gRPC stream is off")
    }

    /// The URL data planes subscribe to: `https://localhost:PORT` (the server certificate
    /// names `localhost`).
    pub fn grpc_url(&self) -> String {
        format!("https://localhost:{}", self.grpc_addr().port())
    }

    /// The admin token read from `DATA/admin-token`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process id of the current run, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the current run has exited (and with what status); `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills the process with SIGKILL (by its `Child`) and reaps it. A no-op if it is not
    /// running.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Sends SIGTERM (via `kill -TERM <pid>`) to the current run, if it still runs.
    pub fn terminate(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }

    /// Waits (polling, bounded) for the current run to exit.
    pub async fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the control plane again on the same data folder, API port and gRPC port
    /// (SIGKILLing the current run first if it still runs), and re-reads the token.
    ///
    /// # Panics
    /// As [`Control::start_with`]; e.g. if a port was taken in between.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Every output line so far (earlier runs first), verbatim.
    pub fn raw_logs(&self) -> Vec<String> {
        self.runs
            .iter()
            .flat_map(|r| r.lock().map(|l| l.clone()).unwrap_or_default())
            .collect()
    }

    /// Every output line so far, parsed as JSON (a line that is not JSON becomes a JSON
    /// string).
    pub fn logs(&self) -> Vec<Value> {
        self.raw_logs()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.clone())))
            .collect()
    }

    /// Sends a request to the API with the admin token (`Authorization: Bearer`).
    ///
    /// # Errors
    /// As [`http::request`]: the request was not answered completely.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<HttpResponse> {
        self.request_as(Some(&self.token), method, path, headers, body)
            .await
    }

    /// Sends a request with the given bearer token (`None`: no `Authorization` header).
    ///
    /// # Errors
    /// As [`http::request`].
    pub async fn request_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<HttpResponse> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = Vec::with_capacity(headers.len() + 1);
        if let Some(a) = &auth {
            all.push(("Authorization", a));
        }
        all.extend_from_slice(headers);
        http::request(self.api_addr, method, path, &all, body).await
    }

    /// Sends a request with the admin token and a JSON body (if any).
    ///
    /// # Panics
    /// If the request is not answered completely.
    pub async fn api(&self, method: &str, path: &str, json: Option<&Value>) -> HttpResponse {
        let body = json.map(|v| serde_json::to_vec(v).expect("serialize JSON"));
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        self.request(method, path, headers, body.as_deref())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `GET path`, expecting 200 and JSON.
    ///
    /// # Panics
    /// On any other answer.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.api("GET", path, None).await;
        assert_eq!(r.status, 200, "GET {path}: {r}");
        r.json()
    }

    /// Every item of a collection (`services`, `users`, `groups`), following `next`
    /// cursors 1000 at a time.
    pub async fn list_all(&self, collection: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let path = match &cursor {
                None => format!("/v1/{collection}?limit=1000"),
                Some(c) => format!("/v1/{collection}?limit=1000&cursor={}", query_escape(c)),
            };
            let page = self.get_json(&path).await;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next"].as_str() {
                Some(next) if !next.is_empty() => cursor = Some(next.to_string()),
                _ => return items,
            }
        }
        panic!("/v1/{collection}: more than 10,000 pages");
    }

    /// The current config version (the `ETag` of a one-item group list).
    pub async fn config_version(&self) -> u64 {
        let r = self.api("GET", "/v1/groups?limit=1", None).await;
        assert_eq!(r.status, 200, "GET /v1/groups?limit=1: {r}");
        r.etag_version()
            .unwrap_or_else(|| panic!("no numeric ETag on GET /v1/groups: {r}"))
    }

    /// The items of `GET /v1/nodes`.
    pub async fn nodes(&self) -> Vec<Value> {
        self.get_json("/v1/nodes").await["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs `ztpctl ARGS` against this control plane (`ZTP_SERVER` and `ZTP_TOKEN` set, a
    /// private `XDG_CONFIG_HOME`), bounded by [`ZTPCTL_TIMEOUT`].
    ///
    /// # Panics
    /// If it cannot be started or does not finish in time (it is killed).
    pub async fn ztpctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.ztpctl_env(args, &[]).await
    }

    /// [`Control::ztpctl`] with extra environment variables (e.g. another `ZTP_TOKEN`).
    pub async fn ztpctl_env<I, S>(&self, args: I, envs: &[(&str, &str)]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let mut cmd = tokio::process::Command::new(Bin::Ztpctl.path());
        cmd.args(&args)
            .env("ZTP_SERVER", self.api_url())
            .env("ZTP_TOKEN", &self.token)
            .env("XDG_CONFIG_HOME", self.root.join("xdg"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        match tokio::time::timeout(ZTPCTL_TIMEOUT, cmd.output()).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("run ztpctl {args:?}: {e}")),
            Err(_) => panic!("ztpctl {args:?} did not finish within {ZTPCTL_TIMEOUT:?}"),
        }
    }

    /// Runs `ztpctl ARGS` and expects success; returns its stdout.
    ///
    /// # Panics
    /// If it fails (its output is in the message).
    pub async fn ztpctl_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let out = self.ztpctl(args.clone()).await;
        assert!(
            out.status.success(),
            "ztpctl {args:?} failed ({}): stdout {:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ztpctl -o json ARGS`, expects success and parses stdout.
    pub async fn ztpctl_json<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut all: Vec<OsString> = vec!["-o".into(), "json".into()];
        all.extend(args.into_iter().map(Into::into));
        let text = self.ztpctl_ok(all.clone()).await;
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("ztpctl {all:?}: stdout is not JSON ({e}): {text}"))
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let secrets = crate::secret_lines(&self.raw_logs());
            assert!(
                secrets.is_empty(),
                "ztp-control logged secret material: {secrets:?}"
            );
        }
        if std::thread::panicking() {
            let lines = self.raw_logs();
            let tail = lines.len().saturating_sub(60);
            eprintln!(
                "---- ztp-control output (last {} lines) ----\n{}\n----",
                lines.len() - tail,
                lines[tail..].join("\n")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{has_flag, query_escape};

    #[test]
    fn flags_and_query_escaping() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(has_flag(&v(&["--api-listen", "x"]), "--api-listen"));
        assert!(has_flag(&v(&["--api-listen=x"]), "--api-listen"));
        assert!(!has_flag(&v(&["--api-listen-x"]), "--api-listen"));
        assert_eq!(query_escape("a.b-c_~"), "a.b-c_~");
        assert_eq!(query_escape("*.svc/x y"), "%2A.svc%2Fx%20y");
    }
}
