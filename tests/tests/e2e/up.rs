//! `ztpctl up` tried as a new user would (README "The two commands"): a fresh state
//! folder, every port chosen by the test on 127.0.0.1 (but for one test, which leaves the
//! gateway's default 127.0.0.1:9743 to `up` and holds that port itself); the `ztpctl
//! connect` commands it prints are run verbatim through `sh -c`; Ctrl-C (SIGINT) stops it
//! cleanly, saying once that it drains; a second run on the same state reuses the PKI
//! and the store, and points the demo services it owns at the backends it started.
//! Taken ports: a default is swapped for a free one, a named one fails naming its flag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_tests::backend::{BannerBackend, EchoBackend};
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

/// Every address `ztpctl up` listens on, as flags.
struct Ports {
    flags: Vec<(&'static str, String)>,
    api: SocketAddr,
}

impl Ports {
    /// A free port on 127.0.0.1 for every flag (none of `up`'s defaults).
    fn pick() -> Ports {
        let api = free_tcp_addr();
        let flags = vec![
            ("--listen", free_tcp_addr().to_string()),
            ("--api-listen", api.to_string()),
            ("--grpc-listen", free_tcp_addr().to_string()),
            ("--admin-listen", free_tcp_addr().to_string()),
            ("--echo-backend", free_tcp_addr().to_string()),
            (
                "--udp-echo-backend",
                format!("127.0.0.1:{}", free_udp_port()),
            ),
        ];
        Ports { flags, api }
    }

    /// Gives `flag` the address `addr`.
    fn set(&mut self, flag: &str, addr: SocketAddr) {
        let slot = self
            .flags
            .iter_mut()
            .find(|(f, _)| *f == flag)
            .unwrap_or_else(|| panic!("no flag {flag}"));
        slot.1 = addr.to_string();
    }

    /// Leaves `flag` out: `up` uses its default.
    fn without(mut self, flag: &str) -> Ports {
        self.flags.retain(|(f, _)| *f != flag);
        self
    }

    fn args(&self) -> Vec<String> {
        self.flags
            .iter()
            .flat_map(|(f, a)| [f.to_string(), a.clone()])
            .collect()
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

/// `ztpctl up --state STATE` with `ports`, as the new user.
fn up_command(state: &Path, home: &Path, ports: &Ports) -> Command {
    let mut cmd = Command::new(Bin::Ztpctl.path());
    cmd.arg("up").arg("--state").arg(state).args(ports.args());
    isolate(&mut cmd, home);
    cmd
}

/// Starts `ztpctl up --state STATE` with `ports`, and waits for the whole welcome (from
/// `ZTP is up` to the `Ctrl-C stops it` line); returns it with the process.
async fn up(state: &Path, home: &Path, ports: &Ports) -> (Process, Vec<String>) {
    let mut p = Process::spawn("ztpctl up", up_command(state, home, ports));
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
    /// alice's echo through the demo connector's tunnel.
    lab: String,
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
        lab: printed(welcome, "the demo connector's service", |l| {
            l.contains(" connect lab.svc.internal ")
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

    // Through the demo connector's tunnel: the same echo (the tunnel may take a moment
    // after the welcome to be up: 503 until then).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = sh(&p.lab, home).await;
        if out.status.success() && String::from_utf8_lossy(&out.stdout) == "hello\n" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{}`: {}",
            p.lab,
            describe_output(&out)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

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
/// local port is 127.0.0.1:9753 unless that was taken when `up` started (then a free
/// one); if it is taken by the time the test runs the command, this part is skipped
/// with a note.
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

/// `ztpctl up` run to its end (it is expected to fail), bounded by [`COMMAND_BOUND`].
async fn up_failing(state: &Path, home: &Path, ports: &Ports) -> std::process::Output {
    let cmd = tokio::process::Command::from(up_command(state, home, ports));
    run_bounded(cmd, None, COMMAND_BOUND).await
}

/// Runs the printed `echo hello | … connect echo.svc.internal …` line: `hello` comes
/// back.
async fn echo_hello(line: &str, home: &Path) {
    let out = sh(line, home).await;
    assert!(
        out.status.success() && out.stdout == b"hello\n",
        "`{line}`: expected `hello`: {}",
        describe_output(&out)
    );
}

/// `echo.svc.internal` as the admin API holds it.
async fn echo_service(api: SocketAddr, token: &str) -> serde_json::Value {
    let auth = format!("Bearer {token}");
    let r = http::request(
        api,
        "GET",
        "/v1/services/echo.svc.internal",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .expect("GET /v1/services/echo.svc.internal");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn new_user(what: &str) -> (TempDir, PathBuf, PathBuf) {
    let root = TempDir::new(what);
    let home = root.join("home");
    std::fs::create_dir_all(&home).expect("create home");
    let state = root.join("state");
    (root, home, state)
}

/// A default port that is taken (here the gateway's 127.0.0.1:9743, held by the test;
/// every other address is named) is swapped for a free one on 127.0.0.1, `up` says which,
/// and the printed `connect` commands use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_up_swaps_a_taken_default_port_for_a_free_one_and_prints_it() {
    let (_root, home, state) = new_user("up-default-taken");
    // Held for the whole test; if another program has it already, it is taken all the
    // same.
    let _held = std::net::TcpListener::bind("127.0.0.1:9743")
        .map_err(|e| eprintln!("note: 127.0.0.1:9743 is taken already ({e})"));
    let ports = Ports::pick().without("--listen");

    let (mut p, welcome) = up(&state, &home, &ports).await;
    let said = p
        .wait_for_line(
            Stream::Stderr,
            |l| l.starts_with("ztpctl: 127.0.0.1:9743 is in use"),
            STEP,
        )
        .await;
    assert!(said.contains("--listen"), "names the flag: {said}");
    let chosen: SocketAddr = said
        .split_once(" is on ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no `is on ADDR` in {said:?}"));
    assert_eq!(chosen.ip().to_string(), "127.0.0.1", "{said}");
    assert_ne!(chosen.port(), 9743, "{said}");
    assert!(
        welcome
            .iter()
            .any(|l| l.starts_with("  gateway") && l.ends_with(&chosen.to_string())),
        "the welcome names the gateway on {chosen}:\n{}",
        welcome.join("\n")
    );

    let pki = state.canonicalize().expect("state").join("pki");
    let printed = commands(&welcome, &pki);
    for line in [&printed.alice_echo, &printed.bob_echo, &printed.whoami] {
        assert!(
            line.contains(&format!(" --via {chosen} ")),
            "not via {chosen}: {line}"
        );
    }
    echo_hello(&printed.alice_echo, &home).await;
    interrupt(&mut p).await;
}

/// Named ports that are taken stop `up` before it writes anything: one line each,
/// naming the flag that changes it, all in one run, and a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_up_refuses_taken_named_ports_in_one_line_each_naming_the_flag() {
    let (_root, home, state) = new_user("up-named-taken");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let mut ports = Ports::pick();
    let grpc = tcp.local_addr().expect("tcp addr");
    let udp_echo = udp.local_addr().expect("udp addr");
    ports.set("--grpc-listen", grpc);
    ports.set("--udp-echo-backend", udp_echo);

    let out = up_failing(&state, &home, &ports).await;
    assert!(!out.status.success(), "{}", describe_output(&out));
    assert!(out.stdout.is_empty(), "{}", describe_output(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one line per port: {}",
        describe_output(&out)
    );
    for (flag, addr) in [("--grpc-listen", grpc), ("--udp-echo-backend", udp_echo)] {
        let prefix = format!("ztpctl: {flag} {addr} is in use");
        assert!(
            lines.iter().any(|l| l.starts_with(&prefix)),
            "no line `{prefix}…`: {}",
            describe_output(&out)
        );
    }
    assert!(
        !state.exists(),
        "the state folder was made before the ports were checked"
    );
}

/// A first run on a taken `--echo-backend` fails; a retry on another port points
/// `echo.svc.internal` at the backend `up` started, not at the program on the first
/// port; moving `--echo-backend` later moves the service too; an address an admin set
/// is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_up_points_the_echo_service_at_the_backend_it_started() {
    let (_root, home, state) = new_user("up-echo-backend");
    let stranger = BannerBackend::start(b"not the demo backend\n").await;
    let mut ports = Ports::pick();
    ports.set("--echo-backend", stranger.addr());

    let out = up_failing(&state, &home, &ports).await;
    assert!(
        !out.status.success(),
        "up ran on a taken --echo-backend: {}",
        describe_output(&out)
    );

    // The retry, on a free port.
    ports.set("--echo-backend", free_tcp_addr());
    let (mut p, welcome) = up(&state, &home, &ports).await;
    let state = state.canonicalize().expect("state");
    let printed = commands(&welcome, &state.join("pki"));
    echo_hello(&printed.alice_echo, &home).await;
    assert_eq!(
        stranger.connections(),
        0,
        "echo.svc.internal reached the stranger"
    );
    interrupt(&mut p).await;
    drop(p);

    // Another --echo-backend on the same state: the service follows it.
    let moved = free_tcp_addr();
    ports.set("--echo-backend", moved);
    let (mut p, welcome) = up(&state, &home, &ports).await;
    echo_hello(&commands(&welcome, &state.join("pki")).alice_echo, &home).await;
    let token = String::from_utf8_lossy(&read(state.join("control").join("admin-token")))
        .trim()
        .to_string();
    let mut svc = echo_service(ports.api, &token).await;
    assert_eq!(svc["address"], moved.to_string(), "{svc}");

    // An admin points it at their own backend: no longer `up`'s to move.
    let theirs = EchoBackend::start().await;
    svc["address"] = theirs.addr().to_string().into();
    let auth = format!("Bearer {token}");
    let body = serde_json::to_vec(&svc).expect("json");
    let r = http::request(
        ports.api,
        "PUT",
        "/v1/services/echo.svc.internal",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&body),
    )
    .await
    .expect("PUT /v1/services/echo.svc.internal");
    assert_eq!(r.status, 200, "{}", r.text());
    interrupt(&mut p).await;
    drop(p);

    ports.set("--echo-backend", free_tcp_addr());
    let (mut p, welcome) = up(&state, &home, &ports).await;
    p.wait_for_line(
        Stream::Stderr,
        |l| l.starts_with("ztpctl: echo.svc.internal forwards to"),
        STEP,
    )
    .await;
    let svc = echo_service(ports.api, &token).await;
    assert_eq!(svc["address"], theirs.addr().to_string(), "{svc}");
    echo_hello(&commands(&welcome, &state.join("pki")).alice_echo, &home).await;
    assert_eq!(theirs.connections(), 1);
    interrupt(&mut p).await;
}

/// Ctrl-C with a connection open: one line says that it drains and for how long, no
/// warnings follow, and `up` exits once the data plane has ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_up_says_once_that_it_drains_on_ctrl_c() {
    let (_root, home, state) = new_user("up-drain");
    let ports = Ports::pick();
    let (mut p, welcome) = up(&state, &home, &ports).await;
    let pki = state.canonicalize().expect("state").join("pki");
    let line = commands(&welcome, &pki).alice_echo;
    let rest = line.strip_prefix("echo hello | ").expect("echo hello | …");

    // A connection that stays open: the printed command, its stdin held by the test.
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("exec {rest}"));
    isolate(&mut cmd, &home);
    let mut client = tokio::process::Command::from(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start ztpctl connect");
    let mut stdin = client.stdin.take().expect("stdin");
    let mut stdout = client.stdout.take().expect("stdout");
    stdin.write_all(b"hello\n").await.expect("write");
    let mut buf = [0u8; 6];
    tokio::time::timeout(STEP, stdout.read_exact(&mut buf))
        .await
        .expect("no echo in time")
        .expect("read the echo");
    assert_eq!(&buf, b"hello\n");

    let before = p.lines(Stream::Stderr).len();
    interrupt(&mut p).await;
    let after = p.lines(Stream::Stderr).split_off(before);
    let said: Vec<&String> = after.iter().filter(|l| l.contains("up to 5s")).collect();
    assert!(
        said.len() == 1 && said[0].contains("draining 1 open connection"),
        "expected one line saying it drains 1 connection for up to 5s: {after:#?}"
    );
    assert_eq!(
        after.len(),
        2,
        "only that line and the last one: {after:#?}"
    );
    assert!(after[1].starts_with("ztpctl: stopped;"), "{after:#?}");

    // The data plane ended the connection before exiting.
    let status = tokio::time::timeout(STEP, client.wait())
        .await
        .expect("the client still runs after up stopped")
        .expect("wait for the client");
    eprintln!("the client exited {status}");
    drop(stdin);
}
