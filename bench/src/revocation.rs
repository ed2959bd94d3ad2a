//! Revocation latency: from `POST /v1/revoked` returning to the live connection that
//! uses the certificate being closed, on every replica.
//!
//! Starts the release binaries next to this one: one `ztp-control`, REPLICAS data planes
//! subscribed to it, a loopback TCP echo backend. Each round issues a fresh client
//! certificate, holds a live echo session through every replica, revokes the
//! certificate's serial through the REST API and measures until each session has been
//! closed by its data plane. Prints the median, p90 and max of the slowest replica per
//! round.
//!
//! Usage: revocation [--replicas 2] [--rounds 20] [--users 0]
//!
//! `--users N` adds N more users to the configuration (each version reaches the
//! replicas as a delta: the figure should not grow with it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_tests::{connect_with, ClientOptions};

mod common;
use common::*;

fn main() {
    let mut replicas = 2usize;
    let mut rounds = 20usize;
    let mut users = 0usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--replicas" => replicas = v.parse().expect("--replicas N"),
            "--rounds" => rounds = v.parse().expect("--rounds N"),
            "--users" => users = v.parse().expect("--users N"),
            other => panic!("unknown argument {other}"),
        }
    }
    ztp_tests::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(replicas, rounds, users));
}

async fn echo_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn run(replicas: usize, rounds: usize, extra_users: usize) {
    let dir = std::env::temp_dir().join(format!("ztp-bench-revocation-{}", std::process::id()));
    let pki = setup_pki(&dir, replicas);
    let ca = dir.join("ca.pem");
    let control = start_control(&dir);
    let (api, grpc, token) = (control.api, control.grpc, control.token.clone());
    let backend = echo_backend().await;
    let mut users = vec![serde_json::json!({"name": "alice", "identities": ["alice@example.com"]})];
    users.extend((0..extra_users).map(|i| serde_json::json!({"name": format!("u{i}"), "identities": [format!("u{i}@example.com")]})));
    let snap = serde_json::json!({"version": 1,
        "services": [{"name": "echo.svc.internal", "protocol": "tcp", "address": backend.to_string()}],
        "users": users, "groups": [], "revoked": []});
    let (status, _, body) = http(
        api,
        "POST",
        "/v1/import",
        &token,
        &serde_json::to_vec(&snap).unwrap(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let listens: Vec<SocketAddr> = (0..replicas)
        .map(|_| ([127, 0, 0, 1], free_port()).into())
        .collect();
    let _nodes: Vec<Proc> = listens
        .iter()
        .enumerate()
        .map(|(i, l)| start_node(&dir, &format!("n{i}"), &ca, grpc, *l))
        .collect();
    wait_until("replicas to sync", Duration::from_secs(30), || {
        let a = applied(api, &token);
        a.len() == replicas && a.iter().all(|v| *v >= 1)
    });

    let mut times = Vec::new();
    for _ in 0..rounds {
        let cert = pki.client_email("alice@example.com");
        let opts = ClientOptions::new(&pki.ca_pem)
            .sni("echo.svc.internal")
            .cert(&cert);
        let mut closers = Vec::new();
        for l in &listens {
            let mut s = connect_with(*l, &opts).await.expect("connect");
            s.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.expect("echo before revocation");
            closers.push(tokio::spawn(async move {
                let mut buf = [0u8; 64];
                // Closed by the data plane: end of stream (or an error).
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return Instant::now(),
                        Ok(_) => {}
                    }
                }
            }));
        }
        let body = serde_json::json!({ "serials": [cert.serial] });
        let (status, _, resp) = http(
            api,
            "POST",
            "/v1/revoked",
            &token,
            &serde_json::to_vec(&body).unwrap(),
        );
        let returned = Instant::now();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
        let mut slowest = Duration::ZERO;
        for c in closers {
            let closed = tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("a live connection was not closed after revocation")
                .unwrap();
            slowest = slowest.max(closed.saturating_duration_since(returned));
        }
        times.push(slowest);
    }
    times.sort();
    println!(
        "revocation, {replicas} replicas, {} users: REST call returned -> live connection closed on every replica: median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({rounds} rounds)",
        extra_users + 1,
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.9).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
