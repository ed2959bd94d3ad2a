//! The QUIC transport from clients (DESIGN.md, "QUIC transport"): QUIC v1 with TLS 1.3
//! and ALPN `ztp/1` on UDP (`--quic-listen`, by default the TCP listener's address).
//!
//! The gate is the TCP listener's, decided by the same functions: per-source preauth
//! (ranges, caps, rate) on each new connection, SNI and the client chain in the handshake
//! (`config`), then [`crate::admission::decide`] (`conn`). A connection's sessions (a
//! stream each for tcp services, a datagram flow each for udp and quic services) run
//! through the pipeline's session stage like TCP connections do.
//!
//! Under a flood of new connections the listener asks for address validation (a Retry)
//! before it spends anything on crypto: above `retry_above` handshakes in flight, a
//! client that has not proven its address gets a Retry first, and only then is it
//! counted against its source's rate (a spoofed source cannot drain a real one's).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Endpoint, EndpointConfig};

use crate::conn::ConnContext;
use crate::preauth::{self, Gate};

pub mod config;
pub mod conn;
pub mod datagram;
pub mod relay;
pub mod stream;
pub mod tunnel;

/// Application error code and reason of a connection closed because its identity holds
/// too many QUIC connections already.
pub const TOO_MANY_CODE: u16 = 429;
pub const TOO_MANY_LINE: &str = "ZTP-ERROR 429 too many connections";

/// The QUIC listener's settings.
#[derive(Debug, Clone)]
pub struct QuicSettings {
    pub listen: SocketAddr,
    /// Concurrent bidirectional streams per connection.
    pub max_streams: u32,
    /// A datagram flow with nothing moving for this long ends.
    pub udp_idle: Duration,
    /// Live QUIC connections per client identity.
    pub max_connections_per_identity: u32,
    /// Handshakes in flight above which unvalidated clients get a Retry first (0: always).
    pub retry_above: usize,
    /// Trust domain of connector identities (`spiffe://DOMAIN/connector/NAME`).
    pub trust_domain: String,
}

/// What the listener and its connections share.
pub struct Quic {
    pub ctx: Arc<ConnContext>,
    pub gate: Gate,
    pub udp_idle: Duration,
    pub trust_domain: String,
    /// The node's certificate (with a control plane): presented to relaying replicas.
    pub node_key: Option<Arc<rustls::sign::CertifiedKey>>,
    /// The endpoint's server config: each connection gets a copy with its own TLS config.
    base: quinn::ServerConfig,
    pub(crate) handshaking: AtomicUsize,
    retry_above: usize,
    pub(crate) identities: IdentityCaps,
    /// True once the node stops accepting: connections with no session close.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    stop_accepting: tokio::sync::watch::Sender<bool>,
}

/// Binds the UDP socket and makes the endpoint. Call inside the runtime.
pub fn bind(
    settings: &QuicSettings,
    ctx: Arc<ConnContext>,
    gate: Gate,
    node_key: Option<Arc<rustls::sign::CertifiedKey>>,
) -> io::Result<(Endpoint, Arc<Quic>)> {
    let socket = config::socket(settings.listen)?;
    let active = ctx.state.borrow().clone();
    let crypto = config::refuse_all(&active.tls).map_err(io::Error::other)?;
    drop(active);
    let mut base = quinn::ServerConfig::new(crypto, token_key()?);
    base.transport_config(Arc::new(config::transport(
        ctx.handler.idle_timeout,
        settings.max_streams,
    )))
    .max_incoming(4096)
    .incoming_buffer_size(64 * 1024)
    .incoming_buffer_size_total(32 << 20);
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(ztp_proto::quic::MAX_UDP_PAYLOAD)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let endpoint = Endpoint::new(
        endpoint_config,
        Some(base.clone()),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let (stop_accepting, stopping) = tokio::sync::watch::channel(false);
    let quic = Arc::new(Quic {
        stopping,
        stop_accepting,
        ctx,
        gate,
        udp_idle: settings.udp_idle,
        trust_domain: settings.trust_domain.clone(),
        node_key,
        base,
        handshaking: AtomicUsize::new(0),
        retry_above: settings.retry_above,
        identities: IdentityCaps::new(settings.max_connections_per_identity),
    });
    Ok((endpoint, quic))
}

/// One key for the process's Retry tokens (a key per snapshot would invalidate the
/// tokens in flight at each change).
fn token_key() -> io::Result<Arc<dyn quinn::crypto::HandshakeTokenKey>> {
    use ring::rand::SecureRandom;
    let mut secret = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| io::Error::other("no randomness for the QUIC token key"))?;
    Ok(Arc::new(ring::hkdf::Prk::new_less_safe(
        ring::hkdf::HKDF_SHA256,
        &secret,
    )))
}

/// Accepts connections until `shutdown` completes; then the endpoint refuses new ones
/// while the live ones go on (they end with the drain, see [`crate::serve`]).
pub async fn run(endpoint: Endpoint, q: Arc<Quic>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            _ = &mut shutdown => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        // Accepting processes the client's first flight, the server's signature
        // included: each in its own task, so that handshakes use every worker.
        let q = q.clone();
        tokio::spawn(async move { accept(&q, incoming) });
    }
    endpoint.set_server_config(None);
    q.stop_accepting.send_replace(true);
}

/// Decides one incoming connection before any crypto, and starts its handshake.
fn accept(q: &Arc<Quic>, incoming: quinn::Incoming) {
    let ctx = &q.ctx;
    let peer = preauth::canonical(incoming.remote_address());
    if ctx.ready.stale() {
        ctx.metrics.connection_shed("snapshot stale", peer);
        incoming.refuse();
        return;
    }
    if !q.gate.in_range(peer.ip()) {
        // Silence, as for a port that is not there.
        ctx.metrics
            .connection_shed(preauth::Shed::Denied.as_str(), peer);
        incoming.ignore();
        return;
    }
    if !incoming.remote_address_validated()
        && incoming.may_retry()
        && q.handshaking.load(Ordering::Relaxed) >= q.retry_above
    {
        let _ = incoming.retry();
        return;
    }
    let permit = match q.gate.admit(peer.ip()) {
        Ok(p) => p,
        Err(shed) => {
            ctx.metrics.connection_shed(shed.as_str(), peer);
            incoming.refuse();
            return;
        }
    };
    let active = ctx.state.borrow().clone();
    let notes = config::SharedNotes::default();
    let crypto = match config::connection_crypto(
        &active.tls,
        active.policy.routes.clone(),
        peer.ip(),
        notes.clone(),
        q.node_key.clone(),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a QUIC TLS config");
            incoming.refuse();
            return;
        }
    };
    let mut server = q.base.clone();
    server.crypto = crypto;
    // Counted from before quinn processes the first flight (the server signs in it).
    let handshaking = conn::Handshaking::start(q);
    match incoming.accept_with(Arc::new(server)) {
        Ok(connecting) => {
            tokio::spawn(conn::serve(
                q.clone(),
                connecting,
                peer,
                notes,
                active,
                permit,
                handshaking,
            ));
        }
        // quinn processes the first flight at once: a ClientHello the gate refuses (no
        // or unknown SNI, no ALPN) ends here.
        Err(e) => conn::refused_at_hello(q, peer, &notes, &e),
    }
}

/// Live QUIC connections per identity, capped.
#[derive(Debug)]
pub(crate) struct IdentityCaps {
    cap: u32,
    live: Arc<Mutex<HashMap<String, u32>>>,
}

/// A connection's place under its identity's cap; given back when dropped.
#[derive(Debug)]
pub(crate) struct IdentityPlace {
    id: String,
    live: Arc<Mutex<HashMap<String, u32>>>,
}

impl IdentityCaps {
    fn new(cap: u32) -> Self {
        IdentityCaps {
            cap,
            live: Arc::default(),
        }
    }

    /// A place for one more connection of `id`, or the cap.
    pub(crate) fn admit(&self, id: &str) -> Result<IdentityPlace, u32> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let n = live.entry(id.to_owned()).or_default();
        if self.cap > 0 && *n >= self.cap {
            if *n == 0 {
                live.remove(id);
            }
            return Err(self.cap);
        }
        *n += 1;
        Ok(IdentityPlace {
            id: id.to_owned(),
            live: self.live.clone(),
        })
    }
}

impl Drop for IdentityPlace {
    fn drop(&mut self) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = live.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_s_connections_are_capped_and_given_back() {
        let caps = IdentityCaps::new(2);
        let a1 = caps.admit("a").unwrap();
        let _a2 = caps.admit("a").unwrap();
        assert_eq!(caps.admit("a").unwrap_err(), 2);
        let _b = caps.admit("b").expect("another identity has its own cap");
        drop(a1);
        let _a3 = caps.admit("a").expect("a place given back");
        drop((_a2, _a3, _b));
        assert!(
            caps.live.lock().unwrap().is_empty(),
            "nothing kept for gone identities"
        );
        let none = IdentityCaps::new(0);
        let _many: Vec<_> = (0..100).map(|_| none.admit("a").unwrap()).collect();
    }
}
