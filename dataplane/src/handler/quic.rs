//! The quic forwarder: the udp forwarder's exchange, byte-exact. Nothing in the client's
//! bytes is parsed or changed; QUIC's own encryption stays end to end between client
//! and backend.

use ztp_proto::Protocol;

use super::{udp, BoxOutcome, Handler, Session};

#[derive(Debug)]
pub struct QuicForwarder;

impl Handler for QuicForwarder {
    fn name(&self) -> &'static str {
        "quic"
    }

    fn supports(&self, protocol: Protocol) -> bool {
        protocol == Protocol::Quic
    }

    fn serve<'a>(&'a self, s: Session<'a>) -> BoxOutcome<'a> {
        Box::pin(udp::forward(s))
    }
}
