//! The verified-chain cache: a returning client skips the CA's signature, never the
//! checks that can change (dates, revoked serials, CA set).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::UnixTime;
use time::{Duration, OffsetDateTime};

use super::*;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "cache test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// A client certificate for `email`, valid for the next `days` days.
    fn client(&self, email: &str, serial: u8, days: i64) -> CertificateDer<'static> {
        self.client_with_serial(email, &[serial], days)
    }

    fn client_with_serial(&self, email: &str, serial: &[u8], days: i64) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::Rfc822Name(email.try_into().unwrap())];
        p.serial_number = Some(SerialNumber::from_slice(serial));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::hours(1);
        p.not_after = now + Duration::days(days);
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &self.issuer).unwrap().der().clone()
    }

    /// The data plane's material with this CA as the client CA set.
    fn material(&self) -> TlsMaterial {
        let dir = std::env::temp_dir().join(format!(
            "ztp-tls-cache-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("s.pem"), server.cert.pem()).unwrap();
        std::fs::write(dir.join("s.key"), server.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), self.issuer.pem()).unwrap();
        let files = TlsFiles {
            cert: dir.join("s.pem"),
            key: KeySource::File(dir.join("s.key")),
            client_ca: dir.join("ca.pem"),
        };
        let m = TlsMaterial::load(&files, &provider()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        m
    }
}

fn verifier(material: &TlsMaterial, revoked: &[&str]) -> Arc<ClientVerifier> {
    let revoked = revoked
        .iter()
        .map(|s| Serial::parse_hex(s).unwrap())
        .collect();
    TlsConfigs::build(material, Arc::new(revoked), session_cache(), provider())
        .unwrap()
        .verifier
}

fn at(days_from_now: i64) -> UnixTime {
    let t = OffsetDateTime::now_utc() + Duration::days(days_from_now);
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.unix_timestamp() as u64))
}

#[test]
fn returning_chain_is_served_from_the_cache() {
    let ca = Ca::new();
    let m = ca.material();
    let leaf = ca.client("alice@example.com", 0x11, 7);
    let v = verifier(&m, &[]);
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_ok());
    assert_eq!(m.chains.len(), 1, "a verified chain is remembered");
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_ok());
    assert_eq!(m.chains.len(), 1);
    // A new snapshot (new verifier, same CA set) shares the cache.
    let v2 = verifier(&m, &[]);
    assert!(v2.verify_client_cert(&leaf, &[], at(0)).is_ok());
    assert_eq!(m.chains.len(), 1);
}

#[test]
fn cached_chain_is_still_refused_once_revoked() {
    let ca = Ca::new();
    let m = ca.material();
    let leaf = ca.client("alice@example.com", 0x22, 7);
    assert!(verifier(&m, &[])
        .verify_client_cert(&leaf, &[], at(0))
        .is_ok());
    let err = verifier(&m, &["22"])
        .verify_client_cert(&leaf, &[], at(0))
        .unwrap_err();
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::Revoked)
    );
}

#[test]
fn cached_chain_is_still_refused_once_expired() {
    let ca = Ca::new();
    let m = ca.material();
    let leaf = ca.client("alice@example.com", 0x33, 2);
    let v = verifier(&m, &[]);
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_ok());
    assert!(
        matches!(
            v.verify_client_cert(&leaf, &[], at(3)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ))
        ),
        "the clock is checked on every handshake, cached or not"
    );
}

#[test]
fn another_ca_set_does_not_inherit_the_cache() {
    let ca = Ca::new();
    let other = Ca::new();
    let leaf = ca.client("alice@example.com", 0x44, 7);
    let m = ca.material();
    assert!(verifier(&m, &[])
        .verify_client_cert(&leaf, &[], at(0))
        .is_ok());
    // Reloaded with a CA set that does not include the issuer: refused, whatever was
    // verified before.
    let reloaded = other.material();
    assert!(matches!(
        verifier(&reloaded, &[]).verify_client_cert(&leaf, &[], at(0)),
        Err(rustls::Error::InvalidCertificate(_))
    ));
}

#[test]
fn a_chain_refused_once_is_not_remembered() {
    let ca = Ca::new();
    let rogue = Ca::new();
    let m = ca.material();
    let leaf = rogue.client("mallory@example.com", 0x55, 7);
    let v = verifier(&m, &[]);
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_err());
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_err());
    assert_eq!(m.chains.len(), 0);
}

#[test]
fn a_serial_too_long_to_revoke_is_refused() {
    let ca = Ca::new();
    let m = ca.material();
    let v = verifier(&m, &[]);
    // Found by fuzzing: 21 octets verify with webpki but cannot be named in `revoked`.
    let long = ca.client_with_serial("alice@example.com", &[0x5a; 21], 7);
    assert!(matches!(
        v.verify_client_cert(&long, &[], at(0)),
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            _
        )))
    ));
    assert_eq!(m.chains.len(), 0, "not remembered");
    let twenty = ca.client_with_serial("alice@example.com", &[0x5a; 20], 7);
    assert!(v.verify_client_cert(&twenty, &[], at(0)).is_ok());
}

// ---------------------------------------------------------------------------------------
// Handshake-failure reasons: an incompatible client is told apart from another.

/// Every rustls error the gate can meet maps to one reason from the fixed set.
#[test]
fn handshake_reasons_name_the_cause() {
    use rustls::{Error as E, PeerIncompatible as P, PeerMisbehaved as M};
    let table: Vec<(E, &str)> = vec![
        (E::PeerIncompatible(P::Tls12NotOffered), "protocol version"),
        (
            E::PeerIncompatible(P::Tls12NotOfferedOrEnabled),
            "protocol version",
        ),
        (
            E::PeerIncompatible(P::SupportedVersionsExtensionRequired),
            "protocol version",
        ),
        (
            E::PeerIncompatible(P::NoCipherSuitesInCommon),
            "no shared cipher suite",
        ),
        (
            E::PeerIncompatible(P::NoKxGroupsInCommon),
            "no shared group",
        ),
        (
            E::PeerIncompatible(P::KeyShareExtensionRequired),
            "no shared group",
        ),
        (
            E::PeerIncompatible(P::NamedGroupsExtensionRequired),
            "no shared group",
        ),
        (
            E::PeerIncompatible(P::NoSignatureSchemesInCommon),
            "no shared signature scheme",
        ),
        (
            E::PeerIncompatible(P::SignatureAlgorithmsExtensionRequired),
            "no shared signature scheme",
        ),
        (
            E::PeerIncompatible(P::NullCompressionRequired),
            "incompatible client",
        ),
        (
            E::PeerIncompatible(P::ExtendedMasterSecretExtensionRequired),
            "incompatible client",
        ),
        (
            E::PeerMisbehaved(M::DuplicateClientHelloExtensions),
            "protocol violation",
        ),
        (
            E::PeerMisbehaved(M::RefusedToFollowHelloRetryRequest),
            "protocol violation",
        ),
        (E::NoCertificatesPresented, "no client certificate"),
        (
            E::InvalidCertificate(CertificateError::Revoked),
            "certificate revoked",
        ),
        (
            E::InvalidCertificate(CertificateError::Expired),
            "certificate expired",
        ),
        (
            E::InvalidCertificate(CertificateError::UnknownIssuer),
            "unknown ca",
        ),
        (
            E::InvalidCertificate(CertificateError::BadSignature),
            "handshake failed",
        ),
        (
            E::InvalidMessage(rustls::InvalidMessage::MissingData("x")),
            "handshake failed",
        ),
        (E::DecryptError, "handshake failed"),
    ];
    for (err, want) in table {
        let what = format!("{err:?}");
        let e = HandshakeError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidData, err));
        let got = e.reason();
        assert_eq!(got, want, "{what}");
        assert!(HANDSHAKE_REASONS.contains(&got), "{got:?} is not listed");
    }
    // An I/O error that carries no rustls error (a reset mid-handshake).
    let reset = HandshakeError::Tls(std::io::ErrorKind::ConnectionReset.into());
    assert_eq!(reset.reason(), "handshake failed");
    assert_eq!(HandshakeError::Timeout.reason(), "handshake timeout");
    for r in HANDSHAKE_REASONS {
        assert_eq!(*r, r.to_lowercase(), "reasons are lowercase");
    }
}

/// Test clients that accept any server certificate: what is under test is what the client
/// offers, never whether it trusts the gate.
mod incompatible {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{
        CipherSuite, CipherSuiteCommon, ClientConfig, DigitallySignedStruct, NamedGroup,
        SignatureScheme, SupportedCipherSuite, Tls13CipherSuite,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use crate::tls::{complete, provider, read_hello, session_cache, test_material, TlsConfigs};

    #[derive(Debug)]
    struct AnyServer(Vec<SignatureScheme>);

    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        /// What the client sends in `signature_algorithms`.
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.clone()
        }
    }

    /// X25519 under another group's name: the client offers (and sends a key share for)
    /// a group the gate's provider lacks.
    #[derive(Debug)]
    struct Renamed(NamedGroup);

    struct RenamedKx(Box<dyn ActiveKeyExchange>, NamedGroup);

    impl SupportedKxGroup for Renamed {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
            let inner = rustls::crypto::ring::kx_group::X25519.start()?;
            Ok(Box::new(RenamedKx(inner, self.0)))
        }
        fn name(&self) -> NamedGroup {
            self.0
        }
    }

    impl ActiveKeyExchange for RenamedKx {
        fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
            self.0.complete(peer)
        }
        fn pub_key(&self) -> &[u8] {
            self.0.pub_key()
        }
        fn group(&self) -> NamedGroup {
            self.1
        }
    }

    /// AES-128-GCM under another suite's code point: the client offers only a TLS 1.3
    /// suite the gate's provider lacks.
    pub(super) fn renamed_suite(suite: CipherSuite) -> SupportedCipherSuite {
        // Refutable when rustls is built with TLS 1.2 (the workspace's tests enable it).
        #[allow(irrefutable_let_patterns)]
        let SupportedCipherSuite::Tls13(real) =
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            unreachable!("a TLS 1.3 suite")
        };
        let fake = Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite,
                hash_provider: real.common.hash_provider,
                confidentiality_limit: real.common.confidentiality_limit,
            },
            hkdf_provider: real.hkdf_provider,
            aead_alg: real.aead_alg,
            quic: None,
        };
        SupportedCipherSuite::Tls13(Box::leak(Box::new(fake)))
    }

    /// A TLS 1.3 client config from `provider`, verifying with `schemes`.
    fn client(provider: CryptoProvider, schemes: Vec<SignatureScheme>) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(schemes)))
            .with_no_client_auth();
        Arc::new(config)
    }

    fn ecdsa() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ED25519,
        ]
    }

    pub(super) enum Client {
        /// Raw bytes (a hand-made ClientHello).
        Raw(Vec<u8>),
        /// A rustls client.
        Tls(Arc<ClientConfig>),
    }

    pub(super) fn only_suite(suite: CipherSuite) -> Client {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![renamed_suite(suite)];
        Client::Tls(client(p, ecdsa()))
    }

    pub(super) fn only_group(group: NamedGroup) -> Client {
        static SECP521R1: Renamed = Renamed(NamedGroup::secp521r1);
        assert_eq!(group, NamedGroup::secp521r1);
        let mut p = rustls::crypto::ring::default_provider();
        p.kx_groups = vec![&SECP521R1];
        Client::Tls(client(p, ecdsa()))
    }

    pub(super) fn only_schemes(schemes: Vec<SignatureScheme>) -> Client {
        Client::Tls(client(rustls::crypto::ring::default_provider(), schemes))
    }

    pub(super) fn compatible_without_certificate() -> Client {
        Client::Tls(client(rustls::crypto::ring::default_provider(), ecdsa()))
    }

    /// A ClientHello as a TLS 1.2 client sends it (this crate's rustls may be built
    /// without TLS 1.2): SNI, groups, point formats and signature algorithms, and
    /// `supported_versions` only if `versions` is given.
    pub(super) fn tls12_hello(versions: Option<&[u16]>) -> Client {
        fn ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
            out.extend(kind.to_be_bytes());
            out.extend((body.len() as u16).to_be_bytes());
            out.extend(body);
        }
        let host = b"localhost";
        let mut sni = ((host.len() + 3) as u16).to_be_bytes().to_vec();
        sni.push(0);
        sni.extend((host.len() as u16).to_be_bytes());
        sni.extend(host);
        let mut exts = Vec::new();
        ext(&mut exts, 0, &sni);
        ext(&mut exts, 10, &[0, 4, 0, 0x1d, 0, 0x17]);
        ext(&mut exts, 11, &[1, 0]);
        ext(&mut exts, 13, &[0, 4, 4, 3, 8, 4]);
        if let Some(versions) = versions {
            let mut body = vec![(versions.len() * 2) as u8];
            for v in versions {
                body.extend(v.to_be_bytes());
            }
            ext(&mut exts, 43, &body);
        }
        let mut hello = vec![3, 3];
        hello.extend([7u8; 32]);
        hello.push(0);
        // ECDHE-ECDSA- and ECDHE-RSA-AES128-GCM-SHA256; null compression.
        hello.extend([0, 4, 0xc0, 0x2b, 0xc0, 0x2f, 1, 0]);
        hello.extend((exts.len() as u16).to_be_bytes());
        hello.extend(exts);
        let mut hs = vec![1];
        hs.extend(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend(hello);
        let mut record = vec![22, 3, 1];
        record.extend((hs.len() as u16).to_be_bytes());
        record.extend(hs);
        Client::Raw(record)
    }

    impl Client {
        async fn run(self, addr: std::net::SocketAddr) {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let mut sink = Vec::new();
            match self {
                Client::Raw(bytes) => {
                    tcp.write_all(&bytes).await.unwrap();
                    let _ = tcp.read_to_end(&mut sink).await;
                }
                Client::Tls(config) => {
                    let name = ServerName::try_from("localhost").unwrap();
                    let connector = tokio_rustls::TlsConnector::from(config);
                    if let Ok(mut tls) = connector.connect(name, tcp).await {
                        // TLS 1.3: the client's side is done before the server has read
                        // its certificate; wait for the verdict.
                        let _ = tls.read_to_end(&mut sink).await;
                    }
                }
            }
        }
    }

    /// Runs `client` against the gate's stream config over loopback; the reason the
    /// server gives for the failed handshake.
    pub(super) async fn refused(client: Client) -> &'static str {
        let configs = TlsConfigs::build(
            &test_material(),
            Arc::default(),
            session_cache(),
            provider(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            let start = read_hello(tcp).await.expect("a well-formed ClientHello");
            match complete(start, configs.stream.clone(), false).await {
                Ok(_) => panic!("the handshake succeeded"),
                Err(e) => e,
            }
        };
        let bound = std::time::Duration::from_secs(10);
        let (err, ()) =
            tokio::time::timeout(bound, async { tokio::join!(server, client.run(addr)) })
                .await
                .expect("bounded");
        eprintln!("{err}");
        err.reason()
    }
}

#[tokio::test]
async fn real_handshakes_name_the_incompatibility() {
    use incompatible::*;
    use rustls::{CipherSuite, NamedGroup, SignatureScheme};
    let cases: Vec<(&str, Client, &str)> = vec![
        (
            "TLS 1.2 only, no supported_versions",
            tls12_hello(None),
            "protocol version",
        ),
        (
            "TLS 1.2 only, supported_versions [1.2]",
            tls12_hello(Some(&[0x0303])),
            "protocol version",
        ),
        (
            "only TLS_AES_128_CCM_SHA256",
            only_suite(CipherSuite::TLS13_AES_128_CCM_SHA256),
            "no shared cipher suite",
        ),
        (
            "only secp521r1",
            only_group(NamedGroup::secp521r1),
            "no shared group",
        ),
        (
            "only Ed448 and RSA PKCS#1 signatures (the gate's key is ECDSA P-256)",
            only_schemes(vec![
                SignatureScheme::ED448,
                SignatureScheme::RSA_PKCS1_SHA256,
            ]),
            "no shared signature scheme",
        ),
        (
            "no client certificate",
            compatible_without_certificate(),
            "no client certificate",
        ),
    ];
    for (what, client, want) in cases {
        assert_eq!(refused(client).await, want, "{what}");
    }
}

/// A signer that holds its key elsewhere (here: wraps a local one) and counts what it
/// signs: the shape of a keyless signer.
#[derive(Debug)]
struct RemoteSigner {
    inner: Arc<dyn rustls::sign::SigningKey>,
    signed: Arc<std::sync::atomic::AtomicUsize>,
}

impl rustls::sign::SigningKey for RemoteSigner {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        let signer = self.inner.choose_scheme(offered)?;
        Some(Box::new(CountingSigner {
            inner: signer,
            signed: self.signed.clone(),
        }))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.inner.algorithm()
    }
}

#[derive(Debug)]
struct CountingSigner {
    inner: Box<dyn rustls::sign::Signer>,
    signed: Arc<std::sync::atomic::AtomicUsize>,
}

impl rustls::sign::Signer for CountingSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.signed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.sign(message)
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        self.inner.scheme()
    }
}

/// The server's key enters as a rustls `SigningKey` (DESIGN "Keyless"): material built
/// from a certificate and any signer serves real handshakes, and the signer does the
/// signing; the private key need not be in the data plane.
#[test]
fn the_server_key_can_be_any_signer() {
    let ca = Ca::new();
    let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key_der =
        rustls::pki_types::PrivateKeyDer::try_from(server.signing_key.serialize_der()).unwrap();
    let signed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let signer = RemoteSigner {
        inner: provider().key_provider.load_private_key(key_der).unwrap(),
        signed: signed.clone(),
    };
    let certified = CertifiedKey::new(vec![server.cert.der().clone()], Arc::new(signer));
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.issuer.der().to_vec()))
        .unwrap();
    let material = TlsMaterial::from_parts(Arc::new(certified), roots);
    let configs =
        TlsConfigs::build(&material, Arc::default(), session_cache(), provider()).unwrap();

    // A client with a certificate from the client CA, trusting the server's.
    let client_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::Rfc822Name("alice@example.com".try_into().unwrap())];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = p.signed_by(&client_key, &ca.issuer).unwrap();
    let mut server_roots = RootCertStore::empty();
    server_roots.add(server.cert.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(server_roots)
        .with_client_auth_cert(
            vec![client_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let mut client =
        rustls::ClientConnection::new(Arc::new(client_config), "localhost".try_into().unwrap())
            .unwrap();
    let mut server = rustls::ServerConnection::new(configs.stream.clone()).unwrap();
    // In memory: move records until neither side is handshaking (bounded).
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        server.read_tls(&mut buf.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        let mut buf = Vec::new();
        server.write_tls(&mut buf).unwrap();
        client.read_tls(&mut buf.as_slice()).unwrap();
        client.process_new_packets().unwrap();
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    assert_eq!(
        signed.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the handshake was signed by the given signer, once"
    );
    assert!(server.peer_certificates().is_some_and(|c| c.len() == 1));
}

/// A refused certificate's claim is kept for the record only when our CA set issued it
/// (revoked, or only out of its dates), and only when it is plain and short: a
/// self-signed certificate cannot put a name in the audit trail.
#[test]
fn only_a_claim_from_our_ca_is_kept_for_the_record() {
    let ca = Ca::new();
    let m = ca.material();
    let v = verifier(&m, &["44", "45"]);
    let refused_claim = |leaf: &CertificateDer<'_>| {
        let _ = take_refused_identity();
        assert!(v.verify_client_cert(leaf, &[], at(0)).is_err());
        take_refused_identity()
    };
    // Revoked, from our CA: the claim is kept.
    let revoked = ca.client("alice@example.com", 0x44, 7);
    assert_eq!(
        refused_claim(&revoked).as_deref(),
        Some("alice@example.com")
    );
    // Expired, from our CA: kept.
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::Rfc822Name("bob@example.com".try_into().unwrap())];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(3);
    p.not_after = now - Duration::days(1);
    let expired = p
        .signed_by(&KeyPair::generate().unwrap(), &ca.issuer)
        .unwrap()
        .der()
        .clone();
    assert_eq!(refused_claim(&expired).as_deref(), Some("bob@example.com"));
    // Self-signed (or another CA's): anyone could claim alice; nothing is kept.
    let rogue = Ca::new().client("alice@example.com", 0x46, 7);
    assert_eq!(refused_claim(&rogue), None);
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::Rfc822Name("alice@example.com".try_into().unwrap())];
    let self_signed = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
    assert_eq!(refused_claim(self_signed.der()), None);
    // From our CA but long or with bidirectional controls: not kept.
    let long = format!("{}@example.com", "a".repeat(300));
    assert_eq!(refused_claim(&ca.client(&long, 0x45, 7)), None);
    // An accepted certificate leaves nothing behind.
    let _ = take_refused_identity();
    let fine = ca.client("carol@example.com", 0x47, 7);
    assert!(v.verify_client_cert(&fine, &[], at(0)).is_ok());
    assert_eq!(take_refused_identity(), None);
    assert!(!plain_claim("alice\u{202E}moc.elpmaxe@"));
    assert!(plain_claim("spiffe://example.org/ns/web"));
}
