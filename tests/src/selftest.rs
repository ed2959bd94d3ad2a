//! Self-tests of the harness against an in-process rustls server (TLS 1.3, client
//! certificates required): they check the PKI and the client helpers, not ZTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::backend::{pseudo_random_bytes, sha256};
use crate::client::{alert_of, connect, connect_with, read_to_end_or_alert, ClientOptions};
use crate::{closed_port, BlackholeListener, EchoBackend, HashSinkBackend, SourceBackend, TestPki};

/// A TLS 1.3 echo server that requires a client certificate from `pki`'s CA.
async fn tls_echo_server(pki: &TestPki) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let config = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![pki.server.cert_der.clone()],
            pki.server.key_der.clone_key(),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(tcp).await {
                    let (mut r, mut w) = tokio::io::split(s);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_certificates_work_and_refusals_surface_as_alerts() {
    let pki = TestPki::new();
    let (addr, task) = tls_echo_server(&pki).await;

    for cert in [
        pki.client_email("alice@example.com"),
        pki.client_uri("spiffe://example.org/ns/x"),
        pki.client_cn("carol"),
        pki.builder()
            .subject_email_attr("alice@example.com")
            .cn("nobody")
            .serial(&[0x01, 0x02])
            .issue(),
        pki.builder()
            .cn("x")
            .uri("spiffe://a/b")
            .email("Alice@Example.COM")
            .dns("x.example")
            .issue(),
    ] {
        let mut s = connect(addr, Some("echo.svc.internal"), Some(&cert), &pki.ca_pem)
            .await
            .unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_to_end_or_alert(&mut s).await.unwrap(), b"ping");
    }

    // No SNI: still verified (as localhost).
    let alice = pki.client_email("alice@example.com");
    let mut s = connect(addr, None, Some(&alice), &pki.ca_pem)
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    assert!(read_to_end_or_alert(&mut s).await.unwrap().is_empty());

    let cases = [
        (None, AlertDescription::CertificateRequired),
        (
            Some(pki.rogue("alice@example.com")),
            AlertDescription::UnknownCA,
        ),
        (
            Some(pki.builder().email("a@example.com").expired().issue()),
            AlertDescription::CertificateExpired,
        ),
    ];
    for (cert, alert) in cases {
        let mut s = connect(addr, Some("echo.svc.internal"), cert.as_ref(), &pki.ca_pem)
            .await
            .expect("the TLS 1.3 client finishes its side of the handshake");
        let err = read_to_end_or_alert(&mut s).await.unwrap_err();
        assert_eq!(err.alert(), Some(alert), "{err}");
    }

    // A TLS 1.2-only client is refused in the handshake, before the certificate.
    let opts = ClientOptions::new(&pki.ca_pem)
        .sni("echo.svc.internal")
        .cert(&alice)
        .tls12_only();
    let err = connect_with(addr, &opts).await.unwrap_err();
    assert_eq!(
        alert_of(&err),
        Some(AlertDescription::ProtocolVersion),
        "{err}"
    );
    assert!(!opts.server_cert_seen());

    let opts = ClientOptions::new(&pki.ca_pem)
        .sni("echo.svc.internal")
        .cert(&alice);
    connect_with(addr, &opts).await.unwrap();
    assert!(opts.server_cert_seen());
    task.abort();
}

#[test]
fn serials_are_canonical_hex() {
    let pki = TestPki::new();
    let c = pki.builder().cn("x").serial(&[0x0a, 0xbc]).issue();
    assert_eq!(c.serial, "abc");
    assert_eq!(c.serial_padded_upper(2), "00ABC");
    let d = pki.client_cn("y");
    assert!(
        !d.serial.starts_with('0') && d.serial.len() == 32,
        "{}",
        d.serial
    );
    assert_ne!(d.serial, pki.client_cn("y").serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_behave() {
    // Echo: half-close comes back as EOF.
    let echo = EchoBackend::start().await;
    let mut s = TcpStream::connect(echo.addr()).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"abc");
    assert_eq!(echo.connections(), 1);

    // Hash sink.
    let sink = HashSinkBackend::start().await;
    let data = pseudo_random_bytes(100_000, 1);
    let mut s = TcpStream::connect(sink.addr()).await.unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, sha256(&data));

    // Source: its EOF, then our bytes still reach it.
    let mut source = SourceBackend::start(50_000, 3).await;
    let mut s = TcpStream::connect(source.addr()).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, pseudo_random_bytes(50_000, 3));
    s.write_all(b"late").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        source.received(Duration::from_secs(5)).await.unwrap(),
        b"late"
    );

    // Closed port refuses.
    let port = closed_port();
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());

    // Blackhole: connects hang.
    let hole = BlackholeListener::start().await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(hole.addr())).await;
    assert!(r.is_err(), "a connect to the full listener should hang");

    // Dropping a backend stops it.
    let addr = echo.addr();
    drop(echo);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_store_resumes_against_a_resuming_server() {
    let pki = TestPki::new();
    let (addr, task) = tls_echo_server(&pki).await;
    let alice = pki.client_email("alice@example.com");
    let opts = ClientOptions::new(&pki.ca_pem)
        .sni("echo.svc.internal")
        .cert(&alice)
        .session_store(crate::new_session_store());
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let mut s = connect_with(addr, &opts).await.unwrap();
        kinds.push(s.get_ref().1.handshake_kind());
        s.write_all(b"x").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_to_end_or_alert(&mut s).await.unwrap(), b"x");
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
    task.abort();
}

/// `TestCert::from_pem` reads back what the PKI wrote (serial included, with and without
/// a DER sign byte), and `TestPki::crl` signs a CRL of the serials given.
#[test]
fn certificates_read_back_from_pem_and_crls_list_serials() {
    let pki = TestPki::new();
    for cert in [
        pki.client_email("alice@example.com"),
        // First byte >= 0x80: DER prepends a zero byte to keep it positive.
        pki.builder().cn("big").serial(&[0x00, 0x9a, 0xbc]).issue(),
        pki.builder().cn("small").serial(&[0x05]).issue(),
    ] {
        let back = crate::TestCert::from_pem(&cert.cert_pem, &cert.key_pem).unwrap();
        assert_eq!(back.serial, cert.serial.trim_start_matches('0'));
        assert_eq!(back.cert_der, cert.cert_der);
    }
    assert!(crate::TestCert::from_pem("nope", "nope").is_err());
    let (pem, der) = pki.crl(&["0A1B", "ff"]);
    assert!(pem.starts_with("-----BEGIN X509 CRL-----"), "{pem}");
    // The DER carries both serials as INTEGERs (0x0a1b, and 0x00ff with its sign byte).
    let has = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
    assert!(has(&[0x02, 0x02, 0x0a, 0x1b]), "{der:02x?}");
    assert!(has(&[0x02, 0x02, 0x00, 0xff]), "{der:02x?}");
}
