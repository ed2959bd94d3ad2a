//! `ztpctl connect SERVICE --via HOST:9743`: the client side of the ZTP wire protocol.
//!
//! Three ways to carry a local program's bytes to a service:
//! - standard input and output (for `ssh -o ProxyCommand='ztpctl connect %h --via …'`);
//! - `--listen 127.0.0.1:PORT`: a local TCP port;
//! - `--udp-listen 127.0.0.1:PORT`: a local UDP port, one flow (or session) per local
//!   peer, closed when idle.
//!
//! Two transports reach the gateway (`--transport`), on the same HOST:PORT:
//! - `quic` (DESIGN.md, "QUIC transport"): QUIC v1 over UDP, ALPN `ztp/1`. A session of a
//!   tcp service is one bidirectional stream, and the local side's end of input is passed
//!   on as the stream's FIN (half-close). Local UDP peers are flows of QUIC DATAGRAM frames,
//!   each a varint flow id and one datagram. In the listening modes every local connection
//!   or peer shares ONE QUIC connection (no handshake per local connection); when it dies,
//!   the next local connection or datagram opens a new one.
//! - `tcp`: TLS 1.3 over TCP, one connection per session; local UDP peers get one
//!   connection each, carrying framed datagrams (ALPN `ztp-dgram`).
//! - `auto` (the default): QUIC at once, TCP 250 ms later unless QUIC has already been
//!   established; the first established wins, the other attempt is dropped, and the winner
//!   is kept for the rest of the process (later local connections do not race again).
//!   QUIC counts as established only once the gateway has confirmed the handshake
//!   (HANDSHAKE_DONE, which it sends after it accepted the client certificate); TCP as soon
//!   as its TLS handshake completed. A refusal from either ends the race with that refusal.
//!   When both fail, the most telling error is reported: a refusal, then a close before the
//!   handshake, then both failures to reach the gateway. After TCP failed, QUIC is given at
//!   most 3 s more.
//!
//! A refusal from the gateway (a TLS alert, a `ZTP-ERROR` line, or over QUIC a close
//! carrying that line) becomes one clear message and a non-zero exit (stdio mode) or a
//! logged line (listening modes).
//!
//! What the client can and cannot know about why a session ended (DESIGN.md, Refusals):
//! - a certificate refused at the handshake (revoked, expired, unknown CA…): the gateway's
//!   TLS alert, named (over QUIC it arrives as a CONNECTION_CLOSE with the alert as a
//!   crypto error);
//! - a session refused before anything was forwarded (no user, user disabled, not in the
//!   groups; also a revocation or group change that lands before the first byte): the
//!   `ZTP-ERROR` line (over QUIC, the close's reason);
//! - a connection the gateway closes before the handshake (shedding load, or refusing new
//!   connections while its snapshot is too old under `--max-snapshot-age`): said so;
//! - a tcp service whose backend cannot be reached: the `ZTP-ERROR 502`/`504` line, on
//!   that stream only over QUIC; a backend connection that breaks in the middle resets the
//!   QUIC stream, which is reported as an error (TCP just ends);
//! - over TCP, a live session that the gateway ends after data was forwarded gets
//!   close_notify, exactly as a normal end of the service's stream: a revocation or group
//!   change then cannot be told apart from the service closing, and the session ends with
//!   exit 0. Over QUIC the gateway closes the connection with the `ZTP-ERROR 403` line even
//!   then, so the session ends with that line and a non-zero exit; a close with code 0 (the
//!   gateway draining) is a normal end. On either transport the one cause the client can
//!   see on its own is the expiry of its own certificate, which the gateway enforces on
//!   live sessions: when a session ends (in any way) after the certificate's notAfter, that
//!   is the message, with a non-zero exit.
//!
//! A limit of QUIC: a stream the client opens is invisible to the gateway until the
//! client sends its first byte (quinn sends nothing for an opened stream before that), so
//! a service that speaks first and whose clients wait for it (SMTP, POP3, MySQL) cannot
//! greet over a QUIC stream. Under `auto`, a session whose program has sent nothing
//! within 250 ms is therefore carried over TCP instead (nothing was sent, so the service
//! cannot tell); with `--transport quic` it waits for the program's first byte. (SSH is
//! not such a service: both sides send their banner at once.)

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use rustls::pki_types::ServerName;
use rustls::sign::SingleCertAndKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use ztp_proto::framing::{encode, Decoder, MAX_FRAME};

mod quic;
#[cfg(test)]
mod tests;

const DGRAM_ALPN: &[u8] = b"ztp-dgram";
/// Local UDP peers served at once (sessions over TCP, flows over QUIC).
const MAX_UDP_SESSIONS: usize = 1024;
/// How long `auto` lets QUIC go first before it starts TCP too.
const TCP_DELAY: Duration = Duration::from_millis(250);
/// How long `auto` still waits for QUIC once TCP has failed without a refusal.
const QUIC_GRACE_AFTER_TCP: Duration = Duration::from_secs(3);
/// Under `auto`, how long a session over QUIC waits for the program's first byte before
/// it is carried over TCP instead: QUIC opens a stream with its first byte, so a program
/// that waits for the service to speak first (SMTP, MySQL) would otherwise wait forever.
const SILENT_FALLBACK: Duration = Duration::from_millis(250);

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The service (its SNI name), e.g. ssh.svc.internal.
    pub service: String,
    /// The gateway, HOST:PORT (env ZTP_VIA, or `via` in the config file); QUIC uses the
    /// same port, over UDP.
    #[arg(long)]
    pub via: Option<String>,
    /// Your certificate (PEM; env ZTP_CERT, or `cert` in the config file).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Your key (PEM; env ZTP_KEY, or `key`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The CA that signed the gateway's certificate (PEM; env ZTP_CA, or `ca`).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Serve a local TCP port instead of standard input and output.
    #[arg(long, value_name = "ADDR", conflicts_with = "udp_listen")]
    pub listen: Option<SocketAddr>,
    /// Serve a local UDP port, carried as QUIC datagrams (or framed datagrams over TCP).
    #[arg(long, value_name = "ADDR")]
    pub udp_listen: Option<SocketAddr>,
    /// A UDP flow (or session) with nothing moving for this long is closed.
    #[arg(long, default_value = "60s", value_parser = ztp_proto::parse_duration)]
    pub udp_idle: Duration,
    /// How to reach the gateway: quic (UDP), tcp, or auto (QUIC first, TCP 250 ms later;
    /// the first established is kept).
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    pub transport: Transport,
}

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// QUIC first, TCP 250 ms later; the first established wins.
    Auto,
    /// QUIC only (UDP, the same port as --via).
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        })
    }
}

/// Why the gateway refused, in words.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the gateway refused the connection: {0}")]
    Line(String),
    #[error("the gateway refused the handshake: {0}")]
    Alert(String),
    /// The connection ended (or was reset, or over QUIC refused) before the gateway
    /// answered the ClientHello.
    #[error(
        "the gateway closed the connection before the TLS handshake (it may be shedding load \
         or refusing new connections)"
    )]
    ClosedBeforeHandshake,
    /// The session ended after the client's own certificate expired.
    #[error("your certificate expired at {0} (the gateway ends sessions when it does); renew it")]
    CertificateExpired(String),
}

/// The transport a connection to the gateway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Quic,
}

/// An established way to the gateway, for one session (TCP) or shared (QUIC).
enum Link {
    Tcp(Box<TlsStream<TcpStream>>),
    Quic(quinn::Connection),
}

/// What the client keeps between sessions.
struct Shared {
    /// The transport in use: the flag's, or `auto`'s winner once there is one.
    kind: Option<Kind>,
    /// The QUIC connection the sessions share.
    conn: Option<quinn::Connection>,
}

struct Client {
    tls: TlsConnector,
    quic: quic::Dialer,
    via: String,
    server_name: ServerName<'static>,
    /// The client certificate's notAfter (Unix seconds) and its text, if it parses.
    not_after: Option<(i64, String)>,
    shared: tokio::sync::Mutex<Shared>,
    /// `--transport auto`: a session may still go over TCP (see [`SILENT_FALLBACK`]).
    auto: bool,
}

impl Client {
    fn new(
        args: &ConnectArgs,
        s: &crate::settings::Settings,
        alpn: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        let need = |v: Option<PathBuf>, flag: &str, env: &str| {
            v.with_context(|| {
                format!(
                    "{flag} FILE is required (or {env}, or `{}` in the config file)",
                    &flag[2..]
                )
            })
        };
        // `s` holds the flags, then the environment, then the config file.
        let cert = need(s.cert.clone(), "--cert", "ZTP_CERT")?;
        let key = need(s.key.clone(), "--key", "ZTP_KEY")?;
        let ca = need(s.ca.clone(), "--ca", "ZTP_CA")?;
        let via = s
            .via
            .clone()
            .context("--via HOST:PORT is required (or ZTP_VIA, or `via` in the config file)")?;
        let roots = ztp_infra::tls::read_roots(&ca)?;
        let provider = ztp_infra::tls::provider();
        let certified = ztp_infra::tls::certified_key(&cert, &key, &provider)?;
        let not_after = certified.cert.first().and_then(|der| not_after(der));
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        Client::from_parts(config, &args.service, via, args.transport, alpn, not_after)
    }

    /// A client from its TLS configuration (certificate and roots; no ALPN yet).
    fn from_parts(
        config: rustls::ClientConfig,
        service: &str,
        via: String,
        transport: Transport,
        alpn: Option<&[u8]>,
        not_after: Option<(i64, String)>,
    ) -> anyhow::Result<Self> {
        let server_name = ServerName::try_from(service.to_owned())
            .with_context(|| format!("{service:?} is not a service name"))?;
        let quic = quic::Dialer::new(config.clone(), service)?;
        let mut config = config;
        if let Some(a) = alpn {
            config.alpn_protocols = vec![a.to_vec()];
        }
        let kind = match transport {
            Transport::Auto => None,
            Transport::Quic => Some(Kind::Quic),
            Transport::Tcp => Some(Kind::Tcp),
        };
        Ok(Client {
            tls: TlsConnector::from(Arc::new(config)),
            quic,
            via,
            server_name,
            not_after,
            shared: tokio::sync::Mutex::new(Shared { kind, conn: None }),
            auto: transport == Transport::Auto,
        })
    }

    async fn connect_tcp(&self) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(&self.via)
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.via))?;
        let _ = tcp.set_nodelay(true);
        self.tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                if closed_early(&e) {
                    return Refused::ClosedBeforeHandshake.into();
                }
                explain(&e).unwrap_or_else(|| anyhow::anyhow!("TLS with the gateway failed: {e}"))
            })
    }

    /// The transport in use, if it is known yet.
    async fn kind(&self) -> Option<Kind> {
        self.shared.lock().await.kind
    }

    /// A way to the gateway for one session: a new TCP connection, or the shared QUIC
    /// connection (opened again if it died). Under `auto`, the first call races the two
    /// and the winner is kept; a race that both lose is run again next time.
    async fn link(&self) -> anyhow::Result<Link> {
        let mut shared = self.shared.lock().await;
        match shared.kind {
            Some(Kind::Tcp) => {
                drop(shared);
                Ok(Link::Tcp(Box::new(self.connect_tcp().await?)))
            }
            Some(Kind::Quic) => {
                if let Some(c) = shared.conn.as_ref().filter(|c| c.close_reason().is_none()) {
                    return Ok(Link::Quic(c.clone()));
                }
                shared.conn = None;
                let c = self.quic.connect(&self.via).await?;
                shared.conn = Some(c.clone());
                Ok(Link::Quic(c))
            }
            None => {
                let link = match race(
                    self.quic.connect(&self.via),
                    self.connect_tcp(),
                    TCP_DELAY,
                    QUIC_GRACE_AFTER_TCP,
                )
                .await?
                {
                    Won::Quic(c) => {
                        shared.conn = Some(c.clone());
                        Link::Quic(c)
                    }
                    Won::Tcp(t) => Link::Tcp(Box::new(t)),
                };
                shared.kind = Some(match link {
                    Link::Tcp(_) => Kind::Tcp,
                    Link::Quic(_) => Kind::Quic,
                });
                Ok(link)
            }
        }
    }

    /// Closes the QUIC connection, if there is one, cleanly.
    async fn close(&self) {
        let conn = self.shared.lock().await.conn.take();
        if let Some(c) = conn {
            quic::close(&c).await;
        }
    }

    /// The message for a session that ended (`result`) after this client's certificate
    /// expired, if it has; `result` otherwise. The gateway ends a live session at expiry
    /// with close_notify (after data) or the 403 line (before), so neither names the
    /// cause: the client's clock and its own certificate do.
    fn ended(&self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        // An alert from the gateway already names the cause (`certificate expired` too).
        let alert = matches!(
            result
                .as_ref()
                .err()
                .and_then(|e| e.downcast_ref::<Refused>()),
            Some(Refused::Alert(_))
        );
        match &self.not_after {
            Some((t, text)) if now > *t && !alert => {
                let expired = anyhow::Error::from(Refused::CertificateExpired(text.clone()));
                Err(match result {
                    Ok(()) => expired.context("the session ended"),
                    Err(e) => expired.context(format!("{e:#}")),
                })
            }
            _ => result,
        }
    }
}

/// Which attempt of a race won.
enum Won<Q, T> {
    Quic(Q),
    Tcp(T),
}

/// `auto`: `quic` at once, `tcp` after `delay` (at once if QUIC fails sooner); the first
/// to succeed wins and the other is dropped. A refusal from either ends the race. Once TCP
/// has failed, QUIC gets at most `grace` more.
async fn race<Q, T, QF, TF>(
    quic: QF,
    tcp: TF,
    delay: Duration,
    grace: Duration,
) -> anyhow::Result<Won<Q, T>>
where
    QF: Future<Output = anyhow::Result<Q>>,
    TF: Future<Output = anyhow::Result<T>>,
{
    tokio::pin!(quic, tcp);
    let start_tcp = tokio::time::sleep(delay);
    let quic_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(start_tcp, quic_deadline);
    let (mut quic_err, mut tcp_err) = (None, None);
    let mut tcp_started = false;
    loop {
        tokio::select! {
            r = &mut quic, if quic_err.is_none() => match r {
                Ok(q) => return Ok(Won::Quic(q)),
                Err(e) if is_refusal(&e) => return Err(e),
                Err(e) => {
                    quic_err = Some(e);
                    tcp_started = true;
                }
            },
            () = &mut start_tcp, if !tcp_started => tcp_started = true,
            r = &mut tcp, if tcp_started && tcp_err.is_none() => match r {
                Ok(t) => return Ok(Won::Tcp(t)),
                Err(e) if is_refusal(&e) => return Err(e),
                Err(e) => {
                    tcp_err = Some(e);
                    quic_deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + grace);
                }
            },
            () = &mut quic_deadline, if quic_err.is_none() && tcp_err.is_some() => {
                quic_err = Some(anyhow::anyhow!(
                    "no answer {} s after TCP failed",
                    grace.as_secs_f32()
                ));
            }
        }
        if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
            let (rq, rt) = (telling(q), telling(t));
            return Err(if rq > rt {
                quic_err.take().expect("set")
            } else if rt > rq || rt > 1 {
                tcp_err.take().expect("set")
            } else {
                anyhow::anyhow!("{t:#}; and over QUIC: {q:#}")
            });
        }
    }
}

/// A refusal: the gateway's answer, which the other transport would get too.
fn is_refusal(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<Refused>(),
        Some(Refused::Line(_) | Refused::Alert(_) | Refused::CertificateExpired(_))
    )
}

/// How much an error says about the gateway: a refusal, a close before the handshake,
/// anything else.
fn telling(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Refused>() {
        Some(Refused::ClosedBeforeHandshake) => 2,
        Some(_) => 3,
        None => 1,
    }
}

/// A certificate's notAfter: Unix seconds and RFC 3339 text.
fn not_after(der: &[u8]) -> Option<(i64, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let t = cert.validity().not_after;
    let text = t
        .to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string());
    Some((t.timestamp(), text))
}

/// Whether a handshake error is the TCP connection ending (EOF or reset) before the
/// gateway sent anything: rustls reports an alert or a protocol error once it has.
fn closed_early(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    ) && e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_none()
}

/// A TLS alert from the gateway, or what the gateway did to a QUIC stream or connection,
/// in words. `None` for an error of the local side.
fn explain(e: &std::io::Error) -> Option<anyhow::Error> {
    let inner = e.get_ref()?;
    if let Some(r) = inner.downcast_ref::<quinn::ReadError>() {
        return Some(quic::explain_read(r));
    }
    if let Some(w) = inner.downcast_ref::<quinn::WriteError>() {
        return Some(quic::explain_write(w));
    }
    match inner.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(Refused::Alert(alert_words(*a)).into()),
        other => Some(anyhow::anyhow!("TLS with the gateway failed: {other}")),
    }
}

/// A refusing alert, in words.
fn alert_words(a: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    match a {
        // Over TCP an unknown service is `unrecognized_name`; over QUIC rustls answers
        // `access_denied` when no certificate is chosen for the name.
        A::UnrecognisedName | A::AccessDenied => "unknown service".to_owned(),
        A::CertificateExpired => "certificate expired".to_owned(),
        A::CertificateRevoked => "certificate revoked".to_owned(),
        A::UnknownCA => "certificate not issued by the gateway's CA".to_owned(),
        A::CertificateRequired => "no certificate".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Reads the gateway's first bytes; a `ZTP-ERROR` line is a refusal. Returns the bytes
/// read otherwise (to be passed on).
async fn first_bytes<R: AsyncRead + Unpin>(tls: &mut R) -> anyhow::Result<Vec<u8>> {
    const PREFIX: &[u8] = b"ZTP-ERROR ";
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match tls.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) => return Err(explain(&e).unwrap_or_else(|| e.into())),
        };
        buf.extend_from_slice(&chunk[..n]);
        let n_cmp = buf.len().min(PREFIX.len());
        if n == 0 || buf[..n_cmp] != PREFIX[..n_cmp] {
            return Ok(buf);
        }
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&buf[PREFIX.len()..end])
                .trim()
                .to_owned();
            return Err(Refused::Line(line).into());
        }
        if buf.len() > 128 {
            return Ok(buf);
        }
    }
}

pub async fn run(args: ConnectArgs, settings: &crate::settings::Settings) -> anyhow::Result<()> {
    // A stop by signal (ssh sends its ProxyCommand SIGHUP when it is done; Ctrl-C; a
    // service manager's SIGTERM) closes the QUIC connection cleanly first: unlike a TCP
    // socket, a QUIC connection is not closed by the kernel when the process dies, and
    // the gateway would hold its sessions and their backend connections until idle.
    let stopped = stop_signal()?;
    let client = Arc::new(Client::new(
        &args,
        settings,
        args.udp_listen.map(|_| DGRAM_ALPN),
    )?);
    let serve = async {
        if let Some(addr) = args.udp_listen {
            let sock = UdpSocket::bind(addr)
                .await
                .with_context(|| format!("cannot listen on udp {addr}"))?;
            return udp(client.clone(), sock, args.udp_idle, args.transport).await;
        }
        match args.listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                tcp(client.clone(), listener, args.transport).await
            }
            None => stdio(&client).await,
        }
    };
    let result = tokio::select! {
        r = serve => r,
        () = stopped => Ok(()),
    };
    client.close().await;
    result
}

/// Completes on SIGHUP, SIGINT or SIGTERM (registered at once, so none is missed).
fn stop_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = hup.recv() => {}
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Copies `local` and the gateway both ways, over a new TCP connection or a new stream of
/// the QUIC connection, after the refusal check.
async fn carry<L: AsyncRead + AsyncWrite + Unpin>(
    client: &Client,
    local: &mut L,
) -> anyhow::Result<()> {
    // A refusal at the handshake names its cause; the session's end may not.
    let link = match client.link().await {
        Ok(link) => link,
        Err(e) if matches!(e.downcast_ref::<Refused>(), Some(Refused::Line(_))) => {
            return client.ended(Err(e));
        }
        Err(e) => return Err(e),
    };
    let result = match link {
        Link::Tcp(tls) => carry_session(*tls, local).await,
        Link::Quic(conn) if client.auto => {
            // The gateway sees a QUIC stream only once its first byte is sent: wait a
            // moment for the program to speak, and carry a program that waits for the
            // service to speak first over TCP instead (nothing was sent yet, so the
            // service cannot tell).
            let mut first = vec![0u8; 16 * 1024];
            match tokio::time::timeout(SILENT_FALLBACK, local.read(&mut first)).await {
                Ok(Ok(n)) => {
                    first.truncate(n);
                    let mut local = Prefixed {
                        prefix: first,
                        at: 0,
                        inner: local,
                    };
                    quic::carry_stream(&conn, &mut local).await
                }
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("reading the program's input")),
                Err(_) => match client.connect_tcp().await {
                    Ok(tls) => carry_session(tls, local).await,
                    Err(e) => Err(e),
                },
            }
        }
        Link::Quic(conn) => quic::carry_stream(&conn, local).await,
    };
    client.ended(result)
}

/// A local stream whose first bytes were already read: they are read again first.
struct Prefixed<'a, L> {
    prefix: Vec<u8>,
    at: usize,
    inner: &'a mut L,
}

impl<L: AsyncRead + Unpin> AsyncRead for Prefixed<'_, L> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf)
    }
}

impl<L: AsyncWrite + Unpin> AsyncWrite for Prefixed<'_, L> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

async fn carry_session<G, L>(mut gateway: G, local: &mut L) -> anyhow::Result<()>
where
    G: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut lr, mut lw) = tokio::io::split(local);
    let (mut tr, mut tw) = tokio::io::split(&mut gateway);
    let up = async {
        let r = tokio::io::copy(&mut lr, &mut tw).await;
        let _ = tw.shutdown().await;
        r
    };
    let down = async {
        // Read (and check) the gateway's first bytes before anything reaches the
        // program: a refusal must not look like data.
        let first = first_bytes(&mut tr).await?;
        lw.write_all(&first).await?;
        lw.flush().await?;
        if !first.is_empty() {
            copy_down(&mut tr, &mut lw).await?;
        }
        lw.shutdown().await.ok();
        Ok::<_, anyhow::Error>(())
    };
    tokio::pin!(up, down);
    // The gateway's side ending (or refusing) ends the session, even while the local
    // side still has input open; the local side ending only half-closes it.
    tokio::select! {
        r = &mut down => r,
        r = &mut up => {
            let Err(e) = r else { return down.await };
            // Writing failed: the gateway has likely refused or closed. Its refusal (an
            // alert or the `ZTP-ERROR` line, read by `down`) says why; the write error
            // only says that it failed.
            match tokio::time::timeout(Duration::from_secs(2), &mut down).await {
                Ok(Err(refusal)) => Err(refusal),
                Ok(Ok(())) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                _ => Err(explain(&e).unwrap_or_else(|| {
                    anyhow::Error::from(e).context("sending to the gateway failed")
                })),
            }
        }
    }
}

/// The gateway's bytes to the program; what goes wrong on the gateway's side is named.
async fn copy_down<R, W>(gateway: &mut R, local: &mut W) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = gateway
            .read(&mut buf)
            .await
            .map_err(|e| explain(&e).unwrap_or_else(|| e.into()))?;
        if n == 0 {
            return Ok(());
        }
        local.write_all(&buf[..n]).await?;
        local.flush().await?;
    }
}

/// Standard input and output: for ssh's ProxyCommand and pipes.
async fn stdio(client: &Client) -> anyhow::Result<()> {
    let mut local = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    carry(client, &mut local).await
}

/// A local TCP port.
async fn tcp(client: Arc<Client>, listener: TcpListener, t: Transport) -> anyhow::Result<()> {
    eprintln!(
        "ztpctl: {} -> {} via {} (transport {t})",
        listener.local_addr()?,
        server_label(&client),
        client.via
    );
    loop {
        let (mut local, peer) = listener.accept().await?;
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(e) = carry(&client, &mut local).await {
                eprintln!("ztpctl: {peer}: {e:#}");
            }
        });
    }
}

fn server_label(c: &Client) -> String {
    match &c.server_name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        other => format!("{other:?}"),
    }
}

/// A local UDP port: the local peers are flows of one QUIC connection, or each a framed
/// session over TCP.
async fn udp(
    client: Arc<Client>,
    sock: UdpSocket,
    idle: Duration,
    t: Transport,
) -> anyhow::Result<()> {
    let sock = Arc::new(sock);
    eprintln!(
        "ztpctl: udp {} -> {} via {} (transport {t})",
        sock.local_addr()?,
        server_label(&client),
        client.via
    );
    let mut local = UdpLocal {
        client,
        sock,
        idle,
        sessions: HashMap::new(),
        flows: None,
    };
    let mut buf = vec![0u8; 65536];
    let mut sweep =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let conn = local.flows.as_ref().map(|f| f.conn().clone());
        tokio::select! {
            r = local.sock.recv_from(&mut buf) => {
                let (n, peer) = r?;
                local.on_local_datagram(peer, &buf[..n]).await;
            }
            r = quic::next_datagram(conn.as_ref()) => local.on_gateway_datagram(r).await,
            _ = sweep.tick() => {
                if let Some(f) = local.flows.as_mut() {
                    f.expire(idle, Instant::now());
                }
            }
        }
    }
}

/// The state of `--udp-listen`.
struct UdpLocal {
    client: Arc<Client>,
    sock: Arc<UdpSocket>,
    idle: Duration,
    /// Peers with a framed session over TCP.
    sessions: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    /// Peers as flows of the QUIC connection.
    flows: Option<quic::Flows>,
}

impl UdpLocal {
    /// A datagram from a local peer.
    async fn on_local_datagram(&mut self, peer: SocketAddr, d: &[u8]) {
        self.sessions.retain(|_, tx| !tx.is_closed());
        if let Some(tx) = self.sessions.get(&peer) {
            // A full queue drops the datagram, as a network would.
            let _ = tx.try_send(d.to_vec());
            return;
        }
        if self.flows.as_ref().is_some_and(|f| !f.alive()) {
            self.flows = None;
        }
        if self.flows.is_none() {
            if self.client.kind().await == Some(Kind::Tcp) {
                self.tcp_session(peer, d, None);
                return;
            }
            match self.client.link().await {
                Ok(Link::Quic(conn)) => self.flows = Some(quic::Flows::new(conn)),
                Ok(Link::Tcp(tls)) => {
                    self.tcp_session(peer, d, Some(*tls));
                    return;
                }
                Err(e) => {
                    if let Err(e) = self.client.ended(Err(e)) {
                        eprintln!("ztpctl: udp {peer}: {e:#}");
                    }
                    return;
                }
            }
        }
        if let Some(f) = self.flows.as_mut() {
            if let Err(e) = f.send(peer, d, Instant::now()) {
                eprintln!("ztpctl: udp {peer}: {e:#}");
            }
        }
    }

    /// A datagram (or the end) of the QUIC connection.
    async fn on_gateway_datagram(&mut self, r: Result<Vec<u8>, quinn::ConnectionError>) {
        match r {
            Ok(frame) => {
                let Some(f) = self.flows.as_mut() else { return };
                if let Some((peer, d)) = f.deliver(&frame, Instant::now()) {
                    if let Err(e) = self.sock.send_to(d, peer).await {
                        eprintln!("ztpctl: udp {peer}: {e}");
                    }
                }
            }
            Err(e) => {
                self.flows = None;
                if let Err(e) = self.client.ended(Err(quic::explain_connection(&e))) {
                    eprintln!("ztpctl: udp: {e:#}");
                }
            }
        }
    }

    /// A framed session over TCP for `peer`, on `tls` if the race already opened it.
    fn tcp_session(&mut self, peer: SocketAddr, d: &[u8], tls: Option<TlsStream<TcpStream>>) {
        if d.len() > MAX_FRAME {
            eprintln!(
                "ztpctl: {peer}: datagram of {} bytes is larger than a frame; dropped",
                d.len()
            );
            return;
        }
        if self.sessions.len() >= MAX_UDP_SESSIONS {
            eprintln!("ztpctl: {peer}: too many UDP sessions; datagram dropped");
            return;
        }
        let (tx, rx) = mpsc::channel(256);
        let (client, sock, idle) = (self.client.clone(), self.sock.clone(), self.idle);
        tokio::spawn(async move {
            if let Err(e) = udp_session(&client, &sock, peer, rx, idle, tls).await {
                eprintln!("ztpctl: udp {peer}: {e:#}");
            }
        });
        let _ = tx.try_send(d.to_vec());
        self.sessions.insert(peer, tx);
    }
}

async fn udp_session(
    client: &Client,
    sock: &UdpSocket,
    peer: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    idle: Duration,
    tls: Option<TlsStream<TcpStream>>,
) -> anyhow::Result<()> {
    let mut tls = match tls {
        Some(t) => t,
        None => client.connect_tcp().await?,
    };
    if tls.get_ref().1.alpn_protocol() != Some(DGRAM_ALPN) {
        bail!("the gateway did not accept framed datagrams for this service (is it a udp or quic service?)");
    }
    let mut dec = Decoder::default();
    let mut rbuf = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(MAX_FRAME + 2);
    loop {
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { break };
                if d.len() > MAX_FRAME {
                    eprintln!("ztpctl: {peer}: datagram of {} bytes is larger than a frame; dropped", d.len());
                    continue;
                }
                encode(&d, &mut out);
                tls.write_all(&out).await?;
                tls.flush().await?;
            }
            r = tls.read(&mut rbuf) => {
                let n = r.map_err(|e| explain(&e).unwrap_or_else(|| e.into()))?;
                if n == 0 {
                    break;
                }
                dec.push(&rbuf[..n]);
                loop {
                    match dec.frame() {
                        Ok(Some(f)) => {
                            sock.send_to(f, peer).await?;
                            dec.consume_frame();
                        }
                        Ok(None) => break,
                        Err(_) => {
                            // Not a frame: the gateway's refusal line.
                            let text = String::from_utf8_lossy(&rbuf[..n]);
                            let line = text.trim().trim_start_matches("ZTP-ERROR ").to_owned();
                            return Err(Refused::Line(line).into());
                        }
                    }
                }
            }
            _ = tokio::time::sleep(idle) => break,
        }
    }
    let _ = tls.shutdown().await;
    Ok(())
}
