//! The TLS gate: TLS 1.3 only, SNI decided on the ClientHello, client certificates
//! verified against the CA set and the snapshot's revoked serials.
//!
//! Server configs are built once per snapshot (the revoked set lives in the verifier)
//! and once per load of the key material, never per connection. The server's key is held
//! as a [`CertifiedKey`], behind rustls's signer traits, so keyless signing can replace it
//! without touching the gate.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ProducesTickets, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};
use ztp_proto::names::Serial;

pub use ztp_infra::tls::{provider, TlsError};

/// Paths of the node's own TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: KeySource,
    pub client_ca: PathBuf,
}

/// Where the server certificate's private key is.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A PEM file: the key is in this process.
    File(PathBuf),
    /// On key servers (`--key keyless://…`): this process never holds it. The pool of
    /// connections is started by the first load and kept across reloads.
    Keyless {
        files: crate::keyless::KeylessFiles,
        pool: Arc<std::sync::Mutex<Option<Arc<crate::keyless::Pool>>>>,
    },
}

impl KeySource {
    pub fn keyless(files: crate::keyless::KeylessFiles) -> KeySource {
        KeySource::Keyless {
            files,
            pool: Arc::default(),
        }
    }
}

/// The node's certificate, key and client CA set, loaded and checked.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    certified: Arc<CertifiedKey>,
    /// With a keyless key: the resolver that names each handshake's SNI to the key
    /// server.
    keyless: Option<Arc<crate::keyless::Resolver>>,
    roots: Arc<RootCertStore>,
    /// Chains this CA set has vouched for; lives and dies with the CA set.
    chains: Arc<ChainCache>,
}

/// Client chains the CA set has already vouched for, by their exact bytes.
///
/// A CA's signature over the same bytes verifies the same way every time, so a returning
/// client's handshake checks one signature (its CertificateVerify, which proves it holds
/// the key and can never be cached) instead of two. Everything that can change is still
/// checked on every handshake: the validity dates against the clock, and the revoked
/// serials. A new CA set (a reload) starts with an empty cache.
#[derive(Debug, Default)]
pub struct ChainCache {
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], Vetted>>,
}

/// What a verified chain's bytes say, read once: when every certificate of it is valid
/// (seconds since the epoch), and the leaf's serial for the revoked list.
#[derive(Debug, Clone)]
struct Vetted {
    not_before: u64,
    not_after: u64,
    serial: Serial,
}

impl Vetted {
    fn read(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Vetted, rustls::Error> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        fn parse(der: &[u8]) -> Result<X509Certificate<'_>, rustls::Error> {
            X509Certificate::from_der(der)
                .map(|(_, c)| c)
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
        }
        let leaf = parse(end_entity)?;
        let raw = leaf.raw_serial();
        // A serial longer than RFC 5280's 20 octets could never be named in `revoked`:
        // such a certificate is refused rather than unrevocable.
        if raw.iter().skip_while(|b| **b == 0).count() > Serial::MAX_LEN {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(SerialTooLong)),
            )));
        }
        let mut v = Vetted {
            not_before: 0,
            not_after: u64::MAX,
            serial: Serial::from_be_bytes(raw),
        };
        let mut widen = |c: &X509Certificate<'_>| {
            let validity = c.validity();
            let nb = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
            let na = u64::try_from(validity.not_after.timestamp()).unwrap_or(0);
            v.not_before = v.not_before.max(nb);
            v.not_after = v.not_after.min(na);
        };
        widen(&leaf);
        for cert in intermediates {
            widen(&parse(cert)?);
        }
        Ok(v)
    }
}

impl ChainCache {
    /// Entries kept; when full the cache starts over (bounded memory, ~100 B an entry).
    const MAX: usize = 16_384;

    fn key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for cert in std::iter::once(end_entity).chain(intermediates) {
            ctx.update(&(cert.len() as u64).to_be_bytes());
            ctx.update(cert);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    /// The leaf's serial, if this exact chain was verified before and is within its
    /// dates at `now`.
    fn vouched(&self, key: &[u8; 32], now: UnixTime) -> Option<Serial> {
        let now = now.as_secs();
        let map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|v| v.not_before <= now && now <= v.not_after)
            .map(|v| v.serial.clone())
    }

    fn remember(&self, key: [u8; 32], vetted: Vetted) {
        let mut map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(key, vetted);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.verified.lock().unwrap().len()
    }
}

impl TlsMaterial {
    /// Loads PEM files: the server chain (leaf first), its key (PKCS#8, PKCS#1 or SEC1),
    /// and one or more CA certificates for clients.
    pub fn load(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let roots = ztp_infra::tls::read_roots(&files.client_ca)?;
        match &files.key {
            KeySource::File(key) => {
                let certified = ztp_infra::tls::certified_key(&files.cert, key, provider)?;
                Ok(Self::from_parts(certified, roots))
            }
            KeySource::Keyless { files: k, pool } => {
                let chain = ztp_infra::tls::read_certs(&files.cert)?;
                let leaf = chain.first().ok_or_else(|| {
                    TlsError::Config(format!("{}: no certificate", files.cert.display()))
                })?;
                let pool = {
                    let mut started = pool.lock().unwrap_or_else(|p| p.into_inner());
                    match started.as_ref() {
                        Some(p) => p.clone(),
                        None => {
                            let tls = crate::keyless::client_config(k, provider)?;
                            let p = crate::keyless::Pool::start(k.servers.clone(), tls)
                                .map_err(|e| TlsError::Config(format!("keyless pool: {e}")))?;
                            *started = Some(p.clone());
                            p
                        }
                    }
                };
                let key = crate::keyless::RemoteKey::new(leaf, pool)
                    .map_err(|e| TlsError::Config(format!("{}: {e}", files.cert.display())))?;
                let resolver = Arc::new(crate::keyless::Resolver::new(chain, key));
                let mut m = Self::from_parts(resolver.certified(None), roots);
                m.keyless = Some(resolver);
                Ok(m)
            }
        }
    }

    /// The server's certificate with its signing key, and the client CA set. The key is
    /// a rustls [`SigningKey`](rustls::sign::SigningKey): a local key, or a remote
    /// signer that holds the private key elsewhere (keyless).
    pub fn from_parts(certified: Arc<CertifiedKey>, roots: RootCertStore) -> Self {
        TlsMaterial {
            certified,
            keyless: None,
            roots: Arc::new(roots),
            chains: Arc::default(),
        }
    }
}

/// Everything the gate needs for one snapshot: built once, shared by every connection.
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    /// For stream services, and clients that do not ask for framed datagrams: selects
    /// no ALPN, so whatever a client offers is ignored, never fatal.
    pub stream: Arc<ServerConfig>,
    /// For a client offering ALPN `ztp-dgram` to a udp or quic service.
    pub dgram: Arc<ServerConfig>,
    /// For a connector's tunnel over TCP (ALPN `ztp-tunnel/1`), which it dials by the
    /// replica's name, not a service's: no resumption (each tunnel is judged on its
    /// full chain).
    pub tunnel: Arc<ServerConfig>,
    /// The same verifier the configs use, to re-check a resumed session's chain.
    pub verifier: Arc<ClientVerifier>,
    /// The server's certificate and signer, and the provider: the QUIC listener builds
    /// its configs from them (see `quic::config`).
    pub certified: Arc<CertifiedKey>,
    pub provider: Arc<CryptoProvider>,
    /// The key is on key servers: a handshake's first flight (which rustls signs
    /// synchronously) runs off the async workers (see [`complete`]).
    pub offload: bool,
    /// With a key on key servers: the certificate and key for a handshake naming an SNI
    /// (the QUIC listener resolves its own).
    pub keyless: Option<Arc<crate::keyless::Resolver>>,
}

/// Session resumption for all configs, so that it survives snapshot swaps (each resumed
/// session is decided afresh anyway): stateless TLS 1.3 tickets, encrypted under keys
/// that rotate every 6 hours and never leave the process. The server keeps nothing per
/// session (a cache of 1,024 sessions held ~1 MiB for nothing while idle).
pub fn session_cache() -> Arc<dyn ProducesTickets> {
    rustls::crypto::ring::Ticketer::new().expect("the ring ticketer")
}

impl TlsConfigs {
    pub fn build(
        material: &TlsMaterial,
        revoked: Arc<HashSet<Serial>>,
        sessions: Arc<dyn ProducesTickets>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let webpki =
            WebPkiClientVerifier::builder_with_provider(material.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let verifier = Arc::new(ClientVerifier {
            webpki,
            revoked,
            chains: material.chains.clone(),
        });
        let mut stream = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(match &material.keyless {
                Some(r) => r.clone() as Arc<dyn rustls::server::ResolvesServerCert>,
                None => Arc::new(SingleCertAndKey::from(material.certified.clone())),
            });
        stream.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        stream.ticketer = sessions;
        let mut dgram = stream.clone();
        dgram.alpn_protocols = vec![crate::handler::DGRAM_ALPN.to_vec()];
        let mut tunnel = stream.clone();
        tunnel.alpn_protocols = vec![ztp_proto::tunnel::ALPN.to_vec()];
        tunnel.send_tls13_tickets = 0;
        Ok(TlsConfigs {
            stream: Arc::new(stream),
            dgram: Arc::new(dgram),
            tunnel: Arc::new(tunnel),
            verifier,
            certified: material.certified.clone(),
            provider,
            offload: material.keyless.is_some(),
            keyless: material.keyless.clone(),
        })
    }
}

/// WebPKI chain verification (CA set, validity, key usage), then the snapshot's revoked
/// serials. A revoked certificate gets the `certificate_revoked` alert.
pub struct ClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    revoked: Arc<HashSet<Serial>>,
    chains: Arc<ChainCache>,
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

#[derive(Debug)]
struct SerialTooLong;

impl fmt::Display for SerialTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serial number longer than {} octets (it could not be revoked)",
            Serial::MAX_LEN
        )
    }
}

impl std::error::Error for SerialTooLong {}

impl ClientVerifier {
    /// Whether a chain refused with `e` was nonetheless issued by the client CA set.
    fn issued_by_us(
        &self,
        e: &rustls::Error,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> bool {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Revoked) => true,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => {
                // Valid at the last second of its validity: only the date was wrong.
                let Ok(v) = Vetted::read(end_entity, intermediates) else {
                    return false;
                };
                let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(v.not_after));
                self.webpki
                    .verify_client_cert(end_entity, intermediates, at)
                    .is_ok()
            }
            _ => false,
        }
    }

    pub(crate) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = ChainCache::key(end_entity, intermediates);
        let serial = match self.chains.vouched(&key, now) {
            Some(serial) => serial,
            None => {
                self.webpki
                    .verify_client_cert(end_entity, intermediates, now)?;
                let vetted = Vetted::read(end_entity, intermediates)?;
                let serial = vetted.serial.clone();
                self.chains.remember(key, vetted);
                serial
            }
        };
        // Only the leaf is checked: serials are unique per issuer, and the revoked list
        // names client certificates.
        if self.revoked.contains(&serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }
}

thread_local! {
    /// The identity a certificate refused by [`ClientVerifier`] claims, for the
    /// connection's record. Set and taken within one poll of that connection's handshake
    /// (rustls verifies inside it, on the polling thread); see [`take_refused_identity`].
    static REFUSED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Longest claimed identity kept for the record: a claim is not proven, and the audit
/// trail must not be a place to park large or misleading strings.
const MAX_CLAIM: usize = 256;

fn note_refused(end_entity: &CertificateDer<'_>) {
    let claimed = crate::identity::extract(end_entity)
        .ok()
        .map(|i| i.id)
        .filter(|id| plain_claim(id));
    REFUSED.with(|r| *r.borrow_mut() = claimed);
}

/// A claim fit for the record: short, and free of characters that reorder or hide text
/// (bidirectional controls, zero-width characters) as well as control characters.
fn plain_claim(id: &str) -> bool {
    id.len() <= MAX_CLAIM
        && !id.chars().any(|c| {
            c.is_control()
                || matches!(c,
                    '\u{200B}'..='\u{200F}'
                    | '\u{202A}'..='\u{202E}'
                    | '\u{2060}'..='\u{2069}'
                    | '\u{FEFF}')
        })
}

/// What the last certificate refused on this thread claimed to be, taken. A caller
/// takes (and drops) it before polling a handshake and takes it again right after the
/// poll: what it finds then was refused in that poll, for that connection.
pub fn take_refused_identity() -> Option<String> {
    REFUSED.with(|r| r.borrow_mut().take())
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verdict = self.verify(end_entity, intermediates, now);
        if let Err(e) = &verdict {
            // Only a certificate our CA set issued names anyone worth recording: one
            // refused for its revocation (its chain verified first) or only for its
            // dates. A self-signed or foreign one could claim any name.
            if self.issued_by_us(e, end_entity, intermediates) {
                note_refused(end_entity);
            }
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// What went wrong in the handshake stage (logged; the client sees an alert or a close).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake timed out")]
    Timeout,
    #[error("bad client hello: {0}")]
    Hello(std::io::Error),
    #[error("handshake failed: {0}")]
    Tls(std::io::Error),
}

impl HandshakeError {
    /// A short constant reason for the connection record, the audit trail and the
    /// `ztp_handshake_failures_total{reason}` label: one of [`HANDSHAKE_REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Timeout => "handshake timeout",
            HandshakeError::Hello(_) => "bad client hello",
            HandshakeError::Tls(e) => e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .map_or("handshake failed", tls_reason),
        }
    }
}

/// Every reason [`HandshakeError::reason`] can give. A metric label: the set stays small
/// and fixed, whatever a client sends.
pub const HANDSHAKE_REASONS: &[&str] = &[
    "handshake timeout",
    "bad client hello",
    "certificate revoked",
    "certificate expired",
    "unknown ca",
    "no client certificate",
    "no application protocol",
    "protocol version",
    "no shared cipher suite",
    "no shared group",
    "no shared signature scheme",
    "incompatible client",
    "protocol violation",
    "handshake failed",
];

/// Names the cause of a handshake the server's rustls ended. Incompatibilities are told
/// apart: a client that offers only TLS 1.2 is not one whose TLS 1.3 offer shares no
/// cipher suite, key-exchange group or signature scheme with the gate.
pub fn tls_reason(e: &rustls::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E, PeerIncompatible as P};
    match e {
        E::InvalidCertificate(C::Revoked) => "certificate revoked",
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "certificate expired",
        E::InvalidCertificate(C::UnknownIssuer) => "unknown ca",
        E::NoCertificatesPresented => "no client certificate",
        // QUIC requires ALPN `ztp/1`.
        E::NoApplicationProtocol => "no application protocol",
        E::PeerIncompatible(p) => match p {
            // No TLS 1.3 offered (with or without a supported_versions extension).
            P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::SupportedVersionsExtensionRequired
            | P::Tls13RequiredForQuic
            | P::ServerDoesNotSupportTls12Or13
            | P::ServerTlsVersionIsDisabledByOurConfig => "protocol version",
            P::NoCipherSuitesInCommon => "no shared cipher suite",
            P::NoKxGroupsInCommon
            | P::KeyShareExtensionRequired
            | P::NamedGroupsExtensionRequired
            | P::EcPointsExtensionRequired
            | P::NoEcPointFormatsInCommon
            | P::UncompressedEcPointsRequired => "no shared group",
            P::NoSignatureSchemesInCommon
            | P::SignatureAlgorithmsExtensionRequired
            | P::NoCertificateRequestSignatureSchemesInCommon => "no shared signature scheme",
            // Compression, extended master secret, certificate types, ECH, and whatever a
            // later rustls adds.
            _ => "incompatible client",
        },
        // A client that broke the protocol (duplicate extensions, a bad binder, a
        // second ClientHello that ignores the retry request, ...), not an incompatible one.
        E::PeerMisbehaved(_) => "protocol violation",
        _ => "handshake failed",
    }
}

/// Reads the ClientHello, before any key is used.
pub async fn read_hello(tcp: TcpStream) -> Result<StartHandshake<TcpStream>, HandshakeError> {
    LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(HandshakeError::Hello)
}

/// Fatal alerts the gate sends itself, in plaintext, before a ServerHello.
#[derive(Debug, Clone, Copy)]
pub enum HelloAlert {
    /// No SNI: RFC 8446 §9.2 `missing_extension`.
    MissingExtension = 109,
    /// SNI that names no service (or one this source may not reach).
    UnrecognizedName = 112,
}

/// Refuses at the ClientHello: one alert record, then close. Nothing was signed.
pub async fn refuse_hello(mut tcp: TcpStream, alert: HelloAlert) {
    // TLSPlaintext { type: alert(21), legacy_version: 0x0303, length: 2,
    //                fragment: { level: fatal(2), description } }
    let record = [21, 3, 3, 0, 2, 2, alert as u8];
    let _ = tcp.write_all(&record).await;
    let _ = tcp.shutdown().await;
}

/// Completes the handshake with the config chosen for this ClientHello. With `offload`
/// (a keyless key), the step that processes the ClientHello and signs runs on tokio's
/// blocking pool: it waits for a key server, and must not hold an async worker. That
/// thread also sends the server's flight it produced (one poll of the handshake), so
/// the client does not wait for a worker to wake up to get it; the worker polls the
/// handshake on from there.
pub async fn complete(
    start: StartHandshake<TcpStream>,
    config: Arc<ServerConfig>,
    offload: bool,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    if !offload {
        return start.into_stream(config).await.map_err(HandshakeError::Tls);
    }
    let first = tokio::task::spawn_blocking(move || {
        let mut accept = start.into_stream(config);
        // The flight goes out now; a pending handshake registers the worker's waker
        // when it is polled next.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::future::Future::poll(std::pin::Pin::new(&mut accept), &mut cx) {
            std::task::Poll::Pending => FirstStep::Going(Box::new(accept)),
            std::task::Poll::Ready(ended) => FirstStep::Ended(Box::new(ended)),
        }
    })
    .await
    .map_err(|e| HandshakeError::Tls(std::io::Error::other(e)))?;
    match first {
        FirstStep::Going(accept) => (*accept).await,
        FirstStep::Ended(ended) => *ended,
    }
    .map_err(HandshakeError::Tls)
}

/// A keyless handshake after its step on the blocking pool (see [`complete`]).
enum FirstStep {
    /// The server's flight is out; the handshake goes on.
    Going(Box<tokio_rustls::Accept<TcpStream>>),
    /// It ended already (an error, as a rule).
    Ended(Box<std::io::Result<TlsStream<TcpStream>>>),
}

/// The verified client chain, leaf first.
pub fn peer_chain(tls: &TlsStream<TcpStream>) -> &[CertificateDer<'static>] {
    tls.get_ref().1.peer_certificates().unwrap_or(&[])
}

/// Verifies the client's chain again, against the current CA set, clock and revoked
/// serials: always for a resumed session (its chain was verified when it was first
/// established), and for a full handshake when `stale` (the state changed since its
/// ClientHello).
pub fn recheck_chain(
    tls: &TlsStream<TcpStream>,
    verifier: &ClientVerifier,
    stale: bool,
) -> Result<(), rustls::Error> {
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if !resumed && !stale {
        return Ok(());
    }
    let chain = peer_chain(tls);
    let (leaf, rest) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    // The inherent check: a re-check notes no claim (the client proved its key).
    verifier.verify(leaf, rest, UnixTime::now()).map(|_| ())
}

/// Verifies a client chain (leaf first) again against the current CA set, clock and
/// revoked serials, for a transport that does not resume sessions (QUIC) when the state
/// changed since its handshake.
pub fn recheck(
    chain: &[CertificateDer<'_>],
    verifier: &ClientVerifier,
) -> Result<(), rustls::Error> {
    let (leaf, rest) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    verifier.verify(leaf, rest, UnixTime::now()).map(|_| ())
}

#[cfg(test)]
mod tests;

/// TLS material for unit tests: one self-signed certificate as server and CA.
#[cfg(test)]
pub(crate) fn test_material() -> TlsMaterial {
    let dir = std::env::temp_dir().join(format!(
        "ztp-tls-material-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("c.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.join("k.pem"), ca.signing_key.serialize_pem()).unwrap();
    let files = crate::tls::TlsFiles {
        cert: dir.join("c.pem"),
        key: crate::tls::KeySource::File(dir.join("k.pem")),
        client_ca: dir.join("c.pem"),
    };
    let m = crate::tls::TlsMaterial::load(&files, &crate::tls::provider()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    m
}
