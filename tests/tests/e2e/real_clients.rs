//! Real clients from Debian's packages through `ztpctl connect` (README "Walkthrough: the
//! operator's day with ztpctl"): `ssh` with `ztpctl connect %h` as its ProxyCommand
//! (standard input and output) to a real `sshd`; `dig` through `--udp-listen` (framed
//! datagrams, ALPN `ztp-dgram`) to a real DNS server (dnsmasq) behind a `protocol: udp`
//! service; `redis-cli` through `--listen` to a real `redis-server`. And the same ssh and
//! redis-cli through two replicas to backends that only a real `ztpctl connector run`
//! dials (DESIGN.md "Connectors"), with /proc saying which process holds the sockets
//! connected to the backends.
//!
//! Every server runs on 127.0.0.1 with a configuration the test writes into a temporary
//! directory; every process is the test's own child and is killed by its guard. A test
//! whose tools are missing is skipped with a visible `SKIPPED` line naming them and their
//! package, or fails under `ZTP_REQUIRE_TOOLS=1`
//! (`.ci/run` installs openssh-client, openssh-server, dnsutils, dnsmasq, redis-server and
//! redis-tools, and sets it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use ztp_tests::process::{
    describe_output, free_tcp_port, free_udp_port, free_udp_tcp_port, require_tools, run_bounded,
    sh_quote, Process, Stream,
};
use ztp_tests::{Bin, Dataplane, TempDir, TestPki};

use crate::common::STEP;

/// Bound on one run of a client (ssh, dig, redis-cli, ssh-keygen).
const CLIENT_BOUND: Duration = Duration::from_secs(30);

/// The environment variables that would change what `ztpctl` does behind the test's back.
const ZTPCTL_ENV: [&str; 7] = [
    "ZTP_VIA",
    "ZTP_CERT",
    "ZTP_KEY",
    "ZTP_CA",
    "ZTP_SERVER",
    "ZTP_TOKEN",
    "RUST_LOG",
];

/// A service for group `ops`, as an operator writes it.
fn service(name: &str, protocol: &str, address: SocketAddr) -> String {
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    address: \"{address}\"\n    groups: [ops]\n"
    )
}

/// `services`, user alice (alice@example.com, group ops) and user bob (bob@example.com,
/// no group).
fn snapshot(services: &str) -> String {
    format!(
        r#"version: 1
services:
{services}users:
  - name: alice
    identities: ["alice@example.com"]
    groups: [ops]
  - name: bob
    identities: ["bob@example.com"]
groups:
  - name: ops
revoked: []
"#
    )
}

/// The files a user of `ztpctl connect` holds: `ca.pem`, and `alice.pem`/`alice.key`,
/// `bob.pem`/`bob.key` (from `pki`), and a private config home.
struct UserFiles {
    files: TempDir,
    /// `ztpctl connect --transport`.
    transport: &'static str,
}

impl UserFiles {
    fn new(pki: &TestPki, transport: &'static str) -> UserFiles {
        let files = TempDir::new("ztpctl-user");
        std::fs::write(files.join("ca.pem"), &pki.ca_pem).expect("write ca.pem");
        for who in ["alice", "bob"] {
            pki.client_email(&format!("{who}@example.com"))
                .write(files.path(), who)
                .expect("write the user's certificate");
        }
        std::fs::create_dir_all(files.join("xdg")).expect("create the config home");
        UserFiles { files, transport }
    }

    /// `--via VIA --cert … --key … --ca … --transport …` for `who`.
    fn connect_flags(&self, who: &str, via: SocketAddr) -> Vec<String> {
        let p = |name: String| self.files.join(name).display().to_string();
        vec![
            "--via".into(),
            via.to_string(),
            "--cert".into(),
            p(format!("{who}.pem")),
            "--key".into(),
            p(format!("{who}.key")),
            "--ca".into(),
            p("ca.pem".into()),
            "--transport".into(),
            self.transport.into(),
        ]
    }

    /// Clears the variables `ztpctl` would read and gives it a private config home.
    fn isolate(&self, cmd: &mut Command) {
        for k in ZTPCTL_ENV {
            cmd.env_remove(k);
        }
        cmd.env("XDG_CONFIG_HOME", self.files.join("xdg"));
    }

    /// `ztpctl connect SERVICE --via VIA` as `who`, with `extra` flags, running.
    fn spawn_connect(&self, via: SocketAddr, who: &str, service: &str, extra: &[&str]) -> Process {
        let mut cmd = Command::new(Bin::Ztpctl.path());
        cmd.arg("connect")
            .arg(service)
            .args(self.connect_flags(who, via))
            .args(extra);
        self.isolate(&mut cmd);
        Process::spawn(&format!("ztpctl connect {service} ({who} via {via})"), cmd)
    }
}

/// The `connection` events `dp` logged for `sni`.
fn events(dp: &Dataplane, sni: &str) -> Vec<Value> {
    dp.logs()
        .into_iter()
        .filter(|v| v["message"] == "connection" && v["tls.sni"] == sni)
        .collect()
}

/// Waits (bounded) for the first `connection` event `dp` logged for `sni` matching `pred`.
async fn wait_event<F: Fn(&Value) -> bool>(dp: &Dataplane, sni: &str, pred: F) -> Value {
    dp.wait_for_log(
        |v| v["message"] == "connection" && v["tls.sni"] == sni && pred(v),
        STEP,
    )
    .await
    .unwrap_or_else(|| {
        panic!(
            "no matching `connection` event for {sni} within {STEP:?}; events: {:?}",
            events(dp, sni)
        )
    })
}

/// A data plane, and the files its user holds ([`UserFiles`]).
struct Gateway {
    dp: Dataplane,
    user: UserFiles,
}

impl Gateway {
    async fn start(services: &str, transport: &'static str) -> Gateway {
        Gateway::start_with(services, transport, &[]).await
    }

    async fn start_with(services: &str, transport: &'static str, args: &[&str]) -> Gateway {
        let pki = TestPki::new();
        let dp = Dataplane::start(&pki, &snapshot(services), args).await;
        let user = UserFiles::new(&pki, transport);
        Gateway { dp, user }
    }

    /// `ztpctl connect SERVICE` as `who`, through this data plane, with `extra` flags.
    fn spawn_connect(&self, who: &str, service: &str, extra: &[&str]) -> Process {
        self.user.spawn_connect(self.dp.addr(), who, service, extra)
    }

    /// The `connection` events the data plane logged for `sni`.
    fn events(&self, sni: &str) -> Vec<Value> {
        events(&self.dp, sni)
    }

    /// Waits (bounded) for the first `connection` event for `sni` matching `pred`.
    async fn wait_event<F: Fn(&Value) -> bool>(&self, sni: &str, pred: F) -> Value {
        wait_event(&self.dp, sni, pred).await
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a std `Command` through [`run_bounded`].
async fn run(cmd: Command) -> std::process::Output {
    run_bounded(tokio::process::Command::from(cmd), None, CLIENT_BOUND).await
}

// ---- OpenSSH ----------------------------------------------------------------------------

/// A loopback `sshd` with its own host key, config and authorized key, in a temporary
/// directory.
struct Sshd {
    // Declared before `dir`: the process is killed before its directory goes.
    proc: Process,
    addr: SocketAddr,
    /// The account to log in as: the one the tests run as (sshd can only switch to
    /// another one as root, and then the test logs in as root).
    user: String,
    /// The private key whose public half is authorized.
    key: PathBuf,
    _dir: TempDir,
}

async fn whoami_unix() -> (String, bool) {
    let mut cmd = Command::new("id");
    cmd.arg("-un");
    let out = run(cmd).await;
    assert!(out.status.success(), "id -un: {}", describe_output(&out));
    let user = text(&out.stdout).trim().to_string();
    let mut cmd = Command::new("id");
    cmd.arg("-u");
    let out = run(cmd).await;
    assert!(out.status.success(), "id -u: {}", describe_output(&out));
    (user, text(&out.stdout).trim() == "0")
}

async fn keygen(ssh_keygen: &Path, file: &Path) {
    let mut cmd = Command::new(ssh_keygen);
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", "ztp-tests", "-f"])
        .arg(file);
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "ssh-keygen -f {}: {}",
        file.display(),
        describe_output(&out)
    );
}

impl Sshd {
    async fn start(sshd: &Path, ssh_keygen: &Path) -> Sshd {
        let dir = TempDir::new("sshd");
        let (user, root) = whoami_unix().await;
        if root {
            // sshd started as root insists on its privilege separation directory, which
            // the package's tmpfiles.d entry (or its init script) makes at boot; a
            // container without either lacks it. Make it the same way: empty, root's,
            // 0755.
            let privsep = Path::new("/run/sshd");
            if !privsep.is_dir() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(privsep)
                    .expect("create /run/sshd (sshd's privilege separation directory)");
            }
        }
        let host_key = dir.join("host_key");
        let key = dir.join("user_key");
        keygen(ssh_keygen, &host_key).await;
        keygen(ssh_keygen, &key).await;
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))
            .expect("write authorized_keys");
        let port = free_tcp_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = format!(
            "ListenAddress {addr}\n\
             HostKey {host}\n\
             AuthorizedKeysFile {auth}\n\
             PidFile {pid}\n\
             StrictModes no\n\
             UsePAM no\n\
             PermitRootLogin {root_login}\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AllowUsers {user}\n\
             LogLevel INFO\n",
            host = host_key.display(),
            auth = dir.join("authorized_keys").display(),
            pid = dir.join("sshd.pid").display(),
            root_login = if root { "yes" } else { "no" },
        );
        std::fs::write(dir.join("sshd_config"), config).expect("write sshd_config");
        // sshd re-executes itself and wants an absolute path (find_tool gives one).
        let mut cmd = Command::new(sshd);
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"));
        let mut proc = Process::spawn("sshd", cmd);
        let listening = format!("Server listening on 127.0.0.1 port {port}.");
        proc.wait_for_line(Stream::Stderr, |l| l.contains(&listening), STEP)
            .await;
        Sshd {
            proc,
            addr,
            user,
            key,
            _dir: dir,
        }
    }
}

/// `ssh … USER@ssh.svc.internal COMMAND` with `ztpctl connect %h` (as `who`, through
/// the gateway's data plane) as its ProxyCommand.
async fn ssh(
    ssh_bin: &Path,
    gw: &Gateway,
    who: &str,
    sshd: &Sshd,
    remote: &str,
) -> std::process::Output {
    ssh_via(ssh_bin, &gw.user, gw.dp.addr(), who, sshd, remote).await
}

/// `ssh … USER@ssh.svc.internal COMMAND` with `ztpctl connect %h --via VIA` (as `who`)
/// as its ProxyCommand.
async fn ssh_via(
    ssh: &Path,
    user: &UserFiles,
    via: SocketAddr,
    who: &str,
    sshd: &Sshd,
    remote: &str,
) -> std::process::Output {
    let proxy = std::iter::once(sh_quote(Bin::Ztpctl.path()))
        .chain(["connect".to_string(), "%h".to_string()])
        .chain(user.connect_flags(who, via).iter().map(sh_quote))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(ssh);
    cmd.arg("-F")
        .arg("/dev/null")
        .arg("-o")
        .arg(format!("ProxyCommand={proxy}"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(&sshd.key)
        .arg(format!("{}@ssh.svc.internal", sshd.user))
        .arg(remote);
    user.isolate(&mut cmd);
    run(cmd).await
}

/// ssh to a real sshd through `ztpctl connect` as ProxyCommand: alice (in the service's
/// group) runs a remote command and reads its output; bob (in no group) gets a failing
/// ssh whose stderr carries ztpctl's one `403 forbidden` line, and sshd is never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_ztpctl_connect_as_proxycommand() {
    ssh_through("ssh_through_ztpctl_connect_as_proxycommand", "tcp").await;
}

/// The same with `--transport quic`: the session is one QUIC stream, recorded as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_ztpctl_connect_over_quic() {
    ssh_through("ssh_through_ztpctl_connect_over_quic", "quic").await;
}

async fn ssh_through(test: &str, transport: &'static str) {
    let Some(tools) = require_tools(test, &["ssh", "ssh-keygen", "sshd"]) else {
        return;
    };
    let (ssh_bin, keygen_bin, sshd_bin) = (&tools[0], &tools[1], &tools[2]);
    let mut sshd = Sshd::start(sshd_bin, keygen_bin).await;
    let gw = Gateway::start(&service("ssh.svc.internal", "tcp", sshd.addr), transport).await;

    let out = ssh(ssh_bin, &gw, "alice", &sshd, "echo hello-over-ztp").await;
    assert!(
        out.status.success(),
        "ssh as alice through ztpctl failed: {}",
        describe_output(&out)
    );
    assert_eq!(
        text(&out.stdout),
        "hello-over-ztp\n",
        "{}",
        describe_output(&out)
    );
    // The real sshd authenticated the key that came through the tunnel.
    let accepted = format!("Accepted publickey for {} from 127.0.0.1", sshd.user);
    sshd.proc
        .wait_for_line(Stream::Stderr, |l| l.contains(&accepted), STEP)
        .await;
    let ev = gw
        .wait_event("ssh.svc.internal", |v| v["user.name"] == "alice")
        .await;
    assert_eq!(ev["decision"], "allow", "{ev}");
    assert_eq!(ev["backend.addr"], sshd.addr.to_string(), "{ev}");
    assert_eq!(ev["transport"], transport, "{ev}");

    let accepted_before = sshd
        .proc
        .lines(Stream::Stderr)
        .iter()
        .filter(|l| l.contains("Accepted publickey"))
        .count();
    let out = ssh(ssh_bin, &gw, "bob", &sshd, "echo hello-over-ztp").await;
    assert!(
        !out.status.success(),
        "ssh as bob (not in the service's group) succeeded: {}",
        describe_output(&out)
    );
    assert!(out.stdout.is_empty(), "{}", describe_output(&out));
    let stderr = text(&out.stderr);
    eprintln!("ssh as bob: {}", describe_output(&out));
    let refusal: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ztpctl:"))
        .collect();
    assert_eq!(
        refusal.len(),
        1,
        "expected exactly one ztpctl line on ssh's stderr: {stderr:?}"
    );
    assert!(
        refusal[0].ends_with("403 forbidden"),
        "ztpctl's line does not say `403 forbidden`: {stderr:?}"
    );
    let ev = gw
        .wait_event("ssh.svc.internal", |v| v["user.name"] == "bob")
        .await;
    assert_eq!(ev["decision"], "deny", "{ev}");
    assert_eq!(ev["refusal.code"], 403, "{ev}");
    assert!(
        ev["backend.addr"].is_null(),
        "a backend was contacted: {ev}"
    );
    let accepted_after = sshd
        .proc
        .lines(Stream::Stderr)
        .iter()
        .filter(|l| l.contains("Accepted publickey"))
        .count();
    assert_eq!(accepted_after, accepted_before, "sshd accepted bob's login");
    assert!(sshd.proc.try_wait().is_none(), "sshd exited");
}

// ---- dig and dnsmasq ----------------------------------------------------------------------

/// The name the DNS server answers, and its address (TEST-NET-1).
const DNS_NAME: &str = "test.ztp.internal";
const DNS_ANSWER: &str = "192.0.2.7";

/// A loopback dnsmasq answering [`DNS_NAME`] with [`DNS_ANSWER`], nothing else.
struct Dnsmasq {
    proc: Process,
    port: u16,
}

impl Dnsmasq {
    async fn start(dnsmasq: &Path, dig_bin: &Path) -> Dnsmasq {
        // dnsmasq binds the port for TCP too.
        let port = free_udp_tcp_port();
        let mut cmd = Command::new(dnsmasq);
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--log-queries",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--address=/{DNS_NAME}/{DNS_ANSWER}"));
        let mut proc = Process::spawn("dnsmasq", cmd);
        proc.wait_for_line(Stream::Stderr, |l| l.contains("started, version"), STEP)
            .await;
        // Ready when it answers directly.
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let out = dig(dig_bin, port, None).await;
            if out.status.success() && text(&out.stdout) == format!("{DNS_ANSWER}\n") {
                break;
            }
            assert!(
                proc.try_wait().is_none() && tokio::time::Instant::now() < deadline,
                "dnsmasq does not answer on 127.0.0.1:{port}: {}; {}",
                describe_output(&out),
                proc.output_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Dnsmasq { proc, port }
    }
}

/// `dig @127.0.0.1 -p PORT DNS_NAME +short +tries=1 +time=3`, from source port `source`
/// when given (the same source port is the same local peer, so the same session of
/// `ztpctl connect --udp-listen`).
async fn dig(dig_bin: &Path, port: u16, source: Option<u16>) -> std::process::Output {
    let mut cmd = Command::new(dig_bin);
    cmd.arg("@127.0.0.1").arg("-p").arg(port.to_string());
    if let Some(s) = source {
        cmd.arg("-b").arg(format!("127.0.0.1#{s}"));
    }
    cmd.args([DNS_NAME, "+short", "+tries=1", "+time=3"]);
    run(cmd).await
}

/// dig through `ztpctl connect dns.svc.internal --udp-listen`: two queries from the same
/// local port both get dnsmasq's answer over one framed session (the data plane logs no
/// end of session between them, and exactly one session once ztpctl stops), and a query
/// from another port gets its own session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_through_ztpctl_connect_udp_listen() {
    dig_through("dig_through_ztpctl_connect_udp_listen", "tcp").await;
}

/// The same with `--transport quic`: each local peer is one datagram flow of one QUIC
/// connection; a flow's record comes when it idles out (`--udp-idle`, 3 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_through_ztpctl_connect_udp_listen_over_quic() {
    dig_through("dig_through_ztpctl_connect_udp_listen_over_quic", "quic").await;
}

async fn dig_through(test: &str, transport: &'static str) {
    let Some(tools) = require_tools(test, &["dig", "dnsmasq"]) else {
        return;
    };
    let (dig_bin, dnsmasq_bin) = (&tools[0], &tools[1]);
    let mut dns = Dnsmasq::start(dnsmasq_bin, dig_bin).await;
    let backend = SocketAddr::from(([127, 0, 0, 1], dns.port));
    let gw = Gateway::start_with(
        &service("dns.svc.internal", "udp", backend),
        transport,
        &["--udp-idle", "3s"],
    )
    .await;

    let local = free_udp_port();
    let listen = format!("127.0.0.1:{local}");
    let mut conn = gw.spawn_connect("alice", "dns.svc.internal", &["--udp-listen", &listen]);
    conn.wait_for_line(
        Stream::Stderr,
        |l| l.starts_with(&format!("ztpctl: udp {listen} -> dns.svc.internal via")),
        STEP,
    )
    .await;

    let source = free_udp_port();
    for i in 1..=2 {
        let out = dig(dig_bin, local, Some(source)).await;
        assert!(
            out.status.success(),
            "query {i} through ztpctl: {}; {}",
            describe_output(&out),
            conn.output_text()
        );
        assert_eq!(
            text(&out.stdout),
            format!("{DNS_ANSWER}\n"),
            "query {i}: {}",
            describe_output(&out)
        );
        assert!(
            gw.events("dns.svc.internal").is_empty(),
            "a session ended after query {i}: {:?}",
            gw.events("dns.svc.internal")
        );
    }
    // Another local peer: another session, answered as well.
    let out = dig(dig_bin, local, None).await;
    assert_eq!(
        text(&out.stdout),
        format!("{DNS_ANSWER}\n"),
        "a query from another port: {}",
        describe_output(&out)
    );
    // dnsmasq saw the queries (the data plane's socket, not a cache in between).
    let queries = dns
        .proc
        .lines(Stream::Stderr)
        .iter()
        .filter(|l| l.contains(&format!("query[A] {DNS_NAME}")))
        .count();
    assert!(
        queries >= 4,
        "dnsmasq logged {queries} queries (1 direct + 3)"
    );

    conn.kill();
    gw.wait_event("dns.svc.internal", |_| true).await;
    // Both sessions end with ztpctl; give the second event a moment, then count.
    let deadline = tokio::time::Instant::now() + STEP;
    while gw.events("dns.svc.internal").len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = gw.events("dns.svc.internal");
    assert_eq!(
        events.len(),
        2,
        "expected two sessions (two queries from one port, one from another): {events:?}"
    );
    for ev in &events {
        assert_eq!(ev["decision"], "allow", "{ev}");
        assert_eq!(ev["user.name"], "alice", "{ev}");
        assert_eq!(ev["transport"], transport, "{ev}");
    }
    let mut ups: Vec<u64> = events
        .iter()
        .map(|ev| ev["bytes.up"].as_u64().unwrap_or(0))
        .collect();
    ups.sort_unstable();
    assert!(
        ups[0] > 0 && ups[1] > ups[0] * 3 / 2,
        "the shared session should carry about twice the bytes of the single-query one: \
         bytes.up {ups:?}; {events:?}"
    );
    assert!(dns.proc.try_wait().is_none(), "dnsmasq exited");
}

// ---- redis ------------------------------------------------------------------------------

/// A loopback `redis-server` that saves nothing, its folder a temporary directory.
struct Redis {
    // Declared before `_dir`: the process is killed before its directory goes.
    proc: Process,
    port: u16,
    _dir: TempDir,
}

impl Redis {
    async fn start(server_bin: &Path) -> Redis {
        let dir = TempDir::new("redis");
        let port = free_tcp_port();
        let mut cmd = Command::new(server_bin);
        cmd.arg("--port")
            .arg(port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ])
            .arg("--dir")
            .arg(dir.path());
        let mut proc = Process::spawn("redis-server", cmd);
        proc.wait_for_line(
            Stream::Stdout,
            |l| l.contains("Ready to accept connections"),
            STEP,
        )
        .await;
        Redis {
            proc,
            port,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// `redis-cli -h 127.0.0.1 -p PORT ARGS…`, run to its end.
async fn redis_cli(cli_bin: &Path, port: u16, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(cli_bin);
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(args);
    run(cmd).await
}

/// redis-cli through `ztpctl connect redis.svc.internal --listen`: `set k v` answers OK,
/// `get k` answers v, and the value is in the real redis-server (read directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_through_ztpctl_connect_listen() {
    redis_through("redis_cli_through_ztpctl_connect_listen", "tcp").await;
}

/// The same with `--transport quic`, and many redis-cli at once: every local connection
/// is a stream of ONE QUIC connection (all their records come from one client address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_through_ztpctl_connect_listen_over_quic() {
    redis_through("redis_cli_through_ztpctl_connect_listen_over_quic", "quic").await;
}

async fn redis_through(test: &str, transport: &'static str) {
    let Some(tools) = require_tools(test, &["redis-server", "redis-cli"]) else {
        return;
    };
    let (server_bin, cli_bin) = (&tools[0], &tools[1]);
    let mut redis = Redis::start(server_bin).await;
    let port = redis.port;
    let gw = Gateway::start(
        &service("redis.svc.internal", "tcp", redis.addr()),
        transport,
    )
    .await;
    let local = free_tcp_port();
    let listen = format!("127.0.0.1:{local}");
    let mut conn = gw.spawn_connect("alice", "redis.svc.internal", &["--listen", &listen]);
    conn.wait_for_line(
        Stream::Stderr,
        |l| l.starts_with(&format!("ztpctl: {listen} -> redis.svc.internal via")),
        STEP,
    )
    .await;

    let out = redis_cli(cli_bin, local, &["set", "k", "v"]).await;
    assert!(
        out.status.success() && text(&out.stdout) == "OK\n",
        "redis-cli set through ztpctl: {}; {}",
        describe_output(&out),
        conn.output_text()
    );
    let out = redis_cli(cli_bin, local, &["get", "k"]).await;
    assert_eq!(
        text(&out.stdout),
        "v\n",
        "redis-cli get through ztpctl: {}",
        describe_output(&out)
    );
    let out = redis_cli(cli_bin, port, &["get", "k"]).await;
    assert_eq!(
        text(&out.stdout),
        "v\n",
        "the value is not in redis-server itself: {}",
        describe_output(&out)
    );
    // Many local connections at once.
    const MANY: usize = 16;
    let runs: Vec<_> = (0..MANY)
        .map(|i| {
            let mut cmd = Command::new(cli_bin);
            cmd.args(["-h", "127.0.0.1", "-p"])
                .arg(local.to_string())
                .args(["set", &format!("k{i}"), &format!("v{i}")]);
            tokio::spawn(run(cmd))
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let out = r.await.expect("a redis-cli run");
        assert_eq!(
            text(&out.stdout),
            "OK\n",
            "set k{i}: {}",
            describe_output(&out)
        );
    }
    let out = redis_cli(cli_bin, port, &["mget", "k0", &format!("k{}", MANY - 1)]).await;
    assert_eq!(
        text(&out.stdout),
        format!("v0\nv{}\n", MANY - 1),
        "{}",
        describe_output(&out)
    );
    let deadline = tokio::time::Instant::now() + STEP;
    while gw.events("redis.svc.internal").len() < MANY + 2 && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = gw.events("redis.svc.internal");
    assert_eq!(
        events.len(),
        MANY + 2,
        "a record per local connection: {events:?}"
    );
    assert!(
        events
            .iter()
            .all(|ev| ev["decision"] == "allow" && ev["transport"] == transport),
        "{events:?}"
    );
    if transport == "quic" {
        let peers: std::collections::BTreeSet<&str> = events
            .iter()
            .filter_map(|ev| ev["client.addr"].as_str())
            .collect();
        assert_eq!(peers.len(), 1, "one QUIC connection for all: {peers:?}");
    }
    assert!(conn.try_wait().is_none(), "ztpctl connect --listen exited");
    assert!(redis.proc.try_wait().is_none(), "redis-server exited");
}

// ---- HTTP/3 (aioquic) ----------------------------------------------------------------------

/// A real QUIC/HTTP3 exchange through `ztpctl connect --udp-listen`: an aioquic HTTP/3
/// server behind a `quic` service, an aioquic HTTP/3 client on the local port. The inner
/// QUIC connection's packets (its 1,200-byte Initials included) travel as datagram flows
/// (QUIC transport) or framed datagrams (TCP), byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_through_ztpctl_connect_udp_listen_over_quic() {
    http3_through("http3_through_ztpctl_connect_udp_listen_over_quic", "quic").await;
}

/// The same over TLS-over-TCP framed datagrams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_through_ztpctl_connect_udp_listen_over_tcp() {
    http3_through("http3_through_ztpctl_connect_udp_listen_over_tcp", "tcp").await;
}

async fn http3_through(test: &str, transport: &'static str) {
    let Some(python) = ztp_tests::process::require_python_module(test, "aioquic", "aioquic") else {
        return;
    };
    let script = ztp_tests::bins::workspace_root().join("tests/tools/h3_peer.py");
    // The HTTP/3 server's own certificate, from its own CA.
    let h3_pki = TestPki::new();
    let h3_dir = TempDir::new("h3");
    let server_cert = h3_pki.builder().dns("h3.example").server_auth().issue();
    server_cert
        .write(h3_dir.path(), "h3")
        .expect("write the h3 server's files");
    std::fs::write(h3_dir.join("ca.pem"), &h3_pki.ca_pem).expect("write its CA");
    let h3_port = free_udp_port();
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args(["server", "--listen"])
        .arg(format!("127.0.0.1:{h3_port}"))
        .arg("--cert")
        .arg(h3_dir.join("h3.pem"))
        .arg("--key")
        .arg(h3_dir.join("h3.key"));
    let mut server = Process::spawn("h3 server", cmd);
    server
        .wait_for_line(Stream::Stdout, |l| l == "listening", STEP)
        .await;

    let gw = Gateway::start(
        &service(
            "h3.svc.internal",
            "quic",
            SocketAddr::from(([127, 0, 0, 1], h3_port)),
        ),
        transport,
    )
    .await;
    let local = free_udp_port();
    let listen = format!("127.0.0.1:{local}");
    let mut conn = gw.spawn_connect("alice", "h3.svc.internal", &["--udp-listen", &listen]);
    conn.wait_for_line(
        Stream::Stderr,
        |l| l.starts_with(&format!("ztpctl: udp {listen} -> h3.svc.internal via")),
        STEP,
    )
    .await;
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args([
            "client",
            "--connect",
            &listen,
            "--sni",
            "h3.example",
            "--ca",
        ])
        .arg(h3_dir.join("ca.pem"))
        .args(["--path", "/through-ztp"]);
    let out = run(cmd).await;
    let line = text(&out.stdout);
    let answer: Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| {
        panic!(
            "the h3 client printed {line:?}: {}; {}",
            describe_output(&out),
            conn.output_text()
        )
    });
    assert_eq!(answer["status"], 200, "{answer}; {}", conn.output_text());
    assert_eq!(answer["body"], "hello over h3: /through-ztp", "{answer}");
    assert!(server.try_wait().is_none(), "the h3 server exited");
    assert!(conn.try_wait().is_none(), "ztpctl connect exited");
}

// ---- a connector's tunnels from two replicas ----------------------------------------------

/// `service(name, "tcp", address)`, served through connector `lab`.
fn lab_service(name: &str, address: SocketAddr) -> String {
    format!("{}    connector: lab\n", service(name, "tcp", address))
}

/// `ztpctl connector run --tunnels N --via localhost:PORT,…` with the certificate
/// `lab.pem`/`lab.key` and `ca.pem` in `files`.
fn run_lab_connector(files: &TempDir, vias: &[SocketAddr]) -> Process {
    let via = vias
        .iter()
        .map(|a| format!("localhost:{}", a.port()))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new(Bin::Ztpctl.path());
    cmd.args(["connector", "run", "--tunnels"])
        .arg(vias.len().to_string())
        .arg("--via")
        .arg(via)
        .arg("--cert")
        .arg(files.join("lab.pem"))
        .arg("--key")
        .arg(files.join("lab.key"))
        .arg("--ca")
        .arg(files.join("ca.pem"));
    for k in ZTPCTL_ENV {
        cmd.env_remove(k);
    }
    cmd.env("XDG_CONFIG_HOME", files.path());
    Process::spawn("ztpctl connector run (lab)", cmd)
}

/// One line of /proc/net/{tcp,tcp6,udp,udp6}.
#[derive(Debug, Clone)]
struct ProcSocket {
    table: &'static str,
    local: SocketAddr,
    remote: SocketAddr,
    /// `st` (TCP: 0x01 is ESTABLISHED).
    state: u8,
    inode: u64,
}

const TCP_ESTABLISHED: u8 = 0x01;

/// An address as /proc/net prints it: the IP as 32-bit words in the host's byte order
/// (one for IPv4, four for IPv6), `:`, the port, all in hex.
fn proc_addr(field: &str) -> Option<SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        ip.get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Ipv6Addr::from(bytes).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The sockets of /proc/net/`table` (`tcp`, `tcp6`, `udp`, `udp6`).
fn proc_sockets(table: &'static str) -> Vec<ProcSocket> {
    let text = std::fs::read_to_string(format!("/proc/net/{table}")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(ProcSocket {
                table,
                local: proc_addr(f.get(1)?)?,
                remote: proc_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The processes that hold each socket of `socks` open (a `socket:[INODE]` link in
/// /proc/PID/fd), found by scanning every process this test may read.
fn with_holders(socks: Vec<ProcSocket>) -> Vec<(ProcSocket, BTreeSet<u32>)> {
    let mut holders: BTreeMap<u64, BTreeSet<u32>> =
        socks.iter().map(|s| (s.inode, BTreeSet::new())).collect();
    for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = proc_dir
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let inode = std::fs::read_link(fd.path()).ok().and_then(|t| {
                t.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            });
            if let Some(pids) = inode.and_then(|i| holders.get_mut(&i)) {
                pids.insert(pid);
            }
        }
    }
    socks
        .into_iter()
        .map(|s| {
            let pids = holders.get(&s.inode).cloned().unwrap_or_default();
            (s, pids)
        })
        .collect()
}

/// The established TCP sockets that dialled `backend` (their remote end is `backend`:
/// the client side of its connections, not its listening or accepted sockets), with the
/// processes holding them.
fn dialers_of(backend: SocketAddr) -> Vec<(ProcSocket, BTreeSet<u32>)> {
    let socks = ["tcp", "tcp6"]
        .into_iter()
        .flat_map(proc_sockets)
        .filter(|s| s.state == TCP_ESTABLISHED && s.remote == backend && s.inode != 0)
        .collect();
    with_holders(socks)
}

/// Asserts that what dialled `backend` is the connector (pid `connector`) alone: at
/// least `at_least` established sockets to it, every one held by the connector and by
/// nothing else, and none, ever, by a data plane (`planes`). Polls (bounded) for
/// sockets still being opened or closed.
async fn assert_only_the_connector_dials(
    what: &str,
    backend: SocketAddr,
    at_least: usize,
    connector: u32,
    planes: &[u32],
) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let socks = dialers_of(backend);
        for (s, pids) in &socks {
            assert!(
                pids.iter().all(|p| !planes.contains(p)),
                "a data plane (pids {planes:?}) holds a connection to {what}'s backend \
                 {backend}: {s:?} held by {pids:?}; the connector is {connector}"
            );
        }
        let by_connector = socks
            .iter()
            .filter(|(_, pids)| pids.len() == 1 && pids.contains(&connector))
            .count();
        if by_connector >= at_least && by_connector == socks.len() {
            eprintln!(
                "{what}: {by_connector} connection(s) to {backend}, all the connector's \
                 (pid {connector}): {socks:?}"
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connections to {what}'s backend {backend}: expected at least {at_least}, \
             every one held by the connector (pid {connector}) alone; found {socks:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The processes holding the socket at local address `addr`: a UDP socket on its port
/// (a QUIC endpoint; bound to that address or a wildcard), or a TCP socket with that
/// local address.
fn holders_of_local(addr: SocketAddr) -> Vec<(ProcSocket, BTreeSet<u32>)> {
    let socks = ["udp", "udp6", "tcp", "tcp6"]
        .into_iter()
        .flat_map(proc_sockets)
        .filter(|s| {
            s.inode != 0
                && if s.table.starts_with("udp") {
                    s.local.port() == addr.port()
                        && (s.local.ip() == addr.ip() || s.local.ip().is_unspecified())
                } else {
                    s.local == addr && s.state == TCP_ESTABLISHED
                }
        })
        .collect();
    with_holders(socks)
}

/// Opens a TCP connection to `local` (a `ztpctl connect --listen` port) and does `hello`
/// on it: the session stays open as long as the stream lives.
async fn live_session(
    local: u16,
    send: &[u8],
    expect_prefix: &[u8],
    conn: &Process,
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(STEP, tokio::net::TcpStream::connect(("127.0.0.1", local)))
        .await
        .expect("connect in time")
        .expect("connect to ztpctl connect --listen");
    if !send.is_empty() {
        s.write_all(send).await.expect("write");
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    tokio::time::timeout(STEP, async {
        while got.len() < expect_prefix.len() {
            let n = s.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "the session through 127.0.0.1:{local} ended after {:?}; {}",
                text(&got),
                conn.output_text()
            );
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no {:?} through 127.0.0.1:{local} within {STEP:?} (got {:?}); {}",
            text(expect_prefix),
            text(&got),
            conn.output_text()
        )
    });
    assert!(
        got.starts_with(expect_prefix),
        "through 127.0.0.1:{local}: {:?}, expected {:?} first",
        text(&got),
        text(expect_prefix)
    );
    s
}

/// `ztpctl connect SERVICE --listen 127.0.0.1:PORT` through `via`, listening.
async fn listen_through(user: &UserFiles, via: SocketAddr, service: &str) -> (Process, u16) {
    let local = free_tcp_port();
    let listen = format!("127.0.0.1:{local}");
    let mut conn = user.spawn_connect(via, "alice", service, &["--listen", &listen]);
    conn.wait_for_line(
        Stream::Stderr,
        |l| l.starts_with(&format!("ztpctl: {listen} -> {service} via")),
        STEP,
    )
    .await;
    (conn, local)
}

/// A backend reachable only by the connector is served through two replicas; ssh and
/// redis-cli work through it.
///
/// A real sshd and redis-server; two data planes (one PKI, file snapshots) whose
/// `ssh.svc.internal` and `redis.svc.internal` name connector `lab`; the real
/// `ztpctl connector run --tunnels 2 --via A,B`, one tunnel up to each. Through each
/// replica, ssh (ProxyCommand `ztpctl connect %h`) runs a remote command, and redis-cli
/// (through `ztpctl connect --listen`) sets and gets values that the other replica's
/// sessions and redis-server itself then read. While sessions to both backends are live
/// through both replicas, /proc says every socket connected to a backend is the
/// connector's, none a data plane's; each replica's records name the connector and its
/// tunnel (a socket of the connector's, one per replica) as the backend, never the
/// backend's address. Bob (in no group) gets ztpctl's `403 forbidden` through A, and no
/// backend is dialled for him.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_and_redis_through_a_connector_behind_two_replicas() {
    const TEST: &str = "ssh_and_redis_through_a_connector_behind_two_replicas";
    let Some(tools) = require_tools(
        TEST,
        &["ssh", "ssh-keygen", "sshd", "redis-server", "redis-cli"],
    ) else {
        return;
    };
    let (ssh_bin, keygen_bin, sshd_bin) = (&tools[0], &tools[1], &tools[2]);
    let (redis_bin, cli_bin) = (&tools[3], &tools[4]);
    let mut sshd = Sshd::start(sshd_bin, keygen_bin).await;
    let mut redis = Redis::start(redis_bin).await;

    let pki = TestPki::new();
    let services = format!(
        "{}{}",
        lab_service("ssh.svc.internal", sshd.addr),
        lab_service("redis.svc.internal", redis.addr())
    );
    let yaml = format!("{}connectors:\n  - name: lab\n", snapshot(&services));
    let a = Dataplane::start(&pki, &yaml, &[]).await;
    let b = Dataplane::start(&pki, &yaml, &[]).await;
    let planes = [a.pid(), b.pid()];
    let user = UserFiles::new(&pki, "tcp");

    let lab_files = TempDir::new("connector-lab");
    std::fs::write(lab_files.join("ca.pem"), &pki.ca_pem).expect("write ca.pem");
    pki.builder()
        .uri("spiffe://ztp.internal/connector/lab")
        .issue()
        .write(lab_files.path(), "lab")
        .expect("write the connector's certificate");
    let mut connector = run_lab_connector(&lab_files, &[a.addr(), b.addr()]);
    // Both tunnels up, each told it serves both services, one on each replica.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let serving = connector
            .lines(Stream::Stderr)
            .iter()
            .filter(|l| l.contains("serving 2 service(s)"))
            .count();
        if serving >= 2 {
            break;
        }
        assert!(
            connector.try_wait().is_none() && tokio::time::Instant::now() < deadline,
            "the connector's two tunnels are not serving; {}",
            connector.output_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (dp, which) in [(&a, "A"), (&b, "B")] {
        let up = dp
            .wait_for_log(
                |v| v["message"] == "tunnel up" && v["connector"] == "lab",
                STEP,
            )
            .await;
        assert!(
            up.is_some(),
            "replica {which} holds no tunnel of lab; {}",
            connector.output_text()
        );
    }
    let connector_pid = connector.pid();

    // ssh through each replica.
    for (dp, which) in [(&a, "A"), (&b, "B")] {
        let out = ssh_via(
            ssh_bin,
            &user,
            dp.addr(),
            "alice",
            &sshd,
            "echo hello-over-ztp",
        )
        .await;
        assert!(
            out.status.success(),
            "ssh as alice through replica {which} and the connector failed: {}; {}",
            describe_output(&out),
            connector.output_text()
        );
        assert_eq!(
            text(&out.stdout),
            "hello-over-ztp\n",
            "through replica {which}: {}",
            describe_output(&out)
        );
        wait_event(dp, "ssh.svc.internal", |v| {
            v["user.name"] == "alice" && v["decision"] == "allow"
        })
        .await;
    }
    let accepted = format!("Accepted publickey for {} from 127.0.0.1", sshd.user);
    let count_accepted = |sshd: &Sshd| {
        sshd.proc
            .lines(Stream::Stderr)
            .iter()
            .filter(|l| l.contains(&accepted))
            .count()
    };
    let deadline = tokio::time::Instant::now() + STEP;
    while count_accepted(&sshd) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sshd did not log two accepted logins; {}",
            sshd.proc.output_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // redis-cli through each replica: what one sets, the other gets.
    let (conn_a, local_a) = listen_through(&user, a.addr(), "redis.svc.internal").await;
    let (conn_b, local_b) = listen_through(&user, b.addr(), "redis.svc.internal").await;
    let steps: [(u16, &Process, &[&str], &str); 4] = [
        (local_b, &conn_b, &["set", "via", "replica-b"], "OK\n"),
        (local_a, &conn_a, &["get", "via"], "replica-b\n"),
        (local_a, &conn_a, &["set", "from", "replica-a"], "OK\n"),
        (local_b, &conn_b, &["get", "from"], "replica-a\n"),
    ];
    for (local, conn, args, want) in steps {
        let out = redis_cli(cli_bin, local, args).await;
        assert!(
            out.status.success() && text(&out.stdout) == want,
            "redis-cli {args:?} through 127.0.0.1:{local}: {}, expected {want:?}; {}; {}",
            describe_output(&out),
            conn.output_text(),
            connector.output_text()
        );
    }
    let out = redis_cli(cli_bin, redis.port, &["mget", "via", "from"]).await;
    assert_eq!(
        text(&out.stdout),
        "replica-b\nreplica-a\n",
        "the values are not in redis-server itself: {}",
        describe_output(&out)
    );

    // Live sessions to both backends through both replicas: who holds the sockets that
    // dialled the backends?
    let (ssh_a, ssh_local_a) = listen_through(&user, a.addr(), "ssh.svc.internal").await;
    let (ssh_b, ssh_local_b) = listen_through(&user, b.addr(), "ssh.svc.internal").await;
    let live = [
        live_session(local_a, b"PING\r\n", b"+PONG\r\n", &conn_a).await,
        live_session(local_b, b"PING\r\n", b"+PONG\r\n", &conn_b).await,
        live_session(ssh_local_a, b"", b"SSH-2.0-", &ssh_a).await,
        live_session(ssh_local_b, b"", b"SSH-2.0-", &ssh_b).await,
    ];
    assert_only_the_connector_dials("redis", redis.addr(), 2, connector_pid, &planes).await;
    assert_only_the_connector_dials("ssh", sshd.addr, 2, connector_pid, &planes).await;
    drop(live);

    // Each replica's records: the connector's tunnel as the backend, never the backend.
    let mut tunnel_ends = Vec::new();
    for (dp, which) in [(&a, "A"), (&b, "B")] {
        for (sni, backend, sessions) in [
            ("ssh.svc.internal", sshd.addr, 2),
            ("redis.svc.internal", redis.addr(), 3),
        ] {
            let deadline = tokio::time::Instant::now() + STEP;
            let allowed = |dp: &Dataplane| -> Vec<Value> {
                events(dp, sni)
                    .into_iter()
                    .filter(|v| v["decision"] == "allow")
                    .collect()
            };
            while allowed(dp).len() < sessions {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "replica {which} recorded {} of {sessions} sessions of {sni}: {:?}",
                    allowed(dp).len(),
                    events(dp, sni)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for ev in allowed(dp) {
                assert_eq!(ev["service.connector"], "lab", "replica {which}: {ev}");
                assert_eq!(ev["user.name"], "alice", "replica {which}: {ev}");
                let addr = ev["backend.addr"]
                    .as_str()
                    .and_then(|s| s.parse::<SocketAddr>().ok())
                    .unwrap_or_else(|| panic!("replica {which}: no backend.addr: {ev}"));
                assert_ne!(
                    addr, backend,
                    "replica {which} names the backend, not the tunnel: {ev}"
                );
                tunnel_ends.push((which, addr));
            }
        }
    }
    // One tunnel per replica: every record of a replica names the same end, the two
    // replicas different ones, and each end is a socket of the connector.
    let ends_of = |which: &str| -> BTreeSet<SocketAddr> {
        tunnel_ends
            .iter()
            .filter(|(w, _)| *w == which)
            .map(|(_, a)| *a)
            .collect()
    };
    let (ends_a, ends_b) = (ends_of("A"), ends_of("B"));
    assert_eq!(ends_a.len(), 1, "replica A's records: {tunnel_ends:?}");
    assert_eq!(ends_b.len(), 1, "replica B's records: {tunnel_ends:?}");
    assert!(ends_a.is_disjoint(&ends_b), "{tunnel_ends:?}");
    for end in ends_a.iter().chain(&ends_b) {
        let holders = holders_of_local(*end);
        let pids: BTreeSet<u32> = holders.iter().flat_map(|(_, p)| p.clone()).collect();
        assert_eq!(
            pids,
            BTreeSet::from([connector_pid]),
            "the records' backend {end} is not a socket of the connector (pid \
             {connector_pid}): {holders:?}"
        );
    }

    // Bob, in no group, through A: ztpctl's 403 line, and no backend dialled.
    let accepted_before = count_accepted(&sshd);
    let out = ssh_via(
        ssh_bin,
        &user,
        a.addr(),
        "bob",
        &sshd,
        "echo hello-over-ztp",
    )
    .await;
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "ssh as bob (not in the service's group) through A: {}",
        describe_output(&out)
    );
    let stderr = text(&out.stderr);
    let refusal: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ztpctl:"))
        .collect();
    assert!(
        refusal.len() == 1 && refusal[0].ends_with("403 forbidden"),
        "expected ztpctl's one `403 forbidden` line on ssh's stderr: {stderr:?}"
    );
    let ev = wait_event(&a, "ssh.svc.internal", |v| v["user.name"] == "bob").await;
    assert_eq!(ev["decision"], "deny", "{ev}");
    assert_eq!(ev["refusal.code"], 403, "{ev}");
    assert!(ev["backend.addr"].is_null(), "a backend was dialled: {ev}");
    assert_eq!(
        count_accepted(&sshd),
        accepted_before,
        "sshd accepted bob's login"
    );

    assert!(
        connector.try_wait().is_none(),
        "the connector exited; {}",
        connector.output_text()
    );
    assert!(sshd.proc.try_wait().is_none(), "sshd exited");
    assert!(redis.proc.try_wait().is_none(), "redis-server exited");
    for mut p in [ssh_a, ssh_b, conn_a, conn_b] {
        p.kill();
    }
    connector.kill();
}
