//! Handlers: what serves a client once it is authorized.
//!
//! The default handler of a service is the forwarder for its protocol; a service may name
//! another one (`identity-echo` today). A handler that does not support the service's
//! protocol refuses with 501.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use ztp_proto::{Protocol, Service};

use crate::authz::Permit;
use crate::identity::ClientIdentity;
use crate::refusal::{self, Refusal};

pub mod identity_echo;
pub mod splice;
pub mod tcp;

/// The client's side of a connection, after the gate.
pub type ClientStream = TlsStream<TcpStream>;

/// Which handler serves a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerKind {
    /// The forwarder for the service's protocol.
    Forward,
    IdentityEcho,
}

impl HandlerKind {
    pub fn for_service(s: &Service) -> Result<Self, String> {
        match s.handler.as_deref() {
            None => Ok(HandlerKind::Forward),
            Some("identity-echo") => Ok(HandlerKind::IdentityEcho),
            Some(other) => Err(format!("unknown handler {other:?}")),
        }
    }

    /// Whether the handler can serve a connection of this protocol.
    pub fn supports(self, protocol: Protocol) -> bool {
        match self {
            // udp and quic forwarding arrive with the datagram half of the protocol.
            HandlerKind::Forward => protocol == Protocol::Tcp,
            HandlerKind::IdentityEcho => protocol == Protocol::Tcp,
        }
    }
}

/// Limits a handler works under.
#[derive(Debug, Clone, Copy)]
pub struct HandlerLimits {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// How a handled connection ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Client to backend.
    pub bytes_up: u64,
    /// Backend to client.
    pub bytes_down: u64,
    /// The refusal line sent instead of service, if any.
    pub refusal: Option<Refusal>,
    /// A short constant description of the end.
    pub end: &'static str,
    pub backend_addr: Option<std::net::SocketAddr>,
}

/// Serves an authorized client with the handler its service names.
pub async fn run(
    mut client: ClientStream,
    protocol: Protocol,
    permit: &Permit,
    identity: &ClientIdentity,
    limits: HandlerLimits,
) -> Outcome {
    let kind = permit.route.handler;
    if !kind.supports(protocol) {
        tracing::warn!(
            service.name = %permit.route.name,
            protocol = protocol.as_str(),
            "handler does not support the service's protocol"
        );
        refusal::deliver(&mut client, Refusal::NotImplemented).await;
        return Outcome {
            refusal: Some(Refusal::NotImplemented),
            end: "protocol not supported by handler",
            ..Outcome::default()
        };
    }
    match kind {
        HandlerKind::Forward => tcp::forward(client, permit, limits).await,
        HandlerKind::IdentityEcho => identity_echo::serve(client, permit, identity).await,
    }
}
