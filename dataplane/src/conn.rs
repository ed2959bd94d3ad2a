//! One connection's path, top to bottom, as DESIGN.md draws it:
//!
//! `accept → preauth → TLS handshake → identity → service lookup → authorize → protocol
//! → handler`
//!
//! Each stage is one call returning a typed value; a stage that refuses ends the
//! connection the way DESIGN.md prescribes (an alert or close in the handshake, a
//! `ZTP-ERROR` line after it). Whatever happens, one `connection` event is logged at the
//! end with who, what, the decision and its reason, bytes each way and duration: never
//! key material or payload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use tokio::io::AsyncReadExt;
use ztp_proto::Protocol;

use crate::authz;
use crate::handler::{ClientStream, HandlerLimits, Registry, Session, DGRAM_ALPN};
use crate::identity;
use crate::protocol::{self, Detected};
use crate::reauth;
use crate::refusal::{self, Refusal};
use crate::snapshot::Active;
use crate::tls::{self, HandshakeError, HelloAlert};

/// What every connection shares: the published state and the limits.
#[derive(Debug)]
pub struct ConnContext {
    pub state: watch::Receiver<Arc<Active>>,
    pub handshake_timeout: Duration,
    pub handler: HandlerLimits,
    pub registry: Registry,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Connection records for the control plane's audit trail (control mode only);
    /// full means dropped, never waited on.
    pub audit: Option<tokio::sync::mpsc::Sender<ztp_proto::wire::pb::ConnectionRecord>>,
    /// Readiness; with `--max-snapshot-age`, a stale node refuses new connections.
    pub ready: Arc<crate::admin::Readiness>,
}

/// Serves one accepted connection to its end, then logs its record.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Arc<ConnContext>) {
    let mut rec = Record::new(peer);
    ctx.metrics.connection_opened();
    run(tcp, &ctx, &mut rec).await;
    rec.emit();
    if let Some(audit) = &ctx.audit {
        if audit.try_send(rec.to_wire()).is_err() {
            ctx.metrics.audit_dropped();
        }
    }
    ctx.metrics.connection_closed(
        rec.service.as_deref(),
        rec.allowed,
        rec.reason,
        !rec.handshake_done,
        rec.bytes_up,
        rec.bytes_down,
    );
}

async fn run(tcp: TcpStream, ctx: &ConnContext, rec: &mut Record) {
    // A connection's task is as big as the largest state of its future, for its whole
    // life. Everything before the session (handshake, checks, peeking, refusals) runs in
    // its own boxed future, freed when done, so an idle session holds only what serving
    // it needs.
    let Some(Admitted {
        client,
        protocol,
        framed,
        initial,
        permit,
        identity,
        handler,
        sni,
    }) = Box::pin(admit(tcp, ctx, rec)).await
    else {
        return;
    };
    let outcome = handler
        .serve(Session {
            client,
            protocol,
            framed,
            initial,
            permit: &permit,
            identity: &identity,
            limits: ctx.handler,
            revoked: reauth::watch(
                ctx.state.clone(),
                sni,
                rec.peer.ip(),
                identity.clone(),
                permit.route.clone(),
            ),
        })
        .await;
    rec.bytes_up = outcome.bytes_up;
    rec.bytes_down = outcome.bytes_down;
    rec.backend = outcome.backend_addr;
    // Authorized: the decision is "allow" even when the backend then failed (the code
    // and reason say so).
    rec.code = outcome.refusal.map(Refusal::code);
    rec.allow(outcome.end);
}

/// An authorized connection, ready for its handler.
struct Admitted {
    /// Boxed: a session's futures move it around; one heap copy is all it needs.
    client: Box<ClientStream>,
    protocol: Protocol,
    framed: bool,
    initial: Vec<u8>,
    permit: authz::Permit,
    identity: identity::ClientIdentity,
    handler: Arc<dyn crate::handler::Handler>,
    sni: String,
}

/// Every stage before the handler. `None` when the connection was refused (answered and
/// recorded in `rec`).
async fn admit(tcp: TcpStream, ctx: &ConnContext, rec: &mut Record) -> Option<Admitted> {
    // TLS: the ClientHello decides the service before anything is signed.
    let handshake = tokio::time::timeout(ctx.handshake_timeout, gate(tcp, ctx, rec)).await;
    let (mut client, hello_state) = match handshake {
        Ok(Some(c)) => c,
        Ok(None) => return None,
        Err(_) => {
            rec.deny(HandshakeError::Timeout.reason());
            return None;
        }
    };
    rec.handshake_done = true;

    // Everything after the handshake is decided on the newest snapshot.
    // A resumed session's chain was verified when it was first made, and a full
    // handshake's against the state of its ClientHello: verify again if either is not
    // the newest.
    let active = ctx.state.borrow().clone();
    let stale = !Arc::ptr_eq(&active, &hello_state);
    if let Err(e) = tls::recheck_chain(&client, &active.tls.verifier, stale) {
        tracing::debug!(error = %e, "certificate refused on re-check");
        let reason = "certificate refused on re-check";
        return refused(&mut client, rec, Refusal::Forbidden, reason).await;
    }

    // Identity.
    let Some(leaf) = tls::peer_chain(&client).first() else {
        return refused(
            &mut client,
            rec,
            Refusal::Forbidden,
            "no client certificate",
        )
        .await;
    };
    let identity = match identity::extract(leaf) {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(error = %e, "no identity");
            return refused(&mut client, rec, Refusal::Forbidden, "no identity").await;
        }
    };
    rec.identity = Some(identity.id.clone());

    // Service lookup.
    let sni = rec.sni.clone().unwrap_or_default();
    let Some(route) = active.policy.routes.lookup(&sni) else {
        return refused(&mut client, rec, Refusal::Misdirected, "service vanished").await;
    };
    rec.service = Some(route.name.clone());
    if !route.admits_source(rec.peer.ip()) {
        return refused(&mut client, rec, Refusal::Forbidden, "source not allowed").await;
    }

    // Authorization.
    let permit = match authz::authorize(&active.policy.directory, &identity, route) {
        Ok(p) => p,
        Err((denial, user)) => {
            rec.user = user.map(|u| u.name.clone());
            return refused(&mut client, rec, Refusal::Forbidden, denial_reason(denial)).await;
        }
    };
    rec.user = Some(permit.user.name.clone());
    drop(active);

    // Protocol: declared, or detected for `auto` when the forwarder is to choose.
    let framed = client.get_ref().1.alpn_protocol() == Some(DGRAM_ALPN);
    let (protocol, initial) = match (
        protocol::declared(permit.route.protocol),
        &permit.route.handler,
    ) {
        (Some(p), _) => (p, Vec::new()),
        // A named handler speaks over the stream itself.
        (None, Some(_)) => (Protocol::Tcp, Vec::new()),
        (None, None) => {
            let (detected, initial) = detect(&mut client).await;
            rec.detected = Some(detected.as_str());
            (detected.protocol(), initial)
        }
    };
    rec.protocol = Some(protocol.as_str());

    // Handler.
    let handler = match &permit.route.handler {
        Some(h) => h.clone(),
        None => ctx.registry.forwarder(protocol).clone(),
    };
    if !handler.supports(protocol) {
        tracing::warn!(
            service.name = %permit.route.name,
            handler = handler.name(),
            protocol = protocol.as_str(),
            "handler does not support the service's protocol"
        );
        rec.allow("protocol not supported by handler");
        rec.code = Some(Refusal::NotImplemented.code());
        refusal::deliver(&mut client, Refusal::NotImplemented).await;
        return None;
    }
    Some(Admitted {
        client: Box::new(client),
        protocol,
        framed,
        initial,
        permit,
        identity,
        handler,
        sni,
    })
}

/// Peeks at the client's first bytes, up to [`protocol::PEEK_DEADLINE`]. Returns what
/// they look like and the bytes read, which the handler must serve first.
async fn detect(client: &mut ClientStream) -> (Detected, Vec<u8>) {
    // Small: a connection must not hold a copy buffer for its lifetime because of a peek.
    let mut buf = vec![0u8; 256];
    let mut len = 0;
    let deadline = Instant::now() + protocol::PEEK_DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, client.read(&mut buf[len..])).await {
            Ok(Ok(n)) if n > 0 => {
                len += n;
                if let Some(d) = protocol::detect(&buf[..len]) {
                    buf.truncate(len);
                    return (d, buf);
                }
                if len == buf.len() {
                    break;
                }
            }
            // End of stream, an error or the deadline: decide on what arrived; the
            // handler meets the end or the error itself.
            _ => break,
        }
    }
    buf.truncate(len);
    let d = if len == 0 {
        Detected::Silent
    } else {
        Detected::Unknown
    };
    (d, buf)
}

/// The handshake stage: ClientHello, SNI and route, source ranges, then the handshake
/// proper with client certificate verification. `None` when refused (already logged in
/// `rec`).
async fn gate(
    tcp: TcpStream,
    ctx: &ConnContext,
    rec: &mut Record,
) -> Option<(ClientStream, Arc<Active>)> {
    let start = match tls::read_hello(tcp).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "client hello refused");
            rec.deny(e.reason());
            return None;
        }
    };
    let active = ctx.state.borrow().clone();
    let Some(sni) = start.client_hello().server_name().map(str::to_owned) else {
        rec.deny("no sni");
        tls::refuse_hello(start.io, HelloAlert::MissingExtension).await;
        return None;
    };
    rec.sni = Some(sni.clone());
    let Some(route) = active.policy.routes.lookup(&sni) else {
        rec.deny("unknown sni");
        tls::refuse_hello(start.io, HelloAlert::UnrecognizedName).await;
        return None;
    };
    if !route.admits_source(rec.peer.ip()) {
        // Indistinguishable from an unknown name: no hint that the service exists.
        rec.service = Some(route.name.clone());
        rec.deny("source not allowed");
        tls::refuse_hello(start.io, HelloAlert::UnrecognizedName).await;
        return None;
    }
    // The framed-datagram extension is offered only where it applies; any other ALPN is
    // ignored rather than fatal.
    let wants_dgram = matches!(route.protocol, Protocol::Udp | Protocol::Quic)
        && start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == DGRAM_ALPN));
    let config = if wants_dgram {
        active.tls.dgram.clone()
    } else {
        active.tls.stream.clone()
    };
    match tls::complete(start, config).await {
        Ok(client) => Some((client, active)),
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            rec.tls_error = Some(e.to_string());
            rec.deny(e.reason());
            None
        }
    }
}

/// Answers a refusal after the handshake; always `None`, for `return refused(..).await`.
async fn refused<T>(
    client: &mut ClientStream,
    rec: &mut Record,
    r: Refusal,
    reason: &'static str,
) -> Option<T> {
    rec.code = Some(r.code());
    rec.deny(reason);
    refusal::deliver(client, r).await;
    None
}

fn denial_reason(d: authz::Denial) -> &'static str {
    match d {
        authz::Denial::UnknownIdentity => "unknown identity",
        authz::Denial::UserDisabled => "user disabled",
        authz::Denial::NotInGroup => "not in group",
    }
}

/// The connection's record, logged once at its end.
#[derive(Debug)]
struct Record {
    started: Instant,
    peer: SocketAddr,
    sni: Option<String>,
    identity: Option<String>,
    user: Option<String>,
    service: Option<String>,
    protocol: Option<&'static str>,
    detected: Option<&'static str>,
    backend: Option<SocketAddr>,
    allowed: bool,
    reason: &'static str,
    code: Option<u16>,
    tls_error: Option<String>,
    /// The TLS handshake completed (refusals before it are handshake failures).
    handshake_done: bool,
    bytes_up: u64,
    bytes_down: u64,
}

impl Record {
    fn new(peer: SocketAddr) -> Self {
        Record {
            started: Instant::now(),
            peer,
            sni: None,
            identity: None,
            user: None,
            service: None,
            protocol: None,
            detected: None,
            backend: None,
            allowed: false,
            reason: "",
            code: None,
            tls_error: None,
            handshake_done: false,
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    fn allow(&mut self, reason: &'static str) {
        self.allowed = true;
        self.reason = reason;
    }

    fn deny(&mut self, reason: &'static str) {
        self.allowed = false;
        self.reason = reason;
    }

    fn to_wire(&self) -> ztp_proto::wire::pb::ConnectionRecord {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        ztp_proto::wire::pb::ConnectionRecord {
            time_ms,
            peer: self.peer.to_string(),
            sni: self.sni.clone().unwrap_or_default(),
            identity: self.identity.clone().unwrap_or_default(),
            user: self.user.clone().unwrap_or_default(),
            service: self.service.clone().unwrap_or_default(),
            decision: if self.allowed { "allow" } else { "deny" }.into(),
            reason: self.reason.into(),
            code: self.code.map_or(0, u32::from),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    fn emit(&self) {
        let duration_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(
            client.addr = %self.peer,
            tls.sni = self.sni.as_deref(),
            client.id = self.identity.as_deref(),
            user.name = self.user.as_deref(),
            service.name = self.service.as_deref(),
            protocol = self.protocol,
            protocol.detected = self.detected,
            backend.addr = self.backend.map(tracing::field::display),
            decision = if self.allowed { "allow" } else { "deny" },
            reason = self.reason,
            refusal.code = self.code,
            tls.error = self.tls_error.as_deref(),
            bytes.up = self.bytes_up,
            bytes.down = self.bytes_down,
            duration_ms,
            "connection"
        );
    }
}
