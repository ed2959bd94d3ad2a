//! One enforcement point (DESIGN.md "Refusals"): every live session, whatever its
//! handler or transport, is ended by a later decision and by drain from one place in the
//! pipeline: a udp or quic session in spec mode that has sent nothing is ended by a
//! revocation like a tcp one (it never reaches the backend afterwards), and at the drain
//! deadline every open client gets a clean TLS close (close_notify), not a bare reset.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use ztp_tests::client::{parse_ztp_error, read_to_end_or_alert_within};
use ztp_tests::{ReadError, TestPki, UdpBackend};

use crate::common::{echo_step, proto_service_yaml, standard_snapshot, Extra, Fixture, STEP};

/// How soon after the SIGHUP a refused live session must have ended.
const LIVE_BOUND: Duration = Duration::from_secs(5);

/// The standard snapshot's `bob` entry, and the same entry disabled.
const BOB: &str = "  - name: bob\n    identities: [\"bob@example.com\"]\n";
const BOB_DISABLED: &str =
    "  - name: bob\n    identities: [\"bob@example.com\"]\n    disabled: true\n";

async fn spec_mode_session_is_ended_by_a_later_decision(protocol: &str) {
    let udp = UdpBackend::echo().await;
    let name = format!("{protocol}.svc.internal");
    let services = proto_service_yaml(&name, Some(protocol), &udp.addr().to_string());
    let extra = Extra {
        services: &services,
        ..Extra::default()
    };
    let fx = Fixture::start_with(TestPki::new(), extra).await;
    let bob = fx.pki.client_email("bob@example.com");

    // Bob is admitted without ALPN (spec mode) and sends nothing yet.
    let mut old = fx.connect(&name, &bob).await.expect("handshake");
    assert_eq!(old.get_ref().1.alpn_protocol(), None);

    // Bob is disabled by a reload; a new bob connection (to the identity-echo service,
    // which answers at once) is refused once it applies.
    let extra = Extra {
        services: &services,
        ..Extra::default()
    };
    let yaml = standard_snapshot(2, fx.echo.addr(), fx.wild.addr(), fx.admins.addr(), &extra);
    assert!(yaml.contains(BOB));
    fx.dp.reload_snapshot(&yaml.replace(BOB, BOB_DISABLED));
    let deadline = tokio::time::Instant::now() + LIVE_BOUND;
    loop {
        let mut s = fx
            .connect("whoami.svc.internal", &bob)
            .await
            .expect("handshake");
        let r = read_to_end_or_alert_within(&mut s, STEP).await;
        let data = match &r {
            Ok(d) => d.as_slice(),
            Err(e) => e.data(),
        };
        if parse_ztp_error(data).map(|(code, _)| code) == Some(403) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload did not disable bob: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The old session, which has forwarded nothing, has been ended with the 403 line:
    // a datagram it sends now never reaches the backend, and no answer comes back.
    let _ = old.write_all(b"sent after the revocation").await;
    let _ = old.flush().await;
    let r = read_to_end_or_alert_within(&mut old, LIVE_BOUND).await;
    let data = match &r {
        Ok(d) => d.clone(),
        Err(ReadError::Io { error, data }) => {
            assert_ne!(
                error.kind(),
                std::io::ErrorKind::TimedOut,
                "{protocol}: the revoked session is still open (data so far {data:?})"
            );
            data.clone()
        }
        Err(e) => e.data().to_vec(),
    };
    assert_eq!(
        parse_ztp_error(&data),
        Some((403, "forbidden".to_string())),
        "{protocol}: the revoked session must get the 403 line and nothing else; got {:?} ({r:?})",
        String::from_utf8_lossy(&data)
    );
    assert_eq!(
        udp.wait_for_datagrams(1, Duration::from_millis(300)).await,
        0,
        "{protocol}: a datagram of the revoked session reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_udp_spec_mode_session_is_ended_before_its_first_datagram() {
    spec_mode_session_is_ended_by_a_later_decision("udp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_quic_spec_mode_session_is_ended_before_its_first_datagram() {
    spec_mode_session_is_ended_by_a_later_decision("quic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_ends_live_sessions_with_close_notify() {
    let udp = UdpBackend::echo().await;
    let services = proto_service_yaml("udp.svc.internal", Some("udp"), &udp.addr().to_string());
    let mut fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            args: &["--drain-timeout", "1s"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    // A tcp session that has moved bytes, and a udp spec-mode one waiting for its first
    // record: neither ends by itself.
    let mut tcp = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    echo_step(&mut tcp, b"hold on").await;
    let mut udp_session = fx
        .connect("udp.svc.internal", &bob)
        .await
        .expect("handshake");

    fx.dp.terminate();
    for (what, s) in [("tcp", &mut tcp), ("udp", &mut udp_session)] {
        match read_to_end_or_alert_within(s, Duration::from_secs(8)).await {
            Ok(data) => assert!(data.is_empty(), "{what}: unexpected data {data:?}"),
            Err(e) => panic!(
                "{what}: at the drain deadline the client must get close_notify (a clean end \
                 of stream); got {e}"
            ),
        }
    }
    let status = fx
        .dp
        .wait_exit(Duration::from_secs(8))
        .await
        .expect("the process exits after the drain deadline");
    assert_eq!(status.code(), Some(0));
    assert_eq!(udp.datagrams(), 0);
}
