//! QUIC to the gateway (DESIGN.md, "QUIC transport"): the client's endpoint and
//! configuration, the wait for the gateway's confirmation, what its closes and resets
//! mean, a stream as the session's byte pipe, and the datagram flows of `--udp-listen`.
//!
//! Read from quinn 0.11.12 / quinn-proto 0.11.19: a client's `Connecting` resolves once
//! the client has its handshake keys and has sent its Finished, before the server has
//! checked the client certificate. The server queues HANDSHAKE_DONE only when its TLS
//! handshake completes, that is after it accepted the certificate, and quinn exposes its
//! arrival only as `stats().frame_rx.handshake_done` (no event, no future): the connection
//! counts as established once that is non-zero, looked at every millisecond and raced
//! against `closed()`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use quinn::{ConnectionError, Endpoint, ReadError, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ztp_proto::quic::{
    decode_datagram, encode_datagram, varint_len, ALPN, CLOSE_DONE, STREAM_ABORTED,
};

use super::Refused;

/// How long a QUIC connection may take until the gateway confirmed it.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const MAX_IDLE: Duration = Duration::from_secs(60);
/// How often the gateway's confirmation is looked for.
const CONFIRM_POLL: Duration = Duration::from_millis(1);
/// Received datagrams buffered before the oldest are dropped.
const DATAGRAM_BUFFER: usize = 1 << 20;
/// How long a finished stream's data gets to be acknowledged after the session ended.
const DELIVERY_GRACE: Duration = Duration::from_secs(2);
/// How long closing the connection at exit waits for quinn to send the close.
const CLOSE_GRACE: Duration = Duration::from_millis(100);

/// The gateway's QUIC endpoint answered, but not in ztp/1 (`no_application_protocol`):
/// not a refusal of this client, so `auto` still tries TCP.
#[derive(Debug, thiserror::Error)]
#[error("the gateway's QUIC endpoint does not speak ztp/1 (no_application_protocol)")]
pub(super) struct NotZtp;

/// Opens QUIC connections to the gateway: one client endpoint per address family,
/// made when first needed.
pub(super) struct Dialer {
    config: quinn::ClientConfig,
    server_name: String,
    v4: Mutex<Option<Endpoint>>,
    v6: Mutex<Option<Endpoint>>,
}

impl Dialer {
    /// `tls` holds the client certificate and the roots; ALPN `ztp/1` is set here.
    pub(super) fn new(mut tls: rustls::ClientConfig, service: &str) -> anyhow::Result<Self> {
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .context("cannot use this TLS configuration for QUIC")?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport()?));
        Ok(Dialer {
            config,
            server_name: service.to_owned(),
            v4: Mutex::new(None),
            v6: Mutex::new(None),
        })
    }

    fn endpoint(&self, remote: SocketAddr) -> anyhow::Result<Endpoint> {
        let slot = if remote.is_ipv6() { &self.v6 } else { &self.v4 };
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        // Larger packets where the path carries them (see `MAX_UDP_PAYLOAD`).
        let e = ztp_infra::mux::quic_client_endpoint(remote, ztp_proto::quic::MAX_UDP_PAYLOAD)?;
        *slot = Some(e.clone());
        Ok(e)
    }

    /// The handshake as quinn's client sees it: done once the client sent its Finished,
    /// before the gateway has checked the client certificate (see [`confirmed`]).
    pub(super) async fn handshake(&self, remote: SocketAddr) -> anyhow::Result<quinn::Connection> {
        let connecting = self
            .endpoint(remote)?
            .connect_with(self.config.clone(), remote, &self.server_name)
            .context("cannot start QUIC")?;
        connecting.await.map_err(|e| explain_connection(&e))
    }

    /// A connection to `via` (HOST:PORT, over UDP) that the gateway confirmed, within
    /// [`ESTABLISH_TIMEOUT`].
    pub(super) async fn connect(&self, via: &str) -> anyhow::Result<quinn::Connection> {
        let remote = tokio::net::lookup_host(via)
            .await
            .with_context(|| format!("cannot reach the gateway at {via}"))?
            .next()
            .with_context(|| format!("cannot reach the gateway at {via}: no address"))?;
        let mut handshaken = false;
        let attempt = async {
            let conn = self.handshake(remote).await?;
            handshaken = true;
            confirmed(&conn).await.map_err(|e| explain_connection(&e))?;
            Ok(conn)
        };
        match tokio::time::timeout(ESTABLISH_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) if handshaken => Err(anyhow!(
                "the gateway at {via} did not confirm the QUIC handshake within {} s",
                ESTABLISH_TIMEOUT.as_secs()
            )),
            Err(_) => Err(anyhow!(
                "cannot reach the gateway at {via} over QUIC: no answer within {} s",
                ESTABLISH_TIMEOUT.as_secs()
            )),
        }
    }
}

fn transport() -> anyhow::Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(MAX_IDLE)?))
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        // Large enough from the first packet that a local QUIC client's 1,200-byte
        // Initial fits one DATAGRAM frame with its flow id; a path that cannot carry it
        // is found by quinn's black-hole detection (back to 1,200).
        .initial_mtu(1452)
        .mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(ztp_proto::quic::MAX_UDP_PAYLOAD);
            m
        }))
        // The gateway opens no streams.
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_concurrent_bidi_streams(VarInt::from_u32(0));
    Ok(t)
}

/// Waits until the gateway confirmed the handshake (its HANDSHAKE_DONE arrived), or the
/// connection closed.
pub(super) async fn confirmed(conn: &quinn::Connection) -> Result<(), ConnectionError> {
    let closed = conn.closed();
    tokio::pin!(closed);
    let mut poll = tokio::time::interval(CONFIRM_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if conn.stats().frame_rx.handshake_done > 0 {
            return Ok(());
        }
        tokio::select! {
            e = &mut closed => return Err(e),
            _ = poll.tick() => {}
        }
    }
}

/// What the end of a QUIC connection says, in words; refusals as [`Refused`].
pub(super) fn explain_connection(e: &ConnectionError) -> anyhow::Error {
    match e {
        ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            if (0x100..0x200).contains(&code) {
                let alert = rustls::AlertDescription::from(code as u8);
                if alert == rustls::AlertDescription::NoApplicationProtocol {
                    return NotZtp.into();
                }
                return Refused::Alert(super::alert_words(alert)).into();
            }
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED {
                return Refused::ClosedBeforeHandshake.into();
            }
            anyhow!("the gateway closed the QUIC connection: {c}")
        }
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_DONE) => {
            anyhow!("the gateway closed the connection")
        }
        ConnectionError::ApplicationClosed(c) => {
            Refused::Line(refusal_line(c.error_code.into_inner(), &c.reason)).into()
        }
        ConnectionError::TimedOut => anyhow!(
            "the gateway stopped answering over QUIC (nothing heard for {} s)",
            MAX_IDLE.as_secs()
        ),
        ConnectionError::Reset => {
            anyhow!("the gateway reset the QUIC connection (it may have restarted)")
        }
        ConnectionError::VersionMismatch => anyhow!("the gateway does not speak QUIC v1"),
        ConnectionError::TransportError(t) if (0x100..0x200).contains(&u64::from(t.code)) => {
            anyhow!("TLS with the gateway failed: {}", t.reason)
        }
        ConnectionError::TransportError(t) => anyhow!("QUIC with the gateway failed: {t}"),
        ConnectionError::LocallyClosed => anyhow!("the QUIC connection was closed"),
        other => anyhow!("QUIC with the gateway failed: {other}"),
    }
}

/// The refusal in a close's reason (`ZTP-ERROR 403 forbidden` → `403 forbidden`), on one
/// line of printable text; the code leads if the reason does not name it.
fn refusal_line(code: u64, reason: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(reason)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    let text = text.trim();
    let text = text.strip_prefix("ZTP-ERROR").unwrap_or(text).trim();
    if text.is_empty() {
        code.to_string()
    } else if text.starts_with(&code.to_string()) {
        text.to_owned()
    } else {
        format!("{code} {text}")
    }
}

/// A failed read of a session's stream, in words.
pub(super) fn explain_read(e: &ReadError) -> anyhow::Error {
    match e {
        ReadError::Reset(code) if *code == VarInt::from_u32(STREAM_ABORTED) => {
            anyhow!("the gateway cut the session: its connection to the service broke")
        }
        ReadError::Reset(code) => anyhow!("the gateway reset the session (code {code})"),
        ReadError::ConnectionLost(c) => explain_connection(c),
        other => anyhow!("reading from the gateway failed: {other}"),
    }
}

/// A failed write to a session's stream, in words.
pub(super) fn explain_write(e: &WriteError) -> anyhow::Error {
    match e {
        WriteError::Stopped(code) => {
            anyhow!("the gateway stopped reading the session (code {code})")
        }
        WriteError::ConnectionLost(c) => explain_connection(c),
        other => anyhow!("sending to the gateway failed: {other}"),
    }
}

/// Closes `conn` (code 0: a clean end) and waits, briefly, until quinn has sent the
/// close, so that the gateway does not wait for its idle timeout. (Waiting for the
/// endpoint to be idle would also wait out the draining period, three PTOs.)
pub(super) async fn close(conn: &quinn::Connection) {
    if conn.close_reason().is_some() {
        return;
    }
    // quinn counts no CONNECTION_CLOSE frame it sends; once closed, every datagram the
    // connection sends is a close.
    let sent = conn.stats().udp_tx.datagrams;
    conn.close(VarInt::from_u32(CLOSE_DONE), b"");
    let deadline = Instant::now() + CLOSE_GRACE;
    while conn.stats().udp_tx.datagrams == sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether the connection ended with code 0: the gateway ended it cleanly (drain).
fn closed_cleanly(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_DONE))
}

/// One session of a tcp service: a new stream of `conn`, carried like a TCP session.
pub(super) async fn carry_stream<L>(conn: &quinn::Connection, local: &mut L) -> anyhow::Result<()>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (send, recv) = conn.open_bi().await.map_err(|e| explain_connection(&e))?;
    let delivered = send.stopped();
    let result = super::carry_session(QuicIo { send, recv }, local).await;
    // The stream was finished when the session ended (dropping it finishes it): what the
    // program sent gets a moment to be acknowledged before the caller may close the
    // connection, which would discard it.
    let _ = tokio::time::timeout(DELIVERY_GRACE, delivered).await;
    result
}

/// A stream as a byte pipe. Reads: the gateway's FIN is the end, and so is a clean close
/// of the connection (code 0, the gateway draining), as close_notify is over TCP. Writes:
/// a gateway that stopped reading cleanly (code 0), or closed cleanly, is a broken pipe,
/// as over TCP. Shutdown is the FIN. Other errors keep quinn's error inside (see
/// [`super::explain`]).
struct QuicIo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl AsyncRead for QuicIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.recv.poll_read_buf(cx, buf) {
            Poll::Ready(Err(ReadError::ConnectionLost(e))) if closed_cleanly(&e) => {
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                let kind = match e {
                    ReadError::Reset(_) => io::ErrorKind::ConnectionReset,
                    _ => io::ErrorKind::NotConnected,
                };
                Poll::Ready(Err(io::Error::new(kind, e)))
            }
            other => other.map(|_| Ok(())),
        }
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.send).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => {
                let kind = match &e {
                    WriteError::Stopped(c) if *c == VarInt::from_u32(0) => {
                        io::ErrorKind::BrokenPipe
                    }
                    WriteError::ConnectionLost(c) if closed_cleanly(c) => io::ErrorKind::BrokenPipe,
                    WriteError::Stopped(_) => io::ErrorKind::ConnectionReset,
                    _ => io::ErrorKind::NotConnected,
                };
                Poll::Ready(Err(io::Error::new(kind, e)))
            }
            other => other.map(|r| r.map_err(io::Error::other)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        // Already finished, reset or gone: nothing more to say.
        let _ = self.send.finish();
        Poll::Ready(Ok(()))
    }
}

/// The next datagram of `conn`; never, without a connection.
pub(super) async fn next_datagram(
    conn: Option<&quinn::Connection>,
) -> Result<Vec<u8>, ConnectionError> {
    match conn {
        Some(c) => c.read_datagram().await.map(|d| d.to_vec()),
        None => std::future::pending().await,
    }
}

/// The local peers of `--udp-listen` as flows of one QUIC connection: each peer gets the
/// next flow id (from 0, never reused on the connection); a flow with nothing moving for
/// `--udp-idle` is forgotten.
pub(super) struct Flows {
    conn: quinn::Connection,
    by_peer: HashMap<SocketAddr, Flow>,
    by_id: HashMap<u64, SocketAddr>,
    next: u64,
}

struct Flow {
    id: u64,
    last: Instant,
}

impl Flows {
    pub(super) fn new(conn: quinn::Connection) -> Self {
        Flows {
            conn,
            by_peer: HashMap::new(),
            by_id: HashMap::new(),
            next: 0,
        }
    }

    pub(super) fn conn(&self) -> &quinn::Connection {
        &self.conn
    }

    pub(super) fn alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_peer.len()
    }

    /// Sends a local peer's datagram on its flow (a new one for a new peer). A datagram
    /// that does not fit a DATAGRAM frame now is dropped, with the error saying so.
    pub(super) fn send(&mut self, peer: SocketAddr, d: &[u8], now: Instant) -> anyhow::Result<()> {
        let id = self.by_peer.get(&peer).map_or(self.next, |f| f.id);
        let Some(max) = self.conn.max_datagram_size() else {
            anyhow::bail!(
                "the gateway takes no datagrams on this connection (is the service a udp or \
                 quic service?); datagram dropped"
            );
        };
        if varint_len(id) + d.len() > max {
            anyhow::bail!(
                "datagram of {} bytes does not fit a QUIC datagram (at most {} now); dropped",
                d.len(),
                max.saturating_sub(varint_len(id))
            );
        }
        match self.by_peer.get_mut(&peer) {
            Some(f) => f.last = now,
            None => {
                if self.by_peer.len() >= ztp_proto::quic::MAX_FLOWS {
                    anyhow::bail!("too many UDP flows (the gateway serves {} per connection); datagram dropped", ztp_proto::quic::MAX_FLOWS);
                }
                self.by_peer.insert(peer, Flow { id, last: now });
                self.by_id.insert(id, peer);
                self.next += 1;
            }
        }
        let frame = encode_datagram(id, d)?;
        self.conn
            .send_datagram(frame.into())
            .map_err(|e| anyhow!("cannot send the datagram: {e}"))
    }

    /// A datagram from the gateway: the local peer of its flow, and its payload. `None`
    /// for a flow no peer has (any more) or a frame too short for its flow id.
    pub(super) fn deliver<'a>(
        &mut self,
        frame: &'a [u8],
        now: Instant,
    ) -> Option<(SocketAddr, &'a [u8])> {
        let (id, payload) = decode_datagram(frame)?;
        let peer = *self.by_id.get(&id)?;
        if let Some(f) = self.by_peer.get_mut(&peer) {
            f.last = now;
        }
        Some((peer, payload))
    }

    /// Forgets the flows with nothing moving for `idle`.
    pub(super) fn expire(&mut self, idle: Duration, now: Instant) {
        let by_id = &mut self.by_id;
        self.by_peer.retain(|_, f| {
            let keep = now.saturating_duration_since(f.last) < idle;
            if !keep {
                by_id.remove(&f.id);
            }
            keep
        });
    }
}
