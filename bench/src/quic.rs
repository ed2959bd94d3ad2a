//! The QUIC path beside the TCP path of the same data plane, measured in one run.
//!
//! The release `ztp-dataplane` (next to this program, like `peers`) runs from a snapshot
//! with `--threads 1`, pinned to CPU 0; this program (the load client, one tokio thread)
//! and the backends (a child process: echo, sink and source, one port each) share CPU 1.
//! The data plane keeps its QUIC defaults (256 streams per connection, 64 connections per
//! identity, 1 MiB per stream / 8 MiB per connection of flow-control window); per-source
//! limits are off because all the load comes from 127.0.0.1.
//!
//! - `latency`: on one established QUIC connection, `--pings` new streams (after a
//!   tenth as many of warm-up), each timed from `open_bi` to the 1-byte echo from the
//!   backend, interleaved with plain loopback TCP connects straight to the backend
//!   (connect, 1 byte, its echo). The stream is then finished and read to its end
//!   (untimed), so the next one starts clean. For context, `--pings / 4` full mTLS
//!   connections through ZTP over TCP (connect, handshake, 1-byte echo), what a local
//!   connection cost before streams.
//! - `bulk`: `--secs` of upload and of download through one QUIC stream and through one
//!   TLS-over-TCP connection (64 KiB writes, 300 ms of warm-up first); MB/s, the data
//!   plane's CPU seconds per GB (user + system from `/proc/PID/stat`) and the client's
//!   and backends' CPU share, with quinn's view of the path (RTT, loss, flow-control
//!   blocking) to tell what limited it.
//! - `idle` (once, on a fresh data plane each): `--streams` streams spread over
//!   connections of 250 streams each, every one echoed once (so its backend connection
//!   is open), then held; the data plane's VmRSS after minus before, per stream. Beside
//!   it, `--tcp-idle` mTLS connections over TCP held the same way.
//!
//! Usage: quic [--secs 5] [--pings 2000] [--streams 10000] [--tcp-idle 2000] [--rounds 3]
//!             [--threads 1] [--json FILE]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, EndpointConfig, TransportConfig, VarInt};

/// The data plane's setting (`ztp_proto::quic::MAX_UDP_PAYLOAD`), as a client of it would
/// set it; `ZTP_BENCH_MAX_UDP_PAYLOAD` overrides it (1452: quinn's default packets).
static MAX_UDP_PAYLOAD: std::sync::LazyLock<u16> = std::sync::LazyLock::new(|| {
    std::env::var("ZTP_BENCH_MAX_UDP_PAYLOAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000)
});
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use ztp_tests::{Dataplane, TestCert, TestPki};

mod common;
use common::{
    bin, client_config, echo, fds, free_port, machine, pin, raise_nofile, rss_kib, serve_loopback,
    stat_cpu, Proc,
};

const ECHO: &str = "echo.svc.internal";
const SINK: &str = "sink.svc.internal";
const SOURCE: &str = "source.svc.internal";
const CHUNK: usize = 64 * 1024;
/// Streams per QUIC connection in the idle test: under the data plane's default cap (256).
const STREAMS_PER_CONN: usize = 250;
/// The client's windows: large enough that the client never holds the data plane back
/// (with 8 MiB per stream the data plane was still blocked on them ~250 times a second in
/// `down`, whenever this one-thread client fell behind for a moment).
const CLIENT_STREAM_WINDOW: u32 = 64 << 20;
const CLIENT_CONN_WINDOW: u32 = 128 << 20;
/// The client's UDP socket buffers (net.core.[rw]mem_max permitting).
const CLIENT_SOCKET_BUFFER: usize = 4 << 20;

struct Opts {
    secs: f64,
    pings: usize,
    streams: usize,
    tcp_idle: usize,
    rounds: usize,
    threads: usize,
    json: Option<PathBuf>,
}

fn opts() -> Opts {
    let mut o = Opts {
        secs: 5.0,
        pings: 2000,
        streams: 10_000,
        tcp_idle: 2000,
        rounds: 3,
        threads: 1,
        json: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--secs" => o.secs = v.parse().expect("--secs SECONDS"),
            "--pings" => o.pings = v.parse().expect("--pings N"),
            "--streams" => o.streams = v.parse().expect("--streams N"),
            "--tcp-idle" => o.tcp_idle = v.parse().expect("--tcp-idle N"),
            "--rounds" => o.rounds = v.parse().expect("--rounds N"),
            "--threads" => o.threads = v.parse().expect("--threads N"),
            "--json" => o.json = Some(PathBuf::from(v)),
            other => panic!("unknown argument {other} (see the comment at the top of quic.rs)"),
        }
        i += 2;
    }
    o.rounds = o.rounds.max(1);
    o.pings = o.pings.max(10);
    o
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("backend") {
        let port = |i: usize| args[i].parse::<u16>().expect("backend ECHO SINK SOURCE");
        backend(port(2), port(3), port(4));
        return;
    }
    let mut o = opts();
    // Every process has its own limit (the children inherit this one): an idle stream
    // is one descriptor in the data plane (its backend connection) and one in the
    // backend; an idle TCP connection two in the data plane, one here, one in the backend.
    let nofile = raise_nofile() as usize;
    let spare = 500;
    if o.streams + spare > nofile || 2 * o.tcp_idle + spare > nofile {
        let (streams, tcp) = (o.streams, o.tcp_idle);
        o.streams = o.streams.min(nofile.saturating_sub(spare));
        o.tcp_idle = o.tcp_idle.min(nofile.saturating_sub(spare) / 2);
        eprintln!(
            "open-file limit {nofile}: holding {} idle streams (of {streams}) and {} idle TCP connections (of {tcp})",
            o.streams, o.tcp_idle
        );
    }
    // The release data plane beside this program, through the harness's guard.
    let dp_bin = bin("ztp-dataplane");
    if cfg!(debug_assertions) {
        // It would measure the debug data plane beside it.
        eprintln!("run the release build: cargo run --release -p ztp-bench --bin quic");
        std::process::exit(2);
    }
    std::env::set_var("ZTP_DATAPLANE_BIN", &dp_bin);
    pin(std::process::id(), "1");
    ztp_tests::install_crypto_provider();

    let ports = (free_port(), free_port(), free_port());
    let backend = Proc(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(std::env::current_exe().unwrap())
            .arg("backend")
            .args([ports.0, ports.1, ports.2].map(|p| p.to_string()))
            .spawn()
            .expect("start the backends"),
    );
    for p in [ports.0, ports.1, ports.2] {
        wait_port(p);
    }

    let pki = TestPki::new();
    let cert = pki.client_email("bench@example.com");
    let env = Env {
        tls: client_config(&pki.ca_pem, &cert),
        quic: quic_config(&pki.ca_pem, &cert),
        endpoint: None,
        backend_pid: backend.0.id(),
        echo_port: ports.0,
        snapshot: snapshot(ports),
        threads: o.threads,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let machine = machine();
    eprintln!("{machine}; data plane {}", dp_bin.display());
    let report = rt.block_on(run(env, &pki, &o));
    print_report(&report, &o, &machine);
    drop(backend);
}

// ---------------------------------------------------------------------------------------
// Setup

struct Env {
    tls: Arc<rustls::ClientConfig>,
    quic: quinn::ClientConfig,
    endpoint: Option<Endpoint>,
    backend_pid: u32,
    echo_port: u16,
    snapshot: String,
    threads: usize,
}

impl Env {
    fn endpoint(&self) -> &Endpoint {
        self.endpoint.as_ref().expect("the client endpoint")
    }
}

fn snapshot((echo, sink, source): (u16, u16, u16)) -> String {
    let mut y = String::from("version: 1\nservices:\n");
    for (name, port) in [(ECHO, echo), (SINK, sink), (SOURCE, source)] {
        y.push_str(&format!(
            "  - name: {name}\n    protocol: tcp\n    address: \"127.0.0.1:{port}\"\n    groups: [bench]\n"
        ));
    }
    y.push_str("users:\n  - name: bench\n    identities: [\"bench@example.com\"]\n    groups: [bench]\ngroups:\n  - name: bench\n");
    y
}

/// A data plane on 127.0.0.1 (TCP and QUIC on the same port), pinned to CPU 0.
async fn start_dataplane(pki: &TestPki, env: &Env) -> Dataplane {
    let threads = env.threads.to_string();
    let dp = Dataplane::start(
        pki,
        &env.snapshot,
        &[
            "--threads",
            &threads,
            "--max-connections",
            "100000",
            "--max-connections-per-source",
            "0",
            "--handshake-rate-per-source",
            "0",
        ],
    )
    .await;
    pin(dp.pid(), if env.threads > 1 { "0,1" } else { "0" });
    dp
}

/// The load client's TLS config (TLS 1.3, AES-128-GCM, X25519, as `peers`) with ALPN
/// `ztp/1`, and transport windows that leave the data plane's as the only limit.
fn quic_config(ca_pem: &str, cert: &TestCert) -> quinn::ClientConfig {
    let mut tls = (*client_config(ca_pem, cert)).clone();
    tls.alpn_protocols = vec![ztp_tests::quic::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(Arc::new(tls)).expect("a QUIC TLS config");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(CLIENT_STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CLIENT_CONN_WINDOW))
        .send_window(u64::from(CLIENT_CONN_WINDOW))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(VarInt::from_u32(30_000).into()))
        .initial_mtu(1452)
        .mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(*MAX_UDP_PAYLOAD);
            m
        }));
    config.transport_config(Arc::new(t));
    config
}

/// A client endpoint on 127.0.0.1 with large socket buffers.
fn client_endpoint() -> Endpoint {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    let _ = s.set_recv_buffer_size(CLIENT_SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(CLIENT_SOCKET_BUFFER);
    s.set_nonblocking(true).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(*MAX_UDP_PAYLOAD)
        .expect("a valid payload size");
    Endpoint::new(
        endpoint_config,
        None,
        s.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .expect("a client endpoint")
}

async fn quic_connect(env: &Env, dp: &Dataplane, sni: &str) -> Connection {
    let conn = env
        .endpoint()
        .connect_with(env.quic.clone(), dp.addr(), sni)
        .expect("connect")
        .await
        .expect("QUIC handshake");
    ztp_tests::quic::confirmed(&conn)
        .await
        .expect("the data plane confirms the handshake");
    conn
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(env: &Env, dp: &Dataplane, sni: &str) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(dp.addr()).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(env.tls.clone())
        .connect(name, tcp)
        .await
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
// /proc accounting

struct Meter {
    t: Instant,
    dp: Duration,
    client: Duration,
    backend: Duration,
    dp_pid: u32,
    backend_pid: u32,
}

impl Meter {
    fn start(dp_pid: u32, backend_pid: u32) -> Meter {
        Meter {
            t: Instant::now(),
            dp: stat_cpu(dp_pid),
            client: stat_cpu(std::process::id()),
            backend: stat_cpu(backend_pid),
            dp_pid,
            backend_pid,
        }
    }

    /// (elapsed s, data plane CPU s, client share of a core, backends' share)
    fn stop(&self) -> (f64, f64, f64, f64) {
        let el = self.t.elapsed().as_secs_f64();
        let dp = (stat_cpu(self.dp_pid) - self.dp).as_secs_f64();
        let client = (stat_cpu(std::process::id()) - self.client).as_secs_f64() / el;
        let backend = (stat_cpu(self.backend_pid) - self.backend).as_secs_f64() / el;
        (el, dp, client, backend)
    }
}

// ---------------------------------------------------------------------------------------
// The tests

#[derive(Default, Clone)]
struct Round {
    /// µs: QUIC new stream, plain TCP connect, mTLS TCP connection through ZTP.
    stream: (f64, f64),
    plain: (f64, f64),
    mtls: (f64, f64),
    /// [quic up, tcp up, quic down, tcp down]
    bulk: [Bulk; 4],
}

#[derive(Default, Clone, Copy)]
struct Bulk {
    mbps: f64,
    cost: f64,
    client: f64,
    backend: f64,
}

#[derive(Default)]
struct Idle {
    n: usize,
    conns: usize,
    kib: f64,
    fds: usize,
    before_kib: u64,
    after_kib: u64,
}

struct Report {
    rounds: Vec<Round>,
    quic_idle: Idle,
    tcp_idle: Idle,
}

async fn run(mut env: Env, pki: &TestPki, o: &Opts) -> Report {
    env.endpoint = Some(client_endpoint());
    let secs = Duration::from_secs_f64(o.secs);
    let mut rounds = Vec::new();
    {
        let dp = start_dataplane(pki, &env).await;
        for round in 1..=o.rounds {
            let mut r = Round::default();
            (r.stream, r.plain) = stream_latency(&env, &dp, o.pings).await;
            r.mtls = mtls_latency(&env, &dp, (o.pings / 4).max(10)).await;
            eprintln!(
                "round {round} latency: QUIC stream p50 {:.0} µs p99 {:.0} µs | plain TCP p50 {:.0} µs p99 {:.0} µs | mTLS TCP via ZTP p50 {:.0} µs p99 {:.0} µs",
                r.stream.0, r.stream.1, r.plain.0, r.plain.1, r.mtls.0, r.mtls.1
            );
            for (i, (quic, up)) in [(true, true), (false, true), (true, false), (false, false)]
                .into_iter()
                .enumerate()
            {
                let b = bulk(&env, &dp, quic, up, secs).await;
                eprintln!(
                    "round {round} {:4} {:4}: {:7.1} MB/s  {:.3} CPU s/GB  (client {:.0}%, backends {:.0}%)",
                    if up { "up" } else { "down" },
                    if quic { "QUIC" } else { "TCP" },
                    b.mbps,
                    b.cost,
                    b.client * 100.0,
                    b.backend * 100.0
                );
                r.bulk[i] = b;
            }
            rounds.push(r);
        }
    }
    // Fresh data planes: memory freed by earlier tests stays resident and would be
    // reused, hiding what a stream costs.
    let quic_idle = {
        let dp = start_dataplane(pki, &env).await;
        idle_quic(&env, &dp, o.streams).await
    };
    eprintln!(
        "idle QUIC: {} streams on {} connections: {:.1} KiB each (VmRSS {} -> {} KiB, +{} descriptors)",
        quic_idle.n,
        quic_idle.conns,
        quic_idle.kib,
        quic_idle.before_kib,
        quic_idle.after_kib,
        quic_idle.fds
    );
    let tcp_idle = {
        let dp = start_dataplane(pki, &env).await;
        idle_tcp(&env, &dp, o.tcp_idle).await
    };
    eprintln!(
        "idle TCP: {} mTLS connections: {:.1} KiB each (VmRSS {} -> {} KiB, +{} descriptors)",
        tcp_idle.n, tcp_idle.kib, tcp_idle.before_kib, tcp_idle.after_kib, tcp_idle.fds
    );
    Report {
        rounds,
        quic_idle,
        tcp_idle,
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

/// New QUIC streams on one connection against plain TCP connects to the backend,
/// interleaved; (stream p50/p99, plain p50/p99) in µs.
async fn stream_latency(env: &Env, dp: &Dataplane, n: usize) -> ((f64, f64), (f64, f64)) {
    let conn = quic_connect(env, dp, ECHO).await;
    let warm = (n / 10).max(100);
    let mut streams = Vec::with_capacity(n);
    let mut plain = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..warm + n {
        let t = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
        send.write_all(b"x").await.expect("write on the stream");
        recv.read_exact(&mut b)
            .await
            .expect("the echo on the stream");
        let el = t.elapsed();
        // Untimed: end the stream both ways, so the next one starts clean.
        send.finish().expect("finish");
        tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(16))
            .await
            .expect("the stream's end")
            .expect("the stream's end");

        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", env.echo_port))
            .await
            .expect("connect to the backend");
        s.set_nodelay(true).unwrap();
        s.write_all(b"x").await.unwrap();
        s.read_exact(&mut b).await.expect("the backend's echo");
        let el_plain = t.elapsed();
        drop(s);
        if i >= warm {
            streams.push(us(el));
            plain.push(us(el_plain));
        }
    }
    conn.close(VarInt::from_u32(0), b"done");
    (p50_p99(streams), p50_p99(plain))
}

/// Full mTLS connections through ZTP over TCP: connect, handshake, 1-byte echo.
async fn mtls_latency(env: &Env, dp: &Dataplane, n: usize) -> (f64, f64) {
    let mut v = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..n + 20 {
        let t = Instant::now();
        let mut s = tls_connect(env, dp, ECHO).await.expect("mTLS connect");
        s.write_all(b"x").await.unwrap();
        s.flush().await.unwrap();
        s.read_exact(&mut b).await.expect("the echo through ZTP");
        let el = t.elapsed();
        let _ = s.shutdown().await;
        if i >= 20 {
            v.push(us(el));
        }
    }
    p50_p99(v)
}

/// One stream of upload (to the sink) or download (from the source), QUIC or TLS/TCP.
async fn bulk(env: &Env, dp: &Dataplane, quic: bool, up: bool, secs: Duration) -> Bulk {
    let sni = if up { SINK } else { SOURCE };
    let mut buf = vec![0x33u8; CHUNK];
    let warm = Duration::from_millis(300);
    let mut bytes = 0u64;
    let measured;
    if quic {
        let conn = quic_connect(env, dp, sni).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // The stream exists for the data plane once a frame arrives: one byte opens it
        // (the source ignores what it reads).
        if !up {
            send.write_all(b"D").await.unwrap();
        }
        let mut before = conn.stats();
        let mut m = None;
        let start = Instant::now();
        loop {
            let now = Instant::now();
            if m.is_none() && now >= start + warm {
                m = Some(Meter::start(dp.pid(), env.backend_pid));
                before = conn.stats();
                bytes = 0;
            }
            if m.as_ref().is_some_and(|m| now >= m.t + secs) {
                break;
            }
            if up {
                send.write_all(&buf).await.expect("upload");
                bytes += CHUNK as u64;
            } else {
                let c = recv
                    .read_chunk(usize::MAX, true)
                    .await
                    .expect("download")
                    .expect("the data plane ended the download");
                bytes += c.bytes.len() as u64;
            }
        }
        measured = m.unwrap().stop();
        let s = conn.stats();
        let (tx, rx) = (s.udp_tx, s.udp_rx);
        eprintln!(
            "    QUIC path: rtt {:?} (min {:?}), mtu {}, cwnd {} KiB, lost {} packets, {} congestion events; client sent {} datagrams in {} syscalls (GSO), got {}; flow control blocked the client {}+{} times (stream+connection), the data plane {}+{} times",
            s.path.rtt,
            s.path.min_rtt,
            s.path.current_mtu,
            s.path.cwnd >> 10,
            s.path.lost_packets - before.path.lost_packets,
            s.path.congestion_events - before.path.congestion_events,
            tx.datagrams - before.udp_tx.datagrams,
            tx.ios - before.udp_tx.ios,
            rx.datagrams - before.udp_rx.datagrams,
            s.frame_tx.stream_data_blocked - before.frame_tx.stream_data_blocked,
            s.frame_tx.data_blocked - before.frame_tx.data_blocked,
            s.frame_rx.stream_data_blocked - before.frame_rx.stream_data_blocked,
            s.frame_rx.data_blocked - before.frame_rx.data_blocked,
        );
        conn.close(VarInt::from_u32(0), b"done");
    } else {
        let mut s = tls_connect(env, dp, sni).await.expect("mTLS connect");
        if !up {
            s.write_all(b"D").await.unwrap();
            s.flush().await.unwrap();
        }
        let mut m = None;
        let start = Instant::now();
        loop {
            let now = Instant::now();
            if m.is_none() && now >= start + warm {
                m = Some(Meter::start(dp.pid(), env.backend_pid));
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
        measured = m.unwrap().stop();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (el, dp_cpu, client, backend) = measured;
    Bulk {
        mbps: bytes as f64 / 1e6 / el,
        cost: dp_cpu / (bytes as f64 / 1e9),
        client,
        backend,
    }
}

/// `n` streams held open on connections of [`STREAMS_PER_CONN`], each echoed once.
async fn idle_quic(env: &Env, dp: &Dataplane, n: usize) -> Idle {
    let pid = dp.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, fds0) = (rss_kib(pid), fds(pid));
    let nconn = n.div_ceil(STREAMS_PER_CONN).max(1);
    let mut conns = Vec::with_capacity(nconn);
    for _ in 0..nconn {
        conns.push(quic_connect(env, dp, ECHO).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in conns.iter().enumerate() {
        let c = c.clone();
        let share = n / nconn + usize::from(i < n % nconn);
        tasks.spawn(async move {
            let mut held = Vec::with_capacity(share);
            let mut b = [0u8; 1];
            for _ in 0..share {
                let (mut send, mut recv) = c.open_bi().await.expect("open a stream");
                send.write_all(b"x").await.expect("write on the stream");
                recv.read_exact(&mut b)
                    .await
                    .expect("the echo on the stream");
                held.push((send, recv));
            }
            held
        });
    }
    let mut held = Vec::with_capacity(n);
    while let Some(h) = tasks.join_next().await {
        held.extend(h.expect("a connection's streams"));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (after, fds1) = (rss_kib(pid), fds(pid));
    let idle = Idle {
        n: held.len(),
        conns: nconn,
        kib: after.saturating_sub(before) as f64 / held.len().max(1) as f64,
        fds: fds1.saturating_sub(fds0),
        before_kib: before,
        after_kib: after,
    };
    drop(held);
    for c in &conns {
        c.close(VarInt::from_u32(0), b"done");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    idle
}

/// `n` mTLS connections over TCP held open, each echoed once.
async fn idle_tcp(env: &Env, dp: &Dataplane, n: usize) -> Idle {
    let pid = dp.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, fds0) = (rss_kib(pid), fds(pid));
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let batch = (n - held.len()).min(64);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let tls = env.tls.clone();
            let addr = dp.addr();
            set.spawn(async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls_pki_types::ServerName::try_from(ECHO).unwrap();
                let mut s = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                s.write_all(b"x").await?;
                s.flush().await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(s)
            });
        }
        while let Some(h) = set.join_next().await {
            held.push(h.unwrap().expect("an idle connection"));
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (after, fds1) = (rss_kib(pid), fds(pid));
    let idle = Idle {
        n: held.len(),
        conns: held.len(),
        kib: after.saturating_sub(before) as f64 / held.len().max(1) as f64,
        fds: fds1.saturating_sub(fds0),
        before_kib: before,
        after_kib: after,
    };
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    idle
}

// ---------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn print_report(r: &Report, o: &Opts, machine: &str) {
    let med = |f: &dyn Fn(&Round) -> f64| median(r.rounds.iter().map(f).collect());
    let stream = (med(&|x| x.stream.0), med(&|x| x.stream.1));
    let plain = (med(&|x| x.plain.0), med(&|x| x.plain.1));
    let mtls = (med(&|x| x.mtls.0), med(&|x| x.mtls.1));
    let added = stream.0 - plain.0;
    let b = |i: usize| Bulk {
        mbps: med(&|x| x.bulk[i].mbps),
        cost: med(&|x| x.bulk[i].cost),
        client: med(&|x| x.bulk[i].client),
        backend: med(&|x| x.bulk[i].backend),
    };
    let (qu, tu, qd, td) = (b(0), b(1), b(2), b(3));
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };

    let mut out = format!(
        "\nQUIC beside TCP, one data plane (--threads {}, CPU 0), client and backends on CPU 1; medians of {} rounds; {machine}\n",
        o.threads, o.rounds
    );
    out.push_str(&format!(
        "\nNew session, {} samples per round (µs):\n\n| path | p50 | p99 |\n| --- | ---: | ---: |\n",
        o.pings
    ));
    out.push_str(&format!(
        "| QUIC new stream on an open connection (open_bi + 1-byte echo) | {:.0} | {:.0} |\n",
        stream.0, stream.1
    ));
    out.push_str(&format!(
        "| plain TCP straight to the backend (connect + 1-byte echo) | {:.0} | {:.0} |\n",
        plain.0, plain.1
    ));
    out.push_str(&format!(
        "| **added by a QUIC stream** (target ≤ 200 µs at p50: {}) | **{:+.0}** | {:+.0} |\n",
        verdict(added <= 200.0),
        added,
        stream.1 - plain.1
    ));
    out.push_str(&format!(
        "| mTLS TCP connection through ZTP (connect + handshake + 1-byte echo), {} per round | {:.0} | {:.0} |\n",
        (o.pings / 4).max(10),
        mtls.0,
        mtls.1
    ));
    out.push_str(&format!(
        "\nBulk, one stream, {} s each way, 64 KiB writes:\n\n| | QUIC MB/s | TCP MB/s | QUIC CPU s/GB | TCP CPU s/GB | **CPU/GB QUIC ÷ TCP** (target ≤ 1.5) | client CPU QUIC / TCP |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        o.secs
    ));
    for (dir, q, t) in [("up", qu, tu), ("down", qd, td)] {
        let ratio = q.cost / t.cost;
        out.push_str(&format!(
            "| {dir} | {:.0} | {:.0} | {:.3} | {:.3} | **{:.2}×** ({}) | {:.0}% / {:.0}% |\n",
            q.mbps,
            t.mbps,
            q.cost,
            t.cost,
            ratio,
            verdict(ratio <= 1.5),
            q.client * 100.0,
            t.client * 100.0
        ));
    }
    let qi = &r.quic_idle;
    let ti = &r.tcp_idle;
    out.push_str("\nIdle, each with its backend connection open (data plane VmRSS after − before):\n\n| | held | KiB each | data plane descriptors added |\n| --- | ---: | ---: | ---: |\n");
    out.push_str(&format!(
        "| QUIC streams on {} connections | {} | {:.1} | {} |\n",
        qi.conns, qi.n, qi.kib, qi.fds
    ));
    out.push_str(&format!(
        "| mTLS TCP connections | {} | {:.1} | {} |\n",
        ti.n, ti.kib, ti.fds
    ));
    println!("{out}");

    let bulk_json = |x: Bulk| serde_json::json!({"MB/s": x.mbps, "CPU s/GB": x.cost, "client CPU": x.client, "backend CPU": x.backend});
    let json = serde_json::json!({
        "bench": "quic",
        "machine": machine,
        "rounds": o.rounds,
        "secs": o.secs,
        "latency_us": {
            "quic_stream": {"p50": stream.0, "p99": stream.1},
            "plain_tcp": {"p50": plain.0, "p99": plain.1},
            "added_p50": added,
            "added_p99": stream.1 - plain.1,
            "mtls_tcp_via_ztp": {"p50": mtls.0, "p99": mtls.1},
        },
        "bulk": {
            "up": {"quic": bulk_json(qu), "tcp": bulk_json(tu), "cpu_ratio": qu.cost / tu.cost},
            "down": {"quic": bulk_json(qd), "tcp": bulk_json(td), "cpu_ratio": qd.cost / td.cost},
        },
        "idle": {
            "quic_streams": {"n": qi.n, "connections": qi.conns, "KiB each": qi.kib, "fds": qi.fds},
            "tcp_connections": {"n": ti.n, "KiB each": ti.kib, "fds": ti.fds},
        },
    });
    println!("{json}");
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}
