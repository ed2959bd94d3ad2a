//! What every connection shares ([`ConnContext`]) and what each one leaves behind: its
//! [`Record`], logged, audited and counted once at its end, for every transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::handler::{HandlerLimits, Registry};
use crate::snapshot::Active;

/// What every connection shares: the published state and the limits.
#[derive(Debug)]
pub struct ConnContext {
    pub state: watch::Receiver<Arc<Active>>,
    /// Trust domain of machine identities (connectors, nodes).
    pub trust_domain: String,
    pub handshake_timeout: Duration,
    pub handler: HandlerLimits,
    pub registry: Registry,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Connection records for the control plane's audit trail (control mode only);
    /// full means dropped, never waited on.
    pub audit: Option<tokio::sync::mpsc::Sender<ztp_proto::wire::pb::ConnectionRecord>>,
    /// Readiness; with `--max-snapshot-age`, a stale node refuses new connections.
    pub ready: Arc<crate::snapshot::Readiness>,
}

/// A connection's (or a QUIC stream's) end: its log event, its audit record and its
/// metrics, in one place for every transport.
pub(crate) fn close_record(ctx: &ConnContext, rec: &Record) {
    close_record_via(ctx, rec, None)
}

/// [`close_record`] of a session that went through `connector`'s tunnel (named in the
/// record; not kept in [`Record`], which every idle connection holds).
pub(crate) fn close_record_via(ctx: &ConnContext, rec: &Record, connector: Option<&str>) {
    rec.emit(connector);
    if let Some(audit) = &ctx.audit {
        let mut wire = rec.to_wire();
        wire.connector = connector.unwrap_or_default().to_owned();
        if audit.try_send(wire).is_err() {
            ctx.metrics.audit_dropped();
        }
    }
    ctx.metrics.connection_closed(
        rec.service.as_deref(),
        rec.transport,
        rec.allowed,
        rec.reason,
        !rec.handshake_done,
        rec.bytes_up,
        rec.bytes_down,
    );
}

/// The connection's record, logged once at its end.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) started: Instant,
    /// `tcp` or `quic`.
    pub(crate) transport: &'static str,
    pub(crate) peer: SocketAddr,
    pub(crate) sni: Option<String>,
    pub(crate) identity: Option<String>,
    /// `identity` is what a certificate refused in the handshake claims.
    pub(crate) identity_unverified: bool,
    pub(crate) user: Option<String>,
    pub(crate) service: Option<String>,
    pub(crate) protocol: Option<&'static str>,
    pub(crate) detected: Option<&'static str>,
    pub(crate) backend: Option<SocketAddr>,
    pub(crate) allowed: bool,
    pub(crate) reason: &'static str,
    pub(crate) code: Option<u16>,
    pub(crate) tls_error: Option<String>,
    /// The TLS handshake completed (refusals before it are handshake failures).
    pub(crate) handshake_done: bool,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
}

impl Record {
    pub(crate) fn new(peer: SocketAddr) -> Self {
        Record::on(peer, "tcp")
    }

    /// A record of a connection over `transport`.
    pub(crate) fn on(peer: SocketAddr, transport: &'static str) -> Self {
        Record {
            started: Instant::now(),
            transport,
            peer,
            sni: None,
            identity: None,
            identity_unverified: false,
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

    pub(crate) fn allow(&mut self, reason: &'static str) {
        self.allowed = true;
        self.reason = reason;
    }

    pub(crate) fn deny(&mut self, reason: &'static str) {
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
            identity_unverified: self.identity_unverified,
            user: self.user.clone().unwrap_or_default(),
            service: self.service.clone().unwrap_or_default(),
            decision: if self.allowed { "allow" } else { "deny" }.into(),
            reason: self.reason.into(),
            code: self.code.map_or(0, u32::from),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms: self.started.elapsed().as_millis() as u64,
            transport: self.transport.into(),
            connector: String::new(),
        }
    }

    fn emit(&self, connector: Option<&str>) {
        let span = tracing::Span::current();
        if let Some(b) = self.backend {
            span.record("backend.addr", tracing::field::display(b));
        }
        if let Some(code) = self.code {
            span.record("refusal.code", code);
        }
        let duration_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(
            transport = self.transport,
            client.addr = %self.peer,
            tls.sni = self.sni.as_deref(),
            client.id = self.identity.as_deref(),
            client.id_unverified = self.identity_unverified.then_some(true),
            user.name = self.user.as_deref(),
            service.name = self.service.as_deref(),
            service.connector = connector,
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
