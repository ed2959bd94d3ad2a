//! ECDSA P-256 signatures per second per core of the key server (issue 20's target:
//! at least 10,000).
//!
//! The release `ztp-keyserver` (next to this program) runs with one async worker and one
//! signing thread (`--threads 1 --sign-threads 1`), pinned to CPU 0 with taskset; this
//! program (the load client, one tokio thread) runs on CPU 1. The key is the test PKI's
//! server key (P-256), as a data plane's certificate would name it. `--conns`
//! connections each keep `--depth` requests in flight (a new one written per answer
//! read, in batches), for `--secs` after a second of warm-up. Per round: signatures per
//! second, the key server's CPU use over the window (user + system from
//! `/proc/PID/stat`), and signatures per CPU-second of the key server: the per-core
//! figure. The key server logs every signature at info (`--log info`, the default, what
//! runs in production; `--log warn` measures without that line); its stderr goes to
//! /dev/null, so the figure counts formatting the line, not a disk or journal behind it.
//!
//! Usage: keyserver [--secs 5] [--conns 4] [--depth 64] [--rounds 3] [--log info|warn]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_proto::keyless::{split, Op, Outcome, Request, Response};

use common::{machine, pin, start_keyserver, stat_cpu};

struct Opts {
    secs: u64,
    conns: usize,
    depth: usize,
    rounds: usize,
    log: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        secs: 5,
        conns: 4,
        depth: 64,
        rounds: 3,
        log: "info".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--secs" => o.secs = v.parse().expect("--secs N"),
            "--conns" => o.conns = v.parse().expect("--conns N"),
            "--depth" => o.depth = v.parse().expect("--depth N"),
            "--rounds" => o.rounds = v.parse().expect("--rounds N"),
            "--log" => o.log = v.to_owned(),
            other => panic!("unknown flag {other}; see the file's docs"),
        }
    }
    o
}

/// One connection: keeps `depth` requests in flight until `stop`, counting answers.
async fn load(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    request: Vec<u8>,
    depth: usize,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(&request.repeat(depth)).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    let mut checked = false;
    loop {
        let n = tls.read(&mut buf[have..]).await.unwrap();
        assert!(n > 0, "the key server closed the connection");
        have += n;
        let mut at = 0;
        let mut answers = 0;
        while let Some((h, body)) = split(&buf[at..have]) {
            if !checked {
                let r = Response::decode(&h, &buf[at..have][body.clone()]).unwrap();
                assert!(
                    matches!(r.outcome, Outcome::Signature(_)),
                    "not a signature: {r:?}"
                );
                checked = true;
            }
            at += body.end;
            answers += 1;
        }
        buf.copy_within(at..have, 0);
        have -= at;
        count.fetch_add(answers, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if answers > 0 {
            tls.write_all(&request.repeat(answers as usize))
                .await
                .unwrap();
        }
    }
}

fn main() {
    let o = opts();
    pin(std::process::id(), "1");
    let dir = ztp_tests::TempDir::new("bench-keyserver");
    let pki = ztp_tests::TestPki::new();
    let key_id = ztp_tests::keyserver::key_id_of_cert(&pki.server.cert_der).unwrap();
    // Its log to /dev/null: the figure includes formatting each line, not a disk.
    let (ks, addr) = start_keyserver(dir.path(), &pki, "0", &o.log, Stdio::null());
    let pid = ks.0.id();

    let node = pki.node("bench");
    let config = common::client_config(&pki.ca_pem, &node);
    let digest = [0x42u8; 32];
    let request = Request {
        id: 1,
        op: Op::EcdsaSha256,
        key_id: Some(key_id),
        sni: Some("app.svc.internal".into()),
        client_ip: Some("192.0.2.1".parse().unwrap()),
        payload: digest.to_vec(),
    }
    .encode()
    .unwrap();

    println!(
        "machine: {}; key server on CPU 0 (--threads 1 --sign-threads 1, RUST_LOG={}), \
         client on CPU 1; {} connections x {} in flight, {} s per round",
        machine(),
        o.log,
        o.conns,
        o.depth,
        o.secs
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut per_core = Vec::new();
    for round in 1..=o.rounds {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (rate, cpu_share, per_cpu_sec) = rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..o.conns {
                tasks.push(tokio::spawn(load(
                    addr,
                    config.clone(),
                    request.clone(),
                    o.depth,
                    count.clone(),
                    stop.clone(),
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (n0, cpu0, t0) = (count.load(Ordering::Relaxed), stat_cpu(pid), Instant::now());
            tokio::time::sleep(Duration::from_secs(o.secs)).await;
            let (n1, cpu1, t1) = (count.load(Ordering::Relaxed), stat_cpu(pid), Instant::now());
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            let wall = (t1 - t0).as_secs_f64();
            let cpu = (cpu1 - cpu0).as_secs_f64();
            let n = (n1 - n0) as f64;
            (n / wall, cpu / wall, n / cpu.max(1e-9))
        });
        println!(
            "round {round}: {rate:>8.0} signatures/s, key server CPU {:>5.1}% of a core, \
             {per_cpu_sec:>8.0} signatures per CPU-second",
            cpu_share * 100.0
        );
        per_core.push(per_cpu_sec);
    }
    per_core.sort_by(f64::total_cmp);
    println!(
        "median: {:.0} ECDSA P-256 signatures per second per core",
        per_core[per_core.len() / 2]
    );
    drop(ks);
}
