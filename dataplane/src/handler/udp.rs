//! The udp forwarder.
//!
//! Spec mode: the plaintext of the client's first TLS record (a client sends one
//! datagram per record) goes to the backend as one datagram from an ephemeral socket; the
//! first datagram back (within `--udp-timeout`) goes to the client, and the connection
//! closes. A timeout or a failed backend just closes: a line would read as a datagram.
//!
//! With ALPN `ztp-dgram` the session carries many datagrams both ways ([`framed`]).

use std::io::{self, BufRead, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use ztp_proto::names::{BackendAddr, BackendHost};
use ztp_proto::Protocol;

use super::{framed, BoxOutcome, ClientStream, Handler, Outcome, Session};
use crate::refusal;

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

/// Serves a udp or quic session: framed when negotiated, spec mode otherwise.
pub async fn forward(s: Session<'_>) -> Outcome {
    let Session {
        mut client,
        framed,
        permit,
        limits,
        mut revoked,
        ..
    } = s;
    let Some(addr) = permit.route.backend.as_ref() else {
        return close(&mut client, "no backend address").await;
    };
    let sock = match socket(addr, limits.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(backend.addr = %addr, error = %e, "udp backend unusable");
            return close(&mut client, "backend unreachable").await;
        }
    };
    let backend_addr = sock.peer_addr().ok();
    if framed {
        let r = framed::relay(&mut client, &sock, limits.idle_timeout, &mut revoked).await;
        return Outcome {
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
            refusal: None,
            end: r.end,
            backend_addr,
        };
    }

    // Spec mode: one record out, one datagram back.
    let first = match tokio::time::timeout(limits.idle_timeout, read_record(&mut client)).await {
        Ok(Ok(Some(record))) => record,
        Ok(Ok(None)) => return close(&mut client, "closed").await,
        Ok(Err(_)) => return Outcome::ended("connection error"),
        Err(_) => return close(&mut client, "idle timeout").await,
    };
    let mut out = Outcome {
        bytes_up: first.len() as u64,
        backend_addr,
        ..Outcome::default()
    };
    if let Err(e) = sock.send(&first).await {
        tracing::debug!(error = %e, "datagram to backend failed");
        out.end = "backend unreachable";
        close(&mut client, "").await;
        return out;
    }
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(limits.udp_timeout, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => {
            refusal::send_and_close(&mut client, &buf[..n]).await;
            out.bytes_down = n as u64;
            out.end = "answered";
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "backend datagram error");
            out.end = "backend unreachable";
            close(&mut client, "").await;
        }
        Err(_) => {
            out.end = "backend timeout";
            close(&mut client, "").await;
        }
    }
    out
}

/// Closes with close_notify and nothing else.
async fn close(client: &mut ClientStream, end: &'static str) -> Outcome {
    let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
    Outcome::ended(end)
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

/// Reads the plaintext of exactly one TLS record from the client: `None` when the client
/// closed first. rustls keeps received plaintext as one chunk per record; reading through
/// `AsyncRead` would merge records that arrived together.
pub async fn read_record(client: &mut ClientStream) -> io::Result<Option<Vec<u8>>> {
    loop {
        let (tcp, conn) = client.get_mut();
        let mut reader = conn.reader();
        match reader.fill_buf() {
            Ok([]) => return Ok(None),
            Ok(chunk) => {
                let record = chunk.to_vec();
                reader.consume(record.len());
                return Ok(Some(record));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        // More ciphertext is needed.
        tcp.readable().await?;
        match conn.read_tls(&mut TryRead(tcp)) {
            Ok(0) => {
                // End of stream: rustls now reports a clean or unclean close.
            }
            Ok(_) => {
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// `std::io::Read` over a tokio socket's non-blocking `try_read`.
struct TryRead<'a>(&'a TcpStream);

impl Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}
