//! udp and quic in spec mode (DESIGN.md "Forwarding"): a client that offers no ALPN
//! writes one TLS record; its plaintext goes to the backend as one datagram; the one
//! datagram that comes back is written to the client, then the proxy closes. A backend
//! that does not answer (or fails) just closes the connection: no `ZTP-ERROR` line, which
//! would read as a datagram.

use std::time::{Duration, Instant};

use ztp_tests::backend::{pseudo_random_bytes, sha256};
use ztp_tests::client::datagram_exchange;
use ztp_tests::{closed_udp_port, ReadError, TestPki, UdpBackend};

use crate::common::{proto_service_yaml, Extra, Fixture, STEP};

/// Starts the standard fixture plus `services` and `args`.
async fn fixture(services: &str, args: &[&str]) -> Fixture {
    Fixture::start_with(
        TestPki::new(),
        Extra {
            services,
            args,
            ..Extra::default()
        },
    )
    .await
}

/// Asserts that `r` is the end of a spec-mode exchange with nothing read: a clean end, or
/// a bare close (EOF or reset), but not a timeout and never a byte (a `ZTP-ERROR` line
/// included). Returns a description.
fn assert_bare_close(r: &Result<Vec<u8>, ReadError>) -> String {
    match r {
        Ok(data) => {
            assert!(
                data.is_empty(),
                "expected a close with no data; got {:?}",
                String::from_utf8_lossy(data)
            );
            "clean end (close_notify)".to_string()
        }
        Err(ReadError::Io { error, data }) => {
            assert_ne!(
                error.kind(),
                std::io::ErrorKind::TimedOut,
                "the proxy did not close the connection: {error}"
            );
            assert!(
                data.is_empty(),
                "expected a close with no data; got {:?}",
                String::from_utf8_lossy(data)
            );
            format!("closed: {error}")
        }
        Err(e @ ReadError::Alert { .. }) => {
            assert!(e.data().is_empty(), "data before the alert: {e}");
            format!("closed with {e}")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_spec_mode_forwards_one_datagram_and_returns_the_answer() {
    let udp = UdpBackend::echo().await;
    let services = proto_service_yaml("udp.svc.internal", Some("udp"), &udp.addr().to_string());
    let fx = fixture(&services, &[]).await;
    let bob = fx.pki.client_email("bob@example.com");

    let mut s = fx
        .connect("udp.svc.internal", &bob)
        .await
        .expect("handshake");
    assert_eq!(
        s.get_ref().1.alpn_protocol(),
        None,
        "no ALPN offered, none selected"
    );
    let payload = b"one datagram, spec mode";
    let reply = datagram_exchange(&mut s, payload, STEP)
        .await
        .unwrap_or_else(|e| panic!("expected the echoed datagram then a clean end; got {e}"));
    assert_eq!(
        reply,
        payload.to_vec(),
        "the answer datagram, exactly, then a clean end"
    );
    assert_eq!(
        udp.wait_for_datagrams(1, Duration::from_millis(200)).await,
        1,
        "the backend saw exactly one datagram"
    );
    assert_eq!(udp.received(), vec![payload.to_vec()]);
    assert_eq!(fx.backend_connections(), 0, "no tcp backend was contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_spec_mode_carries_a_full_16k_record_as_one_datagram() {
    let udp = UdpBackend::echo().await;
    let services = proto_service_yaml("udp.svc.internal", Some("udp"), &udp.addr().to_string());
    let fx = fixture(&services, &[]).await;
    let bob = fx.pki.client_email("bob@example.com");
    // The largest TLS record plaintext: it spans several TCP segments.
    let payload = pseudo_random_bytes(16_384, 77);
    let mut s = fx
        .connect("udp.svc.internal", &bob)
        .await
        .expect("handshake");
    let reply = datagram_exchange(&mut s, &payload, STEP)
        .await
        .unwrap_or_else(|e| panic!("expected the 16 KiB echo then a clean end; got {e}"));
    assert!(reply == payload, "the 16 KiB datagram came back changed");
    assert_eq!(udp.datagrams(), 1, "one record, one datagram");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_spec_mode_sends_the_first_record_alone() {
    let udp = UdpBackend::echo().await;
    let services = proto_service_yaml("udp.svc.internal", Some("udp"), &udp.addr().to_string());
    let fx = fixture(&services, &[]).await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut s = fx
        .connect("udp.svc.internal", &bob)
        .await
        .expect("handshake");
    // Two records back to back (they usually arrive in one TCP segment): only the first
    // is the datagram, not the two merged.
    use tokio::io::AsyncWriteExt;
    s.write_all(b"first record").await.expect("write");
    s.flush().await.expect("flush");
    s.write_all(b"second record").await.expect("write");
    s.flush().await.expect("flush");
    let r = ztp_tests::client::read_to_end_or_alert_within(&mut s, STEP).await;
    assert_eq!(
        udp.wait_for_datagrams(1, Duration::from_secs(2)).await,
        1,
        "{:?}",
        udp.received()
    );
    assert_eq!(
        udp.received(),
        vec![b"first record".to_vec()],
        "the datagram is the first record's plaintext exactly"
    );
    match r {
        Ok(data) => assert_eq!(data, b"first record", "the answer, then a clean end"),
        // The proxy may close while the second record is unread (a reset can follow).
        Err(e) => assert_eq!(e.data(), b"first record", "the answer arrived: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_backend_address_may_be_written_port_only() {
    let udp = UdpBackend::echo().await;
    let address = format!(":{}", udp.port());
    let services = proto_service_yaml("udp.svc.internal", Some("udp"), &address);
    let fx = fixture(&services, &[]).await;
    let bob = fx.pki.client_email("bob@example.com");

    let mut s = fx
        .connect("udp.svc.internal", &bob)
        .await
        .expect("handshake");
    let reply = datagram_exchange(&mut s, b"to :port", STEP)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "address {address:?} (localhost) did not reach 127.0.0.1:{}: {e}",
                udp.port()
            )
        });
    assert_eq!(reply, b"to :port");
    assert_eq!(udp.datagrams(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_spec_mode_silent_backend_just_closes_after_the_udp_timeout() {
    let udp = UdpBackend::silent().await;
    let services = proto_service_yaml("quiet.svc.internal", Some("udp"), &udp.addr().to_string());
    let fx = fixture(&services, &["--udp-timeout", "500ms"]).await;
    let bob = fx.pki.client_email("bob@example.com");

    let mut s = fx
        .connect("quiet.svc.internal", &bob)
        .await
        .expect("handshake");
    let start = Instant::now();
    let r = datagram_exchange(&mut s, b"anyone there?", Duration::from_secs(6)).await;
    let took = start.elapsed();
    let how = assert_bare_close(&r);
    eprintln!("silent udp backend: {how} after {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "--udp-timeout 500ms, but the connection was closed only after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(400),
        "closed after {took:?}: before the 500ms udp timeout could have elapsed"
    );
    assert_eq!(
        udp.datagrams(),
        1,
        "the datagram was sent to the backend once"
    );
    assert_eq!(udp.received(), vec![b"anyone there?".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_spec_mode_unreachable_backend_just_closes() {
    let port = closed_udp_port();
    let services = proto_service_yaml(
        "nobody.svc.internal",
        Some("udp"),
        &format!("127.0.0.1:{port}"),
    );
    let fx = fixture(&services, &["--udp-timeout", "500ms"]).await;
    let bob = fx.pki.client_email("bob@example.com");

    let mut s = fx
        .connect("nobody.svc.internal", &bob)
        .await
        .expect("handshake");
    let start = Instant::now();
    let r = datagram_exchange(&mut s, b"hello?", Duration::from_secs(6)).await;
    let how = assert_bare_close(&r);
    eprintln!("unreachable udp backend: {how} after {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_spec_mode_carries_binary_bytes_exactly() {
    let udp = UdpBackend::sha256().await;
    let services = proto_service_yaml("quic.svc.internal", Some("quic"), &udp.addr().to_string());
    let fx = fixture(&services, &[]).await;
    let bob = fx.pki.client_email("bob@example.com");

    // ~1200 bytes each (a QUIC Initial's size), binary: zero bytes, a TLS record header,
    // a QUIC long header, CR LF, a fake refusal line.
    let mut tls_like = vec![0x16, 0x03, 0x01, 0x04, 0xa0, 0x01, 0x00, 0x00, 0x00];
    tls_like.extend(pseudo_random_bytes(1191, 1));
    let mut quic_like = vec![0xc3, 0x00, 0x00, 0x00, 0x01, 0x08];
    quic_like.extend(pseudo_random_bytes(600, 2));
    quic_like.extend([0u8; 64]);
    quic_like.extend(b"\r\nZTP-ERROR 403 forbidden\n\r\n");
    quic_like.extend(pseudo_random_bytes(1200 - quic_like.len(), 3));
    let mut zeros = vec![0u8; 1200];
    zeros[600] = 0xff;

    for (i, payload) in [tls_like, quic_like, zeros].iter().enumerate() {
        let mut s = fx
            .connect("quic.svc.internal", &bob)
            .await
            .expect("handshake");
        assert_eq!(s.get_ref().1.alpn_protocol(), None);
        let reply = datagram_exchange(&mut s, payload, STEP)
            .await
            .unwrap_or_else(|e| {
                panic!("payload {i}: expected the 32-byte hash then a clean end; got {e}")
            });
        assert_eq!(
            reply,
            sha256(payload).to_vec(),
            "payload {i}: the backend's hash of what it received differs from the hash of \
             what was sent (the bytes were changed on the way)"
        );
        let got = udp.received();
        assert_eq!(got.len(), i + 1, "one datagram per connection");
        assert!(got[i] == *payload, "payload {i} arrived changed");
    }
}
