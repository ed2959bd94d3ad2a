//! Outside programs in the tests: finding them (and skipping or failing when one is
//! missing), free loopback ports, a guard around a long-running process (a server such as
//! `sshd`, `dnsmasq`, `redis-server`, or `ztpctl connect`/`ztpctl up`), and bounded
//! one-shot runs of a client (`ssh`, `dig`, `redis-cli`, `sh -c`).
//!
//! `ZTP_REQUIRE_TOOLS=1` (set by `.ci/run`, which installs the tools) turns a missing tool
//! into a failure; without it a test that needs a missing tool is skipped, and says so
//! where `cargo test` shows it (see [`skip`]).
//!
//! libtest has no runtime skip: a test that returns early is reported `ok`. It captures
//! what a passing test prints with `print!`/`eprint!` and drops it, so a note printed that
//! way is never seen. The capture works by swapping the target of those macros only;
//! bytes written to the process's standard error through [`std::io::stderr`]'s `Write`
//! reach the terminal (or CI log) as they are, between libtest's `test … ok` lines. So a
//! skip writes one `SKIPPED` line that way, naming the test, the missing tool and the
//! package to install. (Under cargo-nextest, which captures per process, the line shows
//! with `--no-capture` or `--success-output immediate`.)

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dataplane::collect_lines;

/// Set (to anything but `0` or empty) to fail, rather than skip, a test whose tool is
/// missing.
pub const REQUIRE_TOOLS_ENV: &str = "ZTP_REQUIRE_TOOLS";

/// Folders searched after `PATH`: daemons live in sbin, which a user's `PATH` may lack.
const SBIN: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The path of the executable `name`, from `PATH` or the sbin folders.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether [`REQUIRE_TOOLS_ENV`] asks for missing tools to fail the test.
pub fn tools_required() -> bool {
    std::env::var_os(REQUIRE_TOOLS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The Debian package that provides `tool` (what `.ci/run` installs), if known.
pub fn package_of(tool: &str) -> Option<&'static str> {
    Some(match tool {
        "openssl" => "openssl",
        "ssh" | "ssh-keygen" => "openssh-client",
        "sshd" => "openssh-server",
        "dig" => "dnsutils",
        "dnsmasq" => "dnsmasq",
        "redis-server" => "redis-server",
        "redis-cli" => "redis-tools",
        _ => return None,
    })
}

/// Reports that `test` did not run, for `reason`, where `cargo test` shows it: one line
/// `SKIPPED test: reason` written straight to the process's standard error (past
/// libtest's capture, see the module docs), also kept with the captured output for a
/// runner that shows it. The caller then returns: libtest will still say `ok`.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let line = format!("SKIPPED {test}: {reason}\n");
    // `eprint!` is captured (shown only if the test fails); the `Write` handle is not.
    eprint!("{line}");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The paths of `names`, in order; `None` if one is missing, after a visible `SKIPPED`
/// line (see [`skip`]) naming the missing tools and how to install them, so the caller
/// returns.
///
/// # Panics
/// If one is missing and [`REQUIRE_TOOLS_ENV`] is set.
pub fn require_tools(test: &str, names: &[&str]) -> Option<Vec<PathBuf>> {
    let found: Vec<Option<PathBuf>> = names.iter().map(|n| find_tool(n)).collect();
    let missing: Vec<&str> = names
        .iter()
        .zip(&found)
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        return Some(found.into_iter().flatten().collect());
    }
    let mut packages: Vec<&str> = missing.iter().filter_map(|t| package_of(t)).collect();
    packages.dedup();
    let install = if packages.is_empty() {
        "install them".to_owned()
    } else {
        format!("install with `apt-get install {}`", packages.join(" "))
    };
    assert!(
        !tools_required(),
        "{test}: missing {missing:?} (not on PATH nor in sbin), and {REQUIRE_TOOLS_ENV} is \
         set; {install}, or run `.ci/run`, which installs them"
    );
    skip(
        test,
        &format!(
            "missing {} (not on PATH nor in sbin); {install} (`.ci/run` does), or set \
             {REQUIRE_TOOLS_ENV}=1 to fail instead",
            missing.join(", ")
        ),
    );
    None
}

/// The path of `name` (see [`require_tools`]).
///
/// # Panics
/// If it is missing and [`REQUIRE_TOOLS_ENV`] is set.
pub fn require_tool(test: &str, name: &str) -> Option<PathBuf> {
    require_tools(test, &[name]).and_then(|mut v| v.pop())
}

/// A `python3` that can import `module` (installed from PyPI as `package`); `None`
/// after a visible `SKIPPED` line when there is none.
///
/// # Panics
/// If it is missing and [`REQUIRE_TOOLS_ENV`] is set.
pub fn require_python_module(test: &str, module: &str, package: &str) -> Option<PathBuf> {
    let python = find_tool("python3");
    let importable = python.as_ref().is_some_and(|p| {
        std::process::Command::new(p)
            .args(["-c", &format!("import {module}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if importable {
        return python;
    }
    assert!(
        !tools_required(),
        "{test}: python3 cannot import {module}, and {REQUIRE_TOOLS_ENV} is set; install \
         it with `pip install {package}`, or run `.ci/run`, which does"
    );
    skip(
        test,
        &format!(
            "python3 cannot import {module}; `pip install {package}` (`.ci/run` does), or \
             set {REQUIRE_TOOLS_ENV}=1 to fail instead"
        ),
    );
    None
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then dropped).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A UDP port on 127.0.0.1 that was free a moment ago (bound to port 0, then dropped).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("bind udp 127.0.0.1:0")
}

/// A port on 127.0.0.1 free for both UDP and TCP a moment ago, for a server that binds
/// both (dnsmasq). Chosen below the kernel's ephemeral range (32768 and up), where an
/// outgoing connection of another test could take the TCP side in the meantime.
pub fn free_udp_tcp_port() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    for i in 0..2000u32 {
        let port = 20_000 + (seed.wrapping_add(i.wrapping_mul(7919)) % 12_000) as u16;
        let udp = UdpSocket::bind(("127.0.0.1", port));
        let tcp = TcpListener::bind(("127.0.0.1", port));
        if udp.is_ok() && tcp.is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1 in 20000..32000");
}

/// `127.0.0.1:PORT` for a port that was free a moment ago (see [`free_tcp_port`]).
pub fn free_tcp_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_tcp_port()))
}

/// Quotes `s` for a POSIX shell (always, with single quotes).
pub fn sh_quote(s: impl AsRef<OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Which output of a [`Process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A running child process whose stdout and stderr lines are collected; killed (by its
/// `Child`) on drop, and its output printed then if the test is failing.
pub struct Process {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl Process {
    /// Starts `cmd` (stdin closed, stdout and stderr collected) under the label `name`.
    ///
    /// # Panics
    /// If it cannot be started.
    pub fn spawn(name: &str, mut cmd: Command) -> Process {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect_lines(child.stdout.take().expect("stdout"), stdout.clone());
        collect_lines(child.stderr.take().expect("stderr"), stderr.clone());
        Process {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The lines of `stream` so far.
    pub fn lines(&self, stream: Stream) -> Vec<String> {
        let lines = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        lines.lock().expect("output lock").clone()
    }

    /// Both outputs so far, for messages.
    pub fn output_text(&self) -> String {
        format!(
            "{} stdout:\n{}\n{} stderr:\n{}",
            self.name,
            self.lines(Stream::Stdout).join("\n"),
            self.name,
            self.lines(Stream::Stderr).join("\n")
        )
    }

    /// Waits (polling, bounded by `bound`) for a line of `stream` matching `pred`.
    ///
    /// # Panics
    /// If none comes within `bound`, or the process exits first (its output is in the
    /// message).
    pub async fn wait_for_line<F>(&mut self, stream: Stream, pred: F, bound: Duration) -> String
    where
        F: Fn(&str) -> bool,
    {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if let Some(l) = self.lines(stream).into_iter().find(|l| pred(l)) {
                return l;
            }
            if let Some(status) = self.try_wait() {
                // The readers may still be collecting the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(l) = self.lines(stream).into_iter().find(|l| pred(l)) {
                    return l;
                }
                panic!(
                    "{} exited ({status}) before the awaited line; {}",
                    self.name,
                    self.output_text()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: the awaited line did not come within {bound:?}; {}",
                self.name,
                self.output_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process has exited (and with what status).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (a `kill` signal name such as `INT`) to this child's pid, unless it
    /// has already exited and been reaped.
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
            "kill -{signal} {pid} ({}) failed",
            self.name
        );
    }

    /// Kills it (SIGKILL, by its `Child`) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}\n----", self.name, self.output_text());
        }
    }
}

/// Runs `cmd` to completion (stdin closed unless `stdin` is given, then fed and closed),
/// bounded by `bound`.
///
/// # Panics
/// If it cannot be started, or is still running after `bound` (it is killed by its
/// `Child`; the message has its output so far).
pub async fn run_bounded(
    mut cmd: tokio::process::Command,
    stdin: Option<&[u8]>,
    bound: Duration,
) -> Output {
    use tokio::io::AsyncWriteExt;
    let what = format!("{:?}", cmd.as_std());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
            let _ = w.shutdown().await;
        });
    }
    match tokio::time::timeout(bound, child.wait_with_output()).await {
        Ok(r) => r.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => panic!("{what} did not finish within {bound:?} (killed)"),
    }
}

/// `out` in words, for messages: status, stdout and stderr.
pub fn describe_output(out: &Output) -> String {
    format!(
        "{}; stdout {:?}; stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing tool fails the test under `ZTP_REQUIRE_TOOLS`, and is a skip (`None`)
    /// otherwise; every tool `.ci/run` installs has its package named.
    #[test]
    fn a_missing_tool_is_a_skip_or_a_failure() {
        let r = std::panic::catch_unwind(|| {
            require_tools(
                "the self-test of the skip line (expected)",
                &["sh", "ztp-no-such-tool-anywhere"],
            )
        });
        match r {
            Ok(found) => {
                assert!(!tools_required());
                assert!(found.is_none());
            }
            Err(_) => assert!(tools_required()),
        }
        assert!(require_tool("selftest", "sh").is_some_and(|p| p.is_absolute()));
        for tool in [
            "openssl",
            "ssh",
            "ssh-keygen",
            "sshd",
            "dig",
            "dnsmasq",
            "redis-server",
            "redis-cli",
        ] {
            assert!(package_of(tool).is_some(), "{tool}");
        }
    }
}
