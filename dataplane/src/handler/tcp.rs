//! The tcp forwarder: a bounded connect to the backend, then both directions copied until
//! both have closed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use ztp_proto::names::{BackendAddr, BackendHost};
use ztp_proto::Protocol;

use super::splice::{splice, SpliceEnd};
use super::{BoxOutcome, Client, ClientIo, Handler, HandlerLimits, Outcome, Report, Session};
use crate::refusal::Refusal;

/// Why a backend could not be reached (logged; the client sees 502 or 504).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("backend connect timed out")]
    Timeout,
    #[error("backend name did not resolve: {0}")]
    Resolve(io::Error),
    #[error("backend refused or unreachable: {0}")]
    Unreachable(io::Error),
    #[error("service has no backend address")]
    NoAddress,
}

impl ConnectError {
    pub fn refusal(&self) -> Refusal {
        match self {
            ConnectError::Timeout => Refusal::GatewayTimeout,
            _ => Refusal::BadGateway,
        }
    }
}

/// Connects to a backend within `timeout`, trying each resolved address in turn.
/// `:port` means this machine: 127.0.0.1 first, then ::1.
pub async fn connect(addr: &BackendAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let deadline = Instant::now() + timeout;
    let candidates: Vec<SocketAddr> = match &addr.host {
        BackendHost::Localhost => vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port),
        ],
        BackendHost::Ip(ip) => vec![SocketAddr::new(*ip, addr.port)],
        BackendHost::Name(name) => tokio::time::timeout_at(
            deadline,
            tokio::net::lookup_host((name.as_str(), addr.port)),
        )
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Resolve)?
        .collect(),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for sa in candidates {
        match tokio::time::timeout_at(deadline, TcpStream::connect(sa)).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = e,
        }
    }
    Err(ConnectError::Unreachable(last))
}

/// The tcp forwarder.
#[derive(Debug)]
pub struct TcpForwarder;

impl Handler for TcpForwarder {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn supports(&self, protocol: Protocol) -> bool {
        protocol == Protocol::Tcp
    }

    fn serve<'a>(&'a self, s: Session<'a>) -> BoxOutcome<'a> {
        // The session is taken apart here, outside the future: the future keeps only the
        // parts it uses, once (an `async fn` keeps its arguments whole for its life,
        // beside anything moved out of them).
        let Session {
            client,
            target,
            limits,
            report,
            ..
        } = s;
        let Client::Stream(client) = client else {
            return Box::pin(std::future::ready(Outcome::ended("not a stream")));
        };
        let Some(addr) = target.backend else {
            return Box::pin(std::future::ready(refuse(ConnectError::NoAddress)));
        };
        Box::pin(forward(client, addr, limits, report))
    }
}

/// Forwards an admitted client to its service's backend.
async fn forward(
    client: &mut dyn ClientIo,
    addr: &BackendAddr,
    limits: HandlerLimits,
    report: &mut Report,
) -> Outcome {
    // Boxed: the connect's state is not kept for the session's life.
    let mut backend = match Box::pin(connect(addr, limits.connect_timeout)).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(backend.addr = %addr, error = %e, "backend connect failed");
            return refuse(e);
        }
    };
    report.backend_addr = backend.peer_addr().ok();
    let res = splice(client, &mut backend, limits.idle_timeout).await;
    match res.end {
        SpliceEnd::Closed => Outcome::ended("closed"),
        SpliceEnd::Idle => Outcome::ended("idle timeout"),
        // Either side failed mid-stream: the client must not read a clean end.
        SpliceEnd::Error(_) => Outcome::aborted("connection error"),
    }
}

fn refuse(e: ConnectError) -> Outcome {
    let r = e.refusal();
    Outcome::refused(
        r,
        match r {
            Refusal::GatewayTimeout => "backend timeout",
            _ => "backend unreachable",
        },
    )
}
