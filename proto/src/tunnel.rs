//! The tunnel protocol between a connector and the data planes (DESIGN.md, "Connectors"):
//! QUIC with ALPN `ztp-tunnel/1` on the replicas' client port, mutual TLS with the
//! connector's certificate (`spiffe://DOMAIN/connector/NAME`).
//!
//! - The connector opens one bidirectional stream first, the **control stream**, and
//!   writes one byte, [`VERSION`] (a stream exists for the peer only once it carries
//!   something). The data plane writes [`Assignments`] on it (a 4-byte big-endian length, then JSON) at once
//!   and again whenever the connector's services change. The connector dials nothing but
//!   these addresses.
//! - For each client session the data plane opens a bidirectional stream and writes a
//!   [`SessionHeader`] (a 2-byte big-endian length, then JSON, at most
//!   [`MAX_HEADER`] bytes). The connector answers one [`Status`] byte, then the stream
//!   carries the session's bytes both ways (FIN is the half-close).

use serde::{Deserialize, Serialize};

use crate::Protocol;

/// The ALPN protocol of a tunnel.
pub const ALPN: &[u8] = b"ztp-tunnel/1";
/// The ALPN protocol of a relay between replicas (mutual TLS with node certificates):
/// a session whose connector has no tunnel here goes, as one stream with a
/// [`SessionHeader`] naming the connector, to a replica that holds one.
pub const RELAY_ALPN: &[u8] = b"ztp-relay/1";
/// The byte that opens the control stream.
pub const VERSION: u8 = 1;
/// Largest session header.
pub const MAX_HEADER: usize = 4096;
/// Largest assignments message (about 20,000 services).
pub const MAX_ASSIGNMENTS: usize = 4 << 20;

/// What the connector needs for one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionHeader {
    /// The service (its name as configured).
    pub service: String,
    /// The client's identity, for the connector's logs.
    pub identity: String,
    /// On a relay: the connector whose tunnel is to carry the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
    /// A udp (or quic) service: the stream carries datagrams, each framed as
    /// `ztp_proto::framing` frames them (a 2-byte length, at most 16,384 bytes), and the
    /// connector relays them to and from a UDP socket connected to the address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub datagrams: bool,
}

/// The services a connector serves: the only addresses it dials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignments {
    /// The config version they come from.
    pub version: u64,
    pub services: Vec<Assignment>,
    /// Where the data-plane replicas are (`HOST:PORT`, their advertised addresses,
    /// sorted), as this one knows: the connector places its tunnels among them. Empty
    /// when unknown (a node without a control plane): the connector keeps its `--via`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// When the control plane took that list (ms since the Unix epoch): of two lists
    /// from different replicas, the later one stands.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replicas_at_ms: u64,
    /// This replica's own address in that list (empty when unknown): the connector
    /// knows its tunnel by it, whatever name it dialled.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One service a connector serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub name: String,
    pub protocol: Protocol,
    /// The backend `host:port` the connector dials.
    pub address: String,
}

/// The connector's answer to a session header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Connected to the backend: the session's bytes follow.
    Connected = 0,
    /// The service is not assigned to this connector: refused (and logged).
    NotAssigned = 1,
    /// The backend refused or is unreachable (the client gets 502).
    Unreachable = 2,
    /// The backend connect timed out (504).
    Timeout = 3,
    /// On a relay: the replica holds no tunnel of the connector (any more): 503.
    NoTunnel = 4,
}

impl Status {
    pub fn from_byte(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Connected,
            1 => Status::NotAssigned,
            2 => Status::Unreachable,
            3 => Status::Timeout,
            4 => Status::NoTunnel,
            _ => return None,
        })
    }
}

/// A session header as it goes on the wire.
pub fn encode_header(h: &SessionHeader) -> Result<Vec<u8>, String> {
    let json = serde_json_bytes(h)?;
    if json.len() > MAX_HEADER {
        return Err(format!("session header of {} bytes", json.len()));
    }
    let mut out = Vec::with_capacity(2 + json.len());
    out.extend_from_slice(&(json.len() as u16).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// An assignments message as it goes on the wire.
pub fn encode_assignments(a: &Assignments) -> Result<Vec<u8>, String> {
    let json = serde_json_bytes(a)?;
    if json.len() > MAX_ASSIGNMENTS {
        return Err(format!("assignments of {} bytes", json.len()));
    }
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

fn serde_json_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| e.to_string())
}

/// Decodes a header body (after its length).
pub fn decode_header(body: &[u8]) -> Result<SessionHeader, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad session header: {e}"))
}

/// Decodes an assignments body (after its length).
pub fn decode_assignments(body: &[u8]) -> Result<Assignments, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad assignments: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_assignments_round_trip_and_are_bounded() {
        let h = SessionHeader {
            service: "db.svc.internal".into(),
            identity: "alice@example.com".into(),
            connector: None,
            datagrams: false,
        };
        let wire = encode_header(&h).unwrap();
        let len = u16::from_be_bytes([wire[0], wire[1]]) as usize;
        assert_eq!(len, wire.len() - 2);
        assert_eq!(decode_header(&wire[2..]).unwrap(), h);
        let huge = SessionHeader {
            service: "x".repeat(MAX_HEADER),
            identity: String::new(),
            connector: None,
            datagrams: false,
        };
        assert!(encode_header(&huge).is_err());
        assert!(decode_header(b"{\"service\":1}").is_err());

        let a = Assignments {
            version: 7,
            services: vec![Assignment {
                name: "db.svc.internal".into(),
                protocol: Protocol::Tcp,
                address: "10.0.0.5:5432".into(),
            }],
            replicas: vec!["10.1.0.1:9743".into()],
            replicas_at_ms: 1,
            replica: "10.1.0.1:9743".into(),
        };
        let wire = encode_assignments(&a).unwrap();
        let len = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
        assert_eq!(decode_assignments(&wire[4..4 + len]).unwrap(), a);
        for b in 0..=4u8 {
            assert_eq!(Status::from_byte(b).unwrap() as u8, b);
        }
        assert_eq!(Status::from_byte(9), None);
    }
}
