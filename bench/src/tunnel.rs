//! Connectors' tunnels through the release binaries, measured in one run: a control
//! plane, data-plane replicas subscribed to it, the real `ztpctl connector run`, and (for
//! scale) many in-bench connectors in one process.
//!
//! Everything runs on loopback with the release binaries beside this program (started
//! through the test harness's `Control` and `Dataplane` guards). The data planes
//! (`--threads 1`) are pinned to CPU 0; this program (the load client, one tokio
//! thread), the backends (a child process: echo, sink and source, one port each), the
//! control plane and the connectors share CPU 1. Per-source limits are off: all the load
//! comes from 127.0.0.1.
//!
//! - `latency`: mTLS TCP sessions (connect, full handshake with a client certificate,
//!   1 byte, its echo from the backend) (a) direct: a plain tcp service on replica A;
//!   (b) tunnel: a service behind connector `lab`, whose only tunnel (`ztpctl connector
//!   run --tunnels 1 --via A`) is on A, the client on A; (c) relay: the same service, the
//!   client on replica B (B carries it to A over QUIC `ztp-relay/1`). Interleaved,
//!   `--latency` of each per round after a tenth as many of warm-up. Beside it the
//!   connector round trip on its own: a QUIC echo server pinned to CPU 0 (a child
//!   process, idle data planes) and this program on CPU 1, a new stream + 1 byte + its
//!   echo on an open connection (what the header and status byte of a tunnel session
//!   cost at least), and a 1-byte ping-pong on an open stream.
//! - `bulk`: one session, `--secs` of upload (to the sink) and of download (from the
//!   source), 64 KiB writes, 300 ms of warm-up, direct and through the tunnel (client on
//!   A); MB/s, the data plane's CPU seconds per GB, and the connector's CPU.
//! - `mtu` (not by default): the same bulk through two in-bench connectors (dialling the
//!   backends like `ztpctl connector run`, tunnels to A): `small0` with quinn's default
//!   packets (≤ 1452 bytes, as `ztpctl connector run` has them) and `jumbo0` with
//!   6,000-byte ones (as the data plane's listener allows): what the tunnel's packet size
//!   costs.
//! - `scale` (once, on a fresh replica C): `--connectors` connectors registered with one
//!   `POST /v1/import`, each with one service, each holding one tunnel to C, from one
//!   child process of this program speaking `ztp_proto::tunnel` with quinn (one endpoint
//!   and one connection per connector, the transport settings of `ztpctl connector
//!   run`); then `--sessions` mTLS sessions through them, spread over the connectors, each
//!   echoed once (by the in-bench connector, on the stream: no backend socket) and held.
//!   C's VmRSS before, after the tunnels and after the sessions: KiB per tunnel and per
//!   tunnel session. For comparison, the same number of direct idle sessions on a fresh
//!   replica D (their backend connections open), and the RSS of one `ztpctl connector
//!   run` against one in-bench connector.
//! - `failover` (not by default: 20–45 s a round): a replica holding a tunnel dies
//!   (`kill -9`). Three fresh replicas A, B, C (`--listen 127.0.0.1:PORT --advertise
//!   localhost:PORT`, fixed ports, so that one can come back where it was; `localhost`,
//!   as their certificate names them) and the real `ztpctl connector run
//!   --tunnels 2 --via A,B,C`; which replicas hold its tunnels is asked of the control
//!   plane (`GET /v1/connectors/lab`), never assumed. The victim is the holder of the
//!   oldest tunnel, once that has lived `--failover-age` (31 s: a replica that dies has
//!   usually held its tunnel long, and ztpctl resets its redial backoff only after a
//!   tunnel that lived 30 s; younger, it redials 0.4, 0.8, … s later). A load of new
//!   sessions through the tunnel service (connect, mTLS handshake, 1 byte, its echo,
//!   close; each with a 5 s deadline) starts 0.5–1.5 s (at random, so that the kill falls
//!   at any phase of the connector's periodic checks) before the kill: one every 10 ms on
//!   each of the two replicas that survive (the other holder, which has its own tunnel,
//!   and the third, which relays), until 1 s after both the tunnels' return and the
//!   victim's leaving the listing (at least 4 s, at most 15 s after the kill). Per round:
//!   (1) recovery, the time from the kill to the start of the last failed session
//!   started after it (0 if none failed), with the failed sessions' count and
//!   `ZTP-ERROR` (or I/O) lines, and those started after the first retry landed (the
//!   first session on the same replica started after the first failure came back, and
//!   served: as a client retrying at once would see); (2) the time from the kill until
//!   the control plane lists 2 live tunnels on replicas other than the victim, polled
//!   every 20 ms (beside it when the victim's tunnel left the listing, and when ztpctl
//!   said it learnt the replicas without the victim, gave up its tunnel there (ended or
//!   moved) and had a new one up, its stderr polled likewise); the listing changes as
//!   soon as a replica reports a change (at once) or its subscription ends, while the
//!   map the replicas route by (and pass on to the connector) reaches them 100 ms after
//!   a change (a burst is one message), so what they act on lags the listing by ~100
//!   ms; (3) the longest served session among those started in the 2 s after the kill,
//!   and the served sessions slower than 1 s (how many, when the last started). Then the
//!   victim is started again on its ports, and the next round begins once the tunnels
//!   listed have stayed the same for 12 s with no load (ztpctl moves a tunnel back to a
//!   better-placed replica only when it carries no session) and 1 s of sessions on all
//!   three replicas were all served. `--failover-rounds` rounds (default `--rounds`);
//!   medians, maxima, p99 from 20 rounds. `--failover-held N` (default 0) also holds N
//!   idle sessions through the tunnel service on each replica from before the load to
//!   the round's end, as long-lived sessions (SSH, say) would be: the tunnels, the
//!   victim's among them, then always carry some. `--failover-signal STOP` stops the
//!   victim (SIGSTOP) instead of killing it: a hung replica or a lost host, whose
//!   connections no kernel resets (the load then runs up to 45 s; the victim is killed
//!   at the round's end).
//!
//! Usage: tunnel [--latency 1000] [--secs 5] [--rounds 3] [--connectors 200]
//!               [--sessions 2000] [--tests latency,bulk,mtu,scale,failover] [--threads 1]
//!               [--connector-mtu 1452] [--connector-transport auto|quic|tcp]
//!               [--failover-rounds N] [--failover-age 31] [--failover-held 0]
//!               [--failover-signal KILL|STOP] [--json FILE]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, RecvStream, SendStream, VarInt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use ztp_proto::tunnel::{decode_assignments, decode_header, Status, MAX_ASSIGNMENTS, MAX_HEADER};
use ztp_tests::process::{Process, Stream};
use ztp_tests::{Control, ControlOptions, Dataplane, TempDir, TestCert, TestPki};

mod common;
use common::{
    bin, client_config, echo, fds, free_port, machine, pin, raise_nofile, rss_kib, serve_loopback,
    stat_cpu, Proc,
};

const ECHO: &str = "echo.svc.internal";
const SINK: &str = "sink.svc.internal";
const SOURCE: &str = "source.svc.internal";
const LAB_ECHO: &str = "lab-echo.svc.internal";
const LAB_SINK: &str = "lab-sink.svc.internal";
const LAB_SOURCE: &str = "lab-source.svc.internal";
/// The `mtu` test's in-bench connectors: `small0` with quinn's default packets (as
/// `ztpctl connector run`), `jumbo0` with 6,000-byte ones; their services are
/// `PREFIX-echo`, `PREFIX-sink` and `PREFIX-source`.
const MTU_CONNECTORS: [(&str, u16); 2] = [("small", 1452), ("jumbo", 6000)];
const CHUNK: usize = 64 * 1024;
/// Bound on waiting for something to become true (a replica current, a tunnel up).
const WAIT: Duration = Duration::from_secs(60);
/// The ALPN of the connector-round-trip echo server.
const QECHO_ALPN: &[u8] = b"bench-echo";

#[derive(Clone)]
struct Opts {
    latency: usize,
    secs: f64,
    rounds: usize,
    connectors: usize,
    sessions: usize,
    tests: Vec<String>,
    threads: usize,
    /// Max UDP payload of the in-bench connectors (1452: quinn's default, as `ztpctl
    /// connector run` has it).
    connector_mtu: u16,
    /// `ztpctl connector run --transport` for the `latency` and `bulk` tests' connector
    /// (auto, quic or tcp).
    connector_transport: String,
    /// Rounds of the `failover` test (default: `rounds`).
    failover_rounds: usize,
    /// The least age of the tunnel whose replica is killed, seconds.
    failover_age: f64,
    /// Idle sessions held open through the tunnel service on each failover replica
    /// during a round (0: the tunnels carry only the load's short sessions).
    failover_held: usize,
    /// The failover victim is stopped (SIGSTOP: a hung replica, whose sockets stay open
    /// and answer nothing) instead of killed.
    failover_stop: bool,
    json: Option<PathBuf>,
}

impl Opts {
    fn has(&self, test: &str) -> bool {
        self.tests.iter().any(|t| t == test)
    }
}

fn opts() -> Opts {
    let mut o = Opts {
        latency: 1000,
        secs: 5.0,
        rounds: 3,
        connectors: 200,
        sessions: 2000,
        tests: vec!["latency".into(), "bulk".into(), "scale".into()],
        threads: 1,
        connector_mtu: 1452,
        connector_transport: "auto".into(),
        failover_rounds: 0,
        failover_age: 31.0,
        failover_held: 0,
        failover_stop: false,
        json: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--latency" => o.latency = v.parse().expect("--latency N"),
            "--secs" => o.secs = v.parse().expect("--secs SECONDS"),
            "--rounds" => o.rounds = v.parse().expect("--rounds N"),
            "--connectors" => o.connectors = v.parse().expect("--connectors N"),
            "--sessions" => o.sessions = v.parse().expect("--sessions N"),
            "--tests" => o.tests = v.split(',').map(str::to_owned).collect(),
            "--threads" => o.threads = v.parse().expect("--threads N"),
            "--connector-mtu" => o.connector_mtu = v.parse().expect("--connector-mtu BYTES"),
            "--connector-transport" => o.connector_transport = v.to_owned(),
            "--failover-rounds" => o.failover_rounds = v.parse().expect("--failover-rounds N"),
            "--failover-age" => o.failover_age = v.parse().expect("--failover-age SECONDS"),
            "--failover-held" => o.failover_held = v.parse().expect("--failover-held N"),
            "--failover-signal" => {
                o.failover_stop = match v.as_str() {
                    "KILL" => false,
                    "STOP" => true,
                    _ => panic!("--failover-signal KILL|STOP"),
                }
            }
            "--json" => o.json = Some(PathBuf::from(v)),
            other => panic!("unknown argument {other} (see the comment at the top of tunnel.rs)"),
        }
        i += 2;
    }
    for t in &o.tests {
        assert!(
            ["latency", "bulk", "mtu", "scale", "failover"].contains(&t.as_str()),
            "--tests: {t} is not latency, bulk, mtu, scale or failover"
        );
    }
    o.rounds = o.rounds.max(1);
    if o.failover_rounds == 0 {
        o.failover_rounds = o.rounds;
    }
    o.failover_age = o.failover_age.clamp(0.0, 120.0);
    o.latency = o.latency.max(10);
    o.connectors = o.connectors.max(1);
    o.connector_mtu = o.connector_mtu.clamp(1200, 6500);
    o
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("backend") => {
            die_with_parent();
            let port = |i: usize| args[i].parse::<u16>().expect("backend ECHO SINK SOURCE");
            backend(port(2), port(3), port(4));
            return;
        }
        Some("swarm") => {
            die_with_parent();
            swarm(&args[2..]);
            return;
        }
        Some("qecho") => {
            die_with_parent();
            qecho(&args[2..]);
            return;
        }
        _ => {}
    }
    let mut o = opts();
    // Descriptors: an idle session through a tunnel is one in the data plane (the client
    // connection) and one here; a direct one two in the data plane and one in the backend.
    let nofile = raise_nofile() as usize;
    let spare = 500;
    if o.sessions + spare > nofile {
        let want = o.sessions;
        o.sessions = nofile.saturating_sub(spare);
        eprintln!(
            "open-file limit {nofile}: holding {} sessions (of {want})",
            o.sessions
        );
    }
    if cfg!(debug_assertions) {
        eprintln!("run the release build: cargo run --release -p ztp-bench --bin tunnel");
        std::process::exit(2);
    }
    // The release binaries beside this program, through the harness's guards (with all
    // three set, the harness builds nothing).
    let dp_bin = bin("ztp-dataplane");
    std::env::set_var("ZTP_DATAPLANE_BIN", &dp_bin);
    std::env::set_var("ZTP_CONTROL_BIN", bin("ztp-control"));
    std::env::set_var("ZTPCTL_BIN", bin("ztpctl"));
    // Every child inherits CPU 1; the data planes are moved to CPU 0.
    pin(std::process::id(), "1");
    ztp_tests::install_crypto_provider();

    let ports = (free_port(), free_port(), free_port());
    let backend = Proc(
        Command::new(std::env::current_exe().unwrap())
            .arg("backend")
            .args([ports.0, ports.1, ports.2].map(|p| p.to_string()))
            .spawn()
            .expect("start the backends"),
    );
    for p in [ports.0, ports.1, ports.2] {
        wait_port(p);
    }
    let machine = machine();
    eprintln!("{machine}; data plane {}", dp_bin.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(run(&o, ports, backend.0.id()));
    print_report(&report, &o, &machine);
    drop(backend);
}

/// Child processes die with this program, whatever ends it.
fn die_with_parent() {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
}

// ---------------------------------------------------------------------------------------
// Setup

struct Env {
    pki: TestPki,
    tls: Arc<rustls::ClientConfig>,
    control: Control,
    backend_pid: u32,
    ports: (u16, u16, u16),
    threads: usize,
    /// ca.pem, the connectors' certificates, the echo server's.
    files: TempDir,
}

/// The configuration: the direct services, `lab`'s, and `n` more connectors `cI` each
/// with one service `cI.svc.internal` (addressed at the echo backend).
fn config(ports: (u16, u16, u16), n: usize) -> Value {
    let (echo, sink, source) = ports;
    let mut services = Vec::new();
    for (name, port, connector) in [
        (ECHO, echo, None),
        (SINK, sink, None),
        (SOURCE, source, None),
        (LAB_ECHO, echo, Some("lab")),
        (LAB_SINK, sink, Some("lab")),
        (LAB_SOURCE, source, Some("lab")),
    ] {
        let mut s = json!({"name": name, "protocol": "tcp",
            "address": format!("127.0.0.1:{port}"), "groups": ["bench"]});
        if let Some(c) = connector {
            s["connector"] = json!(c);
        }
        services.push(s);
    }
    let mut connectors = vec![json!({"name": "lab", "description": "ztpctl connector run"})];
    for (prefix, mtu) in MTU_CONNECTORS {
        for (what, port) in [("echo", echo), ("sink", sink), ("source", source)] {
            services.push(json!({"name": format!("{prefix}-{what}.svc.internal"),
                "protocol": "tcp", "address": format!("127.0.0.1:{port}"),
                "groups": ["bench"], "connector": format!("{prefix}0")}));
        }
        connectors.push(json!({"name": format!("{prefix}0"),
            "description": format!("in-bench, {mtu}-byte packets (the mtu test)")}));
    }
    for i in 0..n {
        services.push(
            json!({"name": format!("c{i}.svc.internal"), "protocol": "tcp",
            "address": format!("127.0.0.1:{echo}"), "groups": ["bench"],
            "connector": format!("c{i}")}),
        );
        connectors.push(json!({"name": format!("c{i}")}));
    }
    json!({
        "version": 1,
        "services": services,
        "users": [{"name": "bench", "identities": ["bench@example.com"], "groups": ["bench"]}],
        "groups": [{"name": "bench"}],
        "revoked": [],
        "connectors": connectors,
    })
}

/// `POST /v1/import`; the version it made.
async fn import(control: &Control, snap: &Value) -> u64 {
    let r = control.api("POST", "/v1/import", Some(snap)).await;
    assert_eq!(r.status, 200, "POST /v1/import: {r}");
    r.json()["version"].as_u64().expect("the imported version")
}

/// A replica subscribed to the control plane, ready, pinned to CPU 0.
async fn replica(env: &Env, id: &str) -> Dataplane {
    replica_with(env, id, &[]).await
}

/// [`replica`] with more flags (`--listen`, `--advertise`).
async fn replica_with(env: &Env, id: &str, extra: &[&str]) -> Dataplane {
    let threads = env.threads.to_string();
    let mut args = vec![
        "--threads",
        &threads,
        "--max-connections",
        "100000",
        "--max-connections-per-source",
        "0",
        "--handshake-rate-per-source",
        "0",
    ];
    args.extend_from_slice(extra);
    let mut dp = Dataplane::start_control(&env.pki, &env.control.grpc_url(), id, &args).await;
    assert!(dp.wait_ready(WAIT).await, "replica {id} never became ready");
    pin(dp.pid(), if env.threads > 1 { "0,1" } else { "0" });
    dp
}

/// Waits until every replica in `ids` is connected and has applied `version`.
async fn wait_current(control: &Control, ids: &[&str], version: u64) {
    let end = Instant::now() + WAIT;
    loop {
        let nodes = control.nodes().await;
        let current = ids.iter().all(|id| {
            nodes.iter().any(|n| {
                n["id"].as_str() == Some(id)
                    && n["connected"] == true
                    && n["applied"].as_u64().is_some_and(|v| v >= version)
            })
        });
        if current {
            return;
        }
        assert!(
            Instant::now() < end,
            "replicas {ids:?} not at version {version}: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
}

/// One session: connect, handshake, 1 byte and its echo; the time it took, or what
/// went wrong (a `ZTP-ERROR` line comes back instead of the echo).
async fn one_echo(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s = tls_connect(tls, addr, sni)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"x").await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    let el = t.elapsed();
    if b[0] != b'x' {
        let mut rest = vec![0u8; 256];
        let n = s.read(&mut rest).await.unwrap_or(0);
        return Err(format!(
            "{}{}",
            b[0] as char,
            String::from_utf8_lossy(&rest[..n]).trim_end()
        ));
    }
    let _ = s.shutdown().await;
    Ok(el)
}

/// Retries a session until it is served (bounded).
async fn wait_served(env: &Env, addr: SocketAddr, sni: &str, what: &str) {
    let end = Instant::now() + WAIT;
    loop {
        match one_echo(&env.tls, addr, sni).await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < end, "{what}: never served: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn wait_port(port: u16) {
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "port {port} never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// The backends (a child process): echo, sink and source, one port each.

fn backend(echo_port: u16, sink: u16, source: u16) {
    std::thread::spawn(move || {
        serve_loopback(sink, "sink", |mut s| async move {
            let mut buf = vec![0u8; 256 * 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        })
    });
    std::thread::spawn(move || {
        serve_loopback(source, "source", |mut s| async move {
            let buf = vec![0x5au8; 256 * 1024];
            while s.write_all(&buf).await.is_ok() {}
        })
    });
    serve_loopback(echo_port, "echo", |s| echo(s, 16 * 1024));
}

// ---------------------------------------------------------------------------------------
// The connector round trip on its own: a QUIC echo server (a child process).

/// `qecho PORT DIR`: serves QUIC (ALPN `bench-echo`, DIR/server.pem) on 127.0.0.1:PORT;
/// every stream is echoed to its end.
fn qecho(args: &[String]) {
    let port: u16 = args[0].parse().expect("qecho PORT DIR");
    let cert = TestCert::read(Path::new(&args[1]), "server");
    ztp_tests::install_crypto_provider();
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert_der.clone()], cert.key_der.clone_key())
        .expect("the echo server's certificate");
    tls.alpn_protocols = vec![QECHO_ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).expect("a QUIC server config");
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ep = Endpoint::server(config, SocketAddr::from(([127, 0, 0, 1], port)))
            .expect("bind the QUIC echo server");
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut recv, &mut send).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
}

/// A quinn client endpoint on 127.0.0.1 with quinn's defaults (as a connector has).
fn quinn_client(max_udp_payload: u16) -> Endpoint {
    let s = std::net::UdpSocket::bind(("127.0.0.1", 0)).expect("a UDP socket");
    let mut ec = EndpointConfig::default();
    ec.max_udp_payload_size(max_udp_payload)
        .expect("a valid payload size");
    Endpoint::new(ec, None, s, Arc::new(quinn::TokioRuntime)).expect("a client endpoint")
}

/// Connector-like transport: keepalive 1 s, idle 3 s, MTU discovery up to `mtu`.
fn connector_transport(mtu: u16) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)))
        .max_idle_timeout(Some(VarInt::from_u32(3_000).into()))
        .max_concurrent_bidi_streams(VarInt::from_u32(4096))
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    if mtu > 1452 {
        t.mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(mtu);
            m
        }));
    }
    t
}

/// (new stream + 1-byte echo p50/p99, ping-pong on an open stream p50/p99, quinn's
/// smoothed RTT), µs.
async fn quic_round_trip(conn: &Connection, n: usize) -> ((f64, f64), (f64, f64), f64) {
    let warm = (n / 10).max(50);
    let mut fresh = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..warm + n {
        let t = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
        send.write_all(b"x").await.expect("write");
        recv.read_exact(&mut b).await.expect("the echo");
        let el = t.elapsed();
        send.finish().expect("finish");
        let _ = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(16)).await;
        if i >= warm {
            fresh.push(us(el));
        }
    }
    let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
    let mut pong = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t = Instant::now();
        send.write_all(b"x").await.expect("write");
        recv.read_exact(&mut b).await.expect("the echo");
        if i >= warm {
            pong.push(us(t.elapsed()));
        }
    }
    let _ = send.finish();
    (p50_p99(fresh), p50_p99(pong), us(conn.rtt()))
}

// ---------------------------------------------------------------------------------------
// In-bench connectors (a child process): many connectors, one tunnel each.

/// `swarm ADDR DIR PREFIX N MTU MODE`: connectors `PREFIX0`..`PREFIX{N-1}` (certificates
/// DIR/PREFIXi.pem and .key, the data plane's CA DIR/ca.pem), each with its own endpoint
/// and one tunnel to ADDR, speaking `ztp_proto::tunnel` as `ztpctl connector run` does,
/// with its transport settings and quinn's default packet sizes unless MTU > 1452 (then
/// MTU discovery up to MTU, as the data plane has it). MODE `echo`: a session is answered
/// `Connected` and echoed on its stream (no backend connection); `dial`: the connector
/// dials the service's address and copies both ways, as `ztpctl connector run`. Prints
/// `up K` as tunnels come up and `ready N MS` once all are; a tunnel that ends is
/// dialled again.
fn swarm(args: &[String]) {
    const USAGE: &str = "swarm ADDR DIR PREFIX N MTU echo|dial";
    let addr: SocketAddr = args[0].parse().expect(USAGE);
    let dir = PathBuf::from(&args[1]);
    let prefix = args[2].clone();
    let n: usize = args[3].parse().expect(USAGE);
    let mtu: u16 = args[4].parse().expect(USAGE);
    let dial = match args[5].as_str() {
        "echo" => false,
        "dial" => true,
        _ => panic!("{USAGE}"),
    };
    ztp_tests::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls_pki_types::pem::PemObject;
        let pem = std::fs::read(dir.join("ca.pem")).expect("ca.pem");
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("a CA"))
            .expect("the CA");
    }
    let roots = Arc::new(roots);
    let transport = Arc::new(connector_transport(mtu));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let up = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        // Handshakes in flight: the data plane asks for address validation (a Retry)
        // above 64, and a connector waits out its 3 s idle timeout if starved.
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        for i in 0..n {
            let name = format!("{prefix}{i}");
            let cert = TestCert::read(&dir, &name);
            let mut tls =
                rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                    .with_root_certificates(roots.clone())
                    .with_client_auth_cert(vec![cert.cert_der.clone()], cert.key_der.clone_key())
                    .expect("a connector's TLS config");
            tls.alpn_protocols = vec![ztp_proto::tunnel::ALPN.to_vec()];
            let crypto = QuicClientConfig::try_from(tls).expect("a QUIC TLS config");
            let mut config = quinn::ClientConfig::new(Arc::new(crypto));
            config.transport_config(transport.clone());
            let (up, gate) = (up.clone(), gate.clone());
            tokio::spawn(async move {
                let ep = quinn_client(if mtu > 1452 { mtu } else { 1472 });
                loop {
                    let permit = gate.acquire().await.expect("the gate");
                    let conn = match ep.connect_with(config.clone(), addr, "localhost") {
                        Ok(c) => c.await,
                        Err(e) => panic!("connect: {e}"),
                    };
                    drop(permit);
                    match conn {
                        Ok(conn) => {
                            let e = tunnel(&conn, &up, dial).await;
                            eprintln!("swarm: {name}: tunnel ended: {e}");
                        }
                        Err(e) => eprintln!("swarm: {name}: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        let mut last = 0;
        let mut ready = false;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let k = up.load(Ordering::Relaxed);
            if k != last {
                println!("up {k}");
                last = k;
            }
            if k == n && !ready {
                println!("ready {n} {}", start.elapsed().as_millis());
                ready = true;
            }
        }
    });
}

/// One in-bench tunnel: the control stream (VERSION, then assignments), then sessions.
async fn tunnel(conn: &Connection, up: &Arc<AtomicUsize>, dial: bool) -> String {
    let Ok((mut control, mut recv)) = conn.open_bi().await else {
        return "no control stream".into();
    };
    if control
        .write_all(&[ztp_proto::tunnel::VERSION])
        .await
        .is_err()
    {
        return "control stream lost".into();
    }
    let assigned: Assigned = Arc::default();
    // The first assignments make the tunnel "up".
    if let Err(e) = read_assignments(&mut recv, &assigned).await {
        return e;
    }
    up.fetch_add(1, Ordering::Relaxed);
    let control_task = {
        let assigned = assigned.clone();
        async move {
            loop {
                if let Err(e) = read_assignments(&mut recv, &assigned).await {
                    return e;
                }
            }
        }
    };
    tokio::pin!(control_task);
    let end = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    tokio::spawn(session(send, recv, assigned.clone(), dial));
                }
                Err(e) => break e.to_string(),
            },
            e = &mut control_task => {
                conn.close(VarInt::from_u32(0), b"control stream ended");
                break e;
            }
        }
    };
    up.fetch_sub(1, Ordering::Relaxed);
    drop(control);
    end
}

/// The services a connector serves: name → address.
type Assigned = Arc<Mutex<std::collections::HashMap<String, String>>>;

async fn read_assignments(recv: &mut RecvStream, assigned: &Assigned) -> Result<(), String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| format!("control stream: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_ASSIGNMENTS {
        return Err(format!("assignments of {len} bytes"));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| format!("control stream: {e}"))?;
    let a = decode_assignments(&body)?;
    *assigned.lock().unwrap() = a
        .services
        .into_iter()
        .map(|s| (s.name, s.address))
        .collect();
    Ok(())
}

/// One session: its header, then (if the service is assigned) `Connected` and an echo
/// of the stream to its end, or, dialling, what `ztpctl connector run` does.
async fn session(mut send: SendStream, mut recv: RecvStream, assigned: Assigned, dial: bool) {
    let mut len = [0u8; 2];
    if recv.read_exact(&mut len).await.is_err() {
        return;
    }
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        let _ = send.reset(VarInt::from_u32(0));
        return;
    }
    let mut body = vec![0u8; len];
    if recv.read_exact(&mut body).await.is_err() {
        return;
    }
    let Ok(header) = decode_header(&body) else {
        let _ = send.reset(VarInt::from_u32(0));
        return;
    };
    let address = assigned.lock().unwrap().get(&header.service).cloned();
    let Some(address) = address else {
        let _ = send.write_all(&[Status::NotAssigned as u8]).await;
        let _ = send.finish();
        return;
    };
    if !dial {
        if send.write_all(&[Status::Connected as u8]).await.is_err() {
            return;
        }
        let _ = tokio::io::copy(&mut recv, &mut send).await;
        let _ = send.finish();
        return;
    }
    let Ok(backend) = TcpStream::connect(&address).await else {
        let _ = send.write_all(&[Status::Unreachable as u8]).await;
        let _ = send.finish();
        return;
    };
    let _ = backend.set_nodelay(true);
    if send.write_all(&[Status::Connected as u8]).await.is_err() {
        return;
    }
    let (mut br, mut bw) = backend.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut recv, &mut bw).await;
        let _ = bw.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut br, &mut send).await;
        let _ = send.finish();
    };
    tokio::join!(up, down);
}

// ---------------------------------------------------------------------------------------
// /proc accounting

/// CPU time of a set of processes over an interval.
struct Meter {
    t: Instant,
    pids: Vec<u32>,
    start: Vec<Duration>,
}

impl Meter {
    fn start(pids: &[u32]) -> Meter {
        Meter {
            t: Instant::now(),
            pids: pids.to_vec(),
            start: pids.iter().map(|p| stat_cpu(*p)).collect(),
        }
    }

    /// (elapsed s, CPU seconds of each process)
    fn stop(&self) -> (f64, Vec<f64>) {
        let el = self.t.elapsed().as_secs_f64();
        let cpu = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|(p, s)| (stat_cpu(*p).saturating_sub(*s)).as_secs_f64())
            .collect();
        (el, cpu)
    }
}

// ---------------------------------------------------------------------------------------
// The tests

#[derive(Default, Clone)]
struct Round {
    /// µs p50/p99: direct, tunnel, relay.
    direct: (f64, f64),
    tunnel: (f64, f64),
    relay: (f64, f64),
    /// µs p50/p99: QUIC new stream + echo, ping-pong on a stream; quinn's RTT.
    rt_stream: (f64, f64),
    rt_pong: (f64, f64),
    rt_quinn: f64,
    /// [direct up, tunnel up, direct down, tunnel down]
    bulk: [Bulk; 4],
    /// In-bench connector: [1452 up, 1452 down, 6000 up, 6000 down]
    jumbo: [Bulk; 4],
}

#[derive(Default, Clone, Copy)]
struct Bulk {
    mbps: f64,
    /// Data plane CPU s/GB.
    cost: f64,
    /// Shares of a core: client (this program), backends, connector.
    client: f64,
    backend: f64,
    connector: f64,
    /// Connector CPU s/GB.
    connector_cost: f64,
    /// CPU s/GB of the data plane, connector, backends and client together.
    total_cost: f64,
}

#[derive(Default)]
struct Scale {
    connectors: usize,
    up_ms: f64,
    /// When the control plane listed every tunnel (ms from the start of the swarm).
    listed_ms: Option<f64>,
    rss0: u64,
    rss1: u64,
    rss2: u64,
    fds0: usize,
    fds1: usize,
    fds2: usize,
    sessions: usize,
    sessions_s: f64,
    swarm_rss1: u64,
    swarm_rss0: u64,
    /// Direct idle sessions on a fresh replica: held, KiB each, fds added.
    direct_n: usize,
    direct_kib: f64,
    direct_fds: usize,
    /// RSS of `ztpctl connector run` with one tunnel (KiB).
    ztpctl_rss: u64,
    /// A tunnel ended while sessions were held.
    lost: usize,
}

struct Report {
    rounds: Vec<Round>,
    scale: Option<Scale>,
    failover: Vec<Failover>,
}

async fn run(o: &Opts, ports: (u16, u16, u16), backend_pid: u32) -> Report {
    let pki = TestPki::new();
    let cert = pki.client_email("bench@example.com");
    let files = TempDir::new("bench-tunnel");
    std::fs::write(files.join("ca.pem"), &pki.ca_pem).expect("write ca.pem");
    pki.server
        .write(files.path(), "server")
        .expect("write server.pem");
    let control = Control::start_with(&pki, ControlOptions::default()).await;
    let env = Env {
        tls: client_config(&pki.ca_pem, &cert),
        pki,
        control,
        backend_pid,
        ports,
        threads: o.threads,
        files,
    };
    let secs = Duration::from_secs_f64(o.secs);
    let mut rounds = Vec::new();
    let mut ztpctl_rss = 0;
    if o.has("latency") || o.has("bulk") || o.has("mtu") {
        let version = import(&env.control, &config(ports, 0)).await;
        let a = replica(&env, "tun-a").await;
        let b = replica(&env, "tun-b").await;
        wait_current(&env.control, &["tun-a", "tun-b"], version).await;
        // The real connector: one tunnel, to A only.
        let lab = env
            .pki
            .builder()
            .uri("spiffe://ztp.internal/connector/lab")
            .issue();
        lab.write(env.files.path(), "lab").expect("write lab.pem");
        for (prefix, _) in MTU_CONNECTORS {
            env.pki
                .builder()
                .uri(&format!("spiffe://ztp.internal/connector/{prefix}0"))
                .issue()
                .write(env.files.path(), &format!("{prefix}0"))
                .expect("write an in-bench connector's certificate");
        }
        let mut cmd = Command::new(bin("ztpctl"));
        cmd.args(["connector", "run", "--tunnels", "1", "--transport"])
            .arg(&o.connector_transport)
            .arg("--via")
            .arg(format!("localhost:{}", a.addr().port()))
            .arg("--cert")
            .arg(env.files.join("lab.pem"))
            .arg("--key")
            .arg(env.files.join("lab.key"))
            .arg("--ca")
            .arg(env.files.join("ca.pem"))
            .env_remove("RUST_LOG");
        let mut connector = Process::spawn("ztpctl connector run", cmd);
        connector
            .wait_for_line(Stream::Stderr, |l| l.contains("serving"), WAIT)
            .await;
        wait_served(&env, a.addr(), LAB_ECHO, "through the tunnel on A").await;
        wait_served(&env, b.addr(), LAB_ECHO, "through B, relayed to A").await;
        wait_served(&env, a.addr(), ECHO, "direct on A").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        ztpctl_rss = rss_kib(connector.pid());

        // The connector round trip's stand-in: a QUIC echo server on CPU 0.
        let qport = free_port();
        let qecho = Proc(
            Command::new("taskset")
                .args(["-c", "0"])
                .arg(std::env::current_exe().unwrap())
                .arg("qecho")
                .arg(qport.to_string())
                .arg(env.files.path())
                .spawn()
                .expect("start the QUIC echo server"),
        );
        let qconn = {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(env.pki.ca_der.clone()).unwrap();
            let mut tls =
                rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            tls.alpn_protocols = vec![QECHO_ALPN.to_vec()];
            let mut config =
                quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
            config.transport_config(Arc::new(connector_transport(1452)));
            let ep = quinn_client(1472);
            let target = SocketAddr::from(([127, 0, 0, 1], qport));
            let end = Instant::now() + WAIT;
            loop {
                match ep.connect_with(config.clone(), target, "localhost") {
                    Ok(c) => match c.await {
                        Ok(c) => break c,
                        Err(e) => assert!(Instant::now() < end, "QUIC echo server: {e}"),
                    },
                    Err(e) => panic!("QUIC echo server: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };

        // The mtu test's connectors, for the whole run: a connector killed leaves its
        // tunnel in the data plane until the idle timeout (3 s), and sessions sent into it
        // meanwhile fail (502 after 3 s).
        let mut swarms = Vec::new();
        if o.has("mtu") {
            for (prefix, mtu) in MTU_CONNECTORS {
                let (swarm, _) = spawn_swarm(&env, a.addr(), prefix, 1, mtu, "dial").await;
                let sni = format!("{prefix}-echo.svc.internal");
                wait_served(&env, a.addr(), &sni, "through an in-bench connector").await;
                swarms.push(swarm);
            }
        }
        for round in 1..=o.rounds {
            let mut r = Round::default();
            if o.has("latency") {
                (r.direct, r.tunnel, r.relay) = setup_latency(&env, &a, &b, o.latency).await;
                (r.rt_stream, r.rt_pong, r.rt_quinn) = quic_round_trip(&qconn, o.latency).await;
                eprintln!(
                    "round {round} setup p50/p99 µs: direct {:.0}/{:.0} | tunnel {:.0}/{:.0} | relay {:.0}/{:.0} | QUIC new stream echo {:.0}/{:.0}, ping-pong {:.0}/{:.0}, quinn rtt {:.0}",
                    r.direct.0, r.direct.1, r.tunnel.0, r.tunnel.1, r.relay.0, r.relay.1,
                    r.rt_stream.0, r.rt_stream.1, r.rt_pong.0, r.rt_pong.1, r.rt_quinn
                );
            }
            if o.has("bulk") {
                let pids = [
                    a.pid(),
                    connector.pid(),
                    env.backend_pid,
                    std::process::id(),
                ];
                for (i, (sni, up)) in [
                    (SINK, true),
                    (LAB_SINK, true),
                    (SOURCE, false),
                    (LAB_SOURCE, false),
                ]
                .into_iter()
                .enumerate()
                {
                    let x = bulk(&env, a.addr(), sni, up, secs, &pids).await;
                    eprintln!(
                        "round {round} {:4} {:6}: {:7.1} MB/s  data plane {:.3} CPU s/GB  (client {:.0}%, backends {:.0}%, connector {:.0}% = {:.3} s/GB)",
                        if up { "up" } else { "down" },
                        if i % 2 == 1 { "tunnel" } else { "direct" },
                        x.mbps,
                        x.cost,
                        x.client * 100.0,
                        x.backend * 100.0,
                        x.connector * 100.0,
                        x.connector_cost
                    );
                    r.bulk[i] = x;
                }
            }
            if o.has("mtu") {
                r.jumbo = mtu_bulk(&env, &a, &swarms, secs, round).await;
            }
            rounds.push(r);
        }
        drop(swarms);
        drop(qecho);
        connector.kill();
    }
    let failover = if o.has("failover") {
        failover(&env, o).await
    } else {
        Vec::new()
    };
    let scale = if o.has("scale") {
        let mut s = scale(&env, o).await;
        s.ztpctl_rss = ztpctl_rss;
        Some(s)
    } else {
        None
    };
    Report {
        rounds,
        scale,
        failover,
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// p50 and p99 of `v`, µs.
fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.99))
}

type P = (f64, f64);

/// Interleaved sessions: direct on A, through the tunnel on A, relayed by B.
async fn setup_latency(env: &Env, a: &Dataplane, b: &Dataplane, n: usize) -> (P, P, P) {
    let warm = (n / 10).max(20);
    let paths = [(a.addr(), ECHO), (a.addr(), LAB_ECHO), (b.addr(), LAB_ECHO)];
    let mut v: [Vec<f64>; 3] = Default::default();
    for i in 0..warm + n {
        // A different order each time: none of the three always follows another.
        for k in 0..3 {
            let j = (i + k) % 3;
            let (addr, sni) = paths[j];
            let el = one_echo(&env.tls, addr, sni)
                .await
                .unwrap_or_else(|e| panic!("{sni} via {addr}: {e}"));
            if i >= warm {
                v[j].push(us(el));
            }
        }
    }
    let [d, t, r] = v;
    (p50_p99(d), p50_p99(t), p50_p99(r))
}

/// One session of upload (to the sink) or download (from the source) through `addr`;
/// `pids`: data plane, connector, backends, this program.
async fn bulk(
    env: &Env,
    addr: SocketAddr,
    sni: &str,
    up: bool,
    secs: Duration,
    pids: &[u32; 4],
) -> Bulk {
    let mut buf = vec![0x33u8; CHUNK];
    let warm = Duration::from_millis(300);
    let mut bytes = 0u64;
    let mut s = tls_connect(&env.tls, addr, sni)
        .await
        .expect("mTLS connect");
    if !up {
        s.write_all(b"D").await.unwrap();
        s.flush().await.unwrap();
    }
    let mut m = None;
    let start = Instant::now();
    loop {
        let now = Instant::now();
        if m.is_none() && now >= start + warm {
            m = Some(Meter::start(pids));
            bytes = 0;
        }
        if m.as_ref().is_some_and(|m| now >= m.t + secs) {
            break;
        }
        if up {
            s.write_all(&buf).await.expect("upload");
            bytes += CHUNK as u64;
        } else {
            let n = s.read(&mut buf).await.expect("download");
            assert!(n > 0, "the data plane ended the download");
            bytes += n as u64;
        }
    }
    let (el, cpu) = m.unwrap().stop();
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gb = bytes as f64 / 1e9;
    Bulk {
        mbps: bytes as f64 / 1e6 / el,
        cost: cpu[0] / gb,
        connector: cpu[1] / el,
        connector_cost: cpu[1] / gb,
        backend: cpu[2] / el,
        client: cpu[3] / el,
        total_cost: cpu.iter().sum::<f64>() / gb,
    }
}

/// The in-bench connectors `PREFIX0..PREFIX{n-1}` in a child process (see [`swarm`]),
/// once all their tunnels to `addr` are up; the `ready` line.
async fn spawn_swarm(
    env: &Env,
    addr: SocketAddr,
    prefix: &str,
    n: usize,
    mtu: u16,
    mode: &str,
) -> (Process, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg("swarm")
        .arg(addr.to_string())
        .arg(env.files.path())
        .arg(prefix)
        .arg(n.to_string())
        .arg(mtu.to_string())
        .arg(mode);
    let mut swarm = Process::spawn("in-bench connectors", cmd);
    let ready = swarm
        .wait_for_line(Stream::Stdout, |l| l.starts_with("ready "), WAIT * 2)
        .await;
    (swarm, ready)
}

/// Bulk through the in-bench connectors `small0` (quinn's default packets, as `ztpctl
/// connector run`) and `jumbo0` (6,000-byte ones), both dialling the backends: what the
/// tunnel's packet size costs the data plane. `swarms`: their processes, in that order.
async fn mtu_bulk(
    env: &Env,
    a: &Dataplane,
    swarms: &[Process],
    secs: Duration,
    round: usize,
) -> [Bulk; 4] {
    let mut out = [Bulk::default(); 4];
    for (k, ((prefix, mtu), swarm)) in MTU_CONNECTORS.iter().zip(swarms).enumerate() {
        let pids = [a.pid(), swarm.pid(), env.backend_pid, std::process::id()];
        for (i, up) in [true, false].into_iter().enumerate() {
            let what = if up { "sink" } else { "source" };
            let sni = format!("{prefix}-{what}.svc.internal");
            let x = bulk(env, a.addr(), &sni, up, secs, &pids).await;
            eprintln!(
                "round {round} {:4} in-bench connector, {mtu}-byte packets: {:7.1} MB/s  data plane {:.3} CPU s/GB  (connector {:.0}% = {:.3} s/GB)",
                if up { "up" } else { "down" },
                x.mbps,
                x.cost,
                x.connector * 100.0,
                x.connector_cost
            );
            out[2 * k + i] = x;
        }
    }
    out
}

/// `n` sessions to `addr` held open, each echoed once; `sni(i)` names the i-th's service.
async fn hold_sessions(
    env: &Env,
    addr: SocketAddr,
    n: usize,
    sni: impl Fn(usize) -> String,
) -> Vec<Tls> {
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let batch = (n - held.len()).min(64);
        let mut set = tokio::task::JoinSet::new();
        for k in 0..batch {
            let tls = env.tls.clone();
            let name = sni(held.len() + k);
            set.spawn(async move {
                let mut s = tls_connect(&tls, addr, &name).await?;
                s.write_all(b"x").await?;
                s.flush().await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                if b[0] != b'x' {
                    return Err(std::io::Error::other(format!("{name}: refused")));
                }
                Ok::<_, std::io::Error>(s)
            });
        }
        while let Some(h) = set.join_next().await {
            held.push(h.unwrap().expect("an idle session"));
        }
    }
    held
}

async fn scale(env: &Env, o: &Opts) -> Scale {
    let n = o.connectors;
    let mut s = Scale {
        connectors: n,
        ..Scale::default()
    };
    // The connectors' certificates, and their registration: one import.
    let t = Instant::now();
    for i in 0..n {
        env.pki
            .builder()
            .uri(&format!("spiffe://ztp.internal/connector/c{i}"))
            .issue()
            .write(env.files.path(), &format!("c{i}"))
            .expect("write a connector's certificate");
    }
    let version = import(&env.control, &config(env.ports, n)).await;
    eprintln!(
        "scale: {n} connectors' certificates issued and imported in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let c = replica(env, "tun-c").await;
    wait_current(&env.control, &["tun-c"], version).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pid = c.pid();
    (s.rss0, s.fds0) = (rss_kib(pid), fds(pid));

    let start = Instant::now();
    let (mut swarm, ready) = spawn_swarm(env, c.addr(), "c", n, o.connector_mtu, "echo").await;
    s.up_ms = ready
        .split(' ')
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    // How long until the control plane lists them all (`ztpctl connector list`).
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        let listed: usize = env
            .control
            .list_all("connectors")
            .await
            .iter()
            .map(|c| c["tunnels"].as_array().map_or(0, Vec::len))
            .sum();
        if listed >= n {
            s.listed_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    (s.rss1, s.fds1) = (rss_kib(pid), fds(pid));
    s.swarm_rss0 = rss_kib(swarm.pid());
    eprintln!(
        "scale: {n} tunnels up in {:.0} ms (listed by the control plane after {}); data plane VmRSS {} -> {} KiB",
        s.up_ms,
        s.listed_ms
            .map_or("more than 60 s".into(), |v| format!("{v:.0} ms")),
        s.rss0,
        s.rss1
    );

    let m = o.sessions;
    let t = Instant::now();
    let held = hold_sessions(env, c.addr(), m, |i| format!("c{}.svc.internal", i % n)).await;
    s.sessions_s = t.elapsed().as_secs_f64();
    s.sessions = held.len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    (s.rss2, s.fds2) = (rss_kib(pid), fds(pid));
    s.swarm_rss1 = rss_kib(swarm.pid());
    s.lost = swarm
        .lines(Stream::Stderr)
        .iter()
        .filter(|l| l.contains("tunnel ended"))
        .count();
    eprintln!(
        "scale: {} sessions through them in {:.1} s; data plane VmRSS {} KiB, +{} descriptors",
        s.sessions,
        s.sessions_s,
        s.rss2,
        s.fds2.saturating_sub(s.fds1)
    );
    drop(held);
    swarm.kill();
    drop(c);

    // For comparison: direct idle sessions on a fresh replica (two descriptors each).
    let nofile = raise_nofile() as usize;
    let dn = m.min(nofile.saturating_sub(500) / 2);
    let d = replica(env, "tun-d").await;
    wait_current(&env.control, &["tun-d"], version).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (r0, f0) = (rss_kib(d.pid()), fds(d.pid()));
    let held = hold_sessions(env, d.addr(), dn, |_| ECHO.to_owned()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (r1, f1) = (rss_kib(d.pid()), fds(d.pid()));
    s.direct_n = held.len();
    s.direct_kib = r1.saturating_sub(r0) as f64 / held.len().max(1) as f64;
    s.direct_fds = f1.saturating_sub(f0);
    drop(held);
    s
}

// ---------------------------------------------------------------------------------------
// Failover: a replica holding a tunnel killed under a steady load of new sessions

/// The failover test's replicas.
const FO_IDS: [&str; 3] = ["tun-fa", "tun-fb", "tun-fc"];
/// Before a round, the tunnels listed stay the same this long with no load: ztpctl moves
/// a tunnel to a better-placed replica (the one started again, say) only at its check
/// each second, when the tunnel carries no session, and passes over a replica it could
/// not reach for 10 s.
const FO_SETTLE: Duration = Duration::from_secs(12);
/// A failover session's deadline.
const FO_DEADLINE: Duration = Duration::from_secs(5);
/// One new session on each loaded replica this often.
const FO_EVERY: Duration = Duration::from_millis(10);
/// The control plane's listing and ztpctl's stderr are polled this often.
const FO_POLL: Duration = Duration::from_millis(20);
/// The load runs this long before the kill, and up to 1 s more (at random: the kill
/// falls at any phase of the connector's periodic checks).
const FO_BEFORE: Duration = Duration::from_millis(500);
/// The longest served session is taken among those started this long after the kill.
const FO_WINDOW: Duration = Duration::from_secs(2);
/// A served session that took longer is slow (counted, and when the last one started).
const FO_SLOW: Duration = Duration::from_secs(1);
/// The load goes on at least this long after the kill, and 1 s past the tunnels' return…
const FO_LOAD_MIN: Duration = Duration::from_secs(4);
/// … and at most this long: tunnels not back by then are "> 15000 ms" (45 s for a
/// stopped victim: the control plane drops a silent node after its HTTP/2 keepalive,
/// 20 s + 10 s).
fn fo_bound(o: &Opts) -> Duration {
    Duration::from_secs(if o.failover_stop { 45 } else { 15 })
}

#[derive(Clone, Default)]
struct Failover {
    victim: String,
    /// The survivors: the other holder of a tunnel, and the replica that relays.
    holder: String,
    relay: String,
    /// Age of the victim's tunnel at the kill, s.
    age_s: f64,
    /// Sessions started after the kill.
    sessions: usize,
    /// Of them, failed.
    failed: usize,
    /// Failed sessions started after the first retry landed: on the same replica, the
    /// first session served that started after the first failure (in flight at the
    /// kill or later) had come back, as a client retrying at once would.
    failed_after_retry: usize,
    /// Sessions started in the 0.5 s before the kill that failed.
    failed_in_flight: usize,
    /// Kill → start of the last failed session started after it (0: none failed), ms.
    recovery_ms: f64,
    /// The failed sessions' longest time from start to failure, ms (0: none).
    fail_after_ms: f64,
    /// The failures, "replica: line" → count.
    errors: std::collections::BTreeMap<String, usize>,
    /// Kill → the listing shows no tunnel on the victim; → 2 tunnels listed on other
    /// replicas (NaN: not within [`fo_bound`]), ms.
    gone_ms: f64,
    back_ms: f64,
    /// Kill → ztpctl said the data planes are at replicas without the victim; → it gave up
    /// its tunnel to the victim (ended, or moved to another replica); → a new tunnel up (as
    /// polled), ms.
    learnt_ms: f64,
    left_ms: f64,
    up_ms: f64,
    /// The longest served session among those started within [`FO_WINDOW`] of the kill, ms.
    longest_ms: f64,
    /// Served sessions started after the kill that took longer than [`FO_SLOW`]; kill →
    /// start of the last of them (0: none), ms.
    slow: usize,
    slow_until_ms: f64,
    /// The victim's start again until ready and current, ms.
    restart_ms: f64,
    /// Failed sessions while waiting to be steady before the round.
    unsteady: usize,
    /// The tunnels listed did not stay the same for [`FO_SETTLE`] within [`WAIT`].
    unsettled: bool,
}

/// One session of a failover load.
struct Shot {
    /// Its replica's index in the load's targets.
    target: usize,
    start: Instant,
    end: Instant,
    /// The `ZTP-ERROR` line (or I/O error, or timeout) of a failed one.
    result: Result<(), String>,
}

/// A steady load of new sessions through the tunnel service, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Shot>>,
}

impl Load {
    /// One new session every [`FO_EVERY`] on each of `targets` (in turn, evenly spaced),
    /// each with the deadline [`FO_DEADLINE`].
    fn start(tls: &Arc<rustls::ClientConfig>, targets: Vec<SocketAddr>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (tls, halt) = (tls.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(FO_EVERY / targets.len() as u32);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut set = tokio::task::JoinSet::new();
            let mut shots = Vec::new();
            let mut i = 0;
            while !halt.load(Ordering::Relaxed) {
                tick.tick().await;
                let target = i % targets.len();
                i += 1;
                let (tls, addr) = (tls.clone(), targets[target]);
                set.spawn(async move {
                    let start = Instant::now();
                    let session = one_echo(&tls, addr, LAB_ECHO);
                    let result = match tokio::time::timeout(FO_DEADLINE, session).await {
                        Ok(r) => r.map(|_| ()),
                        Err(_) => Err(format!("no echo within {} s", FO_DEADLINE.as_secs())),
                    };
                    Shot {
                        target,
                        start,
                        end: Instant::now(),
                        result,
                    }
                });
                while let Some(s) = set.try_join_next() {
                    shots.push(s.expect("a session task"));
                }
            }
            while let Some(s) = set.join_next().await {
                shots.push(s.expect("a session task"));
            }
            shots.sort_by_key(|s| s.start);
            shots
        });
        Load { stop, task }
    }

    /// Starts no more sessions; every session, once all have ended (each within its
    /// deadline), by start.
    async fn stop(self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the load")
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The live tunnels of connector `lab` as the control plane lists them: (replica, since
/// ms).
async fn lab_tunnels(control: &Control) -> Vec<(String, u64)> {
    let v = control.get_json("/v1/connectors/lab").await;
    v["tunnels"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["replica"].as_str().unwrap_or_default().to_owned(),
                        t["since_ms"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A failover replica on 127.0.0.1:`port` (TCP, and UDP for QUIC), advertised as
/// `localhost:PORT` (the name its certificate carries: connectors that learn the replicas
/// from the data planes dial and verify that): it comes back where the connector's
/// `--via` names it.
async fn fo_replica(env: &Env, id: &str, port: u16) -> Dataplane {
    let listen = format!("127.0.0.1:{port}");
    let advertise = format!("localhost:{port}");
    replica_with(env, id, &["--listen", &listen, "--advertise", &advertise]).await
}

/// Waits (bounded by [`WAIT`]) until `lab`'s tunnels, as listed, have not changed for
/// [`FO_SETTLE`]; whether they settled so.
async fn fo_settle(control: &Control) -> bool {
    let end = Instant::now() + WAIT;
    let mut last = lab_tunnels(control).await;
    let mut since = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = lab_tunnels(control).await;
        if now != last {
            last = now;
            since = Instant::now();
        } else if last.len() >= 2 && since.elapsed() >= FO_SETTLE {
            return true;
        }
    }
    false
}

/// Waits (bounded) until `lab` has 2 live tunnels listed and 1 s of sessions on each of
/// `addrs` were all served; the sessions that failed meanwhile.
async fn fo_steady(env: &Env, addrs: &[SocketAddr]) -> usize {
    let end = Instant::now() + WAIT;
    let mut failed = 0;
    let mut last = String::new();
    loop {
        let tunnels = lab_tunnels(&env.control).await;
        if tunnels.len() >= 2 {
            let load = Load::start(&env.tls, addrs.to_vec());
            tokio::time::sleep(Duration::from_secs(1)).await;
            let shots = load.stop().await;
            let bad: Vec<&String> = shots
                .iter()
                .filter_map(|s| s.result.as_ref().err())
                .collect();
            if bad.is_empty() && lab_tunnels(&env.control).await.len() >= 2 {
                return failed;
            }
            failed += bad.len();
            if let Some(b) = bad.last() {
                last = (*b).clone();
            }
        }
        assert!(
            Instant::now() < end,
            "failover: never steady (tunnels {tunnels:?}; {failed} sessions failed, the last: {last})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The figures of one round from its sessions; `t0`: the kill; `names`: the load's
/// targets.
fn fo_figures(r: &mut Failover, shots: &[Shot], t0: Instant, names: &[&str]) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let after: Vec<&Shot> = shots.iter().filter(|s| s.start >= t0).collect();
    r.sessions = after.len();
    for s in shots.iter().filter(|s| s.result.is_err()) {
        let e = s.result.as_ref().unwrap_err();
        *r.errors
            .entry(format!("{}: {e}", names[s.target]))
            .or_default() += 1;
        r.fail_after_ms = r.fail_after_ms.max(ms(s.end - s.start));
        if s.start < t0 {
            r.failed_in_flight += 1;
        }
    }
    r.failed = after.iter().filter(|s| s.result.is_err()).count();
    r.recovery_ms = after
        .iter()
        .filter(|s| s.result.is_err())
        .map(|s| ms(s.start - t0))
        .fold(0.0, f64::max);
    for target in 0..names.len() {
        let mine: Vec<&Shot> = shots.iter().filter(|s| s.target == target).collect();
        let Some(first) = mine.iter().find(|s| s.result.is_err()) else {
            continue;
        };
        let Some(landed) = mine
            .iter()
            .find(|s| s.result.is_ok() && s.start >= first.end)
        else {
            continue;
        };
        r.failed_after_retry += mine
            .iter()
            .filter(|s| s.result.is_err() && s.start > landed.start)
            .count();
    }
    let slow: Vec<&&Shot> = after
        .iter()
        .filter(|s| s.result.is_ok() && s.end - s.start > FO_SLOW)
        .collect();
    r.slow = slow.len();
    r.slow_until_ms = slow.iter().map(|s| ms(s.start - t0)).fold(0.0, f64::max);
    r.longest_ms = after
        .iter()
        .filter(|s| s.result.is_ok() && s.start - t0 <= FO_WINDOW)
        .map(|s| ms(s.end - s.start))
        .fold(0.0, f64::max);
}

async fn failover(env: &Env, o: &Opts) -> Vec<Failover> {
    let version = import(&env.control, &config(env.ports, 0)).await;
    env.pki
        .builder()
        .uri("spiffe://ztp.internal/connector/lab")
        .issue()
        .write(env.files.path(), "lab")
        .expect("write lab.pem");
    // Fixed ports, free for TCP and UDP (the QUIC listener shares the port).
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < 3 {
        let p = ztp_tests::process::free_udp_tcp_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let mut dps = Vec::new();
    for (id, port) in FO_IDS.iter().zip(&ports) {
        dps.push(fo_replica(env, id, *port).await);
    }
    wait_current(&env.control, &FO_IDS, version).await;
    let via: Vec<String> = ports.iter().map(|p| format!("localhost:{p}")).collect();
    let mut cmd = Command::new(bin("ztpctl"));
    cmd.args(["connector", "run", "--tunnels", "2", "--via"])
        .arg(via.join(","))
        .arg("--cert")
        .arg(env.files.join("lab.pem"))
        .arg("--key")
        .arg(env.files.join("lab.key"))
        .arg("--ca")
        .arg(env.files.join("ca.pem"))
        .env_remove("RUST_LOG");
    let mut connector = Process::spawn("ztpctl connector run", cmd);
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("serving"), WAIT)
        .await;
    let addrs: Vec<SocketAddr> = dps.iter().map(Dataplane::addr).collect();
    for (addr, id) in addrs.iter().zip(FO_IDS) {
        wait_served(env, *addr, LAB_ECHO, id).await;
    }
    let ms = |t0: Instant, t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
    let mut out = Vec::new();
    for round in 1..=o.failover_rounds {
        let mut r = Failover {
            gone_ms: f64::NAN,
            back_ms: f64::NAN,
            learnt_ms: f64::NAN,
            left_ms: f64::NAN,
            up_ms: f64::NAN,
            ..Failover::default()
        };
        r.unsettled = !fo_settle(&env.control).await;
        // The victim: the holder of the oldest tunnel, once that is old enough.
        let want = (o.failover_age * 1e3) as u64;
        let mut tries = 0;
        let tunnels = loop {
            let t = lab_tunnels(&env.control).await;
            let oldest = t.iter().map(|(_, since)| *since).min().unwrap_or(0);
            let age = now_ms().saturating_sub(oldest);
            if t.len() >= 2 && age >= want {
                break t;
            }
            tries += 1;
            assert!(tries < 20, "failover: no tunnel {want} ms old: {t:?}");
            let left = if t.len() >= 2 { want - age } else { 200 };
            tokio::time::sleep(Duration::from_millis(left.max(20))).await;
        };
        r.unsteady = fo_steady(env, &addrs).await;
        // Long sessions (the victim's own clients' among them): the connector's tunnel to
        // the victim is then never idle.
        let mut held = Vec::new();
        for addr in &addrs {
            held.extend(hold_sessions(env, *addr, o.failover_held, |_| LAB_ECHO.to_owned()).await);
        }
        let (victim, since) = tunnels
            .iter()
            .min_by_key(|(_, since)| *since)
            .cloned()
            .expect("a tunnel");
        let v = FO_IDS
            .iter()
            .position(|id| *id == victim)
            .unwrap_or_else(|| panic!("a tunnel on {victim}, not a replica of this test"));
        let survivors: Vec<usize> = (0..3).filter(|i| *i != v).collect();
        let names: Vec<&str> = survivors.iter().map(|i| FO_IDS[*i]).collect();
        let holds = |id: &str| tunnels.iter().any(|(t, _)| t == id);
        r.victim = victim.clone();
        r.holder = names
            .iter()
            .filter(|n| holds(n))
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        r.relay = names
            .iter()
            .filter(|n| !holds(n))
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        r.age_s = now_ms().saturating_sub(since) as f64 / 1e3;

        let load = Load::start(&env.tls, survivors.iter().map(|i| addrs[*i]).collect());
        let phase = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() % 1000);
        tokio::time::sleep(FO_BEFORE + Duration::from_millis(u64::from(phase))).await;
        let mut seen = connector.lines(Stream::Stderr).len();
        let mut log = Vec::new();
        let pid = rustix::process::Pid::from_raw(dps[v].pid() as i32).expect("a pid");
        // By its pid, which the guard has not reaped: it cannot be another process.
        let signal = if o.failover_stop {
            rustix::process::Signal::STOP
        } else {
            rustix::process::Signal::KILL
        };
        let t0 = Instant::now();
        rustix::process::kill_process(pid, signal).expect("kill -9 (or -STOP) the replica");
        // ztpctl names a replica as `--via` does or as the data planes advertise it.
        let victim_at = format!(":{}", ports[v]);
        let ended = format!("{victim_at} ended");
        loop {
            let t = lab_tunnels(&env.control).await;
            let now = Instant::now();
            let on_victim = t.iter().any(|(id, _)| *id == victim);
            if r.gone_ms.is_nan() && !on_victim {
                r.gone_ms = ms(t0, now);
            }
            // 2 tunnels on replicas other than the victim (a stopped one stays listed until
            // the control plane drops it).
            let elsewhere = t.iter().filter(|(id, _)| *id != victim).count();
            if r.back_ms.is_nan() && elsewhere >= 2 {
                r.back_ms = ms(t0, now);
            }
            let lines = connector.lines(Stream::Stderr);
            for l in &lines[seen..] {
                let left = (l.contains("tunnel to ") && l.contains(&ended))
                    || l.split_once(" moved from ").is_some_and(|(_, from)| {
                        from.split(" to ")
                            .next()
                            .is_some_and(|f| f.ends_with(&victim_at))
                    });
                if r.left_ms.is_nan() && left {
                    r.left_ms = ms(t0, now);
                }
                if r.learnt_ms.is_nan()
                    && l.contains("the data planes are at")
                    && !l.contains(&victim_at)
                {
                    r.learnt_ms = ms(t0, now);
                }
                // A new tunnel once the victim's was given up (another may be moving).
                if r.up_ms.is_nan() && !r.left_ms.is_nan() && l.contains("tunnel up to") {
                    r.up_ms = ms(t0, now);
                }
                log.push(format!("{:6.0} ms  {l}", ms(t0, now)));
            }
            seen = lines.len();
            let el = now - t0;
            // Until 1 s after both the tunnels' return and the victim's leaving the listing
            // (what the replicas route by).
            let done = !r.back_ms.is_nan()
                && !r.gone_ms.is_nan()
                && el
                    >= FO_LOAD_MIN.max(Duration::from_secs_f64(
                        r.back_ms.max(r.gone_ms) / 1e3 + 1.0,
                    ));
            if done || el >= fo_bound(o) {
                break;
            }
            tokio::time::sleep_until((now + FO_POLL).into()).await;
        }
        let shots = load.stop().await;
        drop(held);
        if o.failover_stop {
            rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                .expect("kill -9 the stopped replica");
        }
        assert!(
            dps[v].wait_exit(Duration::from_secs(5)).await.is_some(),
            "the killed replica {victim} still runs"
        );
        fo_figures(&mut r, &shots, t0, &names);

        // Back where it was, for the next round.
        let t = Instant::now();
        dps[v] = fo_replica(env, &victim, ports[v]).await;
        wait_current(&env.control, &FO_IDS, version).await;
        r.restart_ms = ms(t, Instant::now());
        let f = |v: f64| {
            if v.is_nan() {
                format!("> {}", fo_bound(o).as_millis())
            } else {
                format!("{v:.0}")
            }
        };
        eprintln!(
            "failover round {round}: killed {victim} (tunnel {:.1} s old; survivors {} with a tunnel, {} relaying): {} sessions after the kill, {} failed ({} after the first retry landed; {} in flight at the kill failed), recovery {:.0} ms; listing: victim's tunnel gone {} ms, 2 tunnels {} ms; ztpctl: learnt the replicas without the victim {} ms, left it {} ms, new tunnel up {} ms; longest served session ≤ 2 s after {:.1} ms; {} served sessions slower than 1 s, the last started {:.0} ms after the kill; restart {:.0} ms{}",
            r.age_s,
            r.holder,
            r.relay,
            r.sessions,
            r.failed,
            r.failed_after_retry,
            r.failed_in_flight,
            r.recovery_ms,
            f(r.gone_ms),
            f(r.back_ms),
            f(r.learnt_ms),
            f(r.left_ms),
            f(r.up_ms),
            r.longest_ms,
            r.slow,
            r.slow_until_ms,
            r.restart_ms,
            if r.unsteady > 0 {
                format!(" ({} sessions failed before the round was steady)", r.unsteady)
            } else {
                String::new()
            } + if r.unsettled {
                " (the tunnels listed never stayed the same 12 s)"
            } else {
                ""
            }
        );
        for (line, n) in &r.errors {
            eprintln!("    failed ×{n}: {line}");
        }
        for (k, s) in shots.iter().filter(|s| s.result.is_err()).enumerate() {
            if k >= 12 {
                eprintln!("    …");
                break;
            }
            eprintln!(
                "    failed: started {:+.0} ms from the kill on {}, failed after {:.0} ms: {}",
                if s.start >= t0 {
                    ms(t0, s.start)
                } else {
                    -ms(s.start, t0)
                },
                names[s.target],
                ms(s.start, s.end),
                s.result.as_ref().unwrap_err()
            );
        }
        for l in &log {
            eprintln!("    ztpctl at {l}");
        }
        out.push(r);
    }
    connector.kill();
    out
}

// ---------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn print_report(r: &Report, o: &Opts, machine: &str) {
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let med = |f: &dyn Fn(&Round) -> f64| median(r.rounds.iter().map(f).collect());
    let mut out = format!(
        "\nTunnels: ztp-dataplane replicas (--threads {}) on CPU 0; ztp-control, the connectors, the client and the backends on CPU 1; {machine}\n",
        o.threads,
    );
    if !r.rounds.is_empty() {
        out.push_str(&format!(
            "Latency and bulk: medians of {} rounds.\n",
            r.rounds.len()
        ));
    }
    let mut j = json!({"bench": "tunnel", "machine": machine, "rounds": r.rounds.len()});
    if o.has("latency") && !r.rounds.is_empty() {
        let p = |f: &dyn Fn(&Round) -> P| (med(&|x| f(x).0), med(&|x| f(x).1));
        let (d, t, rl) = (p(&|x| x.direct), p(&|x| x.tunnel), p(&|x| x.relay));
        let (rs, rp) = (p(&|x| x.rt_stream), p(&|x| x.rt_pong));
        let rq = med(&|x| x.rt_quinn);
        let tunnel_added = (t.0 - d.0, t.1 - d.1);
        let relay_added = (rl.0 - t.0, rl.1 - t.1);
        let tunnel_bound = rs.0 + 200.0;
        out.push_str(&format!(
            "\nSession setup: TCP connect, mTLS handshake, 1 byte and its echo; {} per path per round (µs):\n\n| path | p50 | p99 |\n| --- | ---: | ---: |\n",
            o.latency
        ));
        out.push_str(&format!(
            "| (a) direct: tcp service, client on replica A | {:.0} | {:.0} |\n",
            d.0, d.1
        ));
        out.push_str(&format!(
            "| (b) tunnel: service behind `ztpctl connector run`, its tunnel and the client on A | {:.0} | {:.0} |\n",
            t.0, t.1
        ));
        out.push_str(&format!(
            "| (c) relay: client on replica B, the tunnel on A only | {:.0} | {:.0} |\n",
            rl.0, rl.1
        ));
        out.push_str(&format!(
            "| **(b) − (a), added by the tunnel** (target ≤ 1 connector round trip + 200 µs = {:.0} µs at p50: {}) | **{:+.0}** | {:+.0} |\n",
            tunnel_bound,
            verdict(tunnel_added.0 <= tunnel_bound),
            tunnel_added.0,
            tunnel_added.1
        ));
        out.push_str(&format!(
            "| **(c) − (b), added by the relay** (target ≤ 300 µs at p50: {}) | **{:+.0}** | {:+.0} |\n",
            verdict(relay_added.0 <= 300.0),
            relay_added.0,
            relay_added.1
        ));
        out.push_str(&format!(
            "| connector round trip: QUIC new stream + 1 byte + echo, CPU 1 ↔ CPU 0, open connection | {:.0} | {:.0} |\n",
            rs.0, rs.1
        ));
        out.push_str(&format!(
            "| QUIC 1-byte ping-pong on an open stream, CPU 1 ↔ CPU 0 (quinn's smoothed RTT {:.0}) | {:.0} | {:.0} |\n",
            rq, rp.0, rp.1
        ));
        j["latency_us"] = json!({
            "direct": {"p50": d.0, "p99": d.1},
            "tunnel": {"p50": t.0, "p99": t.1},
            "relay": {"p50": rl.0, "p99": rl.1},
            "tunnel_added": {"p50": tunnel_added.0, "p99": tunnel_added.1, "target_p50": tunnel_bound, "met": tunnel_added.0 <= tunnel_bound},
            "relay_added": {"p50": relay_added.0, "p99": relay_added.1, "target_p50": 300.0, "met": relay_added.0 <= 300.0},
            "connector_round_trip": {"new_stream_echo": {"p50": rs.0, "p99": rs.1}, "ping_pong": {"p50": rp.0, "p99": rp.1}, "quinn_rtt": rq},
        });
    }
    if o.has("bulk") && !r.rounds.is_empty() {
        let b = |i: usize| Bulk {
            mbps: med(&|x| x.bulk[i].mbps),
            cost: med(&|x| x.bulk[i].cost),
            client: med(&|x| x.bulk[i].client),
            backend: med(&|x| x.bulk[i].backend),
            connector: med(&|x| x.bulk[i].connector),
            connector_cost: med(&|x| x.bulk[i].connector_cost),
            total_cost: med(&|x| x.bulk[i].total_cost),
        };
        let (du, tu, dd, td) = (b(0), b(1), b(2), b(3));
        out.push_str(&format!(
            "\nBulk, one session, {} s each way, 64 KiB writes, client on A (MB/s per data-plane core = MB/s ÷ its CPU share = 1000 ÷ CPU s/GB):\n\n| | direct MB/s | tunnel MB/s | direct DP CPU s/GB | tunnel DP CPU s/GB | **MB/s per DP core, tunnel ÷ direct** (target ≥ 0.9) | MB/s tunnel ÷ direct | connector CPU (share, s/GB) | all four processes' CPU s/GB, direct / tunnel | CPU 1 busy, direct / tunnel |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            o.secs
        ));
        let mut bj = json!({});
        for (dir, d, t) in [("up", du, tu), ("down", dd, td)] {
            let per_core = d.cost / t.cost;
            let cpu1 = |x: &Bulk| (x.client + x.backend + x.connector) * 100.0;
            out.push_str(&format!(
                "| {dir} | {:.0} | {:.0} | {:.3} | {:.3} | **{:.2}×** ({}) | {:.2}× | {:.0}%, {:.3} | {:.3} / {:.3} | {:.0}% / {:.0}% |\n",
                d.mbps,
                t.mbps,
                d.cost,
                t.cost,
                per_core,
                verdict(per_core >= 0.9),
                t.mbps / d.mbps,
                t.connector * 100.0,
                t.connector_cost,
                d.total_cost,
                t.total_cost,
                cpu1(&d),
                cpu1(&t)
            ));
            let bulk_json = |x: &Bulk| json!({"MB/s": x.mbps, "DP CPU s/GB": x.cost, "client CPU": x.client, "backend CPU": x.backend, "connector CPU": x.connector, "connector CPU s/GB": x.connector_cost, "all CPU s/GB": x.total_cost});
            bj[dir] = json!({"direct": bulk_json(&d), "tunnel": bulk_json(&t), "per_core_ratio": per_core, "mbps_ratio": t.mbps / d.mbps, "met": per_core >= 0.9});
        }
        j["bulk"] = bj;
    }
    if o.has("mtu") && !r.rounds.is_empty() {
        let b = |i: usize| Bulk {
            mbps: med(&|x| x.jumbo[i].mbps),
            cost: med(&|x| x.jumbo[i].cost),
            client: med(&|x| x.jumbo[i].client),
            backend: med(&|x| x.jumbo[i].backend),
            connector: med(&|x| x.jumbo[i].connector),
            connector_cost: med(&|x| x.jumbo[i].connector_cost),
            total_cost: med(&|x| x.jumbo[i].total_cost),
        };
        out.push_str(&format!(
            "\nThe tunnel's packet size (an in-bench connector dialling the backends, `mtu` test), {} s each way:\n\n| | MB/s, quinn's default packets (≤ 1452 B, as ztpctl) | MB/s, 6000-byte packets | DP CPU s/GB, 1452 | DP CPU s/GB, 6000 | connector CPU s/GB, 1452 / 6000 |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
            o.secs
        ));
        let mut mj = json!({});
        for (dir, small, big) in [("up", b(0), b(2)), ("down", b(1), b(3))] {
            out.push_str(&format!(
                "| {dir} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} / {:.3} |\n",
                small.mbps,
                big.mbps,
                small.cost,
                big.cost,
                small.connector_cost,
                big.connector_cost
            ));
            let bulk_json = |x: &Bulk| json!({"MB/s": x.mbps, "DP CPU s/GB": x.cost, "connector CPU": x.connector, "connector CPU s/GB": x.connector_cost});
            mj[dir] = json!({"1452": bulk_json(&small), "6000": bulk_json(&big)});
        }
        j["mtu"] = mj;
    }
    if let Some(s) = &r.scale {
        let per_tunnel = s.rss1.saturating_sub(s.rss0) as f64 / s.connectors as f64;
        let per_session = s.rss2.saturating_sub(s.rss1) as f64 / s.sessions.max(1) as f64;
        let swarm_per = s.swarm_rss0 as f64 / s.connectors as f64;
        out.push_str(
            "\nScale, fresh replica C (data plane VmRSS; kernel socket buffers not in it):\n\n| | count | data plane VmRSS before → after (KiB) | **KiB each** | descriptors added | time |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        out.push_str(&format!(
            "| tunnels (in-bench connectors, one each, max UDP payload {}) | {} | {} → {} | **{:.1}** | {} | all up in {:.0} ms; listed by the control plane after {} |\n",
            o.connector_mtu,
            s.connectors,
            s.rss0,
            s.rss1,
            per_tunnel,
            s.fds1.saturating_sub(s.fds0),
            s.up_ms,
            s.listed_ms.map_or("> 60 s".into(), |v| format!("{v:.0} ms"))
        ));
        out.push_str(&format!(
            "| idle mTLS sessions through them, each echoed once{} | {} | {} → {} | **{:.1}** | {} | {:.1} s ({:.0}/s) |\n",
            if s.lost > 0 { format!(" ({} tunnels ended meanwhile)", s.lost) } else { String::new() },
            s.sessions,
            s.rss1,
            s.rss2,
            per_session,
            s.fds2.saturating_sub(s.fds1),
            s.sessions_s,
            s.sessions as f64 / s.sessions_s
        ));
        out.push_str(&format!(
            "| for comparison: direct idle mTLS sessions (backend connection open), fresh replica D | {} | | {:.1} | {} | |\n",
            s.direct_n, s.direct_kib, s.direct_fds
        ));
        let ztpctl = if s.ztpctl_rss > 0 {
            format!(
                "`ztpctl connector run` with one tunnel, VmRSS {} KiB; ",
                s.ztpctl_rss
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "\nConnector processes: {ztpctl}the in-bench connectors (one endpoint each), {:.0} KiB each ({} KiB for {} before the sessions, {} KiB with them).\n",
            swarm_per, s.swarm_rss0, s.connectors, s.swarm_rss1
        ));
        j["scale"] = json!({
            "connectors": s.connectors,
            "connector_max_udp_payload": o.connector_mtu,
            "tunnels_up_ms": s.up_ms,
            "tunnels_listed_ms": s.listed_ms,
            "rss_kib": {"before": s.rss0, "tunnels": s.rss1, "sessions": s.rss2},
            "KiB per tunnel": per_tunnel,
            "sessions": s.sessions,
            "sessions_s": s.sessions_s,
            "KiB per tunnel session": per_session,
            "fds per tunnel session": s.fds2.saturating_sub(s.fds1) as f64 / s.sessions.max(1) as f64,
            "tunnels_ended_meanwhile": s.lost,
            "direct": {"sessions": s.direct_n, "KiB each": s.direct_kib, "fds": s.direct_fds},
            "ztpctl_connector_rss_kib": s.ztpctl_rss,
            "in_bench_connector_rss_kib_each": swarm_per,
        });
    }
    if !r.failover.is_empty() {
        let f = &r.failover;
        let n = f.len();
        let fmt = |v: f64| {
            if v.is_nan() {
                format!("> {}", fo_bound(o).as_millis())
            } else {
                format!("{v:.0}")
            }
        };
        out.push_str(&format!(
            "\nFailover: `kill -{}` of the replica holding the oldest of `ztpctl connector run --tunnels 2 --via A,B,C`'s tunnels (at least {:.0} s old); new mTLS sessions through it (1 byte echoed, {} s deadline), one every {} ms on each of the two survivors (the other holder, and the replica that relays){}; ms from the kill; {n} rounds:\n\n| round | killed (its tunnel's age) | survivors: with a tunnel / relaying | sessions started after the kill | failed (after the first retry landed; in flight at the kill) | recovery: start of the last failed one | the victim's tunnel off the listing | ztpctl: learnt the replicas without the victim / left its tunnel there / a new one up | 2 live tunnels listed | longest served session started ≤ 2 s after | served sessions slower than 1 s / the last one's start | restart → ready and current |\n| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            if o.failover_stop { "STOP" } else { "9" },
            o.failover_age,
            FO_DEADLINE.as_secs(),
            FO_EVERY.as_millis(),
            if o.failover_held > 0 {
                format!("; {} idle sessions held through each replica", o.failover_held)
            } else {
                String::new()
            }
        ));
        for (i, x) in f.iter().enumerate() {
            out.push_str(&format!(
                "| {} | {} ({:.1} s) | {} / {} | {} | {} ({}; {}) | {:.0} | {} | {} / {} / {} | {} | {:.1} | {} / {:.0} | {:.0} |\n",
                i + 1,
                x.victim,
                x.age_s,
                x.holder,
                x.relay,
                x.sessions,
                x.failed,
                x.failed_after_retry,
                x.failed_in_flight,
                x.recovery_ms,
                fmt(x.gone_ms),
                fmt(x.learnt_ms),
                fmt(x.left_ms),
                fmt(x.up_ms),
                fmt(x.back_ms),
                x.longest_ms,
                x.slow,
                x.slow_until_ms,
                x.restart_ms
            ));
        }
        // Median, p99 (from 20 rounds) and max; NaN (not within the bound) sorts last.
        type Stats = (f64, Option<f64>, f64);
        let stats = |g: &dyn Fn(&Failover) -> f64| -> Stats {
            let mut v: Vec<f64> = f.iter().map(g).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
            (p(0.5), (n >= 20).then(|| p(0.99)), v[v.len() - 1])
        };
        // The figure a target is judged on: p99 from 20 rounds, else the max.
        let judged = |s: &Stats| s.1.unwrap_or(s.2);
        let recovery = stats(&|x| x.recovery_ms);
        let back = stats(&|x| x.back_ms);
        let after_retry = stats(&|x| x.failed_after_retry as f64);
        let rec_ok = judged(&recovery) <= 1000.0;
        let back_ok = !back.2.is_nan() && judged(&back) <= 3000.0;
        let retry_ok = after_retry.2 == 0.0;
        let on = if n >= 20 { "p99" } else { "max" };
        let rows: Vec<(&str, &str, Stats, String)> = vec![
            (
                "recovery_ms",
                "recovery: kill → start of the last failed session (0: none failed), ms",
                recovery,
                format!("≤ 1000 at p99 ({on}): {}", verdict(rec_ok)),
            ),
            (
                "failed",
                "failed sessions started after the kill",
                stats(&|x| x.failed as f64),
                String::new(),
            ),
            (
                "failed_after_retry",
                "of them, started after the first retry landed",
                after_retry,
                format!("0: {}", verdict(retry_ok)),
            ),
            (
                "failed_in_flight",
                "sessions in flight at the kill that failed",
                stats(&|x| x.failed_in_flight as f64),
                String::new(),
            ),
            (
                "fail_after_ms",
                "a failed session's time to fail (longest in the round), ms",
                stats(&|x| x.fail_after_ms),
                String::new(),
            ),
            (
                "gone_ms",
                "kill → the victim's tunnel off the control plane's listing, ms",
                stats(&|x| x.gone_ms),
                String::new(),
            ),
            (
                "learnt_ms",
                "kill → ztpctl says the data planes are at replicas without the victim (stderr polled every 20 ms), ms",
                stats(&|x| x.learnt_ms),
                String::new(),
            ),
            (
                "left_ms",
                "kill → ztpctl says its tunnel to the victim ended or moved, ms",
                stats(&|x| x.left_ms),
                String::new(),
            ),
            (
                "up_ms",
                "kill → ztpctl says a new tunnel is up, ms",
                stats(&|x| x.up_ms),
                String::new(),
            ),
            (
                "back_ms",
                "**kill → 2 live tunnels listed** (polled every 20 ms), ms",
                back,
                format!("≤ 3000 ({on}): {}", verdict(back_ok)),
            ),
            (
                "longest_ms",
                "longest served session started ≤ 2 s after the kill, ms",
                stats(&|x| x.longest_ms),
                String::new(),
            ),
            (
                "slow",
                "served sessions started after the kill that took more than 1 s",
                stats(&|x| x.slow as f64),
                String::new(),
            ),
            (
                "slow_until_ms",
                "kill → start of the last of them (0: none), ms",
                stats(&|x| x.slow_until_ms),
                String::new(),
            ),
            (
                "restart_ms",
                "the victim started again → ready and current, ms",
                stats(&|x| x.restart_ms),
                String::new(),
            ),
        ];
        out.push_str(&format!(
            "\n| over {n} rounds | median | p99 | max | target |\n| --- | ---: | ---: | ---: | --- |\n"
        ));
        let mut fj = json!({});
        for (key, what, (med, p99, max), target) in &rows {
            out.push_str(&format!(
                "| {what} | {} | {} | {} | {target} |\n",
                fmt(*med),
                p99.map_or("–".into(), fmt),
                fmt(*max)
            ));
            fj[*key] = json!({"median": med, "p99": p99, "max": max});
        }
        let mut lines: std::collections::BTreeMap<&str, usize> = Default::default();
        for x in f {
            for (l, k) in &x.errors {
                *lines.entry(l).or_default() += k;
            }
        }
        if !lines.is_empty() {
            out.push_str("\nFailed sessions' lines, all rounds (replica: line × count):\n\n");
            for (l, k) in &lines {
                out.push_str(&format!("- {l} × {k}\n"));
            }
        }
        let unsettled = f.iter().filter(|x| x.unsettled).count();
        if unsettled > 0 {
            out.push_str(&format!(
                "\nIn {unsettled} rounds the tunnels listed never stayed the same for {} s before the kill.\n",
                FO_SETTLE.as_secs()
            ));
        }
        let unsteady: usize = f.iter().map(|x| x.unsteady).sum();
        if unsteady > 0 {
            out.push_str(&format!(
                "\n{unsteady} sessions failed while a round waited to be steady (2 tunnels, 1 s of sessions all served on all three).\n"
            ));
        }
        let per_round: Vec<Value> = f
            .iter()
            .map(|x| {
                json!({"victim": x.victim, "tunnel_age_s": x.age_s, "survivor_with_tunnel": x.holder,
                    "survivor_relaying": x.relay, "sessions": x.sessions, "failed": x.failed,
                    "failed_after_retry": x.failed_after_retry, "failed_in_flight": x.failed_in_flight,
                    "recovery_ms": x.recovery_ms, "fail_after_ms": x.fail_after_ms,
                    "gone_ms": x.gone_ms, "learnt_ms": x.learnt_ms, "left_ms": x.left_ms, "up_ms": x.up_ms,
                    "back_ms": x.back_ms, "longest_ms": x.longest_ms, "slow": x.slow, "slow_until_ms": x.slow_until_ms, "restart_ms": x.restart_ms,
                    "errors": x.errors, "unsteady_failures": x.unsteady, "unsettled": x.unsettled})
            })
            .collect();
        j["failover"] = json!({
            "rounds": n,
            "min_tunnel_age_s": o.failover_age,
            "held_sessions_per_replica": o.failover_held,
            "signal": if o.failover_stop { "STOP" } else { "KILL" },
            "deadline_s": FO_DEADLINE.as_secs(),
            "every_ms_per_replica": FO_EVERY.as_millis() as u64,
            "summary": fj,
            "targets": {
                "recovery_ms_p99": {"target": 1000, "judged_on": on, "met": rec_ok},
                "failed_after_retry": {"target": 0, "met": retry_ok},
                "back_ms_p99": {"target": 3000, "judged_on": on, "met": back_ok},
            },
            "per_round": per_round,
        });
    }
    println!("{out}");
    println!("{j}");
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&j).unwrap()).unwrap();
    }
}
