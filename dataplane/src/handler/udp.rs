//! The udp forwarder.
//!
//! Spec mode: the plaintext of the client's first TLS record (a client sends one
//! datagram per record) goes to the backend as one datagram from an ephemeral socket; the
//! first datagram back (within `--udp-timeout`) goes to the client, and the connection
//! closes. A timeout or a failed backend just closes: a line would read as a datagram.
//!
//! With ALPN `ztp-dgram` (or any other datagram channel) the session carries many
//! datagrams both ways ([`relay`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use ztp_proto::framing::MAX_FRAME;
use ztp_proto::names::{BackendAddr, BackendHost};
use ztp_proto::Protocol;

use super::{BoxOutcome, Client, DatagramChannel, Handler, Outcome, Session};

#[derive(Debug)]
pub struct UdpForwarder;

impl Handler for UdpForwarder {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn supports(&self, protocol: Protocol) -> bool {
        protocol == Protocol::Udp
    }

    fn serve<'a>(&'a self, s: Session<'a>) -> BoxOutcome<'a> {
        Box::pin(forward(s))
    }
}

/// Serves a udp or quic session: framed datagrams when negotiated, spec mode otherwise.
pub async fn forward(s: Session<'_>) -> Outcome {
    let Session {
        client,
        target,
        limits,
        report,
        ..
    } = s;
    let Some(addr) = target.backend else {
        return Outcome::ended("no backend address");
    };
    let sock = match socket(addr, limits.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(backend.addr = %addr, error = %e, "udp backend unusable");
            return Outcome::ended("backend unreachable");
        }
    };
    report.backend_addr = sock.peer_addr().ok();
    let client = match client {
        Client::Datagrams(channel) => {
            return Outcome::ended(relay(channel, &sock, limits.idle_timeout).await)
        }
        Client::Stream(client) => client,
    };

    // Spec mode: one message out, one datagram back.
    let first = match tokio::time::timeout(limits.idle_timeout, client.read_message()).await {
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => return Outcome::ended("closed"),
        Ok(Err(_)) => return Outcome::aborted("connection error"),
        Err(_) => return Outcome::ended("idle timeout"),
    };
    if let Err(e) = sock.send(&first).await {
        tracing::debug!(error = %e, "datagram to backend failed");
        return Outcome::ended("backend unreachable");
    }
    drop(first);
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(limits.udp_timeout, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => {
            let written = async {
                client.write_all(&buf[..n]).await?;
                client.flush().await
            };
            match tokio::time::timeout(limits.udp_timeout, written).await {
                Ok(Ok(())) => Outcome::answered("answered"),
                _ => Outcome::aborted("connection error"),
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "backend datagram error");
            Outcome::ended("backend unreachable")
        }
        Err(_) => Outcome::ended("backend timeout"),
    }
}

/// An ephemeral UDP socket connected to the backend, so that only the backend's
/// datagrams are received. `:port` means 127.0.0.1; a name is resolved (bounded by
/// `timeout`) and its first address used.
pub async fn socket(addr: &BackendAddr, timeout: Duration) -> io::Result<UdpSocket> {
    let target: SocketAddr = match &addr.host {
        BackendHost::Localhost => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port),
        BackendHost::Ip(ip) => SocketAddr::new(*ip, addr.port),
        BackendHost::Name(name) => {
            tokio::time::timeout(timeout, tokio::net::lookup_host((name.as_str(), addr.port)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "name resolution timed out"))??
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "name has no address"))?
        }
    };
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(target).await?;
    Ok(sock)
}

/// Carries datagrams between the client's channel and a connected UDP socket until the
/// client closes, an error, or `idle` passes with nothing moving. Returns how it ended.
pub async fn relay(
    client: &mut dyn DatagramChannel,
    sock: &UdpSocket,
    idle: Duration,
) -> &'static str {
    let mut up = Vec::new();
    // One byte more than a frame can carry, to tell an oversize datagram.
    let mut down = vec![0u8; MAX_FRAME + 1];
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = client.recv(&mut up) => match r {
                Ok(true) => {
                    // Datagrams are lossy; a refused send is a lost datagram.
                    if let Err(e) = sock.send(&up).await {
                        tracing::debug!(error = %e, "datagram to backend lost");
                    }
                }
                Ok(false) => return "closed",
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::debug!(error = %e, "bad frame from client");
                    return "bad frame";
                }
                Err(_) => return "connection error",
            },
            r = sock.recv(&mut down) => match r {
                Ok(n) if n > MAX_FRAME => {
                    tracing::debug!(bytes = n, "backend datagram too large for a frame; dropped");
                }
                Ok(n) => {
                    // Bounded: a client that stops reading must not hold the session
                    // past the idle timeout.
                    if !matches!(tokio::time::timeout(idle, client.send(&down[..n])).await, Ok(Ok(()))) {
                        return "connection error";
                    }
                }
                // An ICMP error from an earlier send: the datagram was lost.
                Err(e) => tracing::debug!(error = %e, "backend datagram error"),
            },
            _ = &mut timer => return "idle timeout",
        }
        timer.as_mut().reset(Instant::now() + idle);
    }
}
