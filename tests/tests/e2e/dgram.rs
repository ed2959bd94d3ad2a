//! Framed datagrams (DESIGN.md "Forwarding", the `ztp-dgram` extension): a client that
//! offers ALPN `ztp-dgram` to a udp or quic service gets it selected and a session in
//! which each datagram, both ways, is a 2-byte big-endian length and that many bytes (at
//! most 16,384). The session lives until either side closes or it idles out. Clients that
//! offer no `ztp-dgram` get spec mode; refusal lines stay unframed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ztp_tests::backend::pseudo_random_bytes;
use ztp_tests::client::datagram_exchange;
use ztp_tests::{DgramEvent, DgramSession, TestPki, UdpBackend, DGRAM_ALPN, MAX_DATAGRAM};

use crate::common::{assert_refusal_line, proto_service_yaml, Extra, Fixture, STEP};

/// The standard fixture plus `dgram-udp.svc.internal` (udp), `dgram-quic.svc.internal`
/// (quic) and `dgram-admins.svc.internal` (udp, group `admins`), all to `udp`.
async fn fixture(udp: &UdpBackend, args: &[&str]) -> Fixture {
    let a = udp.addr().to_string();
    let services = format!(
        "{}{}{}    groups: [admins]\n",
        proto_service_yaml("dgram-udp.svc.internal", Some("udp"), &a),
        proto_service_yaml("dgram-quic.svc.internal", Some("quic"), &a),
        proto_service_yaml("dgram-admins.svc.internal", Some("udp"), &a),
    );
    Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            args,
            ..Extra::default()
        },
    )
    .await
}

/// Connects offering `alpn`, asserts that `ztp-dgram` was selected.
async fn open_session(
    fx: &Fixture,
    sni: &str,
    alpn: &[&[u8]],
) -> DgramSession<TlsStream<TcpStream>> {
    let bob = fx.pki.client_email("bob@example.com");
    let opts = fx.opts(sni, &bob).alpn(alpn);
    let s = ztp_tests::connect_with(fx.dp.addr(), &opts)
        .await
        .unwrap_or_else(|e| panic!("handshake with ALPN {alpn:?} to {sni}: {e}"));
    assert_eq!(
        s.get_ref().1.alpn_protocol(),
        Some(DGRAM_ALPN),
        "a client offering ztp-dgram to {sni} gets ztp-dgram selected"
    );
    DgramSession::new(s)
}

/// Closes the client's side and expects the session to end cleanly; returns the local
/// address (for the connection event).
async fn close_and_expect_end(mut session: DgramSession<TlsStream<TcpStream>>) {
    session.close().await.expect("close_notify");
    match session.recv(STEP).await {
        Ok(DgramEvent::End) => {}
        other => {
            panic!("after the client's close_notify the session should end cleanly; got {other:?}")
        }
    }
}

/// 100 sizes: the edges first, then pseudo-random in 1..=16384.
fn sizes() -> Vec<usize> {
    let mut sizes = vec![1, 2, 512, 1200, 1500, MAX_DATAGRAM - 1, MAX_DATAGRAM];
    let r = pseudo_random_bytes(2 * (100 - sizes.len()), 42);
    for pair in r.chunks(2) {
        let v = u16::from_le_bytes([pair[0], pair[1]]) as usize;
        sizes.push(1 + v % MAX_DATAGRAM);
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_session_carries_100_datagrams_of_varied_sizes_then_a_burst() {
    let udp = UdpBackend::echo().await;
    let fx = fixture(&udp, &[]).await;
    let mut session = open_session(&fx, "dgram-udp.svc.internal", &[DGRAM_ALPN]).await;
    let local = session
        .get_ref()
        .get_ref()
        .0
        .local_addr()
        .expect("local addr");

    // Lockstep: one datagram out, its echo back.
    let sizes = sizes();
    let mut sent = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut d = pseudo_random_bytes(n, 1000 + i as u64);
        d[0] = i as u8; // distinct even when short
        session.send(&d).await.expect("send a frame");
        match session.recv(STEP).await {
            Ok(DgramEvent::Datagram(back)) => assert!(
                back == d,
                "datagram {i} ({n} bytes) came back as {} different bytes",
                back.len()
            ),
            other => panic!("datagram {i} ({n} bytes): expected its echo; got {other:?}"),
        }
        sent.push(d);
    }
    let got = udp.received();
    assert_eq!(got.len(), 100, "one backend datagram per frame");
    for (i, (a, b)) in got.iter().zip(&sent).enumerate() {
        assert!(
            a == b,
            "datagram {i} reached the backend changed ({} bytes)",
            a.len()
        );
    }

    // A burst of 10 in one write; UDP may reorder, so compare as sets.
    let burst: Vec<Vec<u8>> = (0..10u8)
        .map(|i| {
            let mut d = pseudo_random_bytes(100 + 97 * i as usize, 7000 + u64::from(i));
            d[0] = i;
            d
        })
        .collect();
    session.send_batch(&burst).await.expect("send the burst");
    let replies = session
        .recv_datagrams(burst.len(), STEP)
        .await
        .unwrap_or_else(|e| panic!("burst of 10: {e}"));
    assert_eq!(
        replies.into_iter().collect::<BTreeSet<_>>(),
        burst.iter().cloned().collect::<BTreeSet<_>>(),
        "every datagram of the burst came back, unchanged"
    );
    assert_eq!(udp.datagrams(), 110);

    close_and_expect_end(session).await;
    let ev = fx
        .dp
        .wait_for_connection_event(local, STEP)
        .await
        .unwrap_or_else(|| panic!("no `connection` event for {local}: the session did not end"));
    eprintln!("session event: {ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_quic_session_is_byte_exact_and_wins_over_other_alpn() {
    let udp = UdpBackend::echo().await;
    let fx = fixture(&udp, &[]).await;
    // Offered alongside h2: the server selects ztp-dgram.
    let mut session = open_session(&fx, "dgram-quic.svc.internal", &[b"h2", DGRAM_ALPN]).await;
    let mut datagrams = Vec::new();
    for i in 0..20u64 {
        let mut d = pseudo_random_bytes(1200, 500 + i);
        match i % 4 {
            0 => d[..5].copy_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x00]),
            1 => d[..6].copy_from_slice(&[0xc3, 0x00, 0x00, 0x00, 0x01, 0x08]),
            2 => d[..4].copy_from_slice(&[0x00, 0x00, 0x40, 0x01]), // looks like a header
            _ => d[..3].copy_from_slice(b"ZT\n"),
        }
        datagrams.push(d);
    }
    for (i, d) in datagrams.iter().enumerate() {
        session.send(d).await.expect("send");
        match session.recv(STEP).await {
            Ok(DgramEvent::Datagram(back)) => assert!(back == *d, "datagram {i} changed"),
            other => panic!("datagram {i}: expected its echo; got {other:?}"),
        }
    }
    assert_eq!(
        udp.received(),
        datagrams,
        "the backend got every datagram unchanged"
    );
    close_and_expect_end(session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_datagram_is_carried() {
    let udp = UdpBackend::echo().await;
    let fx = fixture(&udp, &[]).await;
    let mut session = open_session(&fx, "dgram-udp.svc.internal", &[DGRAM_ALPN]).await;
    session.send(b"").await.expect("send an empty frame");
    session.send(b"after the empty one").await.expect("send");
    let replies = session
        .recv_datagrams(2, STEP)
        .await
        .unwrap_or_else(|e| panic!("an empty datagram (length 0 is within 0..=16384): {e}"));
    assert_eq!(replies, vec![b"".to_vec(), b"after the empty one".to_vec()]);
    assert_eq!(
        udp.received(),
        vec![b"".to_vec(), b"after the empty one".to_vec()]
    );
    close_and_expect_end(session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_longer_than_16384_closes_the_session() {
    let udp = UdpBackend::echo().await;
    let fx = fixture(&udp, &[]).await;
    let mut session = open_session(&fx, "dgram-udp.svc.internal", &[DGRAM_ALPN]).await;
    session.send(b"fine").await.expect("send");
    assert_eq!(
        session.recv(STEP).await.expect("echo"),
        DgramEvent::Datagram(b"fine".to_vec())
    );

    let oversized = vec![0xabu8; MAX_DATAGRAM + 1];
    let start = Instant::now();
    // The proxy may close while this is being written.
    if let Err(e) = session.send(&oversized).await {
        eprintln!("note: writing the oversized frame failed: {e}");
    }
    let r = session.recv(Duration::from_secs(5)).await;
    match &r {
        Ok(DgramEvent::End) => {}
        Ok(other) => panic!("a frame declaring 16385 bytes was answered with {other:?}"),
        Err(ztp_tests::ReadError::Io { error, .. })
            if error.kind() == std::io::ErrorKind::TimedOut =>
        {
            panic!("a frame declaring 16385 bytes did not close the session within 5s")
        }
        Err(e) => assert!(e.data().is_empty(), "bytes before the close: {e}"),
    }
    eprintln!(
        "oversized frame: session closed after {:?} ({r:?})",
        start.elapsed()
    );
    assert_eq!(
        udp.received(),
        vec![b"fine".to_vec()],
        "nothing of the oversized frame reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_alpn_to_a_udp_service_gets_spec_mode() {
    let udp = UdpBackend::echo().await;
    let fx = fixture(&udp, &[]).await;
    let bob = fx.pki.client_email("bob@example.com");
    let opts = fx.opts("dgram-udp.svc.internal", &bob).alpn(&[b"h2"]);
    let mut s = ztp_tests::connect_with(fx.dp.addr(), &opts)
        .await
        .expect("ALPN h2 offered to a udp service is not a handshake failure");
    assert_eq!(
        s.get_ref().1.alpn_protocol(),
        None,
        "no ALPN selected for a client that did not offer ztp-dgram"
    );
    let reply = datagram_exchange(&mut s, b"spec mode despite h2", STEP)
        .await
        .unwrap_or_else(|e| panic!("spec-mode exchange: {e}"));
    assert_eq!(reply, b"spec mode despite h2");
    assert_eq!(udp.datagrams(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_client_on_a_dgram_session_gets_the_raw_403_line() {
    let udp = UdpBackend::echo().await;
    let fx = fixture(&udp, &[]).await;
    let bob = fx.pki.client_email("bob@example.com");
    let mallory = fx.pki.client_email("mallory@example.com");
    // bob is not in `admins`; mallory is no user at all.
    for (who, sni, cert) in [
        ("bob", "dgram-admins.svc.internal", &bob),
        ("mallory", "dgram-udp.svc.internal", &mallory),
    ] {
        let opts = fx.opts(sni, cert).dgram();
        let s = ztp_tests::connect_with(fx.dp.addr(), &opts)
            .await
            .expect("handshake");
        eprintln!(
            "{who} -> {sni}: ALPN selected {:?}",
            s.get_ref().1.alpn_protocol().map(String::from_utf8_lossy)
        );
        // Exactly the unframed bytes "ZTP-ERROR 403 forbidden\n", then a clean end.
        assert_refusal_line(s, 0, 403, "forbidden").await;
    }
    assert_eq!(udp.datagrams(), 0, "no datagram reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_framed_session_is_closed() {
    let udp = UdpBackend::echo().await;
    // Both bounds at 1s: DESIGN says the session "idles out" without naming the flag.
    let fx = fixture(&udp, &["--idle-timeout", "1s", "--udp-timeout", "1s"]).await;
    let mut session = open_session(&fx, "dgram-udp.svc.internal", &[DGRAM_ALPN]).await;
    session.send(b"ping").await.expect("send");
    assert_eq!(
        session.recv(STEP).await.expect("echo"),
        DgramEvent::Datagram(b"ping".to_vec())
    );
    let start = Instant::now();
    let r = session.recv(Duration::from_secs(8)).await;
    let took = start.elapsed();
    match &r {
        Ok(DgramEvent::End) => {}
        Ok(other) => panic!("unexpected {other:?} on an idle session"),
        Err(ztp_tests::ReadError::Io { error, .. })
            if error.kind() == std::io::ErrorKind::TimedOut =>
        {
            panic!("an idle ztp-dgram session was not closed within 8s (idle timeout 1s)")
        }
        Err(e) => assert!(e.data().is_empty(), "unexpected bytes: {e}"),
    }
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    eprintln!("idle dgram session closed after {took:?}: {r:?}");
}
