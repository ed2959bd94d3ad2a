//! `protocol: auto` (DESIGN.md step 6): the default when the field is left out. Whatever
//! the client speaks goes to tcp forwarding, byte-exact, and the backend is connected at
//! once: a client that sends nothing (a server-speaks-first protocol) gets its banner
//! without waiting for a peek. The first bytes name the detected kind in the record.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ztp_tests::backend::pseudo_random_bytes;
use ztp_tests::client::client_hello_bytes;
use ztp_tests::{BannerBackend, ClientOptions, EchoBackend, TestPki};

use crate::common::{echo_roundtrip, echo_step, proto_service_yaml, Extra, Fixture, STEP};

/// Bound on the proxy's peek deadline plus a generous margin for loaded test machines
/// (DESIGN: "with a deadline"; the brief for this suite: at most about 1 s).
const PEEK_BOUND: Duration = Duration::from_millis(2500);

/// First bytes of each kind a client may open with.
fn first_bytes(pki: &TestPki) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    // A real TLS 1.3 ClientHello (another TLS session tunnelled inside ours).
    let inner = ClientOptions::new(&pki.ca_pem).sni("inner.example.org");
    let hello = client_hello_bytes(&inner);
    assert_eq!(&hello[..2], &[0x16, 0x03], "a TLS record header");
    let mut ssh_rest = vec![0x00, 0x00, 0x01, 0x2c, 0x0a, 0x14];
    ssh_rest.extend(pseudo_random_bytes(294, 9));
    vec![
        ("tls", hello, pseudo_random_bytes(3000, 8)),
        ("ssh", b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n".to_vec(), ssh_rest),
        (
            "http",
            b"GET / HTTP/1.1\r\nHost: auto.svc.internal\r\nUser-Agent: ztp-tests\r\nAccept: */*\r\n\r\n"
                .to_vec(),
            b"GET /second HTTP/1.1\r\nHost: auto.svc.internal\r\n\r\n".to_vec(),
        ),
    ]
}

async fn auto_fixture(echo: &EchoBackend, banner: &BannerBackend) -> Fixture {
    let e = echo.addr().to_string();
    let b = banner.addr().to_string();
    let services = [
        proto_service_yaml("auto.svc.internal", Some("auto"), &e),
        proto_service_yaml("default.svc.internal", None, &e),
        proto_service_yaml("banner-auto.svc.internal", None, &b),
        proto_service_yaml("banner-explicit-auto.svc.internal", Some("auto"), &b),
        proto_service_yaml("banner-tcp.svc.internal", Some("tcp"), &b),
    ]
    .concat();
    Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            ..Extra::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_service_forwards_tls_ssh_and_http_first_bytes_exactly() {
    let echo = EchoBackend::start().await;
    let banner = BannerBackend::start_default().await;
    let fx = auto_fixture(&echo, &banner).await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut expected = 0;
    for sni in ["auto.svc.internal", "default.svc.internal"] {
        for (kind, first, rest) in first_bytes(&fx.pki) {
            let mut s = fx.connect(sni, &bob).await.expect("handshake");
            let local = s.get_ref().0.local_addr().expect("local addr");
            assert_eq!(
                s.get_ref().1.alpn_protocol(),
                None,
                "{sni}: no ALPN offered"
            );
            // The first bytes come back exactly (nothing lost, added or repeated by the
            // peek), then the stream goes on both ways.
            echo_step(&mut s, &first).await;
            echo_step(&mut s, &rest).await;
            let mut tail = rest.clone();
            tail.reverse();
            assert_eq!(
                echo_roundtrip(s, &tail).await,
                tail,
                "{sni} / {kind}: the rest of the stream, then a clean end"
            );
            expected += 1;
            assert_eq!(
                echo.connections(),
                expected,
                "{sni} / {kind}: one tcp backend connection"
            );
            // The first bytes name the kind in the record.
            let ev = fx
                .dp
                .wait_for_connection_event(local, STEP)
                .await
                .unwrap_or_else(|| panic!("{sni} / {kind}: no connection event"));
            let want = if kind == "http" { "http1" } else { kind };
            assert_eq!(ev["protocol.detected"], want, "{sni} / {kind}: {ev}");
            assert_eq!(ev["protocol"], "tcp", "{ev}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_service_first_bytes_split_across_records_are_forwarded_exactly() {
    let echo = EchoBackend::start().await;
    let banner = BannerBackend::start_default().await;
    let fx = auto_fixture(&echo, &banner).await;
    let bob = fx.pki.client_email("bob@example.com");
    for (kind, first, _) in first_bytes(&fx.pki) {
        let mut s = fx
            .connect("default.svc.internal", &bob)
            .await
            .expect("handshake");
        // A slow typist: 3 bytes, a pause, the rest (each write its own TLS record).
        s.write_all(&first[..3]).await.expect("write");
        s.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&first[3..]).await.expect("write");
        s.flush().await.expect("flush");
        let mut back = vec![0u8; first.len()];
        tokio::time::timeout(STEP, s.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("{kind}: no echo within {STEP:?}"))
            .unwrap_or_else(|e| panic!("{kind}: echo failed: {e}"));
        assert_eq!(back, first, "{kind}: split first bytes came back changed");
        assert_eq!(echo_roundtrip(s, b"bye").await, b"bye");
    }
}

/// Connects, sends nothing, and reads the banner; returns how long after the handshake it
/// arrived, and the stream.
async fn banner_after_handshake(
    fx: &Fixture,
    sni: &str,
    banner: &BannerBackend,
) -> (Duration, TlsStream<TcpStream>) {
    let bob = fx.pki.client_email("bob@example.com");
    let mut s = fx.connect(sni, &bob).await.expect("handshake");
    let start = Instant::now();
    let mut got = vec![0u8; banner.banner.len()];
    tokio::time::timeout(Duration::from_secs(8), s.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| {
            panic!("{sni}: the server-first banner did not arrive within 8s of the handshake")
        })
        .unwrap_or_else(|e| panic!("{sni}: reading the banner: {e}"));
    assert_eq!(got, *banner.banner, "{sni}: the banner, exactly");
    (start.elapsed(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_service_with_a_server_first_backend_stops_peeking_and_connects() {
    let echo = EchoBackend::start().await;
    let banner = BannerBackend::start_default().await;
    let fx = auto_fixture(&echo, &banner).await;
    for sni in [
        "banner-auto.svc.internal",
        "banner-explicit-auto.svc.internal",
    ] {
        let (took, mut s) = banner_after_handshake(&fx, sni, &banner).await;
        let local = s.get_ref().0.local_addr().expect("local addr");
        eprintln!("{sni}: banner {took:?} after the handshake");
        assert!(
            took < PEEK_BOUND,
            "{sni}: the banner took {took:?}: the proxy kept peeking at a silent client \
             (deadline should be at most about 1s)"
        );
        // Then it is an ordinary stream both ways.
        echo_step(&mut s, b"EHLO client\r\n").await;
        assert_eq!(echo_roundtrip(s, b"QUIT\r\n").await, b"QUIT\r\n");
        // The client spoke second: its first bytes are plain text, not a known kind.
        let ev = fx
            .dp
            .wait_for_connection_event(local, STEP)
            .await
            .expect("connection event");
        assert_eq!(ev["protocol.detected"], "unknown", "{ev}");
    }
    assert_eq!(banner.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_tcp_service_connects_its_backend_at_once() {
    let echo = EchoBackend::start().await;
    let banner = BannerBackend::start_default().await;
    let fx = auto_fixture(&echo, &banner).await;
    // Timing is noisy under a parallel test run: compare the fastest of three each.
    let mut tcp_best = Duration::MAX;
    let mut auto_best = Duration::MAX;
    for _ in 0..3 {
        let (took, s) = banner_after_handshake(&fx, "banner-tcp.svc.internal", &banner).await;
        tcp_best = tcp_best.min(took);
        assert_eq!(echo_roundtrip(s, b"x").await, b"x");
        let (took, s) = banner_after_handshake(&fx, "banner-auto.svc.internal", &banner).await;
        auto_best = auto_best.min(took);
        assert_eq!(echo_roundtrip(s, b"y").await, b"y");
    }
    eprintln!(
        "banner after the handshake (best of 3): declared tcp {tcp_best:?}, auto {auto_best:?} \
         (the peek deadline)"
    );
    assert!(
        tcp_best < Duration::from_millis(800),
        "a declared tcp service's banner took at least {tcp_best:?}: was the protocol detected \
         (peeked) although it is declared?"
    );
    // Where the auto service's peek deadline is long enough to tell apart, the declared
    // service must not wait for it.
    if auto_best >= Duration::from_millis(150) {
        assert!(
            tcp_best < auto_best / 2,
            "a declared tcp service waited {tcp_best:?} for its banner, like the auto service's \
             peek deadline ({auto_best:?}): a declared protocol is never detected"
        );
    } else {
        eprintln!("note: the auto peek deadline is too short to compare against");
    }
}
