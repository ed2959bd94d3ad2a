//! `ztpctl up` tried as a new user would (README "The two commands"): a fresh state
//! folder, every port chosen by the test on 127.0.0.1; the `ztpctl connect` commands it
//! prints are run verbatim through `sh -c`; Ctrl-C (SIGINT) stops it cleanly; a second
//! run on the same state reuses the PKI and the store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ztp_tests::process::{
    describe_output, free_tcp_addr, free_udp_port, run_bounded, Process, Stream,
};
use ztp_tests::{http, Bin, TempDir};

use crate::common::STEP;

/// Bound on `ztpctl up` coming up (a fresh PKI, the store, both planes, the first
/// snapshot on the data plane).
const UP_BOUND: Duration = Duration::from_secs(60);

/// Bound on `ztpctl up` exiting after SIGINT: "a few seconds".
const STOP_BOUND: Duration = Duration::from_secs(10);

/// Bound on one printed command.
const COMMAND_BOUND: Duration = Duration::from_secs(30);

/// The variables that would change what `ztpctl` does behind the test's back.
const ZTPCTL_ENV: [&str; 7] = [
    "ZTP_VIA",
    "ZTP_CERT",
    "ZTP_KEY",
    "ZTP_CA",
    "ZTP_SERVER",
    "ZTP_TOKEN",
    "RUST_LOG",
];

/// Every address `ztpctl up` listens on.
struct Ports {
    flags: Vec<String>,
    api: SocketAddr,
}

impl Ports {
    fn pick() -> Ports {
        let api = free_tcp_addr();
        let flags = vec![
            "--listen".into(),
            free_tcp_addr().to_string(),
            "--api-listen".into(),
            api.to_string(),
            "--grpc-listen".into(),
            free_tcp_addr().to_string(),
            "--admin-listen".into(),
            free_tcp_addr().to_string(),
            "--echo-backend".into(),
            free_tcp_addr().to_string(),
            "--udp-echo-backend".into(),
            format!("127.0.0.1:{}", free_udp_port()),
        ];
        Ports { flags, api }
    }
}

/// A new user's environment: a private home, no `ZTP_*` variables.
fn isolate(cmd: &mut Command, home: &Path) {
    for k in ZTPCTL_ENV {
        cmd.env_remove(k);
    }
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_STATE_HOME", home.join(".local/state"));
}

/// Starts `ztpctl up --state STATE` with `ports`, and waits for the whole welcome (from
/// `ZTP is up` to the `Ctrl-C stops it` line); returns it with the process.
async fn up(state: &Path, home: &Path, ports: &Ports) -> (Process, Vec<String>) {
    let mut cmd = Command::new(Bin::Ztpctl.path());
    cmd.arg("up").arg("--state").arg(state).args(&ports.flags);
    isolate(&mut cmd, home);
    let mut p = Process::spawn("ztpctl up", cmd);
    p.wait_for_line(Stream::Stdout, |l| l.starts_with("ZTP is up"), UP_BOUND)
        .await;
    p.wait_for_line(Stream::Stdout, |l| l.starts_with("Ctrl-C stops it"), STEP)
        .await;
    let welcome = p.lines(Stream::Stdout);
    eprintln!("ztpctl up printed:\n{}", welcome.join("\n"));
    (p, welcome)
}

/// The one printed line that satisfies `pred`, without its indentation.
fn printed<F: Fn(&str) -> bool>(welcome: &[String], what: &str, pred: F) -> String {
    let found: Vec<&String> = welcome.iter().filter(|l| pred(l)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one printed line for {what}; the welcome:\n{}",
        welcome.join("\n")
    );
    found[0].trim().to_string()
}

/// Runs `line` verbatim with `sh -c` (stdin closed), as the new user.
async fn sh(line: &str, home: &Path) -> std::process::Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(line);
    isolate(&mut cmd, home);
    run_bounded(tokio::process::Command::from(cmd), None, COMMAND_BOUND).await
}

/// The printed commands: alice's echo, bob's echo, alice's whoami and udp-echo, and the
/// administration lines.
struct Printed {
    alice_echo: String,
    bob_echo: String,
    whoami: String,
    udp_echo: String,
    admin: String,
}

fn commands(welcome: &[String], pki: &Path) -> Printed {
    let alice_pem = pki.join("alice.pem").display().to_string();
    let bob_pem = pki.join("bob.pem").display().to_string();
    let echo = " connect echo.svc.internal ";
    let p = Printed {
        alice_echo: printed(welcome, "alice's echo", |l| {
            l.contains(echo) && l.contains(&alice_pem)
        }),
        bob_echo: printed(welcome, "bob's echo", |l| {
            l.contains(echo) && l.contains(&bob_pem)
        }),
        whoami: printed(welcome, "whoami", |l| {
            l.contains(" connect whoami.svc.internal ")
        }),
        udp_echo: printed(welcome, "udp-echo", |l| {
            l.contains(" connect udp-echo.svc.internal ")
        }),
        admin: [
            printed(welcome, "the admin export", |l| {
                l.trim_start().starts_with("export ZTP_SERVER=")
            }),
            printed(welcome, "the admin commands", |l| {
                l.contains(" service list")
            }),
        ]
        .join("\n"),
    };
    for (what, line) in [("alice's echo", &p.alice_echo), ("bob's echo", &p.bob_echo)] {
        let rest = line
            .strip_prefix("echo hello | ")
            .unwrap_or_else(|| panic!("{what}: not `echo hello | …`: {line}"));
        assert!(
            rest.starts_with('/') || rest.starts_with("'/"),
            "{what}: ztpctl is not named by an absolute path: {line}"
        );
    }
    p
}

async fn run_printed(p: &Printed, home: &Path) {
    // alice, in the demo group: her line comes back.
    let out = sh(&p.alice_echo, home).await;
    assert!(
        out.status.success(),
        "`{}`: {}",
        p.alice_echo,
        describe_output(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "`{}`: {}",
        p.alice_echo,
        describe_output(&out)
    );

    // bob, in no group: exit 1 and one line saying 403 forbidden.
    let out = sh(&p.bob_echo, home).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "`{}`: {}",
        p.bob_echo,
        describe_output(&out)
    );
    assert!(out.stdout.is_empty(), "{}", describe_output(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].ends_with("403 forbidden"),
        "`{}`: expected one line ending `403 forbidden`: {}",
        p.bob_echo,
        describe_output(&out)
    );

    // whoami: the identity lines.
    let out = sh(&p.whoami, home).await;
    assert!(
        out.status.success(),
        "`{}`: {}",
        p.whoami,
        describe_output(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "identity: alice@example.com",
        "user: alice",
        "groups: demo",
        "service: whoami.svc.internal",
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "`{}`: no line {want:?}: {}",
            p.whoami,
            describe_output(&out)
        );
    }

    udp_echo(&p.udp_echo, home).await;

    // The administration lines, as printed.
    let out = sh(&p.admin, home).await;
    assert!(
        out.status.success(),
        "`{}`: {}",
        p.admin,
        describe_output(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "echo.svc.internal",
        "whoami.svc.internal",
        "udp-echo.svc.internal",
        "alice",
        "bob",
        "local",
    ] {
        assert!(
            text.contains(want),
            "`{}` does not list {want}: {}",
            p.admin,
            describe_output(&out)
        );
    }
}

/// The printed udp-echo command, running (`exec` before it, so that the process the
/// test kills is ztpctl itself), carries a datagram to the demo UDP echo and back. Its
/// local port is printed as a fixed 127.0.0.1:9753 whatever flags `up` got; if that port
/// is taken on this machine, this part is skipped with a note.
async fn udp_echo(line: &str, home: &Path) {
    let (_, local) = line
        .rsplit_once("--udp-listen ")
        .unwrap_or_else(|| panic!("the udp-echo command has no --udp-listen: {line}"));
    let local: SocketAddr = local
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("--udp-listen {local:?}: {e}"));
    if std::net::UdpSocket::bind(local).is_err() {
        eprintln!(
            "note: {local} is taken on this machine; the printed udp-echo command is not run"
        );
        return;
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("exec {line}"));
    isolate(&mut cmd, home);
    let mut p = Process::spawn("ztpctl connect udp-echo.svc.internal", cmd);
    p.wait_for_line(
        Stream::Stderr,
        |l| l.starts_with(&format!("ztpctl: udp {local} -> udp-echo.svc.internal")),
        STEP,
    )
    .await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind a udp socket");
    let mut buf = [0u8; 64];
    for i in 0..2 {
        let msg = format!("hello over udp {i}\n");
        sock.send_to(msg.as_bytes(), local).await.expect("send");
        let (n, from) = tokio::time::timeout(STEP, sock.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no udp echo within {STEP:?}; {}", p.output_text()))
            .expect("recv");
        assert_eq!(from, local);
        assert_eq!(&buf[..n], msg.as_bytes(), "{}", p.output_text());
    }
    p.kill();
}

/// SIGINT, then exit 0 within [`STOP_BOUND`].
async fn interrupt(p: &mut Process) {
    let t = Instant::now();
    p.signal("INT");
    let status = p.wait_exit(STOP_BOUND).await.unwrap_or_else(|| {
        panic!(
            "ztpctl up still running {STOP_BOUND:?} after SIGINT; {}",
            p.output_text()
        )
    });
    eprintln!("ztpctl up exited {status} {:?} after SIGINT", t.elapsed());
    assert_eq!(
        status.code(),
        Some(0),
        "ztpctl up did not exit 0 on SIGINT; {}",
        p.output_text()
    );
}

/// The config version (`ETag`) of the store, read with the admin token.
async fn config_version(api: SocketAddr, token: &str) -> u64 {
    let auth = format!("Bearer {token}");
    let r = http::request(
        api,
        "GET",
        "/v1/snapshot",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .expect("GET /v1/snapshot");
    assert_eq!(r.status, 200, "GET /v1/snapshot: {}", r.text());
    r.etag_version().expect("an ETag with the config version")
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_up_works_as_printed_stops_on_ctrl_c_and_reuses_its_state() {
    let root = TempDir::new("up");
    let home = root.join("home");
    std::fs::create_dir_all(&home).expect("create home");
    let state = root.join("state");
    let ports = Ports::pick();

    let (mut first, welcome) = up(&state, &home, &ports).await;
    let state = state.canonicalize().expect("the state folder exists");
    let pki = state.join("pki");
    assert!(
        welcome[0].contains(&state.display().to_string()),
        "the first line names the state folder: {}",
        welcome[0]
    );
    let printed = commands(&welcome, &pki);
    run_printed(&printed, &home).await;

    let ca = read(pki.join("ca.pem"));
    let alice = read(pki.join("alice.pem"));
    let token_file = state.join("control").join("admin-token");
    let token = read(token_file.clone());
    let token_text = String::from_utf8_lossy(&token).trim().to_string();
    let version = config_version(ports.api, &token_text).await;

    interrupt(&mut first).await;
    drop(first);

    // Again, on the same state and ports.
    let (mut second, welcome) = up(&state, &home, &ports).await;
    assert_eq!(
        read(pki.join("ca.pem")),
        ca,
        "ca.pem changed: the PKI was made anew"
    );
    assert_eq!(read(pki.join("alice.pem")), alice, "alice.pem changed");
    assert_eq!(read(token_file), token, "the admin token file changed");
    assert_eq!(
        config_version(ports.api, &token_text).await,
        version,
        "the config version moved: the store was seeded again"
    );
    let printed_again = commands(&welcome, &pki);
    assert_eq!(printed_again.alice_echo, printed.alice_echo);
    run_printed(&printed_again, &home).await;
    interrupt(&mut second).await;
}
