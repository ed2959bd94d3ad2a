//! Real clients from Debian's packages through `ztpctl connect` (README "Walkthrough: the
//! operator's day with ztpctl"): `ssh` with `ztpctl connect %h` as its ProxyCommand
//! (standard input and output) to a real `sshd`; `dig` through `--udp-listen` (framed
//! datagrams, ALPN `ztp-dgram`) to a real DNS server (dnsmasq) behind a `protocol: udp`
//! service; `redis-cli` through `--listen` to a real `redis-server`.
//!
//! Every server runs on 127.0.0.1 with a configuration the test writes into a temporary
//! directory; every process is the test's own child and is killed by its guard. A test
//! whose tools are missing is skipped with a visible `SKIPPED` line naming them and their
//! package, or fails under `ZTP_REQUIRE_TOOLS=1`
//! (`.ci/run` installs openssh-client, openssh-server, dnsutils, dnsmasq, redis-server and
//! redis-tools, and sets it).

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

/// A data plane, and the files a user of `ztpctl connect` holds: `ca.pem`, and
/// `alice.pem`/`alice.key`, `bob.pem`/`bob.key`.
struct Gateway {
    dp: Dataplane,
    files: TempDir,
    /// `ztpctl connect --transport`.
    transport: &'static str,
}

impl Gateway {
    async fn start(services: &str, transport: &'static str) -> Gateway {
        Gateway::start_with(services, transport, &[]).await
    }

    async fn start_with(services: &str, transport: &'static str, args: &[&str]) -> Gateway {
        let pki = TestPki::new();
        let dp = Dataplane::start(&pki, &snapshot(services), args).await;
        let files = TempDir::new("ztpctl-user");
        std::fs::write(files.join("ca.pem"), &pki.ca_pem).expect("write ca.pem");
        for who in ["alice", "bob"] {
            pki.client_email(&format!("{who}@example.com"))
                .write(files.path(), who)
                .expect("write the user's certificate");
        }
        std::fs::create_dir_all(files.join("xdg")).expect("create the config home");
        Gateway {
            dp,
            files,
            transport,
        }
    }

    /// `--via … --cert … --key … --ca …` for `who`.
    fn connect_flags(&self, who: &str) -> Vec<String> {
        let p = |name: String| self.files.join(name).display().to_string();
        vec![
            "--via".into(),
            self.dp.addr().to_string(),
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

    /// `ztpctl connect SERVICE` as `who`, with `extra` flags, running.
    fn spawn_connect(&self, who: &str, service: &str, extra: &[&str]) -> Process {
        let mut cmd = Command::new(Bin::Ztpctl.path());
        cmd.arg("connect")
            .arg(service)
            .args(self.connect_flags(who))
            .args(extra);
        self.isolate(&mut cmd);
        Process::spawn(&format!("ztpctl connect {service} ({who})"), cmd)
    }

    /// The `connection` events the data plane logged for `sni`.
    fn events(&self, sni: &str) -> Vec<Value> {
        self.dp
            .logs()
            .into_iter()
            .filter(|v| v["message"] == "connection" && v["tls.sni"] == sni)
            .collect()
    }

    /// Waits (bounded) for the first `connection` event for `sni` matching `pred`.
    async fn wait_event<F: Fn(&Value) -> bool>(&self, sni: &str, pred: F) -> Value {
        self.dp
            .wait_for_log(
                |v| v["message"] == "connection" && v["tls.sni"] == sni && pred(v),
                STEP,
            )
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no matching `connection` event for {sni} within {STEP:?}; events: {:?}",
                    self.events(sni)
                )
            })
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

/// `ssh … USER@ssh.svc.internal COMMAND` with `ztpctl connect %h` (as `who`) as its
/// ProxyCommand.
async fn ssh(
    ssh: &Path,
    gw: &Gateway,
    who: &str,
    sshd: &Sshd,
    remote: &str,
) -> std::process::Output {
    let proxy = std::iter::once(sh_quote(Bin::Ztpctl.path()))
        .chain(["connect".to_string(), "%h".to_string()])
        .chain(gw.connect_flags(who).iter().map(sh_quote))
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
    gw.isolate(&mut cmd);
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
    let mut redis = Process::spawn("redis-server", cmd);
    redis
        .wait_for_line(
            Stream::Stdout,
            |l| l.contains("Ready to accept connections"),
            STEP,
        )
        .await;
    let gw = Gateway::start(
        &service(
            "redis.svc.internal",
            "tcp",
            SocketAddr::from(([127, 0, 0, 1], port)),
        ),
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

    let cli = |port: u16, args: &[&str]| {
        let mut cmd = Command::new(cli_bin);
        cmd.args(["-h", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(args);
        run(cmd)
    };
    let out = cli(local, &["set", "k", "v"]).await;
    assert!(
        out.status.success() && text(&out.stdout) == "OK\n",
        "redis-cli set through ztpctl: {}; {}",
        describe_output(&out),
        conn.output_text()
    );
    let out = cli(local, &["get", "k"]).await;
    assert_eq!(
        text(&out.stdout),
        "v\n",
        "redis-cli get through ztpctl: {}",
        describe_output(&out)
    );
    let out = cli(port, &["get", "k"]).await;
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
    let out = cli(port, &["mget", "k0", &format!("k{}", MANY - 1)]).await;
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
    assert!(redis.try_wait().is_none(), "redis-server exited");
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
