//! SIGTERM drains (DESIGN.md "Processes and flags"): the node stops taking new
//! connections, live ones go on until they end or `--drain-timeout` passes, then the
//! process exits.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use ztp_tests::client::{handshake, read_to_end_or_alert_within};
use ztp_tests::TestPki;

use crate::common::{echo_roundtrip, echo_step, Extra, Fixture, STEP};

/// Whether a new client is still served: `Ok(())` if refused (connect fails, or the
/// connection is closed before any echo), `Err` with what happened otherwise.
async fn new_client_refused(fx: &Fixture) -> Result<String, String> {
    let bob = fx.pki.client_email("bob@example.com");
    let tcp = match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(fx.dp.addr()))
        .await
    {
        Err(_) => return Err("the TCP connect hung".into()),
        Ok(Err(e)) => return Ok(format!("connect failed: {e}")),
        Ok(Ok(t)) => t,
    };
    let opts = fx
        .opts("echo.svc.internal", &bob)
        .timeout(Duration::from_secs(2));
    let mut s = match handshake(tcp, &opts).await {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            return Err("connected, then the handshake hung (neither served nor closed)".into())
        }
        Err(e) => return Ok(format!("closed in the handshake: {e}")),
        Ok(s) => s,
    };
    use tokio::io::AsyncWriteExt;
    let _ = s.write_all(b"new").await;
    let _ = s.shutdown().await;
    match read_to_end_or_alert_within(&mut s, Duration::from_secs(2)).await {
        Ok(d) if d == b"new" => Err("a new connection was served".into()),
        Ok(d) => Ok(format!("closed after the handshake ({} bytes)", d.len())),
        Err(e) if e.data() == b"new" => Err(format!("a new connection was served ({e})")),
        Err(e) => {
            if let ztp_tests::ReadError::Io { error, .. } = &e {
                if error.kind() == std::io::ErrorKind::TimedOut {
                    return Err("a new connection hung after the handshake".into());
                }
            }
            Ok(format!("closed after the handshake: {e}"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_and_drains_live_ones() {
    let mut fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut live = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    echo_step(&mut live, b"before SIGTERM").await;

    fx.dp.terminate();
    // The signal is handled asynchronously: poll (bounded) until new clients are refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    let how = loop {
        match new_client_refused(&fx).await {
            Ok(how) => break how,
            Err(what) => {
                assert!(
                    Instant::now() < deadline,
                    "5s after SIGTERM new clients are not refused: {what}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    eprintln!("after SIGTERM a new client: {how}");

    // The live connection goes on, and the process waits for it.
    echo_step(&mut live, b"during the drain").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_step(&mut live, b"still during the drain").await;
    assert!(
        fx.dp.try_wait().is_none(),
        "the process exited while a connection was still live"
    );

    // The live client ends: the process exits 0, promptly.
    let closed = Instant::now();
    assert_eq!(echo_roundtrip(live, b"last words").await, b"last words");
    let status = fx
        .dp
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the process did not exit within 5s of its last connection closing");
    eprintln!(
        "exited {status} {:?} after the last close",
        closed.elapsed()
    );
    assert_eq!(status.code(), Some(0), "a drained shutdown exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_how_long_an_open_connection_keeps_the_process() {
    let mut fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--drain-timeout", "1s"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut live = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    echo_step(&mut live, b"hold on").await;

    let start = Instant::now();
    fx.dp.terminate();
    let status = fx.dp.wait_exit(Duration::from_secs(8)).await;
    let took = start.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!("--drain-timeout 1s: the process still runs 8s after SIGTERM with a connection open")
    });
    eprintln!("exited {status} {took:?} after SIGTERM with an open connection");
    assert!(
        took < Duration::from_secs(4),
        "--drain-timeout 1s, but the process exited only after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(800),
        "the process exited after {took:?}: the live connection was not given its drain time"
    );
    // The client sees its connection end (not a hang).
    let r = read_to_end_or_alert_within(&mut live, STEP).await;
    if let Err(ztp_tests::ReadError::Io { error, .. }) = &r {
        assert_ne!(
            error.kind(),
            std::io::ErrorKind::TimedOut,
            "the client's connection stayed open after the process exited"
        );
    }
    eprintln!("the open client saw: {r:?}");
}
