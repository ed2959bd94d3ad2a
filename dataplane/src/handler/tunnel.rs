//! Services behind a connector (DESIGN.md, "Connectors"): the data plane never dials
//! their address; a session goes as one stream over a tunnel the service's connector
//! holds to this node (`ztp_proto::tunnel`).
//!
//! [`Tunnels`] holds the live tunnels by connector name; the QUIC listener registers a
//! connector's connection once it is admitted and removes it when it ends.
//! [`TunnelForwarder`] is the handler of every service that names a connector: no live
//! tunnel is `ZTP-ERROR 503 unavailable`.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ztp_proto::tunnel::{encode_header, SessionHeader, Status};
use ztp_proto::Protocol;

use super::splice::{splice, SpliceEnd};
use super::{BoxOutcome, Client, Handler, Outcome, Session};
use crate::refusal::Refusal;

/// The live tunnels of this node, by connector name.
#[derive(Debug)]
pub struct Tunnels {
    live: Mutex<HashMap<String, Vec<Live>>>,
    next: AtomicU64,
    /// Moves on every change (the control plane is told: `ztpctl connector list`).
    changes: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug)]
struct Live {
    id: u64,
    conn: Connection,
    /// Milliseconds since the Unix epoch.
    since_ms: u64,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            live: Mutex::default(),
            next: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// One live tunnel, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    pub connector: String,
    pub transport: &'static str,
    pub since_ms: u64,
}

/// A registered tunnel; removed when dropped.
#[derive(Debug)]
pub struct TunnelGuard {
    tunnels: Arc<Tunnels>,
    name: String,
    id: u64,
}

impl Tunnels {
    /// Registers a connector's connection as a tunnel.
    pub fn register(self: &Arc<Self>, name: &str, conn: Connection) -> TunnelGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let since_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.lock()
            .entry(name.to_owned())
            .or_default()
            .push(Live { id, conn, since_ms });
        self.changes.send_modify(|n| *n += 1);
        TunnelGuard {
            tunnels: self.clone(),
            name: name.to_owned(),
            id,
        }
    }

    /// A live tunnel of `name`, taking turns between several.
    pub fn pick(&self, name: &str) -> Option<Connection> {
        let live = self.lock();
        let tunnels = live.get(name)?;
        let open: Vec<&Connection> = tunnels
            .iter()
            .map(|t| &t.conn)
            .filter(|c| c.close_reason().is_none())
            .collect();
        if open.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        Some(open[turn % open.len()].clone())
    }

    /// Live tunnels of `name`.
    pub fn count(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, Vec::len)
    }

    /// Every live tunnel, sorted.
    pub fn report(&self) -> Vec<TunnelInfo> {
        let mut out: Vec<TunnelInfo> = self
            .lock()
            .iter()
            .flat_map(|(name, v)| {
                v.iter().map(|t| TunnelInfo {
                    connector: name.clone(),
                    transport: "quic",
                    since_ms: t.since_ms,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.connector, a.since_ms).cmp(&(&b.connector, b.since_ms)));
        out
    }

    /// Changes to watch (the value only counts them).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        {
            let mut live = self.tunnels.lock();
            if let Some(v) = live.get_mut(&self.name) {
                v.retain(|t| t.id != self.id);
                if v.is_empty() {
                    live.remove(&self.name);
                }
            }
        }
        self.tunnels.changes.send_modify(|n| *n += 1);
    }
}

/// The handler of services behind a connector.
#[derive(Debug)]
pub struct TunnelForwarder {
    tunnels: Arc<Tunnels>,
}

impl TunnelForwarder {
    pub fn new(tunnels: Arc<Tunnels>) -> Self {
        TunnelForwarder { tunnels }
    }
}

impl Handler for TunnelForwarder {
    fn name(&self) -> &'static str {
        "tunnel"
    }

    fn supports(&self, protocol: Protocol) -> bool {
        // udp and quic services through a connector (datagrams in the tunnel) are not
        // served yet: 501.
        matches!(protocol, Protocol::Tcp | Protocol::Auto)
    }

    fn serve<'a>(&'a self, s: Session<'a>) -> BoxOutcome<'a> {
        Box::pin(async move {
            let Session {
                client,
                target,
                caller,
                limits,
                report,
            } = s;
            let Client::Stream(client) = client else {
                return Outcome::ended("not a stream");
            };
            let Some(name) = target.connector else {
                return Outcome::refused(Refusal::Unavailable, "no connector");
            };
            let Some(conn) = self.tunnels.pick(name) else {
                return Outcome::refused(Refusal::Unavailable, "no tunnel");
            };
            report.backend_addr = Some(conn.remote_address());
            let header = match encode_header(&SessionHeader {
                service: target.service.to_owned(),
                identity: caller.identity.id.clone(),
            }) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "session header");
                    return Outcome::refused(Refusal::BadGateway, "bad session header");
                }
            };
            // The connector dials within the connect timeout; a little more for the
            // round trip to it.
            let opened =
                tokio::time::timeout(limits.connect_timeout + Duration::from_secs(1), async {
                    let (mut send, mut recv) = conn.open_bi().await.map_err(io::Error::other)?;
                    send.write_all(&header).await.map_err(io::Error::other)?;
                    let mut status = [0u8; 1];
                    recv.read_exact(&mut status)
                        .await
                        .map_err(io::Error::other)?;
                    Ok::<_, io::Error>((send, recv, status[0]))
                })
                .await;
            let (send, recv, status) = match opened {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    tracing::debug!(connector = name, error = %e, "tunnel session failed");
                    return Outcome::refused(Refusal::BadGateway, "tunnel error");
                }
                Err(_) => return Outcome::refused(Refusal::GatewayTimeout, "connector timeout"),
            };
            let mut stream = TunnelStream {
                send,
                recv,
                finished: false,
            };
            match Status::from_byte(status) {
                Some(Status::Connected) => {}
                Some(Status::Timeout) => {
                    stream.finished = true;
                    return Outcome::refused(Refusal::GatewayTimeout, "backend timeout");
                }
                Some(Status::NotAssigned) => {
                    stream.finished = true;
                    tracing::warn!(connector = name, "the connector does not serve the service");
                    return Outcome::refused(Refusal::BadGateway, "not assigned");
                }
                Some(Status::Unreachable) | None => {
                    stream.finished = true;
                    return Outcome::refused(Refusal::BadGateway, "backend unreachable");
                }
            }
            let res = splice(client, &mut stream, limits.idle_timeout).await;
            match res.end {
                SpliceEnd::Closed => Outcome::ended("closed"),
                SpliceEnd::Idle => Outcome::ended("idle timeout"),
                SpliceEnd::Error(_) => Outcome::aborted("connection error"),
            }
        })
    }
}

/// A session's stream in a tunnel, as a byte stream; reset unless finished.
struct TunnelStream {
    send: SendStream,
    recv: RecvStream,
    finished: bool,
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .send
                .reset(VarInt::from_u32(ztp_proto::quic::STREAM_ABORTED));
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.finished = true;
        }
        r
    }
}
