//! Keyless handshake cost (issue 20): the same handshakes against a data plane holding
//! its key and one whose key is on a `ztp-keyserver` on loopback.
//!
//! Starts the release binaries next to this one (`cargo build --release -p ztp-dataplane
//! -p ztp-keyserver -p ztp-bench --bins`): two data planes (`--threads 1`, both pinned
//! to CPU 0), one with `--key server.key`, one with `--key keyless://…`; one key server
//! (`--threads 1 --sign-threads 1`, its log, a line per signature, to a file) and this
//! program (the load client, one thread) and the echo backend on CPU 1. Each
//! round offers RATE full mTLS handshakes per second (open loop: a new connection every
//! 1/RATE s whatever the previous ones do, ECDSA P-256 keys) for SECS seconds to each
//! data plane in turn, and times each from the TCP connect to the completed handshake
//! (the client's view). Meanwhile a canary session on the same data plane sends one byte
//! every millisecond and times its echo: a worker stalled by signing would show in it.
//! Prints p50 and p99 of both, per data plane, over the samples of all rounds (which
//! alternate between the two, so that a drift of the machine falls on both alike).
//!
//! Usage: keyless [--rate 1000] [--secs 1] [--rounds 20] [--keyserver-cpus 1]
//!
//! `--keyserver-cpus` moves the key server (a `taskset` CPU list: `0` beside the data
//! planes, `0,1` wherever the kernel puts it).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::*;

struct Opts {
    rate: u64,
    secs: u64,
    rounds: usize,
    keyserver_cpus: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        rate: 1000,
        secs: 1,
        rounds: 20,
        keyserver_cpus: "1".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--rate" => o.rate = v.parse().expect("--rate N"),
            "--secs" => o.secs = v.parse().expect("--secs N"),
            "--rounds" => o.rounds = v.parse().expect("--rounds N"),
            "--keyserver-cpus" => o.keyserver_cpus = v,
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
    // The key server, its log (a line per signature) written to a file as in
    // production: through the test harness, a thread of this process would wake for
    // every line, on the CPU the key server shares with the load client.
    let ks_log = dir.join("keyserver.log");
    let (_ks, ks_addr) = start_keyserver(
        &dir,
        &pki,
        &o.keyserver_cpus,
        "info",
        std::fs::File::create(&ks_log).unwrap().into(),
    );

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
        format!("keyless://{ks_addr}"),
        "--keyless-cert".into(),
        path("node.pem"),
        "--keyless-key".into(),
        path("node.key"),
        "--keyless-ca".into(),
        path("ca.pem"),
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
    // Every round's samples pooled: the rounds alternate between the two data planes,
    // so a drift of the machine's speed falls on both alike.
    let pooled = |rounds: &[Round], f: &dyn Fn(&Round) -> &Vec<Duration>| {
        let mut all: Vec<Duration> = rounds.iter().flat_map(|r| f(r).iter().copied()).collect();
        all.sort();
        all
    };
    let mut figures = Vec::new();
    for (name, rounds) in &results {
        let hs = pooled(rounds, &|r| &r.handshakes);
        let canary = pooled(rounds, &|r| &r.canary);
        let (hs50, hs99) = (ms(percentile(&hs, 0.5)), ms(percentile(&hs, 0.99)));
        let (c50, c99) = (ms(percentile(&canary, 0.5)), ms(percentile(&canary, 0.99)));
        let cmax = ms(*canary.last().unwrap());
        let failed: usize = rounds.iter().map(|r| r.failed).sum();
        println!(
            "{name:>9}: handshake p50 {hs50:.2} ms, p99 {hs99:.2} ms ({} handshakes, {failed} failed); \
             canary echo p50 {c50:.2} ms, p99 {c99:.2} ms, max {cmax:.2} ms",
            hs.len()
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
    // The spread: each round's p50 difference against the local round just before it.
    let mut diffs: Vec<f64> = results[0]
        .1
        .iter()
        .zip(&results[1].1)
        .map(|(l, k)| ms(percentile(&k.handshakes, 0.5)) - ms(percentile(&l.handshakes, 0.5)))
        .collect();
    diffs.sort_by(|a, b| a.total_cmp(b));
    println!(
        "p50 difference per round: median {:+.2} ms, from {:+.2} to {:+.2} ms",
        diffs[diffs.len() / 2],
        diffs[0],
        diffs[diffs.len() - 1]
    );
    println!(
        "at {} handshakes/s, {} rounds of {} s against each in turn (samples pooled); key server on CPU {}",
        o.rate, o.rounds, o.secs, o.keyserver_cpus
    );
    let signed = std::fs::read_to_string(&ks_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("signed") && !l.contains("not signed"))
        .count();
    println!("the key server logged {signed} signatures");
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
