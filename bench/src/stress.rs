//! Stress: many idle mTLS connections held on one data plane, then churn of every
//! outcome, with the data plane's descriptors and memory before and after.
//!
//! 1. Holds `--idle N` (10,000) established mTLS connections (each echoed once, so the
//!    backend side is open too) and reports the data plane's resident memory per
//!    connection; closes them and reports descriptors and memory after.
//! 2. Two rounds of churn, `--churn N` (10,000) connections each at concurrency 64, mixed
//!    outcomes (served, 403 line, unknown CA refused in the handshake, unknown SNI,
//!    backend down 502, client vanishing mid-stream); descriptors and memory before and
//!    after each round. The second round must leave memory where the first left it.
//!
//! Raises its own open-file limit to the hard limit. A proxied connection needs two
//! descriptors in the data plane; where the hard limit is too low for `--idle`, the
//! run says so and holds what fits.
//!
//! Usage: stress [--idle 10000] [--churn 10000] [--threads N]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

mod common;
use common::{
    bin, client_config, dataplane_args, echo, free_port, raise_nofile, rss_kib, serve_loopback,
    Proc,
};

struct Opts {
    idle: usize,
    churn: usize,
    threads: Option<String>,
}

fn opts() -> Opts {
    let mut o = Opts {
        idle: 10_000,
        churn: 10_000,
        threads: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--idle" => o.idle = v.parse().expect("--idle N"),
            "--churn" => o.churn = v.parse().expect("--churn N"),
            "--threads" => o.threads = Some(v),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    o
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("backend") {
        raise_nofile();
        echo_backend(args[2].parse().expect("backend PORT"));
        return;
    }
    let o = opts();
    let hard = raise_nofile();
    ztp_tests::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("ztp-stress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = ztp_tests::TestPki::new();
    pki.write_files(&dir).unwrap();
    let alice = pki.client_email("alice@example.com");
    let stranger = pki.client_email("stranger@example.com");
    let rogue = ztp_tests::TestPki::with_ca_name("Rogue CA").client_email("alice@example.com");

    let backend_port = free_port();
    let _backend = Proc(
        Command::new(std::env::current_exe().unwrap())
            .args(["backend", &backend_port.to_string()])
            .spawn()
            .expect("start the backend"),
    );
    let down_port = free_port();
    std::fs::write(
        dir.join("snapshot.yaml"),
        format!(
            "version: 1\nservices:\n  - name: echo.svc.internal\n    protocol: tcp\n    address: \"127.0.0.1:{backend_port}\"\n  - name: admins.svc.internal\n    protocol: tcp\n    address: \"127.0.0.1:{backend_port}\"\n    groups: [admins]\n  - name: down.svc.internal\n    protocol: tcp\n    address: \"127.0.0.1:{down_port}\"\nusers:\n  - name: alice\n    identities: [\"alice@example.com\"]\ngroups:\n  - name: admins\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new(bin("ztp-dataplane"));
    dataplane_args(
        &mut cmd,
        &dir,
        &format!("127.0.0.1:{port}"),
        &dir.join("ca.pem"),
    )
    .arg("--snapshot")
    .arg(dir.join("snapshot.yaml"))
    .args(["--max-connections", "100000"])
    // All the load comes from 127.0.0.1.
    .args(["--max-connections-per-source", "0"])
    .args(["--handshake-rate-per-source", "0"])
    .args(["--log-format", "json"]);
    if let Some(t) = &o.threads {
        cmd.args(["--threads", t]);
    }
    let dp = Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ztp-dataplane"),
    );
    let pid = dp.0.id();
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "the data plane did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cfg = |cert: &ztp_tests::TestCert| client_config(&pki.ca_pem, cert);
    let env = Arc::new(Env {
        port,
        alice: cfg(&alice),
        stranger: cfg(&stranger),
        rogue: cfg(&rogue),
    });

    println!("machine: open-file hard limit {hard}");
    // Two descriptors a connection in the data plane, and room for its own.
    let fit = (hard as usize).saturating_sub(64) / 2;
    let idle_n = if o.idle > fit {
        println!(
            "--idle {} does not fit the hard limit {hard} (2 descriptors a connection): holding {fit}",
            o.idle
        );
        fit
    } else {
        o.idle
    };

    rt.block_on(async {
        warm(&env).await;
        let (f0, m0) = settle(pid).await;
        println!("idle data plane: {f0} descriptors, {m0} KiB resident");

        let t = Instant::now();
        let held = hold(&env, idle_n).await;
        let opened = t.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (f1, m1) = (fds(pid), rss_kib(pid));
        println!(
            "holding {} idle mTLS connections (opened in {:.1} s): {f1} descriptors, {m1} KiB resident, {:.1} KiB per connection",
            held.len(),
            opened.as_secs_f64(),
            (m1.saturating_sub(m0)) as f64 / held.len().max(1) as f64
        );
        drop(held);
        let (f2, m2) = settle_to(pid, f0).await;
        println!("all closed: {f2} descriptors, {m2} KiB resident");

        let mut after = Vec::new();
        for round in 1..=2 {
            let (fb, mb) = (fds(pid), rss_kib(pid));
            let t = Instant::now();
            let counts = churn(&env, o.churn).await;
            let took = t.elapsed();
            let (fa, ma) = settle_to(pid, f0).await;
            println!(
                "churn round {round}: {} connections in {:.1} s ({counts}); descriptors {fb} -> {fa}; resident {mb} -> {ma} KiB",
                o.churn,
                took.as_secs_f64()
            );
            after.push((fa, ma));
        }
        let growth = after[1].1 as i64 - after[0].1 as i64;
        println!(
            "second churn round grew resident memory by {growth} KiB; descriptors back to {} (idle {f0})",
            after[1].0
        );
    });
    drop(dp);
    let _ = std::fs::remove_dir_all(&dir);
}

struct Env {
    port: u16,
    alice: Arc<rustls::ClientConfig>,
    stranger: Arc<rustls::ClientConfig>,
    rogue: Arc<rustls::ClientConfig>,
}

async fn connect(
    env: &Env,
    cfg: &Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", env.port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
}

async fn warm(env: &Env) {
    for _ in 0..10 {
        if let Ok(mut s) = connect(env, &env.alice, "echo.svc.internal").await {
            let _ = s.write_all(b"x").await;
            let mut b = [0u8; 1];
            let _ = s.read_exact(&mut b).await;
        }
    }
}

/// Waits for the data plane's descriptors to stop changing; returns them and its memory.
async fn settle(pid: u32) -> (usize, u64) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    (fds(pid), rss_kib(pid))
}

/// Waits (up to 30 s) until descriptors are back to `idle`.
async fn settle_to(pid: u32, idle: usize) -> (usize, u64) {
    let end = Instant::now() + Duration::from_secs(30);
    while fds(pid) > idle && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    (fds(pid), rss_kib(pid))
}

async fn hold(env: &Arc<Env>, n: usize) -> Vec<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    while held.len() + failed < n {
        let batch = (n - held.len() - failed).min(100);
        let mut set = Vec::with_capacity(batch);
        for _ in 0..batch {
            let env = env.clone();
            set.push(tokio::spawn(async move {
                let mut s = connect(&env, &env.alice, "echo.svc.internal").await?;
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(s)
            }));
        }
        for h in set {
            match h.await.unwrap() {
                Ok(s) => held.push(s),
                Err(e) => {
                    if failed == 0 {
                        println!("a connection failed: {e}");
                    }
                    failed += 1;
                }
            }
        }
    }
    if failed > 0 {
        println!("{failed} of {n} connections failed");
    }
    held
}

/// `n` connections of mixed outcomes at concurrency 64; returns counts by outcome.
async fn churn(env: &Arc<Env>, n: usize) -> String {
    let next = Arc::new(AtomicU64::new(0));
    let done: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (env, next, done) = (env.clone(), next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let kind = i % 6;
                let (cfg, sni) = match kind {
                    0 => (&env.alice, "echo.svc.internal"),
                    1 => (&env.alice, "admins.svc.internal"),
                    2 => (&env.rogue, "echo.svc.internal"),
                    3 => (&env.alice, "nope.svc.internal"),
                    4 => (&env.alice, "down.svc.internal"),
                    _ => (&env.stranger, "echo.svc.internal"),
                };
                let Ok(mut s) = connect(&env, cfg, sni).await else {
                    done[kind].fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if kind == 0 && i % 12 == 0 {
                    // The client vanishes mid-stream.
                    let _ = s.write_all(b"half").await;
                    let (tcp, _) = s.into_inner();
                    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    drop(tcp);
                } else {
                    let _ = s.write_all(b"hello").await;
                    let _ = s.shutdown().await;
                    let mut sink = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink))
                        .await;
                }
                done[kind].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let names = [
        "served",
        "403 not in group",
        "unknown CA",
        "unknown SNI",
        "502 backend down",
        "403 unknown identity",
    ];
    names
        .iter()
        .zip(done.iter())
        .map(|(n, c)| format!("{} {n}", c.load(Ordering::Relaxed)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn echo_backend(port: u16) {
    serve_loopback(port, "backend", |s| echo(s, 1024));
}
