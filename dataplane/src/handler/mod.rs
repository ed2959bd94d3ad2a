//! Handlers: what serves a client once the pipeline has admitted it.
//!
//! Every handler is a [`Handler`] in the [`Registry`]. A service's `handler` field picks
//! one by name; without it, the forwarder for the connection's protocol serves it. A
//! handler that does not support the protocol refuses with 501: the snapshot stays
//! valid, and a warning is logged.
//!
//! Handlers are transport-neutral: they see the client through [`ClientIo`] (a byte
//! stream: TLS over TCP today, a QUIC stream or a tunnel's stream later) or a
//! [`DatagramChannel`] (framed datagrams today, QUIC DATAGRAM frames later), the narrow
//! [`Target`] of their route and the [`Caller`]. They never see a socket type, the
//! snapshot, or the revocation and drain signals: the pipeline (the `session` stage) races
//! every handler against those and ends the session itself, so no handler can forget to.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use ztp_proto::names::BackendAddr;
use ztp_proto::Protocol;

use crate::identity::ClientIdentity;
use crate::refusal::Refusal;

pub mod framed;
pub mod identity_echo;
pub mod quic;
pub mod splice;
pub mod tcp;
pub mod tunnel;
pub mod udp;

/// The ALPN protocol of the framed-datagram extension.
pub const DGRAM_ALPN: &[u8] = b"ztp-dgram";

/// A boxed future of an I/O result, for the object-safe client traits.
pub type BoxIo<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// The client's side of a session as a byte stream. `shutdown` ends the client's
/// direction cleanly (close_notify on TLS, FIN on a QUIC stream).
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {
    /// The client's next message as its transport delimits it (the plaintext of one TLS
    /// record), without merging messages that arrived together; `None` when the client
    /// closed first. For spec-mode datagram services, where one message is one datagram.
    fn read_message(&mut self) -> BoxIo<'_, Option<Vec<u8>>>;
}

impl<T: ClientIo + ?Sized> ClientIo for Box<T> {
    fn read_message(&mut self) -> BoxIo<'_, Option<Vec<u8>>> {
        (**self).read_message()
    }
}

/// The client's side of a datagram session: whole datagrams both ways.
pub trait DatagramChannel: Send {
    /// The client's next datagram, into `buf` (replacing its contents); `false` when the
    /// client closed. Cancel-safe: a datagram is never half taken.
    fn recv<'a>(&'a mut self, buf: &'a mut Vec<u8>) -> BoxIo<'a, bool>;
    /// Sends one datagram to the client (at most [`ztp_proto::framing::MAX_FRAME`]
    /// bytes; a larger one is an `InvalidInput` error and nothing is sent).
    fn send<'a>(&'a mut self, datagram: &'a [u8]) -> BoxIo<'a, ()>;
}

/// How the client is carried in a session.
pub enum Client<'a> {
    Stream(&'a mut dyn ClientIo),
    Datagrams(&'a mut dyn DatagramChannel),
}

/// What a handler knows of its route: the service's name, backend and protocol.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub service: &'a str,
    pub backend: Option<&'a BackendAddr>,
    /// The protocol chosen for the session (declared, or detected for `auto`).
    pub protocol: Protocol,
    /// The connector whose tunnels reach the backend, if the service has one.
    pub connector: Option<&'a str>,
}

/// Who is calling: the certificate's identity and the directory user it maps to.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub identity: &'a ClientIdentity,
    pub user: &'a str,
    pub groups: &'a [String],
}

/// Limits a handler works under.
#[derive(Debug, Clone, Copy)]
pub struct HandlerLimits {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a udp or quic backend has to answer in spec mode.
    pub udp_timeout: Duration,
}

/// An admitted session, handed to its handler.
pub struct Session<'a> {
    pub client: Client<'a>,
    pub target: Target<'a>,
    pub caller: Caller<'a>,
    pub limits: HandlerLimits,
    /// Where the handler notes what the pipeline records even when it ends the session
    /// before the handler returns.
    pub report: &'a mut Report,
}

/// What a handler reports while it works.
#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    /// The backend address the session reached.
    pub backend_addr: Option<SocketAddr>,
}

/// How a handled session ended, when the handler ended it. The pipeline then closes the
/// client as asked; a handler never writes a refusal line or closes the client itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// A short constant description of the end.
    pub end: &'static str,
    pub close: Close,
}

/// How the pipeline closes the client after the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// close_notify: the session ended cleanly.
    Clean,
    /// close_notify, then read (bounded) what the client still sends, so that it reads
    /// an answer just written rather than a reset.
    Linger,
    /// Write this refusal line instead of service, then close as `Linger`.
    Refuse(Refusal),
    /// No close_notify: the session was cut (a backend error mid-stream), and a clean
    /// end would tell the client it got everything.
    Abort,
}

impl Outcome {
    pub fn ended(end: &'static str) -> Self {
        Outcome {
            end,
            close: Close::Clean,
        }
    }

    /// An answer was written: close, and let the client read it.
    pub fn answered(end: &'static str) -> Self {
        Outcome {
            end,
            close: Close::Linger,
        }
    }

    pub fn refused(refusal: Refusal, end: &'static str) -> Self {
        Outcome {
            end,
            close: Close::Refuse(refusal),
        }
    }

    pub fn aborted(end: &'static str) -> Self {
        Outcome {
            end,
            close: Close::Abort,
        }
    }
}

pub type BoxOutcome<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Something that serves admitted clients: a forwarder, or a gateway that speaks the
/// client's protocol itself.
pub trait Handler: Send + Sync + fmt::Debug {
    /// The name a service's `handler` field uses.
    fn name(&self) -> &'static str;
    /// Whether the handler can serve a connection of this protocol.
    fn supports(&self, protocol: Protocol) -> bool;
    /// Serves the session until the handler is done with it. The pipeline may drop the
    /// future at any await point (a later decision, drain) and end the session itself.
    fn serve<'a>(&'a self, session: Session<'a>) -> BoxOutcome<'a>;
}

/// The handlers a data plane knows, by name, and the default forwarders.
#[derive(Debug, Clone)]
pub struct Registry {
    named: HashMap<&'static str, Arc<dyn Handler>>,
    tcp: Arc<dyn Handler>,
    udp: Arc<dyn Handler>,
    quic: Arc<dyn Handler>,
    /// Serves services behind a connector, through its tunnels.
    tunnel: Arc<dyn Handler>,
    tunnels: Arc<tunnel::Tunnels>,
}

impl Registry {
    /// The built-in handlers.
    pub fn builtin() -> Self {
        let mut named: HashMap<&'static str, Arc<dyn Handler>> = HashMap::new();
        let echo: Arc<dyn Handler> = Arc::new(identity_echo::IdentityEcho);
        named.insert(echo.name(), echo);
        let tunnels = Arc::new(tunnel::Tunnels::default());
        Registry {
            named,
            tcp: Arc::new(tcp::TcpForwarder),
            udp: Arc::new(udp::UdpForwarder),
            quic: Arc::new(quic::QuicForwarder),
            tunnel: Arc::new(tunnel::TunnelForwarder::new(tunnels.clone())),
            tunnels,
        }
    }

    /// The handler of services behind a connector.
    pub fn tunnel(&self) -> &Arc<dyn Handler> {
        &self.tunnel
    }

    /// The live tunnels of this node's connectors.
    pub fn tunnels(&self) -> &Arc<tunnel::Tunnels> {
        &self.tunnels
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
