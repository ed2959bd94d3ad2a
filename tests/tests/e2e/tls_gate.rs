//! The TLS gate: protocol version, SNI, and the client certificate are all checked in the
//! handshake, before any backend is contacted (DESIGN.md "Refusals").

use rustls::AlertDescription;
use ztp_tests::{connect_with, ClientOptions, TestPki};

use crate::common::{assert_cert_refused, assert_handshake_alert, echo_roundtrip, Extra, Fixture};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_client_is_refused_with_protocol_version() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let opts = fx.opts("echo.svc.internal", &bob).tls12_only();
    assert_handshake_alert(
        connect_with(fx.dp.addr(), &opts).await,
        AlertDescription::ProtocolVersion,
    );
    assert!(
        !opts.server_cert_seen(),
        "the server presented its certificate to a TLS 1.2 client"
    );
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_without_sni_is_refused_in_the_handshake() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    // No SNI extension; the server certificate would be verified as `localhost`.
    let opts = ClientOptions::new(&fx.pki.ca_pem).cert(&bob);
    let r = connect_with(fx.dp.addr(), &opts).await;
    match &r {
        Ok(_) => panic!("a ClientHello without SNI completed the handshake"),
        Err(e) => eprintln!(
            "no-SNI handshake failed as required: {e} (alert: {:?}; DESIGN expects missing_extension or a close)",
            ztp_tests::client::alert_of(e)
        ),
    }
    assert!(
        !opts.server_cert_seen(),
        "the server sent (and signed for) its certificate before refusing a ClientHello without SNI"
    );
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_is_refused_with_unrecognized_name_before_the_certificate() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let opts = fx.opts("nothing.example.org", &bob);
    assert_handshake_alert(
        connect_with(fx.dp.addr(), &opts).await,
        AlertDescription::UnrecognisedName,
    );
    assert!(
        !opts.server_cert_seen(),
        "the server sent its certificate before refusing an unknown SNI"
    );
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_matches_exactly_one_label() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");

    let s = fx
        .connect("a.svc.internal", &bob)
        .await
        .expect("a.svc.internal matches *.svc.internal");
    assert_eq!(echo_roundtrip(s, b"one label").await, b"one label");
    assert_eq!(
        fx.wild.connections(),
        1,
        "the wildcard service's backend was used"
    );
    assert_eq!(fx.echo.connections(), 0);

    let opts = fx.opts("a.b.svc.internal", &bob);
    assert_handshake_alert(
        connect_with(fx.dp.addr(), &opts).await,
        AlertDescription::UnrecognisedName,
    );
    assert!(!opts.server_cert_seen());
    assert_eq!(
        fx.wild.connections(),
        1,
        "a.b.svc.internal must not reach the wildcard backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_compares_case_insensitively() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let s = fx
        .connect("ECHO.svc.internal", &bob)
        .await
        .expect("ECHO.svc.internal names echo.svc.internal");
    assert_eq!(echo_roundtrip(s, b"upper case").await, b"upper case");
    assert_eq!(
        fx.echo.connections(),
        1,
        "the exact service (not the wildcard) was used"
    );
    assert_eq!(fx.wild.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_certificate_gets_certificate_required() {
    let fx = Fixture::start().await;
    let opts = ClientOptions::new(&fx.pki.ca_pem).sni("echo.svc.internal");
    assert_cert_refused(fx.dp.addr(), &opts, AlertDescription::CertificateRequired).await;
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_untrusted_ca_gets_unknown_ca() {
    let fx = Fixture::start().await;
    // Same identity as a real user, but issued by a CA nobody trusts.
    let rogue = fx.pki.rogue("alice@example.com");
    let opts = fx.opts("echo.svc.internal", &rogue);
    assert_cert_refused(fx.dp.addr(), &opts, AlertDescription::UnknownCA).await;
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_gets_certificate_expired() {
    let fx = Fixture::start().await;
    let expired = fx
        .pki
        .builder()
        .email("alice@example.com")
        .expired()
        .issue();
    let opts = fx.opts("echo.svc.internal", &expired);
    assert_cert_refused(fx.dp.addr(), &opts, AlertDescription::CertificateExpired).await;
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_serial_gets_certificate_revoked() {
    let pki = TestPki::new();
    let revoked = pki.client_email("alice@example.com");
    let other = pki.client_email("alice@example.com");
    // Same integer, written with leading zeros and in upper case.
    let listed = vec![revoked.serial_padded_upper(3)];
    assert_ne!(
        listed[0], revoked.serial,
        "the listed form differs textually"
    );
    let fx = Fixture::start_with(
        pki,
        Extra {
            revoked: &listed,
            ..Extra::default()
        },
    )
    .await;

    let opts = fx.opts("echo.svc.internal", &revoked);
    assert_cert_refused(fx.dp.addr(), &opts, AlertDescription::CertificateRevoked).await;
    assert_eq!(fx.backend_connections(), 0);

    // Another certificate of the same identity is not affected.
    let s = fx
        .connect("echo.svc.internal", &other)
        .await
        .expect("connect");
    assert_eq!(echo_roundtrip(s, b"still fine").await, b"still fine");
    assert_eq!(fx.echo.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--handshake-timeout", "500ms"],
            ..Extra::default()
        },
    )
    .await;
    let start = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(fx.dp.addr())
        .await
        .expect("tcp connect");
    let mut buf = [0u8; 64];
    // EOF or a reset both count; what matters is that the proxy lets go.
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf)).await;
    let took = start.elapsed();
    assert!(
        !matches!(r, Err(_) | Ok(Ok(1..))),
        "a client that sends nothing was not dropped within 5s (handshake timeout 500ms): {r:?}"
    );
    eprintln!("dropped after {took:?}: {r:?}");
    assert!(
        took < std::time::Duration::from_millis(2500),
        "--handshake-timeout 500ms, but a silent client was dropped only after {took:?}"
    );

    // The proxy still serves others.
    let bob = fx.pki.client_email("bob@example.com");
    let s = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    assert_eq!(echo_roundtrip(s, b"still serving").await, b"still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_certificate_is_refused() {
    let fx = Fixture::start().await;
    let early = fx
        .pki
        .builder()
        .email("alice@example.com")
        .not_yet_valid()
        .issue();
    let opts = fx.opts("echo.svc.internal", &early);
    // rustls reports "not within its validity" with the certificate_expired alert.
    assert_cert_refused(fx.dp.addr(), &opts, AlertDescription::CertificateExpired).await;
    assert_eq!(fx.backend_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_client_hello_is_cut_at_the_handshake_timeout() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--handshake-timeout", "500ms"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    // A valid ClientHello, sent one byte every 200 ms: each read makes progress, only the
    // whole handshake is too slow.
    let hello = ztp_tests::client::client_hello_bytes(&fx.opts("echo.svc.internal", &bob));
    assert!(hello.len() > 100, "{} bytes", hello.len());
    let mut tcp = tokio::net::TcpStream::connect(fx.dp.addr())
        .await
        .expect("tcp connect");
    tcp.set_nodelay(true).expect("nodelay");
    let start = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 256];
    let how = loop {
        if start.elapsed() > Duration::from_secs(6) {
            panic!(
                "a ClientHello trickled at 1 byte / 200 ms ({sent} of {} bytes sent) was not cut \
                 within 6s (handshake timeout 500ms)",
                hello.len()
            );
        }
        if sent < hello.len() {
            if let Err(e) = tcp.write_all(&hello[sent..sent + 1]).await {
                break format!("write failed: {e}");
            }
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => break "EOF".to_string(),
            Ok(Ok(n)) => break format!("{n} bytes (an alert?) then presumably a close"),
            Ok(Err(e)) => break format!("read failed: {e}"),
        }
    };
    let took = start.elapsed();
    eprintln!("trickling client cut after {took:?} ({sent} bytes sent): {how}");
    assert!(
        took < Duration::from_millis(2500),
        "--handshake-timeout 500ms bounds the whole handshake, but the trickling client was \
         cut only after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(300),
        "cut after {took:?}, before the handshake timeout: a valid partial ClientHello was refused"
    );
}
