//! Keyless handshake cost (issue 20): the same handshakes against a data plane holding
//! its key and one whose key is on a `ztp-keyserver` on loopback.
//!
//! Starts the release binaries next to this one (`cargo build --release -p ztp-dataplane
//! -p ztp-keyserver -p ztp-bench --bins`): two data planes (`--threads 1`, both pinned
//! to CPU 0), one with `--key server.key`, one with `--key keyless://…`; one key server
//! (`--threads 1 --sign-threads 1`) and this program (the load client, one thread) and
//! the echo backend on CPU 1. Each
//! round offers RATE full mTLS handshakes per second (open loop: a new connection every
//! 1/RATE s whatever the previous ones do, ECDSA P-256 keys) for SECS seconds to each
//! data plane in turn, and times each from the TCP connect to the completed handshake
//! (the client's view). Meanwhile a canary session on the same data plane sends one byte
//! every millisecond and times its echo: a worker stalled by signing would show in it.
//! Prints p50 and p99 of both, per data plane, medians over the rounds.
//!
//! Usage: keyless [--rate 1000] [--secs 5] [--rounds 3]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_tests::keyserver::{KeyFile, Keyserver};

mod common;
use common::*;

struct Opts {
    rate: u64,
    secs: u64,
    rounds: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        rate: 1000,
        secs: 5,
        rounds: 3,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--rate" => o.rate = v.parse().expect("--rate N"),
            "--secs" => o.secs = v.parse().expect("--secs N"),
            "--rounds" => o.rounds = v.parse().expect("--rounds N"),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

const SNAPSHOT: &str = r#"version: 1
services:
  - name: echo.svc.internal
    protocol: tcp
    address: "127.0.0.1:BACKEND"
users:
  - name: alice
    identities: ["alice@example.com"]
"#;

/// What one round against one data plane measured.
struct Round {
    handshakes: Vec<Duration>,
    failed: usize,
    canary: Vec<Duration>,
}

fn main() {
    let o = opts();
    ztp_tests::install_crypto_provider();
    // The harness's key server guard runs the release binary next to this one.
    std::env::set_var("ZTP_KEYSERVER_BIN", bin("ztp-keyserver"));
    raise_nofile();
    pin(std::process::id(), "1");
    let dir = std::env::temp_dir().join(format!("ztp-bench-keyless-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = ztp_tests::TestPki::new();
    pki.write_files(&dir).unwrap();
    pki.node("bench-node").write(&dir, "node").unwrap();
    let alice = pki.client_email("alice@example.com");

    let backend = free_port();
    std::thread::spawn(move || serve_loopback(backend, "echo backend", |s| echo(s, 4096)));
    std::fs::write(
        dir.join("snapshot.yaml"),
        SNAPSHOT.replace("BACKEND", &backend.to_string()),
    )
    .unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ks = rt.block_on(Keyserver::start(
        &pki,
        &[KeyFile {
            name: "server",
            pem: &pki.server.key_pem,
            nodes: None,
        }],
        // Sized to the one CPU it is pinned to.
        &["--threads", "1", "--sign-threads", "1"],
    ));
    pin(ks.pid(), "1");

    let start_dp = |key: &[String]| -> (Proc, SocketAddr) {
        let port = free_port();
        let child = Command::new(bin("ztp-dataplane"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(dir.join("server.pem"))
            .args(key)
            .arg("--client-ca")
            .arg(dir.join("ca.pem"))
            .arg("--snapshot")
            .arg(dir.join("snapshot.yaml"))
            .args(["--threads", "1", "--quic-listen", "off"])
            .args(["--max-connections-per-source", "0"])
            .args(["--handshake-rate-per-source", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ztp-dataplane");
        let p = Proc(child);
        pin(p.0.id(), "0");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_until("the data plane to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        (p, addr)
    };
    let path = |p: &str| dir.join(p).display().to_string();
    let (_local, local) = start_dp(&["--key".into(), path("server.key")]);
    let (_keyless, keyless) = start_dp(&[
        "--key".into(),
        ks.url(),
        "--keyless-cert".into(),
        path("node.pem"),
        "--keyless-key".into(),
        path("node.key"),
        "--keyless-ca".into(),
        ks.ca_path().display().to_string(),
    ]);
    let config = client_config(&pki.ca_pem, &alice);

    println!("machine: {}", machine());
    let mut results: Vec<(&str, Vec<Round>)> = vec![("local key", vec![]), ("keyless", vec![])];
    for round in 0..=o.rounds {
        for (i, addr) in [local, keyless].into_iter().enumerate() {
            let r = rt.block_on(run(addr, config.clone(), o.rate, o.secs));
            // Round 0 warms up.
            if round > 0 {
                results[i].1.push(r);
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut figures = Vec::new();
    for (name, rounds) in &results {
        let stat =
            |f: &dyn Fn(&Round) -> Duration| median(rounds.iter().map(|r| ms(f(r))).collect());
        let hs50 = stat(&|r| percentile(&r.handshakes, 0.5));
        let hs99 = stat(&|r| percentile(&r.handshakes, 0.99));
        let c50 = stat(&|r| percentile(&r.canary, 0.5));
        let c99 = stat(&|r| percentile(&r.canary, 0.99));
        let cmax = stat(&|r| *r.canary.last().unwrap());
        let failed: usize = rounds.iter().map(|r| r.failed).sum();
        let done: usize = rounds.iter().map(|r| r.handshakes.len()).sum();
        println!(
            "{name:>9}: handshake p50 {hs50:.2} ms, p99 {hs99:.2} ms ({done} handshakes, {failed} failed); \
             canary echo p50 {c50:.2} ms, p99 {c99:.2} ms, max {cmax:.2} ms"
        );
        figures.push((hs50, hs99, c99, cmax));
    }
    let (l, k) = (figures[0], figures[1]);
    println!(
        "keyless - local: handshake p50 {:+.2} ms (target +0.3), p99 {:+.2} ms (target +2); canary p99 {:+.2} ms, max {:+.2} ms",
        k.0 - l.0,
        k.1 - l.1,
        k.2 - l.2,
        k.3 - l.3
    );
    println!(
        "at {} handshakes/s for {} s, {} rounds (medians of the rounds)",
        o.rate, o.secs, o.rounds
    );
    drop(ks);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One round against `addr`: handshakes at `rate` per second for `secs`, and the canary.
async fn run(
    addr: SocketAddr,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
    rate: u64,
    secs: u64,
) -> Round {
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls_pki_types::ServerName::try_from("echo.svc.internal").unwrap();
    // The canary: one session, one byte a millisecond.
    let mut canary = {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        connector.connect(name.clone(), tcp).await.unwrap()
    };
    let stop = Instant::now() + Duration::from_secs(secs);
    let canary_task = tokio::spawn(async move {
        let mut times = Vec::new();
        let mut b = [0u8; 1];
        while Instant::now() < stop {
            let t = Instant::now();
            if canary.write_all(b"x").await.is_err() || canary.read_exact(&mut b).await.is_err() {
                break;
            }
            times.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times
    });
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while Instant::now() < stop {
        tick.tick().await;
        let (connector, name) = (connector.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            tcp.set_nodelay(true).ok()?;
            let mut s = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
                .await
                .ok()?
                .ok()?;
            let took = t.elapsed();
            let mut b = [0u8; 1];
            s.write_all(b"y").await.ok()?;
            s.read_exact(&mut b).await.ok()?;
            Some(took)
        }));
    }
    let mut handshakes = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.ok().flatten() {
            Some(d) => handshakes.push(d),
            None => failed += 1,
        }
    }
    handshakes.sort();
    let mut canary = canary_task.await.unwrap();
    canary.sort();
    Round {
        handshakes,
        failed,
        canary,
    }
}
