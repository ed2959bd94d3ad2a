//! Locating (and building) the workspace's binaries: `ztp-dataplane`, `ztp-control`,
//! `ztpctl` and `ztp-keyserver`.
//!
//! Tests in `tests/` cannot use `CARGO_BIN_EXE_*` of another package, so the binaries are
//! looked up next to the test executable (`target/<profile>/NAME`). `cargo test` does not
//! build another package's binaries, and a stale binary would test old code, so the first
//! lookup in a test process runs
//! `cargo build -p ztp-dataplane -p ztp-control -p ztpctl -p ztp-keyserver -p ztp-tests
//! --bins` (in the test's profile and target directory; quick when everything is fresh),
//! once for all of them.
//!
//! `ZTP_TESTS_NO_BUILD=1` uses existing binaries as they are. `ZTP_DATAPLANE_BIN`,
//! `ZTP_CONTROL_BIN`, `ZTPCTL_BIN` and `ZTP_KEYSERVER_BIN` point at other binaries
//! altogether (if all are set, nothing is built).

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One of the workspace's binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    /// `ztp-dataplane` (package `ztp-dataplane`).
    Dataplane,
    /// `ztp-control` (package `ztp-control`).
    Control,
    /// `ztpctl` (package `ztpctl`).
    Ztpctl,
    /// `ztp-keyserver` (package `ztp-keyserver`).
    Keyserver,
}

impl Bin {
    /// Every binary the harness runs.
    pub const ALL: [Bin; 4] = [Bin::Dataplane, Bin::Control, Bin::Ztpctl, Bin::Keyserver];

    /// The binary's (and its package's) name.
    pub fn name(self) -> &'static str {
        match self {
            Bin::Dataplane => "ztp-dataplane",
            Bin::Control => "ztp-control",
            Bin::Ztpctl => "ztpctl",
            Bin::Keyserver => "ztp-keyserver",
        }
    }

    /// The environment variable that overrides its path.
    pub fn env_override(self) -> &'static str {
        match self {
            Bin::Dataplane => "ZTP_DATAPLANE_BIN",
            Bin::Control => "ZTP_CONTROL_BIN",
            Bin::Ztpctl => "ZTPCTL_BIN",
            Bin::Keyserver => "ZTP_KEYSERVER_BIN",
        }
    }

    /// The binary's path, building the workspace's binaries once per process first (see
    /// the module docs).
    ///
    /// # Panics
    /// If the binary is missing and cannot be built.
    pub fn path(self) -> PathBuf {
        if let Some(p) = std::env::var_os(self.env_override()) {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "{}={} is not a file",
                self.env_override(),
                p.display()
            );
            return p;
        }
        if let Err(e) = ensure_built() {
            panic!("{e}");
        }
        let p = profile_dir().join(format!("{}{}", self.name(), std::env::consts::EXE_SUFFIX));
        assert!(
            p.is_file(),
            "{} is missing after the build; build it with `cargo build -p {}` or set {}",
            p.display(),
            self.name(),
            self.env_override()
        );
        p
    }
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `target/<profile>`, where the test binary (`target/<profile>/deps/<test>`) lives.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Runs the one build of this process (or skips it); the outcome is shared by every
/// caller.
fn ensure_built() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(build).clone()
}

fn build() -> Result<(), String> {
    let dir = profile_dir();
    let missing: Vec<Bin> = Bin::ALL
        .into_iter()
        .filter(|b| std::env::var_os(b.env_override()).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let exists = |b: &Bin| {
        dir.join(format!("{}{}", b.name(), std::env::consts::EXE_SUFFIX))
            .is_file()
    };
    if std::env::var_os("ZTP_TESTS_NO_BUILD").is_some() && missing.iter().all(exists) {
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    // Selecting ztp-tests too unifies dependency features with the test build's, so the
    // builds share artifacts instead of rebuilding rustls & co. each time.
    cmd.current_dir(workspace_root()).args([
        "build",
        "-p",
        "ztp-dataplane",
        "-p",
        "ztp-control",
        "-p",
        "ztpctl",
        "-p",
        "ztp-keyserver",
        "-p",
        "ztp-tests",
        "--bins",
    ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target_dir) = dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    // Cargo sets these for the test process; inherited, they would look like a changed
    // environment to the nested build (ring's build script reruns on a changed
    // CARGO_MANIFEST_DIR), and each `cargo test` and nested build would rebuild rustls &
    // co. for the other.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if is_cargo_test_var(key) {
            cmd.env_remove(key);
        }
    }
    eprintln!("ztp-tests: building the binaries: {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo to build the binaries: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building ztp-dataplane, ztp-control, ztpctl and ztp-keyserver failed \
             ({status}); build them with `cargo build --workspace --bins` and rerun, or set \
             ZTP_DATAPLANE_BIN, ZTP_CONTROL_BIN, ZTPCTL_BIN and ZTP_KEYSERVER_BIN"
        ));
    }
    Ok(())
}

/// Whether cargo sets `key` for the package under test (as opposed to the user's own
/// configuration, such as `CARGO_HOME` or `CARGO_TARGET_DIR`, which the nested build must
/// see too).
fn is_cargo_test_var(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// Runs `bin ARGS` to completion (stdin closed), bounded by `bound`; `envs` are added to
/// its environment and `RUST_LOG` is removed from it.
///
/// # Panics
/// If the process cannot be started or is still running after `bound` (it is killed).
pub fn run_bounded_with<I, S>(bin: Bin, args: I, envs: &[(&str, &str)], bound: Duration) -> Output
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = Command::new(bin.path());
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.name()));
    let out = drain_in_thread(child.stdout.take().expect("stdout"));
    let err = drain_in_thread(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} still running after {bound:?}; killed it. stderr: {}",
                bin.name(),
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

pub(crate) fn drain_in_thread<R: Read + Send + 'static>(
    mut r: R,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}
