//! A QUIC client (quinn) for the data plane's QUIC transport, with the same
//! [`ClientOptions`] as the TCP client (SNI, certificate, ALPN).
//!
//! A QUIC client's handshake completes before the server has looked at its certificate;
//! the server confirms it (HANDSHAKE_DONE) only after. [`connect`] waits for that
//! confirmation, so a refusal shows as the error it closed the connection with.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, TransportConfig, VarInt};

use crate::client::{ClientOptions, NO_SNI_VERIFY_NAME};

/// The ALPN the data plane's QUIC listener requires.
pub const ALPN: &[u8] = b"ztp/1";

/// How a QUIC connection attempt ended, when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The server's TLS stack refused: the alert (`0x100 + alert` on the wire).
    Alert(u8),
    /// The server closed after the handshake: application code and reason.
    App(u64, String),
    /// Nothing or something else (timeout, reset, local error), described.
    Other(String),
}

impl Closed {
    /// From a connection's error.
    pub fn of(e: &ConnectionError) -> Closed {
        match e {
            ConnectionError::ConnectionClosed(c) => {
                let code = u64::from(c.error_code);
                if (0x100..0x200).contains(&code) {
                    Closed::Alert((code - 0x100) as u8)
                } else {
                    Closed::Other(format!("transport close {code:#x}: {c}"))
                }
            }
            ConnectionError::ApplicationClosed(a) => Closed::App(
                u64::from(a.error_code),
                String::from_utf8_lossy(&a.reason).into_owned(),
            ),
            other => Closed::Other(other.to_string()),
        }
    }
}

/// TLS alert codes the gate sends over QUIC.
pub mod alert {
    /// `access_denied`: no or unknown SNI (no certificate resolves).
    pub const ACCESS_DENIED: u8 = 49;
    /// `no_application_protocol`: no ALPN `ztp/1`.
    pub const NO_APPLICATION_PROTOCOL: u8 = 120;
    /// `certificate_required`.
    pub const CERTIFICATE_REQUIRED: u8 = 116;
    /// `unknown_ca`.
    pub const UNKNOWN_CA: u8 = 48;
    /// `certificate_expired`.
    pub const CERTIFICATE_EXPIRED: u8 = 45;
    /// `certificate_revoked`.
    pub const CERTIFICATE_REVOKED: u8 = 44;
}

/// A client endpoint on loopback (IPv4 or IPv6, like `server`).
pub fn endpoint_for(server: SocketAddr) -> Endpoint {
    let local: SocketAddr = if server.is_ipv6() {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    Endpoint::client(local).expect("a client endpoint on loopback")
}

/// The quinn client config of `opts` (its ALPN as given: add [`ALPN`] for a real
/// client), with keepalives and datagrams.
pub fn client_config(opts: &ClientOptions) -> quinn::ClientConfig {
    let crypto = QuicClientConfig::try_from(opts.client_config()).expect("a TLS 1.3 config");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(VarInt::from_u32(30_000).into()))
        .initial_mtu(1452)
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    config.transport_config(Arc::new(transport));
    config
}

/// Connects to `addr` and waits for the server's confirmation (HANDSHAKE_DONE), bounded
/// by 15 s. The server name is the options' SNI (or [`NO_SNI_VERIFY_NAME`] when none is
/// sent).
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    opts: &ClientOptions,
) -> Result<Connection, Closed> {
    let name = opts.sni_name().unwrap_or(NO_SNI_VERIFY_NAME).to_owned();
    let connecting = endpoint
        .connect_with(client_config(opts), addr, &name)
        .map_err(|e| Closed::Other(e.to_string()))?;
    let attempt = async {
        let conn = connecting.await.map_err(|e| Closed::of(&e))?;
        confirmed(&conn).await?;
        Ok(conn)
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .unwrap_or_else(|_| Err(Closed::Other("timed out".into())))
}

/// Waits until the server confirmed the handshake (it accepted the certificate), or the
/// error it closed with.
pub async fn confirmed(conn: &Connection) -> Result<(), Closed> {
    loop {
        if let Some(e) = conn.close_reason() {
            return Err(Closed::of(&e));
        }
        if conn.stats().frame_rx.handshake_done > 0 {
            return Ok(());
        }
        tokio::select! {
            e = conn.closed() => return Err(Closed::of(&e)),
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
}

/// Options for a real client: `opts` offering ALPN `ztp/1`.
pub fn with_alpn(opts: ClientOptions) -> ClientOptions {
    opts.alpn(&[ALPN])
}

/// A flow's datagram: the flow id as a QUIC varint, then the payload.
pub fn flow_datagram(flow: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    if flow < 1 << 6 {
        out.push(flow as u8);
    } else if flow < 1 << 14 {
        out.extend_from_slice(&((flow as u16) | 0x4000).to_be_bytes());
    } else if flow < 1 << 30 {
        out.extend_from_slice(&((flow as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(flow | 0xC000_0000_0000_0000).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// Splits a flow's datagram into its flow id and payload.
pub fn split_flow(d: &[u8]) -> Option<(u64, &[u8])> {
    let first = *d.first()?;
    let len = 1usize << (first >> 6);
    let bytes = d.get(..len)?;
    let mut v = u64::from(first & 0x3F);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, &d[len..]))
}
