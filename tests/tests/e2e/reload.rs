//! SIGHUP (DESIGN.md "Config" and "Processes and flags"): the snapshot file is reloaded
//! and swapped in atomically; live connections go on; an invalid snapshot is refused with
//! a message naming the field, and the node keeps its last good one.
//! (Re-checking resumed sessions after a reload is in `resumption.rs`.)

use std::time::Duration;

use ztp_tests::{EchoBackend, TestPki};

use crate::common::{
    echo_roundtrip, echo_step, service_yaml, standard_snapshot, wait_until_served_by, Extra,
    Fixture, STEP,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_connection_survives_a_valid_reload() {
    let mut fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut live = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    echo_step(&mut live, b"before the reload").await;

    // v2 adds a service on its own backend: once it reaches that backend, v2 is in effect.
    let canary = EchoBackend::start().await;
    let services = service_yaml("canary.svc.internal", canary.addr());
    let v2 = standard_snapshot(
        2,
        fx.echo.addr(),
        fx.wild.addr(),
        fx.admins.addr(),
        &Extra {
            services: &services,
            ..Extra::default()
        },
    );
    fx.dp.reload_snapshot(&v2);
    wait_until_served_by(&mut fx, "canary.svc.internal", &bob, &canary).await;

    echo_step(&mut live, b"after the reload").await;
    assert_eq!(
        echo_roundtrip(live, b"and to the end").await,
        b"and to the end"
    );
    assert_eq!(
        fx.echo.connections(),
        1,
        "the same backend connection all along"
    );
    assert!(fx.dp.try_wait().is_none(), "the data plane is alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_logged_and_the_old_snapshot_keeps_serving() {
    let old_only = EchoBackend::start().await;
    let old_services = service_yaml("old-only.svc.internal", old_only.addr());
    let mut fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &old_services,
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut live = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    echo_step(&mut live, b"before").await;

    // v2 drops old-only.svc.internal (it would go to the wildcard's backend) and has an
    // unparsable address in services[0].
    let v2 = standard_snapshot(
        2,
        fx.echo.addr(),
        fx.wild.addr(),
        fx.admins.addr(),
        &Extra::default(),
    )
    .replacen(
        &format!("\"{}\"", fx.echo.addr()),
        "\"127.0.0.1:notaport\"",
        1,
    );
    assert!(v2.contains("notaport"));
    fx.dp.reload_snapshot(&v2);

    let logged = fx
        .dp
        .wait_for_log(
            |v| v["level"] == "ERROR" && v.to_string().contains("services[0].address"),
            STEP,
        )
        .await;
    assert!(
        logged.is_some(),
        "no ERROR log line names `services[0].address` after reloading an invalid snapshot"
    );
    eprintln!("logged: {}", logged.unwrap_or_default());
    assert!(
        fx.dp.try_wait().is_none(),
        "the data plane exited on an invalid reload"
    );

    // The old snapshot serves: old-only still reaches its own backend.
    let before = old_only.connections();
    let s = fx
        .connect("old-only.svc.internal", &bob)
        .await
        .expect("handshake");
    assert_eq!(echo_roundtrip(s, b"old snapshot").await, b"old snapshot");
    assert_eq!(
        old_only.connections(),
        before + 1,
        "old-only.svc.internal no longer reaches its backend: the invalid snapshot was applied"
    );
    assert_eq!(fx.wild.connections(), 0);
    echo_step(&mut live, b"live connection unaffected").await;
    drop(live);

    // And a later valid reload is still applied.
    let canary = EchoBackend::start().await;
    let services = service_yaml("canary.svc.internal", canary.addr());
    let v3 = standard_snapshot(
        3,
        fx.echo.addr(),
        fx.wild.addr(),
        fx.admins.addr(),
        &Extra {
            services: &services,
            ..Extra::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    fx.dp.reload_snapshot(&v3);
    wait_until_served_by(&mut fx, "canary.svc.internal", &bob, &canary).await;
}
