//! Preauth (DESIGN.md pipeline step 1, issue 9): before any crypto, connections per
//! source, new connections per second per source, and the listener's allow/deny ranges;
//! and `--max-snapshot-age`, a node that fails closed when its control plane has been
//! away too long. A refused connection is closed before the ServerHello: no handshake,
//! no backend connection.

use std::time::{Duration, Instant};

use ztp_tests::client::connect_with;
use ztp_tests::{http, Dataplane, TestCert, TestPki};

use crate::common::{echo_roundtrip, echo_step, Extra, Fixture, STEP};
use crate::plane::{Plane, ECHO};

/// Asserts a connection attempt is refused before the handshake completes.
async fn assert_shed(fx: &Fixture, cert: &TestCert, what: &str) {
    let before = fx.backend_connections();
    let r = tokio::time::timeout(STEP, fx.connect("echo.svc.internal", cert))
        .await
        .unwrap_or_else(|_| panic!("{what}: neither served nor closed within {STEP:?}"));
    assert!(r.is_err(), "{what}: the handshake completed");
    assert_eq!(
        fx.backend_connections(),
        before,
        "{what}: reached a backend"
    );
}

async fn shed_metric(dp: &Dataplane, reason: &str) -> u64 {
    let r = http::request(dp.admin_addr(), "GET", "/metrics", &[], None)
        .await
        .expect("GET /metrics");
    let body = String::from_utf8_lossy(&r.body).to_string();
    let prefix = format!("ztp_connections_shed_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("a counter"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_source_are_capped() {
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--max-connections-per-source", "2"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut c1 = fx.connect("echo.svc.internal", &bob).await.expect("first");
    echo_step(&mut c1, b"one").await;
    let mut c2 = fx.connect("echo.svc.internal", &bob).await.expect("second");
    echo_step(&mut c2, b"two").await;

    assert_shed(&fx, &bob, "a third connection from the same source").await;
    assert_eq!(shed_metric(&fx.dp, "source connection cap").await, 1);
    echo_step(&mut c2, b"two still works").await;

    // Closing one frees its place (once the proxy has seen the close: poll, bounded).
    assert_eq!(echo_roundtrip(c1, b"bye").await, b"bye");
    let deadline = Instant::now() + STEP;
    loop {
        if let Ok(c) = fx.connect("echo.svc.internal", &bob).await {
            assert_eq!(echo_roundtrip(c, b"again").await, b"again");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never reused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_source_are_rate_limited() {
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--handshake-rate-per-source", "3"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    for i in 0..3 {
        let c = fx
            .connect("echo.svc.internal", &bob)
            .await
            .unwrap_or_else(|e| panic!("connection {i} of the burst: {e}"));
        assert_eq!(echo_roundtrip(c, b"x").await, b"x");
    }
    assert_shed(&fx, &bob, "the fourth within the second").await;
    assert!(shed_metric(&fx.dp, "source rate").await >= 1);
    // The bucket refills at 3 per second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let c = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("a connection after the refill");
    assert_eq!(echo_roundtrip(c, b"y").await, b"y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_deny_and_allow_ranges() {
    let bob_of = |fx: &Fixture| fx.pki.client_email("bob@example.com");
    // Denied: loopback is in the deny range.
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--deny", "127.0.0.0/8"],
            ..Extra::default()
        },
    )
    .await;
    assert_shed(&fx, &bob_of(&fx), "a denied source").await;
    assert_eq!(shed_metric(&fx.dp, "source not allowed").await, 1);
    drop(fx);

    // Outside the allow ranges.
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--allow", "10.0.0.0/8", "--allow", "192.0.2.0/24"],
            ..Extra::default()
        },
    )
    .await;
    assert_shed(&fx, &bob_of(&fx), "a source outside --allow").await;
    drop(fx);

    // Inside the allow range, but deny wins.
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--allow", "127.0.0.0/8", "--deny", "127.0.0.1"],
            ..Extra::default()
        },
    )
    .await;
    assert_shed(&fx, &bob_of(&fx), "a source both allowed and denied").await;
    drop(fx);

    // Allowed.
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--allow", "127.0.0.1"],
            ..Extra::default()
        },
    )
    .await;
    let c = fx
        .connect("echo.svc.internal", &bob_of(&fx))
        .await
        .expect("an allowed source");
    assert_eq!(echo_roundtrip(c, b"ok").await, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ranges_are_refused_at_start() {
    let out = ztp_tests::dataplane::run_bounded(["--allow", "10.0.0.0/33"], STEP);
    assert_eq!(out.status.code(), Some(64), "usage error: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow"), "names the flag: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fails_closed_when_its_control_plane_is_away_too_long() {
    let mut plane = Plane::start(&[], &[]).await;
    let url = plane.control.grpc_url();
    let mut strict =
        Dataplane::start_control(&plane.pki, &url, "strict", &["--max-snapshot-age", "1s"]).await;
    let mut relaxed = Dataplane::start_control(&plane.pki, &url, "relaxed", &[]).await;
    assert!(strict.wait_ready(STEP).await, "strict node ready");
    assert!(relaxed.wait_ready(STEP).await, "relaxed node ready");
    let opts = plane.opts(ECHO, &plane.alice);
    let mut live = connect_with(strict.addr(), &opts)
        .await
        .expect("served while in contact");
    echo_step(&mut live, b"before").await;

    plane
        .control
        .kill9()
        .expect("the control plane was running");
    // Within the bound: still serving.
    let c = connect_with(strict.addr(), &opts)
        .await
        .expect("served within the bound");
    assert_eq!(echo_roundtrip(c, b"within").await, b"within");

    // Past the bound: new connections refused, /readyz 503; the live one goes on; the
    // node without the flag keeps serving.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let r = tokio::time::timeout(STEP, connect_with(strict.addr(), &opts))
        .await
        .expect("refused promptly");
    assert!(r.is_err(), "a stale node completed a handshake");
    assert_eq!(strict.readyz().await.ok(), Some(503));
    echo_step(&mut live, b"live goes on").await;
    let c = connect_with(relaxed.addr(), &opts)
        .await
        .expect("the node without --max-snapshot-age serves its last snapshot");
    assert_eq!(echo_roundtrip(c, b"relaxed").await, b"relaxed");

    // The control plane back: serving again.
    plane.control.restart().await;
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        if let Ok(c) = connect_with(strict.addr(), &opts).await {
            assert_eq!(echo_roundtrip(c, b"back").await, b"back");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again after the control plane came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(strict.readyz().await.ok(), Some(200));
    assert!(strict.try_wait().is_none());
}
