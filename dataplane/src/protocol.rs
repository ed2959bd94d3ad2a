//! Protocol choice: how an authorized connection is carried.
//!
//! A declared protocol (`tcp`, `udp`, `quic`) is used as is, never detected. `auto`
//! is carried as a byte stream (tcp): detection by peeking at the first bytes arrives
//! with the datagram half of the protocol, and every stream protocol it detects (TLS,
//! SSH, HTTP/1) goes to tcp forwarding anyway.

use ztp_proto::Protocol;

use crate::routing::Route;

/// The protocol a connection to `route` is carried with.
pub fn choose(route: &Route) -> Protocol {
    match route.protocol {
        Protocol::Auto => Protocol::Tcp,
        declared => declared,
    }
}
