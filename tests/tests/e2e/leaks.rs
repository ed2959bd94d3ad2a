//! No leaks (issue 9): after connections of every outcome (served, refused with a line,
//! refused in the handshake, backend down, client vanishing mid-stream), the data
//! plane's open descriptors come back to their idle level. The bounded stress run with
//! 20,000 connections and memory figures is `bench/stress.sh`.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use ztp_tests::{Dataplane, TestPki};

use crate::common::{echo_roundtrip, Extra, Fixture, STEP};

fn open_fds(dp: &Dataplane) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", dp.pid()))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_return_to_idle_after_mixed_outcomes() {
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_addr = down.local_addr().unwrap();
    drop(down); // nothing listens there: 502
    let services =
        format!("  - name: down.svc.internal\n    protocol: tcp\n    address: \"{down_addr}\"\n");
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            args: &["--handshake-rate-per-source", "0"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let rogue = TestPki::with_ca_name("Rogue CA").client_email("bob@example.com");
    let stranger = fx.pki.client_email("nobody@example.com");
    // Warm up (lazily opened files, thread pools), then take the idle level.
    for _ in 0..5 {
        let c = fx
            .connect("echo.svc.internal", &bob)
            .await
            .expect("warm-up");
        assert_eq!(echo_roundtrip(c, b"w").await, b"w");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = open_fds(&fx.dp);
    assert!(idle > 0, "cannot read the data plane's descriptors");

    for round in 0..60 {
        let mut tasks = Vec::new();
        for kind in 0..5 {
            let (sni, cert) = match kind {
                0 => ("echo.svc.internal", bob.clone()),
                1 => ("admins.svc.internal", bob.clone()), // 403 line
                2 => ("echo.svc.internal", rogue.clone()), // unknown CA
                3 => ("down.svc.internal", bob.clone()),   // 502 line
                _ => ("echo.svc.internal", stranger.clone()), // unknown identity
            };
            let opts = fx.opts(sni, &cert);
            let addr = fx.dp.addr();
            tasks.push(tokio::spawn(async move {
                let Ok(mut c) = ztp_tests::connect_with(addr, &opts).await else {
                    return;
                };
                if kind == 0 && round % 2 == 1 {
                    // The client vanishes mid-stream: no close_notify, no FIN first.
                    let _ = c.write_all(b"half a message").await;
                    let (tcp, _) = c.into_inner();
                    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    drop(tcp);
                    return;
                }
                let _ = c.write_all(b"hello").await;
                let _ = c.shutdown().await;
                let _ =
                    ztp_tests::client::read_to_end_or_alert_within(&mut c, Duration::from_secs(5))
                        .await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    let deadline = Instant::now() + STEP;
    loop {
        let now = open_fds(&fx.dp);
        if now <= idle {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 300 connections of mixed outcomes the data plane holds {now} descriptors, {idle} when idle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And it still serves.
    let c = fx.connect("echo.svc.internal", &bob).await.expect("after");
    assert_eq!(echo_roundtrip(c, b"still").await, b"still");
}
