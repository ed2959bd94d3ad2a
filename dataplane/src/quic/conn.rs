//! One QUIC connection's path: handshake (the gate decided its ClientHello and chain,
//! see `config`), then the same admission as TCP ([`admission::decide`]), then its
//! sessions: one per bidirectional stream (tcp services) or per datagram flow (udp and
//! quic services), each served by the pipeline's session stage and recorded as one
//! connection.
//!
//! The connection is one identity and one service: it is decided again on every snapshot
//! ([`reauth::watch`], once for all its sessions). A refusal closes the whole connection
//! with the refusal's code as the application error code and its line as the reason; its
//! streams, flows and their backend connections end with it. A client that moves to an
//! address the listener's or the service's ranges refuse is closed the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::HandshakeData;
use quinn::{Connecting, Connection, ConnectionError, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::field::Empty;
use tracing::Instrument;
use ztp_proto::quic::{CLOSE_DONE, STREAM_ABORTED};
use ztp_proto::Protocol;

use super::config::SharedNotes;
use super::datagram::{Dispatched, Flows, QuicFlow, QuicFlowStart};
use super::stream::QuicStream;
use super::Quic;
use crate::admission::{self, Admission, Choice, PeerFacts};
use crate::conn::{close_record, close_record_via, detected, record_in_span, ConnContext, Record};
use crate::handler::{Caller, Handler, HandlerLimits, Target};
use crate::preauth::{self, Permit};
use crate::reauth;
use crate::refusal::{self, Refusal};
use crate::session::{self, Metered, Setup, Stop};
use crate::snapshot::Active;
use crate::tls;

/// How often a connection's address is looked at (quinn has no migration event).
const MIGRATION_POLL: Duration = Duration::from_millis(250);
/// How long a closing connection's sessions get to write their records.
const SESSIONS_GRACE: Duration = Duration::from_secs(3);

/// Closes `conn` with a refusal: its code as the application error code, its line
/// (without the newline) as the reason.
pub fn close_refused(conn: &Connection, r: Refusal) {
    conn.close(
        VarInt::from_u32(u32::from(r.code())),
        r.line().trim_end().as_bytes(),
    );
}

/// Counts a handshake in flight while it lives (the listener's Retry threshold): made
/// before quinn processes the first flight, dropped when the handshake is over.
pub struct Handshaking(Arc<Quic>);

impl Handshaking {
    pub fn start(q: &Arc<Quic>) -> Self {
        q.handshaking.fetch_add(1, Ordering::Relaxed);
        Handshaking(q.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.handshaking.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted connection to its end. `hello_state` is the state its TLS config
/// was built from; `permit` is its place in the preauth gate.
pub async fn serve(
    q: Arc<Quic>,
    connecting: Connecting,
    peer: SocketAddr,
    notes: SharedNotes,
    hello_state: Arc<Active>,
    permit: Permit,
    handshaking: Handshaking,
) {
    let span = tracing::info_span!(
        "conn",
        transport = "quic",
        client.addr = %peer,
        tls.sni = Empty,
        client.id = Empty,
        service.name = Empty,
        backend.addr = Empty,
        refusal.code = Empty,
    );
    async move {
        let ctx = &q.ctx;
        ctx.metrics.connection_opened();
        let mut rec = Record::on(peer, "quic");
        let handshake = tokio::time::timeout(ctx.handshake_timeout, connecting).await;
        drop(handshaking);
        let taken = std::mem::take(&mut *notes.lock().unwrap_or_else(|p| p.into_inner()));
        rec.sni = taken.sni;
        rec.service = taken.service;
        if let Some(sni) = &rec.sni {
            tracing::Span::current().record("tls.sni", sni.as_str());
        }
        let conn = match handshake {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "quic handshake failed");
                if let Some(id) = taken.claimed {
                    rec.identity = Some(id);
                    rec.identity_unverified = true;
                }
                rec.tls_error = Some(e.to_string());
                rec.deny(taken.refused.unwrap_or_else(|| handshake_reason(&e)));
                close_record(ctx, &rec);
                return;
            }
            Err(_) => {
                // Dropping the handshake closes the connection.
                rec.deny("handshake timeout");
                close_record(ctx, &rec);
                return;
            }
        };
        rec.handshake_done = true;
        if super::relay::is_relay(&conn) {
            // Another replica relaying sessions to this one's tunnels.
            super::relay::serve(&q, conn, &mut rec).await;
            close_record(ctx, &rec);
            drop(permit);
            return;
        }
        if super::tunnel::is_tunnel(&conn) {
            // A connector's tunnel: one connection record for its life.
            super::tunnel::serve(&q, conn, &hello_state, &mut rec).await;
            close_record(ctx, &rec);
            drop(permit);
            return;
        }
        let Some(admitted) = admit(&q, &conn, &hello_state, &mut rec) else {
            close_record(ctx, &rec);
            return;
        };
        // Admitted: from here on each stream or flow is a connection of its own, counted
        // and recorded as it ends.
        ctx.metrics.connection_handed_on();
        let end = run(&q, conn, admitted, peer).await;
        tracing::info!(end, "quic connection closed");
        drop(permit);
    }
    .instrument(span)
    .await
}

/// Records a connection whose first flight the gate refused (quinn ends it in
/// `accept`, before there is a connection to serve).
pub fn refused_at_hello(q: &Quic, peer: SocketAddr, notes: &SharedNotes, e: &ConnectionError) {
    let span = tracing::info_span!("conn", transport = "quic", client.addr = %peer);
    let _enter = span.enter();
    let ctx = &q.ctx;
    ctx.metrics.connection_opened();
    let taken = std::mem::take(&mut *notes.lock().unwrap_or_else(|p| p.into_inner()));
    let mut rec = Record::on(peer, "quic");
    rec.sni = taken.sni;
    rec.service = taken.service;
    rec.tls_error = Some(e.to_string());
    rec.deny(taken.refused.unwrap_or_else(|| handshake_reason(e)));
    close_record(ctx, &rec);
}

/// What every session of an admitted connection shares.
struct Served {
    q: Arc<Quic>,
    admission: Arc<Admission>,
    handler: Arc<dyn Handler>,
    protocol: Protocol,
    /// `auto`: name the detected protocol in each stream's record.
    detect: bool,
    sni: String,
    /// Fires when the pipeline ends the connection (a later decision, drain).
    stop: watch::Receiver<Option<Stop>>,
    conn: Connection,
}

impl Served {
    /// A session's record, before it starts.
    fn record(&self, peer: SocketAddr) -> Record {
        let mut rec = Record::on(peer, "quic");
        rec.handshake_done = true;
        rec.sni = Some(self.sni.clone());
        rec.identity = Some(self.admission.identity.id.clone());
        rec.user = Some(self.admission.permit.user.name.clone());
        rec.service = Some(self.admission.permit.route.name.clone());
        rec.protocol = Some(self.protocol.as_str());
        rec
    }

    /// A session's stop: the pipeline's decision, complete once the connection is closed
    /// (so that nothing a session does on its way out, a FIN above all, reaches the
    /// client before the close: quinn finishes a dropped stream of an open connection).
    /// A connection that ends otherwise (the client's close, idle, an error) stops its
    /// sessions too, which then record it.
    fn stop(&self) -> Pin<Box<dyn Future<Output = Stop> + Send>> {
        let mut rx = self.stop.clone();
        let conn = self.conn.clone();
        Box::pin(async move {
            loop {
                let decided = *rx.borrow_and_update();
                if let Some(s) = decided {
                    conn.closed().await;
                    return s;
                }
                tokio::select! {
                    biased;
                    changed = rx.changed() => {
                        if changed.is_err() {
                            conn.closed().await;
                            return Stop::Revoked("connection closed");
                        }
                    }
                    _ = conn.closed() => {
                        // A decision made with the close names its cause.
                        let decided = *rx.borrow();
                        return decided.unwrap_or(Stop::Revoked("connection closed"));
                    }
                }
            }
        })
    }

    fn setup(&self, limits: HandlerLimits) -> Box<Setup<'_>> {
        let route = &self.admission.permit.route;
        Box::new(Setup {
            framed: false,
            target: Target {
                service: &route.name,
                backend: route.backend.as_ref(),
                protocol: self.protocol,
                connector: route.connector.as_deref(),
            },
            caller: Caller {
                identity: &self.admission.identity,
                user: &self.admission.permit.user.name,
                groups: &self.admission.permit.user.groups,
            },
            limits,
        })
    }
}

/// An admitted connection's decision.
struct Admitted {
    /// Counts the connection against its identity's cap while it lives.
    _place: super::IdentityPlace,
    admission: Admission,
    handler: Arc<dyn Handler>,
    protocol: Protocol,
    detect: bool,
    sni: String,
}

/// Identity, service, authorization and protocol, as for TCP. `None` when refused (the
/// connection closed with the refusal, and `rec` says why).
fn admit(
    q: &Quic,
    conn: &Connection,
    hello_state: &Arc<Active>,
    rec: &mut Record,
) -> Option<Admitted> {
    let ctx = &q.ctx;
    let (sni, alpn) = conn
        .handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .map(|d| (d.server_name.unwrap_or_default(), d.protocol))
        .unwrap_or_default();
    if alpn.as_deref() != Some(ztp_proto::quic::ALPN) {
        // rustls refuses this in the handshake; never serve without it.
        return refuse(conn, rec, Refusal::Forbidden, "no application protocol");
    }
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
        .unwrap_or_default();
    let active = ctx.state.borrow().clone();
    if !Arc::ptr_eq(&active, hello_state) {
        // The state moved during the handshake: the chain is judged on the newest.
        if let Err(e) = tls::recheck(&chain, &active.tls.verifier) {
            tracing::debug!(error = %e, "certificate refused on re-check");
            return refuse(
                conn,
                rec,
                Refusal::Forbidden,
                "certificate refused on re-check",
            );
        }
    }
    let decision = admission::decide(
        &active.policy,
        &PeerFacts {
            leaf: chain.first().map(|c| c.as_ref()),
            sni: &sni,
            source: rec.peer.ip(),
            // `ztp-dgram` is a TLS-over-TCP extension: QUIC has datagrams of its own.
            alpn: None,
        },
    );
    drop(active);
    let admission = match decision {
        Ok(a) => a,
        Err(denied) => {
            if let Some(id) = &denied.identity {
                record_in_span(id, denied.service.as_deref().unwrap_or_default());
            }
            rec.identity = denied.identity;
            rec.service = denied.service;
            rec.user = denied.user;
            let cause = denied.cause;
            return refuse(conn, rec, cause.refusal(), cause.reason());
        }
    };
    record_in_span(&admission.identity.id, &admission.permit.route.name);
    rec.identity = Some(admission.identity.id.clone());
    rec.user = Some(admission.permit.user.name.clone());
    rec.service = Some(admission.permit.route.name.clone());
    let (protocol, detect) = match admission.choice {
        Choice::Declared(p) => (p, false),
        Choice::Detect => (Protocol::Tcp, true),
    };
    rec.protocol = Some(protocol.as_str());
    let route = &admission.permit.route;
    let handler = match &route.handler {
        Some(h) => h.clone(),
        None => ctx.registry.forwarder(protocol).clone(),
    };
    if !handler.supports(protocol) {
        tracing::warn!(
            service.name = %route.name,
            handler = handler.name(),
            protocol = protocol.as_str(),
            "handler does not support the service's protocol"
        );
        rec.allow("protocol not supported by handler");
        rec.code = Some(Refusal::NotImplemented.code());
        close_refused(conn, Refusal::NotImplemented);
        return None;
    }
    let place = match q.identities.admit(&admission.identity.id) {
        Ok(place) => place,
        Err(limit) => {
            tracing::info!(limit, "too many QUIC connections for this identity");
            rec.deny("identity connection cap");
            rec.code = Some(super::TOO_MANY_CODE);
            conn.close(
                VarInt::from_u32(u32::from(super::TOO_MANY_CODE)),
                super::TOO_MANY_LINE.as_bytes(),
            );
            return None;
        }
    };
    Some(Admitted {
        _place: place,
        admission,
        handler,
        protocol,
        detect,
        sni,
    })
}

fn refuse<T>(conn: &Connection, rec: &mut Record, r: Refusal, reason: &'static str) -> Option<T> {
    rec.code = Some(r.code());
    rec.deny(reason);
    close_refused(conn, r);
    None
}

/// Why a handshake failed, when the gate did not note it: one of
/// [`tls::HANDSHAKE_REASONS`].
fn handshake_reason(e: &ConnectionError) -> &'static str {
    match e {
        ConnectionError::TimedOut => "handshake timeout",
        ConnectionError::TransportError(t) => {
            // A TLS alert the server sent: 0x100 + its code (RFC 9001 §4.8).
            match u64::from(t.code) {
                0x178 => "no application protocol",
                0x174 => "no client certificate",
                0x146 => "protocol version",
                0x10a | 0x132 | 0x16d => "protocol violation",
                _ => "handshake failed",
            }
        }
        _ => "handshake failed",
    }
}

/// How a connection the client or the network ended, for the log.
fn closed(e: &ConnectionError) -> &'static str {
    match e {
        ConnectionError::ApplicationClosed(_) | ConnectionError::ConnectionClosed(_) => "closed",
        ConnectionError::LocallyClosed => "closed here",
        ConnectionError::TimedOut => "idle timeout",
        ConnectionError::Reset => "reset",
        _ => "connection error",
    }
}

/// Serves an admitted connection's streams or flows until it ends; returns how.
async fn run(
    q: &Arc<Quic>,
    conn: Connection,
    admitted: Admitted,
    peer: SocketAddr,
) -> &'static str {
    let Admitted {
        _place,
        admission,
        handler,
        protocol,
        detect,
        sni,
    } = admitted;
    let admission = Arc::new(admission);
    // The connection is decided again on every snapshot and on every move of its address
    // (the service's ranges judge the address it has now).
    let (source_tx, source_rx) = watch::channel(peer.ip());
    let mut stop = reauth::watch_moving(
        q.ctx.state.clone(),
        sni.clone(),
        source_rx,
        admission.clone(),
    );
    let (stop_tx, stop_rx) = watch::channel(None);
    let served = Arc::new(Served {
        q: q.clone(),
        admission,
        handler,
        protocol,
        detect,
        sni,
        stop: stop_rx,
        conn: conn.clone(),
    });
    let datagrams = matches!(protocol, Protocol::Udp | Protocol::Quic);
    let mut flows = Flows::default();
    let mut sessions = JoinSet::new();
    let mut addr = peer;
    let mut poll = tokio::time::interval(MIGRATION_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stopping = q.stopping.clone();
    let end = loop {
        // On shutdown a connection with no live session closes at once (it would only
        // hold the drain up); one with sessions goes on until they end or the deadline.
        if *stopping.borrow() && sessions.is_empty() {
            conn.close(VarInt::from_u32(CLOSE_DONE), b"drained");
            break "drained";
        }
        tokio::select! {
            s = &mut stop => {
                // The sessions learn why, and end once the close is made (see
                // `Served::stop`).
                let _ = stop_tx.send(Some(s));
                match s {
                    Stop::Revoked(_) => close_refused(&conn, Refusal::Forbidden),
                    Stop::Drain => conn.close(VarInt::from_u32(CLOSE_DONE), b"drained"),
                }
                break match s {
                    Stop::Revoked(reason) => reason,
                    Stop::Drain => "drained",
                };
            }
            bi = conn.accept_bi() => match bi {
                Ok((mut send, recv)) => match session_permit(q) {
                    Some(permit) => {
                        let s = served.clone();
                        sessions.spawn(stream_session(s, addr, send, recv, permit).in_current_span());
                    }
                    None => {
                        let _ = send.reset(VarInt::from_u32(STREAM_ABORTED));
                    }
                },
                Err(e) => break closed(&e),
            },
            d = conn.read_datagram(), if datagrams => match d {
                Ok(frame) => match flows.dispatch(frame) {
                    Dispatched::New(start) => match session_permit(q) {
                        Some(permit) => {
                            let s = served.clone();
                            let c = conn.clone();
                            sessions.spawn(flow_session(s, addr, c, start, permit).in_current_span());
                        }
                        None => flows.forget(start.flow),
                    },
                    Dispatched::Dropped(why) => tracing::debug!(why, "datagram dropped"),
                    Dispatched::Queued => {}
                },
                Err(e) => break closed(&e),
            },
            _ = poll.tick() => {
                let now = preauth::canonical(conn.remote_address());
                if now != addr {
                    if !q.gate.in_range(now.ip()) {
                        tracing::info!(from = %addr, to = %now, "client moved to a refused address");
                        let _ = stop_tx.send(Some(Stop::Revoked("source not allowed")));
                        close_refused(&conn, Refusal::Forbidden);
                        break "source not allowed";
                    }
                    tracing::info!(from = %addr, to = %now, "client migrated");
                    addr = now;
                    // The service's ranges judge the new address (the watch above).
                    let _ = source_tx.send(now.ip());
                }
            }
            _ = stopping.changed(), if !*stopping.borrow() => {}
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    };
    // The sessions see the end (their stop completes once the connection is closed:
    // `Served::stop`), and the flows' queues close; each writes its record.
    drop(flows);
    drop(stop_tx);
    let _ = tokio::time::timeout(SESSIONS_GRACE, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    sessions.abort_all();
    end
}

/// A session's place under `--max-connections` (streams and flows count like
/// connections); `None` when the node is full, or when it must refuse new sessions
/// (a stale snapshot under `--max-snapshot-age`: fail closed, as for new connections).
fn session_permit(q: &Quic) -> Option<preauth::SessionPermit> {
    if q.ctx.ready.stale() {
        tracing::debug!("new session refused: snapshot stale");
        return None;
    }
    let permit = q.gate.session();
    if permit.is_none() {
        tracing::debug!("new session refused: connection cap");
    }
    permit
}

/// A session's record, written when the session ends, or with reason `aborted` if its
/// task is dropped first (the connection's grace ran out): every counted session is
/// recorded and uncounted once.
struct Recorded {
    ctx: Arc<ConnContext>,
    rec: Option<Record>,
    /// The connector whose tunnel carries the session, for the record.
    connector: Option<String>,
}

impl Recorded {
    fn open(ctx: &Arc<ConnContext>, rec: Record, connector: Option<String>) -> Self {
        ctx.metrics.connection_opened();
        Recorded {
            ctx: ctx.clone(),
            rec: Some(rec),
            connector,
        }
    }

    fn rec(&mut self) -> &mut Record {
        self.rec
            .get_or_insert_with(|| Record::on(([0, 0, 0, 0], 0).into(), "quic"))
    }

    fn close(mut self) {
        if let Some(rec) = self.rec.take() {
            close_record_via(&self.ctx, &rec, self.connector.as_deref());
        }
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.allow("aborted");
            close_record_via(&self.ctx, &rec, self.connector.as_deref());
        }
    }
}

/// One bidirectional stream: one session of a tcp service, and one record.
async fn stream_session(
    s: Arc<Served>,
    peer: SocketAddr,
    send: SendStream,
    recv: RecvStream,
    _permit: preauth::SessionPermit,
) {
    let ctx = &s.q.ctx;
    let connector = s.admission.permit.route.connector.clone();
    let mut recorded = Recorded::open(ctx, s.record(peer), connector);
    let mut client = Metered::new(QuicStream::new(send, recv));
    if matches!(s.protocol, Protocol::Udp | Protocol::Quic) {
        // Datagram services take DATAGRAM frames, not streams.
        refusal::deliver(&mut client, Refusal::NotImplemented).await;
        let rec = recorded.rec();
        rec.code = Some(Refusal::NotImplemented.code());
        rec.deny("stream to a datagram service");
        recorded.close();
        return;
    }
    let ended = session::run(
        &mut client,
        s.handler.as_ref(),
        s.setup(ctx.handler),
        s.stop(),
    )
    .await;
    let rec = recorded.rec();
    if s.detect {
        rec.detected = Some(detected(client.first_bytes()).as_str());
    }
    rec.bytes_up = ended.bytes_up;
    rec.bytes_down = ended.bytes_down;
    rec.backend = ended.backend_addr;
    rec.code = ended.refusal.map(Refusal::code);
    rec.allow(ended.end);
    recorded.close();
}

/// One datagram flow: one backend socket, one session, one record.
async fn flow_session(
    s: Arc<Served>,
    peer: SocketAddr,
    conn: Connection,
    start: QuicFlowStart,
    _permit: preauth::SessionPermit,
) {
    let ctx = &s.q.ctx;
    let connector = s.admission.permit.route.connector.clone();
    let mut recorded = Recorded::open(ctx, s.record(peer), connector);
    let mut flow = QuicFlow::new(conn, start);
    let limits = HandlerLimits {
        idle_timeout: s.q.udp_idle,
        ..ctx.handler
    };
    let (end, backend) =
        session::run_datagrams(&mut flow, s.handler.as_ref(), s.setup(limits), s.stop()).await;
    let rec = recorded.rec();
    rec.bytes_up = flow.bytes_up;
    rec.bytes_down = flow.bytes_down;
    rec.backend = backend;
    rec.allow(end);
    recorded.close();
}
