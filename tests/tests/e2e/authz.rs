//! Directory lookup and authorization (DESIGN.md steps 3 and 5): refusals after the
//! handshake are the line `ZTP-ERROR 403 forbidden`, then close_notify, delivered even
//! while the client is still sending.

use crate::common::{assert_refusal_line, echo_roundtrip, Fixture};

/// Sent before reading a refusal, so that a proxy that closes without draining would
/// reset the connection and lose the line.
const JUNK: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_identity_gets_403_then_clean_end() {
    let fx = Fixture::start().await;
    let mallory = fx.pki.client_email("mallory@example.com");
    let s = fx
        .connect("echo.svc.internal", &mallory)
        .await
        .expect("handshake");
    assert_refusal_line(s, JUNK, 403, "forbidden").await;
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_user_gets_403() {
    let fx = Fixture::start().await;
    let dave = fx.pki.client_email("dave@example.com");
    let s = fx
        .connect("echo.svc.internal", &dave)
        .await
        .expect("handshake");
    assert_refusal_line(s, JUNK, 403, "forbidden").await;
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_outside_the_services_groups_gets_403() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let s = fx
        .connect("admins.svc.internal", &bob)
        .await
        .expect("handshake");
    assert_refusal_line(s, JUNK, 403, "forbidden").await;
    assert_eq!(fx.admins.connections(), 0);
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_member_is_admitted() {
    let fx = Fixture::start().await;
    let alice = fx.pki.client_email("alice@example.com");
    let s = fx
        .connect("admins.svc.internal", &alice)
        .await
        .expect("handshake");
    assert_eq!(echo_roundtrip(s, b"hello admins").await, b"hello admins");
    assert_eq!(fx.admins.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_without_groups_admits_every_enabled_user() {
    let fx = Fixture::start().await;
    let certs = [
        fx.pki.client_email("bob@example.com"),
        fx.pki.client_email("alice@example.com"),
        fx.pki.client_cn("carol"),
        fx.pki.client_uri(crate::common::SPIFFE_X),
    ];
    for (i, cert) in certs.iter().enumerate() {
        let s = fx
            .connect("echo.svc.internal", cert)
            .await
            .expect("handshake");
        let msg = format!("user {i}");
        assert_eq!(echo_roundtrip(s, msg.as_bytes()).await, msg.as_bytes());
    }
    assert_eq!(fx.echo.connections(), certs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_source_ranges_are_enforced() {
    let lan = ztp_tests::EchoBackend::start().await;
    let services = format!(
        "  - name: lan.svc.internal\n    protocol: tcp\n    address: \"{a}\"\n    allow: [\"10.0.0.0/8\"]\n\
         \x20 - name: local.svc.internal\n    protocol: tcp\n    address: \"{a}\"\n    allow: [\"127.0.0.0/8\"]\n",
        a = lan.addr()
    );
    let fx = Fixture::start_with(
        ztp_tests::TestPki::new(),
        crate::common::Extra {
            services: &services,
            ..Default::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");

    let how = crate::common::assert_denied(&fx, "lan.svc.internal", &bob).await;
    eprintln!("source outside `allow`: {how}");
    assert_eq!(
        lan.connections(),
        0,
        "a source outside `allow` reached the backend"
    );

    let s = fx
        .connect("local.svc.internal", &bob)
        .await
        .expect("handshake");
    assert_eq!(echo_roundtrip(s, b"from loopback").await, b"from loopback");
    assert_eq!(lan.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_deny_ranges_win_over_allow() {
    let b = ztp_tests::EchoBackend::start().await;
    let services = format!(
        "  - name: denied.svc.internal\n    protocol: tcp\n    address: \"{a}\"\n    allow: [\"127.0.0.0/8\"]\n    deny: [\"127.0.0.1\"]\n\
         \x20 - name: other.svc.internal\n    protocol: tcp\n    address: \"{a}\"\n    deny: [\"10.0.0.0/8\"]\n",
        a = b.addr()
    );
    let fx = Fixture::start_with(
        ztp_tests::TestPki::new(),
        crate::common::Extra {
            services: &services,
            ..Default::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let how = crate::common::assert_denied(&fx, "denied.svc.internal", &bob).await;
    eprintln!("source in `deny`: {how}");
    assert_eq!(b.connections(), 0, "a denied source reached the backend");
    let s = fx
        .connect("other.svc.internal", &bob)
        .await
        .expect("a source outside `deny`");
    assert_eq!(echo_roundtrip(s, b"ok").await, b"ok");
    assert_eq!(b.connections(), 1);
}
