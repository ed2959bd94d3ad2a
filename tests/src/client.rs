//! An mTLS client on tokio-rustls, with the knobs the refusal tests need.
//!
//! A TLS 1.3 client learns of a client-certificate refusal (missing, expired, revoked,
//! unknown CA) only when it next reads: its side of the handshake is over before the
//! server has looked at the certificate. So refusal checks must read, e.g. with
//! [`read_to_end_or_alert`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, WebPkiServerVerifier,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::pki::TestCert;

/// The name the server certificate is verified against when no SNI is sent.
pub const NO_SNI_VERIFY_NAME: &str = "localhost";

/// Default bound on a TCP connect plus TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Default bound on [`read_to_end_or_alert`].
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// How to connect: SNI, client certificate, trust root, protocol versions, ALPN, resumption.
///
/// Built with [`ClientOptions::new`] and the builder methods. The rustls configuration is
/// built once and shared by every connection made with these options (and their clones):
/// rustls resumes a session only under the same configuration.
#[derive(Clone)]
pub struct ClientOptions {
    sni: Option<String>,
    cert: Option<TestCert>,
    ca_pem: String,
    tls12_only: bool,
    alpn: Vec<Vec<u8>>,
    session_store: Option<Arc<dyn ClientSessionStore>>,
    timeout: Duration,
    server_cert_seen: Arc<AtomicBool>,
    config: Arc<OnceLock<Arc<ClientConfig>>>,
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("sni", &self.sni)
            .field("cert", &self.cert)
            .field("tls12_only", &self.tls12_only)
            .field("alpn", &self.alpn)
            .field("session_store", &self.session_store.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ClientOptions {
    /// Options that trust `ca_pem`, send no SNI, present no certificate, offer TLS 1.3 only.
    pub fn new(ca_pem: &str) -> ClientOptions {
        ClientOptions {
            sni: None,
            cert: None,
            ca_pem: ca_pem.to_string(),
            tls12_only: false,
            alpn: Vec::new(),
            session_store: None,
            timeout: CONNECT_TIMEOUT,
            server_cert_seen: Arc::new(AtomicBool::new(false)),
            config: Arc::new(OnceLock::new()),
        }
    }

    /// Forgets the built configuration (the options changed).
    fn changed(mut self) -> Self {
        self.config = Arc::new(OnceLock::new());
        self
    }

    /// The SNI that will be sent, if any.
    pub fn sni_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// Sends `sni` as the server name (and verifies the server certificate against it).
    pub fn sni(mut self, sni: &str) -> Self {
        self.sni = Some(sni.to_string());
        self.changed()
    }

    /// Presents `cert` as the client certificate.
    pub fn cert(mut self, cert: &TestCert) -> Self {
        self.cert = Some(cert.clone());
        self.changed()
    }

    /// Offers TLS 1.2 only.
    pub fn tls12_only(mut self) -> Self {
        self.tls12_only = true;
        self.changed()
    }

    /// Offers these ALPN protocols.
    pub fn alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self.changed()
    }

    /// Offers the framed-datagram ALPN `ztp-dgram` only (see [`DgramSession`]).
    pub fn dgram(self) -> Self {
        self.alpn(&[DGRAM_ALPN])
    }

    /// Keeps session tickets in `store` (see [`new_session_store`]).
    pub fn session_store(mut self, store: Arc<dyn ClientSessionStore>) -> Self {
        self.session_store = Some(store);
        self.changed()
    }

    /// Sets the connect plus handshake bound.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.changed()
    }

    /// Whether any connection made with these options (or clones of them) was shown a
    /// server certificate, i.e. whether the server got as far as sending (and signing
    /// for) its certificate. A refusal "before the server signs anything" leaves this false.
    pub fn server_cert_seen(&self) -> bool {
        self.server_cert_seen.load(Ordering::SeqCst)
    }

    /// The rustls client configuration (built on first use, then shared).
    ///
    /// # Panics
    /// If the CA PEM or the client certificate is unusable.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.get_or_init(|| self.build_config()).clone()
    }

    fn build_config(&self) -> Arc<ClientConfig> {
        crate::install_crypto_provider();
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(cert.expect("CA PEM parses"))
                .expect("CA certificate is acceptable as a root");
        }
        let inner = WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .expect("build server verifier");
        let verifier = Arc::new(RecordingVerifier {
            inner,
            seen: self.server_cert_seen.clone(),
        });
        let versions: &[&'static rustls::SupportedProtocolVersion] = if self.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder = ClientConfig::builder_with_protocol_versions(versions)
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.cert {
            Some(c) => builder
                .with_client_auth_cert(vec![c.cert_der.clone()], c.key_der.clone_key())
                .expect("client certificate and key are usable"),
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = self.sni.is_some();
        config.alpn_protocols = self.alpn.clone();
        if let Some(store) = &self.session_store {
            config.resumption = Resumption::store(store.clone());
        }
        Arc::new(config)
    }
}

/// A fresh in-memory session store to share between connections.
pub fn new_session_store() -> Arc<dyn ClientSessionStore> {
    Arc::new(ClientSessionMemoryCache::new(64))
}

/// Connects to `addr` over TLS 1.3 with SNI `sni` (none if `None`), presenting `cert`
/// (none if `None`) and trusting `ca_pem`.
///
/// Errors are the handshake's: a refusal alert the server sent in the handshake shows up
/// here (see [`alert_of`]); a refusal of the client certificate usually shows up only on
/// the first read.
pub async fn connect(
    addr: SocketAddr,
    sni: Option<&str>,
    cert: Option<&TestCert>,
    ca_pem: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let mut opts = ClientOptions::new(ca_pem);
    if let Some(sni) = sni {
        opts = opts.sni(sni);
    }
    if let Some(cert) = cert {
        opts = opts.cert(cert);
    }
    connect_with(addr, &opts).await
}

/// Connects with full [`ClientOptions`], bounded by `opts.timeout` (an elapsed bound is
/// an `io::ErrorKind::TimedOut` error).
pub async fn connect_with(
    addr: SocketAddr,
    opts: &ClientOptions,
) -> io::Result<TlsStream<TcpStream>> {
    let config = opts.client_config();
    let name = opts
        .sni
        .as_deref()
        .unwrap_or(NO_SNI_VERIFY_NAME)
        .to_string();
    let server_name =
        ServerName::try_from(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fut = async move {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        TlsConnector::from(config).connect(server_name, tcp).await
    };
    match tokio::time::timeout(opts.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "TLS connect to {addr} did not finish within {:?}",
                opts.timeout
            ),
        )),
    }
}

/// Runs the TLS handshake over an already connected `tcp` (so the caller knows its local
/// address even if the handshake fails), bounded by `opts.timeout`.
pub async fn handshake(tcp: TcpStream, opts: &ClientOptions) -> io::Result<TlsStream<TcpStream>> {
    let config = opts.client_config();
    let name = opts
        .sni
        .as_deref()
        .unwrap_or(NO_SNI_VERIFY_NAME)
        .to_string();
    let server_name =
        ServerName::try_from(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    tcp.set_nodelay(true)?;
    match tokio::time::timeout(
        opts.timeout,
        TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("TLS handshake did not finish within {:?}", opts.timeout),
        )),
    }
}

/// The TLS alert the peer sent, if `err` is (or wraps) a received alert.
pub fn alert_of(err: &io::Error) -> Option<AlertDescription> {
    match rustls_error_of(err)? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error_of(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Why [`read_to_end_or_alert`] stopped before a clean end of stream.
#[derive(Debug)]
pub enum ReadError {
    /// The peer sent a fatal alert; `data` is what was read before it.
    Alert {
        /// The alert.
        alert: AlertDescription,
        /// Plaintext read before the alert.
        data: Vec<u8>,
    },
    /// Any other error (reset, EOF without close_notify, timeout); `data` is what was
    /// read before it.
    Io {
        /// The error.
        error: io::Error,
        /// Plaintext read before the error.
        data: Vec<u8>,
    },
}

impl ReadError {
    /// The received alert, if that is what stopped the read.
    pub fn alert(&self) -> Option<AlertDescription> {
        match self {
            ReadError::Alert { alert, .. } => Some(*alert),
            ReadError::Io { .. } => None,
        }
    }

    /// What was read before the error.
    pub fn data(&self) -> &[u8] {
        match self {
            ReadError::Alert { data, .. } | ReadError::Io { data, .. } => data,
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Alert { alert, data } => {
                write!(f, "alert {alert:?} after {} bytes", data.len())
            }
            ReadError::Io { error, data } => {
                write!(
                    f,
                    "I/O error `{error}` ({:?}) after {} bytes",
                    error.kind(),
                    data.len()
                )
            }
        }
    }
}

impl std::error::Error for ReadError {}

/// Reads until a clean end of stream (TLS close_notify then EOF), a received alert, an
/// error, or [`READ_TIMEOUT`].
pub async fn read_to_end_or_alert<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Vec<u8>, ReadError> {
    read_to_end_or_alert_within(stream, READ_TIMEOUT).await
}

/// [`read_to_end_or_alert`] with an explicit bound.
pub async fn read_to_end_or_alert_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    bound: Duration,
) -> Result<Vec<u8>, ReadError> {
    let mut data = Vec::new();
    let deadline = tokio::time::Instant::now() + bound;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return Err(ReadError::Io {
                    error: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no end of stream within {bound:?}"),
                    ),
                    data,
                })
            }
            Ok(Ok(0)) => return Ok(data),
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
            Ok(Err(error)) => {
                return Err(match alert_of(&error) {
                    Some(alert) => ReadError::Alert { alert, data },
                    None => ReadError::Io { error, data },
                })
            }
        }
    }
}

/// Parses a refusal line `ZTP-ERROR <code> <reason>\n` at the start of `bytes`.
///
/// Returns the code and the reason (without the newline); `None` if `bytes` does not
/// start with a complete refusal line.
pub fn parse_ztp_error(bytes: &[u8]) -> Option<(u16, String)> {
    let line_end = bytes.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&bytes[..line_end]).ok()?;
    let rest = line.strip_prefix("ZTP-ERROR ")?;
    let (code, reason) = rest.split_once(' ')?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((code.parse().ok()?, reason.to_string()))
}

/// The raw bytes of the ClientHello a connection with `opts` would start with (at most a
/// few hundred bytes, one TLS record): for tests that send a handshake slowly, or that
/// need realistic TLS first bytes.
///
/// # Panics
/// If the options are unusable (see [`ClientOptions::client_config`]).
pub fn client_hello_bytes(opts: &ClientOptions) -> Vec<u8> {
    let name = opts
        .sni
        .as_deref()
        .unwrap_or(NO_SNI_VERIFY_NAME)
        .to_string();
    let server_name = ServerName::try_from(name).expect("a valid server name");
    let mut conn = rustls::ClientConnection::new(opts.client_config(), server_name)
        .expect("start a client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write to a Vec");
    }
    out
}

// ---------------------------------------------------------------------------------------
// Datagrams over TLS (DESIGN.md "Forwarding": udp, quic, framed datagrams)
// ---------------------------------------------------------------------------------------

/// The ALPN protocol of the framed-datagram extension.
pub const DGRAM_ALPN: &[u8] = b"ztp-dgram";

/// The largest datagram a `ztp-dgram` frame may carry.
pub const MAX_DATAGRAM: usize = 16_384;

/// One spec-mode exchange (udp or quic service, no ALPN): writes `payload` with one
/// `write_all` and a flush (one TLS record for up to 16 KiB), then reads to the end of
/// the stream within `bound`. `Ok` is what came back before a clean end (close_notify,
/// then EOF).
pub async fn datagram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    payload: &[u8],
    bound: Duration,
) -> Result<Vec<u8>, ReadError> {
    let deadline = tokio::time::Instant::now() + bound;
    let write = async {
        stream.write_all(payload).await?;
        stream.flush().await
    };
    match tokio::time::timeout_at(deadline, write).await {
        Err(_) => {
            return Err(ReadError::Io {
                error: io::Error::new(io::ErrorKind::TimedOut, "writing the datagram stalled"),
                data: Vec::new(),
            })
        }
        Ok(Err(error)) => {
            return Err(match alert_of(&error) {
                Some(alert) => ReadError::Alert {
                    alert,
                    data: Vec::new(),
                },
                None => ReadError::Io {
                    error,
                    data: Vec::new(),
                },
            })
        }
        Ok(Ok(())) => {}
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    read_to_end_or_alert_within(stream, left).await
}

/// `payload` as one `ztp-dgram` frame: its length as 2 bytes big-endian, then the bytes.
///
/// Lengths above [`MAX_DATAGRAM`] (up to 65,535) are encoded too, so that tests can send
/// an oversized frame.
///
/// # Panics
/// If `payload` is longer than 65,535 bytes.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("a frame length fits 16 bits");
    let mut out = Vec::with_capacity(2 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// What [`DgramSession::recv`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DgramEvent {
    /// One framed datagram.
    Datagram(Vec<u8>),
    /// An unframed refusal line `ZTP-ERROR <code> <reason>\n` (its first two bytes, `ZT`,
    /// read as a length above [`MAX_DATAGRAM`], so it cannot be mistaken for a frame).
    Refusal {
        /// The code.
        code: u16,
        /// The reason, without the newline.
        reason: String,
    },
    /// A clean end of stream (close_notify, then EOF) at a frame boundary.
    End,
}

/// A `ztp-dgram` session over any stream (normally the TLS stream of a connection that
/// negotiated ALPN `ztp-dgram`): frames datagrams out and unframes them in.
#[derive(Debug)]
pub struct DgramSession<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> DgramSession<S> {
    /// Wraps `stream`.
    pub fn new(stream: S) -> Self {
        DgramSession {
            stream,
            buf: Vec::new(),
        }
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream, mutably (bytes written through it are not framed).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Sends one datagram (one frame), then flushes.
    pub async fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send_raw(&encode_frame(payload)).await
    }

    /// Sends every datagram (frames back to back), with one flush at the end.
    pub async fn send_batch<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> io::Result<()> {
        let mut bytes = Vec::new();
        for p in payloads {
            bytes.extend_from_slice(&encode_frame(p.as_ref()));
        }
        self.send_raw(&bytes).await
    }

    /// Writes `bytes` as they are (no framing), then flushes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Ends the client's side: close_notify (and the TCP write side).
    pub async fn close(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// Reads the next datagram, refusal line or clean end, within `bound`.
    ///
    /// A frame header above [`MAX_DATAGRAM`] that is not the start of a refusal line, or
    /// an end of stream inside a frame, is an `InvalidData`/`UnexpectedEof` error; what
    /// was buffered is in the error's `data`.
    pub async fn recv(&mut self, bound: Duration) -> Result<DgramEvent, ReadError> {
        let deadline = tokio::time::Instant::now() + bound;
        let mut chunk = vec![0u8; 32 * 1024];
        loop {
            if let Some(ev) = self.take_buffered()? {
                return Ok(ev);
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => {
                    return Err(ReadError::Io {
                        error: io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no datagram or end within {bound:?}"),
                        ),
                        data: std::mem::take(&mut self.buf),
                    })
                }
                Ok(Ok(0)) => {
                    return if self.buf.is_empty() {
                        Ok(DgramEvent::End)
                    } else {
                        Err(ReadError::Io {
                            error: io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "clean end of stream inside a frame",
                            ),
                            data: std::mem::take(&mut self.buf),
                        })
                    };
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(error)) => {
                    let data = std::mem::take(&mut self.buf);
                    return Err(match alert_of(&error) {
                        Some(alert) => ReadError::Alert { alert, data },
                        None => ReadError::Io { error, data },
                    });
                }
            }
        }
    }

    /// Reads `n` datagrams (each within `bound`); anything else is an error naming how
    /// many arrived.
    pub async fn recv_datagrams(
        &mut self,
        n: usize,
        bound: Duration,
    ) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.recv(bound).await {
                Ok(DgramEvent::Datagram(d)) => out.push(d),
                Ok(other) => {
                    return Err(format!("after {} of {n} datagrams: {other:?}", out.len()))
                }
                Err(e) => return Err(format!("after {} of {n} datagrams: {e}", out.len())),
            }
        }
        Ok(out)
    }

    fn take_buffered(&mut self) -> Result<Option<DgramEvent>, ReadError> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        if self.buf.starts_with(b"ZT") {
            let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
                return Ok(None);
            };
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            return match parse_ztp_error(&line) {
                Some((code, reason)) => Ok(Some(DgramEvent::Refusal { code, reason })),
                None => Err(ReadError::Io {
                    error: io::Error::new(io::ErrorKind::InvalidData, "not a refusal line"),
                    data: line,
                }),
            };
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if len > MAX_DATAGRAM {
            return Err(ReadError::Io {
                error: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the server sent a frame of {len} bytes (max {MAX_DATAGRAM})"),
                ),
                data: std::mem::take(&mut self.buf),
            });
        }
        if self.buf.len() < 2 + len {
            return Ok(None);
        }
        let frame: Vec<u8> = self.buf.drain(..2 + len).skip(2).collect();
        Ok(Some(DgramEvent::Datagram(frame)))
    }
}

/// Wraps the WebPKI verifier and records that a server certificate was presented.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<AtomicBool>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.seen.store(true, Ordering::SeqCst);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use super::{encode_frame, parse_ztp_error, DgramEvent, DgramSession};
    use std::time::Duration;

    #[tokio::test]
    async fn dgram_session_unframes_datagrams_refusals_and_the_end() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut session = DgramSession::new(client);
        let mut wire = Vec::new();
        wire.extend(encode_frame(b""));
        wire.extend(encode_frame(&[7u8; 16_384]));
        wire.extend(encode_frame(b"ab"));
        wire.extend_from_slice(b"ZTP-ERROR 403 forbidden\n");
        use tokio::io::AsyncWriteExt;
        // Written in awkward pieces.
        for piece in wire.chunks(3) {
            server.write_all(piece).await.unwrap();
        }
        drop(server);
        let t = Duration::from_secs(5);
        assert_eq!(session.recv(t).await.unwrap(), DgramEvent::Datagram(vec![]));
        assert_eq!(
            session.recv(t).await.unwrap(),
            DgramEvent::Datagram(vec![7u8; 16_384])
        );
        assert_eq!(
            session.recv(t).await.unwrap(),
            DgramEvent::Datagram(b"ab".to_vec())
        );
        assert_eq!(
            session.recv(t).await.unwrap(),
            DgramEvent::Refusal {
                code: 403,
                reason: "forbidden".into()
            }
        );
        assert_eq!(session.recv(t).await.unwrap(), DgramEvent::End);
        assert_eq!(encode_frame(b"xyz"), [0, 3, b'x', b'y', b'z']);
    }

    #[test]
    fn parses_refusal_lines() {
        assert_eq!(
            parse_ztp_error(b"ZTP-ERROR 403 forbidden\n"),
            Some((403, "forbidden".to_string()))
        );
        assert_eq!(
            parse_ztp_error(b"ZTP-ERROR 504 gateway timeout\nrest"),
            Some((504, "gateway timeout".to_string()))
        );
        assert_eq!(parse_ztp_error(b"ZTP-ERROR 403 forbidden"), None);
        assert_eq!(parse_ztp_error(b"hello\n"), None);
        assert_eq!(parse_ztp_error(b"ZTP-ERROR 40x nope\n"), None);
    }
}
