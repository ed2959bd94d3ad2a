//! Handlers: what serves a client once it is authorized.
//!
//! Every handler is a [`Handler`] in the [`Registry`]. A service's `handler` field picks
//! one by name; without it, the forwarder for the connection's protocol serves it. A
//! handler that does not support the protocol refuses with 501: the snapshot stays
//! valid, and a warning is logged.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use ztp_proto::Protocol;

use crate::authz::Permit;
use crate::identity::ClientIdentity;
use crate::refusal::Refusal;

pub mod framed;
pub mod identity_echo;
pub mod quic;
pub mod splice;
pub mod tcp;
pub mod udp;

/// The client's side of a connection, after the gate.
pub type ClientStream = TlsStream<TcpStream>;

/// The ALPN protocol of the framed-datagram extension.
pub const DGRAM_ALPN: &[u8] = b"ztp-dgram";

/// Limits a handler works under.
#[derive(Debug, Clone, Copy)]
pub struct HandlerLimits {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a udp or quic backend has to answer in spec mode.
    pub udp_timeout: Duration,
}

/// An authorized connection, handed to its handler.
pub struct Session<'a> {
    pub client: Box<ClientStream>,
    /// The protocol chosen for the connection (declared, or detected for `auto`).
    pub protocol: Protocol,
    /// The client negotiated the framed-datagram extension (ALPN `ztp-dgram`).
    pub framed: bool,
    /// Bytes already read from the client (while detecting the protocol), to be served
    /// first.
    pub initial: Vec<u8>,
    pub permit: &'a Permit,
    pub identity: &'a ClientIdentity,
    pub limits: HandlerLimits,
    /// Completes when the connection is no longer authorized; long-lived handlers race
    /// it and close the client (403 line if nothing was forwarded, else close_notify).
    pub revoked: crate::reauth::Revoked,
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

impl Outcome {
    pub fn ended(end: &'static str) -> Self {
        Outcome {
            end,
            ..Outcome::default()
        }
    }
}

pub type BoxOutcome<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Something that serves authorized clients: a forwarder, or a gateway that speaks the
/// client's protocol itself.
pub trait Handler: Send + Sync + fmt::Debug {
    /// The name a service's `handler` field uses.
    fn name(&self) -> &'static str;
    /// Whether the handler can serve a connection of this protocol.
    fn supports(&self, protocol: Protocol) -> bool;
    /// Serves the session to its end.
    fn serve<'a>(&'a self, session: Session<'a>) -> BoxOutcome<'a>;
}

/// The handlers a data plane knows, by name, and the default forwarders.
#[derive(Debug, Clone)]
pub struct Registry {
    named: HashMap<&'static str, Arc<dyn Handler>>,
    tcp: Arc<dyn Handler>,
    udp: Arc<dyn Handler>,
    quic: Arc<dyn Handler>,
}

impl Registry {
    /// The built-in handlers.
    pub fn builtin() -> Self {
        let mut named: HashMap<&'static str, Arc<dyn Handler>> = HashMap::new();
        let echo: Arc<dyn Handler> = Arc::new(identity_echo::IdentityEcho);
        named.insert(echo.name(), echo);
        Registry {
            named,
            tcp: Arc::new(tcp::TcpForwarder),
            udp: Arc::new(udp::UdpForwarder),
            quic: Arc::new(quic::QuicForwarder),
        }
    }

    /// A handler by the name a service gives.
    pub fn named(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.named.get(name)
    }

    /// Names of the handlers a service may name.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.named.keys().copied()
    }

    /// The forwarder for a (chosen) protocol.
    pub fn forwarder(&self, protocol: Protocol) -> &Arc<dyn Handler> {
        match protocol {
            Protocol::Udp => &self.udp,
            Protocol::Quic => &self.quic,
            Protocol::Tcp | Protocol::Auto => &self.tcp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_knows_every_handler_a_snapshot_may_name() {
        let reg = Registry::builtin();
        for name in ztp_proto::KNOWN_HANDLERS {
            assert!(reg.named(name).is_some(), "{name} not registered");
        }
        let mut names: Vec<_> = reg.names().collect();
        names.sort();
        let mut known = ztp_proto::KNOWN_HANDLERS.to_vec();
        known.sort();
        assert_eq!(names, known);
    }

    #[test]
    fn forwarders_support_their_protocol_only() {
        let reg = Registry::builtin();
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Quic] {
            let f = reg.forwarder(p);
            assert!(f.supports(p), "{} must support {p:?}", f.name());
        }
        assert!(!reg.forwarder(Protocol::Tcp).supports(Protocol::Udp));
        let echo = reg.named("identity-echo").unwrap();
        assert!(echo.supports(Protocol::Tcp));
        assert!(!echo.supports(Protocol::Udp) && !echo.supports(Protocol::Quic));
    }
}
