//! Handlers (DESIGN.md steps 6 and 7): `identity-echo` answers `identity:`, `user:`,
//! `groups:`, `service:` lines and closes; it supports stream protocols only, so on a
//! udp or quic service it refuses with `ZTP-ERROR 501 not implemented` (the snapshot is
//! still valid; a warning is logged).

use std::time::Duration;

use ztp_tests::client::read_to_end_or_alert;
use ztp_tests::{connect_with, Dataplane, TestPki};

use crate::common::{assert_refusal_line, Extra, Fixture, STEP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_echo_on_a_datagram_service_gets_501() {
    let services = "  - name: whoami-udp.svc.internal\n    protocol: udp\n    handler: identity-echo\n\
                    \x20 - name: whoami-quic.svc.internal\n    protocol: quic\n    handler: identity-echo\n";
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services,
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");

    for sni in ["whoami-udp.svc.internal", "whoami-quic.svc.internal"] {
        // Spec mode (no ALPN).
        let s = fx.connect(sni, &bob).await.expect("handshake");
        assert_refusal_line(s, 0, 501, "not implemented").await;
        // A ztp-dgram session gets the same unframed line.
        let opts = fx.opts(sni, &bob).dgram();
        let s = connect_with(fx.dp.addr(), &opts).await.expect("handshake");
        assert_refusal_line(s, 0, 501, "not implemented").await;
    }

    // "A warning is logged", naming what it is about.
    let warned = fx
        .dp
        .wait_for_log(
            |v| {
                v["level"] == "WARN" && {
                    let line = v.to_string();
                    line.contains("whoami-udp.svc.internal") || line.contains("identity-echo")
                }
            },
            STEP,
        )
        .await;
    assert!(
        warned.is_some(),
        "no WARN log line names the service or the handler that does not support its protocol"
    );
    // The rest of the snapshot serves.
    let s = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    assert_eq!(
        crate::common::echo_roundtrip(s, b"still valid").await,
        b"still valid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_echo_lists_groups_comma_separated() {
    let pki = TestPki::new();
    let yaml = r#"version: 1
services:
  - name: whoami.svc.internal
    protocol: tcp
    handler: identity-echo
users:
  - name: erin
    identities: ["erin@example.com"]
    groups: [admins, ops]
  - name: frank
    identities: ["frank@example.com"]
    groups: [ops]
  - name: gus
    identities: ["gus@example.com"]
groups:
  - name: admins
  - name: ops
"#;
    let dp = Dataplane::start(&pki, yaml, &[]).await;
    for (who, groups) in [("erin", "admins,ops"), ("frank", "ops"), ("gus", "")] {
        let cert = pki.client_email(&format!("{who}@example.com"));
        let opts = ztp_tests::ClientOptions::new(&pki.ca_pem)
            .sni("whoami.svc.internal")
            .cert(&cert);
        let mut s = connect_with(dp.addr(), &opts).await.expect("handshake");
        let data = read_to_end_or_alert(&mut s)
            .await
            .unwrap_or_else(|e| panic!("identity-echo for {who}: {e}"));
        let text = String::from_utf8_lossy(&data);
        let want_groups = if groups.is_empty() {
            "groups:".to_string()
        } else {
            format!("groups: {groups}")
        };
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(
            lines,
            [
                format!("identity: {who}@example.com").as_str(),
                format!("user: {who}").as_str(),
                want_groups.as_str(),
                "service: whoami.svc.internal",
            ],
            "the identity-echo answer for {who}: {text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_echo_on_an_auto_service_answers() {
    // No protocol field: auto. The client sends nothing first, so the proxy gives up
    // peeking after its deadline and serves the stream handler.
    let services = "  - name: whoami-auto.svc.internal\n    handler: identity-echo\n";
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services,
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut s = fx
        .connect("whoami-auto.svc.internal", &bob)
        .await
        .expect("handshake");
    let start = std::time::Instant::now();
    let data = ztp_tests::client::read_to_end_or_alert_within(&mut s, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("identity-echo on an auto service: {e}"));
    let text = String::from_utf8_lossy(&data);
    assert!(
        text.starts_with("identity: bob@example.com\nuser: bob\n"),
        "{text:?}"
    );
    assert!(
        text.contains("service: whoami-auto.svc.internal"),
        "{text:?}"
    );
    eprintln!("answered after {:?}", start.elapsed());
}
