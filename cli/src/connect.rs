//! `ztpctl connect SERVICE --via HOST:9743`: the client side of the ZTP wire protocol.
//!
//! Three ways to carry a local program's bytes to a service:
//! - standard input and output (for `ssh -o ProxyCommand='ztpctl connect %h --via …'`);
//! - `--listen 127.0.0.1:PORT`: a local TCP port, one mTLS connection per accepted one;
//! - `--udp-listen 127.0.0.1:PORT`: a local UDP port carried over framed datagrams (ALPN
//!   `ztp-dgram`), one session per local peer, closed when idle.
//!
//! A refusal from the gateway (a TLS alert, or a `ZTP-ERROR` line) becomes one clear
//! message and a non-zero exit (stdio mode) or a logged line (listening modes).
//!
//! What the client can and cannot know about why a session ended (DESIGN.md, Refusals):
//! - a certificate refused at the handshake (revoked, expired, unknown CA…): the gateway's
//!   TLS alert, named;
//! - a session refused before anything was forwarded (no user, user disabled, not in the
//!   groups; also a revocation or group change that lands before the first byte): the
//!   `ZTP-ERROR` line;
//! - a connection the gateway closes before the handshake (shedding load, or refusing new
//!   connections while its snapshot is too old under `--max-snapshot-age`): said so;
//! - a live session that the gateway ends after data was forwarded gets close_notify,
//!   exactly as a normal end of the service's stream: a revocation or group change then
//!   cannot be told apart from the service closing, and the session ends with exit 0.
//!   The one such cause the client can see on its own is the expiry of its own
//!   certificate, which the gateway enforces on live sessions: when a session ends (in any
//!   way) after the certificate's notAfter, that is the message, with a non-zero exit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rustls::pki_types::ServerName;
use rustls::sign::SingleCertAndKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use ztp_proto::framing::{encode, Decoder, MAX_FRAME};

const DGRAM_ALPN: &[u8] = b"ztp-dgram";
/// Local UDP peers served at once.
const MAX_UDP_SESSIONS: usize = 1024;

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The service (its SNI name), e.g. ssh.svc.internal.
    pub service: String,
    /// The gateway, HOST:PORT (env ZTP_VIA, or `via` in the config file).
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
    /// Serve a local UDP port, carried as framed datagrams.
    #[arg(long, value_name = "ADDR")]
    pub udp_listen: Option<SocketAddr>,
    /// A UDP session with nothing moving for this long is closed.
    #[arg(long, default_value = "60s", value_parser = ztp_proto::parse_duration)]
    pub udp_idle: Duration,
}

/// Why the gateway refused, in words.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the gateway refused the connection: {0}")]
    Line(String),
    #[error("the gateway refused the handshake: {0}")]
    Alert(String),
    /// The TCP connection ended (or was reset) before the gateway answered the ClientHello.
    #[error(
        "the gateway closed the connection before the TLS handshake (it may be shedding load \
         or refusing new connections)"
    )]
    ClosedBeforeHandshake,
    /// The session ended after the client's own certificate expired.
    #[error("your certificate expired at {0} (the gateway ends sessions when it does); renew it")]
    CertificateExpired(String),
}

struct Client {
    tls: TlsConnector,
    via: String,
    server_name: ServerName<'static>,
    /// The client certificate's notAfter (Unix seconds) and its text, if it parses.
    not_after: Option<(i64, String)>,
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
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        if let Some(a) = alpn {
            config.alpn_protocols = vec![a.to_vec()];
        }
        let server_name = ServerName::try_from(args.service.clone())
            .with_context(|| format!("{:?} is not a service name", args.service))?;
        Ok(Client {
            tls: TlsConnector::from(Arc::new(config)),
            via,
            server_name,
            not_after,
        })
    }

    async fn connect(&self) -> anyhow::Result<TlsStream<TcpStream>> {
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

/// A TLS alert from the gateway, in words.
fn explain(e: &std::io::Error) -> Option<anyhow::Error> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::AlertReceived(a) => {
            let what = match a {
                rustls::AlertDescription::UnrecognisedName => "unknown service".to_owned(),
                rustls::AlertDescription::CertificateExpired => "certificate expired".to_owned(),
                rustls::AlertDescription::CertificateRevoked => "certificate revoked".to_owned(),
                rustls::AlertDescription::UnknownCA => {
                    "certificate not issued by the gateway's CA".to_owned()
                }
                rustls::AlertDescription::CertificateRequired => "no certificate".to_owned(),
                other => format!("{other:?}"),
            };
            Some(Refused::Alert(what).into())
        }
        other => Some(anyhow::anyhow!("TLS with the gateway failed: {other}")),
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
    if let Some(addr) = args.udp_listen {
        let client = Arc::new(Client::new(&args, settings, Some(DGRAM_ALPN))?);
        return udp(client, addr, args.udp_idle).await;
    }
    let client = Arc::new(Client::new(&args, settings, None)?);
    match args.listen {
        Some(addr) => tcp(client, addr).await,
        None => stdio(&client).await,
    }
}

/// Copies `local` and the gateway both ways, after the refusal check.
async fn carry<L: AsyncRead + AsyncWrite + Unpin>(
    client: &Client,
    local: &mut L,
) -> anyhow::Result<()> {
    // A refusal at the handshake names its cause; the session's end may not.
    let tls = client.connect().await?;
    let result = carry_session(tls, local).await;
    client.ended(result)
}

async fn carry_session<L: AsyncRead + AsyncWrite + Unpin>(
    mut tls: TlsStream<TcpStream>,
    local: &mut L,
) -> anyhow::Result<()> {
    let (mut lr, mut lw) = tokio::io::split(local);
    let (mut tr, mut tw) = tokio::io::split(&mut tls);
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
        if !first.is_empty() {
            tokio::io::copy(&mut tr, &mut lw).await?;
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

/// Standard input and output: for ssh's ProxyCommand and pipes.
async fn stdio(client: &Client) -> anyhow::Result<()> {
    let mut local = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    carry(client, &mut local).await
}

/// A local TCP port.
async fn tcp(client: Arc<Client>, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!(
        "ztpctl: {} -> {} via {}",
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

/// A local UDP port: one framed session per local peer.
async fn udp(client: Arc<Client>, addr: SocketAddr, idle: Duration) -> anyhow::Result<()> {
    let sock = Arc::new(
        UdpSocket::bind(addr)
            .await
            .with_context(|| format!("cannot listen on udp {addr}"))?,
    );
    eprintln!(
        "ztpctl: udp {} -> {} via {}",
        sock.local_addr()?,
        server_label(&client),
        client.via
    );
    let mut sessions: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = sock.recv_from(&mut buf).await?;
        if n > MAX_FRAME {
            eprintln!("ztpctl: {peer}: datagram of {n} bytes is larger than a frame; dropped");
            continue;
        }
        sessions.retain(|_, tx| !tx.is_closed());
        let tx = match sessions.get(&peer) {
            Some(tx) => tx.clone(),
            None => {
                if sessions.len() >= MAX_UDP_SESSIONS {
                    eprintln!("ztpctl: {peer}: too many UDP sessions; datagram dropped");
                    continue;
                }
                let (tx, rx) = mpsc::channel(256);
                let (client, sock) = (client.clone(), sock.clone());
                tokio::spawn(async move {
                    if let Err(e) = udp_session(&client, &sock, peer, rx, idle).await {
                        eprintln!("ztpctl: udp {peer}: {e:#}");
                    }
                });
                sessions.insert(peer, tx.clone());
                tx
            }
        };
        // A full queue drops the datagram, as a network would.
        let _ = tx.try_send(buf[..n].to_vec());
    }
}

async fn udp_session(
    client: &Client,
    sock: &UdpSocket,
    peer: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    idle: Duration,
) -> anyhow::Result<()> {
    let mut tls = client.connect().await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn client(via: String, not_after: Option<(i64, String)>) -> Client {
        let config = rustls::ClientConfig::builder_with_provider(ztp_infra::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Client {
            tls: TlsConnector::from(Arc::new(config)),
            via,
            server_name: ServerName::try_from("echo.svc.internal").expect("a name"),
            not_after,
        }
    }

    /// A gateway shedding load (or stale under `--max-snapshot-age`) closes the TCP
    /// connection before the handshake: said so, not `tls handshake eof`.
    #[tokio::test]
    async fn a_close_before_the_handshake_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let via = listener.local_addr().expect("address").to_string();
        let shed = tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                drop(tcp);
            }
        });
        let c = client(via, None);
        for _ in 0..2 {
            let e = c.connect().await.expect_err("closed before the handshake");
            assert!(
                matches!(
                    e.downcast_ref::<Refused>(),
                    Some(Refused::ClosedBeforeHandshake)
                ),
                "{e:#}"
            );
            assert!(
                format!("{e:#}").contains("closed the connection before the TLS handshake"),
                "{e:#}"
            );
        }
        shed.await.expect("the shedding listener");
    }

    /// A session ending after the client's certificate expired says so, whether it ended
    /// cleanly or with a refusal; before expiry the end is left as it was.
    #[test]
    fn a_session_ending_after_expiry_names_it() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        let expired = client(
            "127.0.0.1:1".into(),
            Some((now - 5, "2026-01-01T00:00:00Z".into())),
        );
        let e = expired.ended(Ok(())).expect_err("expired");
        assert_eq!(
            format!("{e:#}"),
            "the session ended: your certificate expired at 2026-01-01T00:00:00Z (the gateway \
             ends sessions when it does); renew it"
        );
        let e = expired
            .ended(Err(Refused::Line("403 forbidden".into()).into()))
            .expect_err("expired");
        let text = format!("{e:#}");
        assert!(
            text.starts_with(
                "the gateway refused the connection: 403 forbidden: your certificate expired"
            ),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1);

        // The gateway's alert already names the cause.
        let e = expired
            .ended(Err(Refused::Alert("certificate expired".into()).into()))
            .expect_err("the alert");
        assert_eq!(
            format!("{e:#}"),
            "the gateway refused the handshake: certificate expired"
        );

        let valid = client("127.0.0.1:1".into(), Some((now + 3600, "later".into())));
        valid.ended(Ok(())).expect("a normal end");
        let e = valid
            .ended(Err(Refused::Line("403 forbidden".into()).into()))
            .expect_err("the refusal");
        assert_eq!(
            format!("{e:#}"),
            "the gateway refused the connection: 403 forbidden"
        );
        client("127.0.0.1:1".into(), None)
            .ended(Ok(()))
            .expect("no date known: a normal end");
    }

    #[test]
    fn not_after_reads_the_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 2, 3);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let (t, text) = not_after(cert.der()).expect("parses");
        assert_eq!(text, "2031-02-03T00:00:00Z");
        assert_eq!(t, 1_927_843_200);
        assert!(not_after(b"not a certificate").is_none());
    }
}
