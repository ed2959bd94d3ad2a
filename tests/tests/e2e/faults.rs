//! Faults an operator will meet (issue 9): a backend that resets mid-stream or goes
//! silent, a client that vanishes, a data plane killed mid-traffic. Each side is freed
//! promptly, and the other replicas go on serving.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztp_tests::client::{connect_with, read_to_end_or_alert_within};
use ztp_tests::{Dataplane, TestPki};

use crate::common::{echo_roundtrip, echo_step, service_yaml, Extra, Fixture, STEP};
use crate::plane::{Plane, ECHO};

/// A backend that reads one chunk, answers it, then resets the connection (SO_LINGER 0).
async fn resetting_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_mid_stream_closes_the_client_promptly() {
    let (addr, _task) = resetting_backend().await;
    let services = service_yaml("reset.svc.internal", addr);
    // A long idle timeout: only the reset may end the session.
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            args: &["--idle-timeout", "1h"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut c = fx
        .connect("reset.svc.internal", &bob)
        .await
        .expect("handshake");
    echo_step(&mut c, b"before the reset").await;
    let t = Instant::now();
    let r = read_to_end_or_alert_within(&mut c, Duration::from_secs(5)).await;
    let took = t.elapsed();
    match &r {
        Err(ztp_tests::ReadError::Io { error, .. }) => assert_ne!(
            error.kind(),
            std::io::ErrorKind::TimedOut,
            "the client was never told the backend reset"
        ),
        Err(ztp_tests::ReadError::Alert { .. }) => {}
        // A clean end (close_notify) would tell the client it got the whole stream.
        Ok(data) => panic!(
            "a backend reset mid-stream must not reach the client as a clean end ({} bytes)",
            data.len()
        ),
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let record = fx
        .dp
        .wait_for_log(
            |e| e["message"] == "connection" && e["service.name"] == "reset.svc.internal",
            STEP,
        )
        .await
        .expect("the connection's record");
    assert_eq!(record["reason"], "connection error", "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_frees_the_backend_side() {
    // A backend that reports when its side of the connection ends.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::channel::<Instant>(4);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let ended_tx = ended_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let _ = s.write_all(&buf[..n]).await;
                        }
                    }
                }
                let _ = ended_tx.send(Instant::now()).await;
            });
        }
    });
    let services = service_yaml("watch.svc.internal", addr);
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            args: &["--idle-timeout", "1h"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut c = fx
        .connect("watch.svc.internal", &bob)
        .await
        .expect("handshake");
    echo_step(&mut c, b"hello").await;
    // Gone: a reset, no close_notify.
    let (tcp, _) = c.into_inner();
    socket2::SockRef::from(&tcp)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let gone = Instant::now();
    drop(tcp);
    let ended = tokio::time::timeout(Duration::from_secs(5), ended_rx.recv())
        .await
        .expect("the backend side was never closed")
        .unwrap();
    assert!(ended.duration_since(gone) < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_traffic_leaves_the_other_serving() {
    let mut plane = Plane::start(&["k1", "k2"], &[]).await;
    let opts = plane.opts(ECHO, &plane.alice);
    let mut on_victim = connect_with(plane.replicas[0].addr(), &opts)
        .await
        .expect("connect to the first replica");
    let mut on_survivor = connect_with(plane.replicas[1].addr(), &opts)
        .await
        .expect("connect to the second replica");
    echo_step(&mut on_victim, b"a").await;
    echo_step(&mut on_survivor, b"b").await;

    let victim: &mut Dataplane = &mut plane.replicas[0];
    let pid = victim.pid();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The victim's client sees its end, promptly.
    let r = read_to_end_or_alert_within(&mut on_victim, Duration::from_secs(5)).await;
    if let Err(ztp_tests::ReadError::Io { error, .. }) = &r {
        assert_ne!(error.kind(), std::io::ErrorKind::TimedOut, "no end seen");
    }
    // The survivor's live connection and new connections go on.
    echo_step(&mut on_survivor, b"after the kill").await;
    for i in 0..5 {
        let c = connect_with(plane.replicas[1].addr(), &opts)
            .await
            .unwrap_or_else(|e| panic!("new connection {i} to the survivor: {e}"));
        assert_eq!(echo_roundtrip(c, b"x").await, b"x");
    }
    assert_eq!(plane.replicas[1].readyz().await.ok(), Some(200));
}
