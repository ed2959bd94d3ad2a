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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::field::Empty;
use tracing::Instrument;
use ztp_proto::Protocol;

use crate::admission::{self, Admission, Choice, PeerFacts};
use crate::handler::{Caller, Handler, Target, DGRAM_ALPN};
use crate::protocol::{self, Detected};
use crate::reauth;
pub use crate::record::ConnContext;
pub(crate) use crate::record::{close_record, close_record_via, Record};
use crate::refusal::{self, Refusal};
use crate::session::{self, Metered, Setup};
use crate::snapshot::Active;
use crate::tls::{self, HandshakeError, HelloAlert};

/// The client's side of a TCP connection, after the gate.
pub type ClientStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Serves one accepted connection to its end, then logs its record. Every log line of
/// the connection is in its `conn` span, which carries who and what as they are learnt.
pub fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ConnContext>,
) -> impl Future<Output = ()> + Send {
    let span = tracing::info_span!(
        "conn",
        client.addr = %peer,
        tls.sni = Empty,
        client.id = Empty,
        service.name = Empty,
        backend.addr = Empty,
        refusal.code = Empty,
    );
    ctx.metrics.connection_opened();
    // A connection's task is as big as the largest state of its future, for its whole
    // life. Everything before the session (handshake, checks, peeking, refusals) runs in
    // its own boxed future, made here so that not even the socket it starts from is kept
    // in the task: an idle session holds only what serving it needs.
    let admitting = Box::pin(admit(tcp, ctx.clone(), Record::new(peer)));
    async move {
        let (mut rec, admitted) = admitting.await;
        if let Some(admitted) = admitted {
            let Admitted {
                client,
                protocol,
                detect,
                admission,
                handler,
                sni,
            } = *admitted;
            // The session stage: the handler serves the client until it or the pipeline
            // ends the session (a later decision or the drain deadline). The admission is
            // shared with the watch, not copied.
            let mut client = Metered::new(client);
            let admission = Arc::new(admission);
            let stop = reauth::watch(ctx.state.clone(), sni, rec.peer.ip(), admission.clone());
            let route = &admission.permit.route;
            let setup = Box::new(Setup {
                framed: admission.framed,
                target: Target {
                    service: &route.name,
                    backend: route.backend.as_ref(),
                    protocol,
                    connector: route.connector.as_deref(),
                },
                caller: Caller {
                    identity: &admission.identity,
                    user: &admission.permit.user.name,
                    groups: &admission.permit.user.groups,
                },
                limits: ctx.handler,
            });
            let ended = session::run(&mut client, handler.as_ref(), setup, stop).await;
            if detect {
                rec.detected = Some(detected(client.first_bytes()).as_str());
            }
            // Who and what, copied for the record once the session is over (not kept
            // twice while it lasts).
            rec.identity = Some(admission.identity.id.clone());
            rec.service = Some(admission.permit.route.name.clone());
            rec.user = Some(admission.permit.user.name.clone());
            rec.bytes_up = ended.bytes_up;
            rec.bytes_down = ended.bytes_down;
            rec.backend = ended.backend_addr;
            // Admitted: the decision is "allow" even when the backend then failed or a
            // later decision ended it (the code and reason say so).
            rec.code = ended.refusal.map(Refusal::code);
            rec.allow(ended.end);
            close_record_via(&ctx, &rec, admission.permit.route.connector.as_deref());
        } else {
            close_record(&ctx, &rec);
        }
    }
    .instrument(span)
}

/// An admitted connection, ready for its handler.
struct Admitted {
    /// Boxed: a session's futures move it around; one heap copy is all it needs.
    client: Box<ClientStream>,
    protocol: Protocol,
    /// `auto`: the client's first bytes name the protocol in the record.
    detect: bool,
    admission: Admission,
    handler: Arc<dyn Handler>,
    sni: String,
}

/// Every stage before the handler, with the connection's record. `None` when the
/// connection was refused (answered and recorded).
async fn admit(
    tcp: TcpStream,
    ctx: Arc<ConnContext>,
    mut rec: Record,
) -> (Record, Option<Box<Admitted>>) {
    // Boxed: the caller's state keeps only a pointer to what it moves out at once.
    let admitted = admit_with(tcp, &ctx, &mut rec).await.map(Box::new);
    (rec, admitted)
}

async fn admit_with(tcp: TcpStream, ctx: &ConnContext, rec: &mut Record) -> Option<Admitted> {
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
    if client.get_ref().1.alpn_protocol() == Some(ztp_proto::tunnel::ALPN) {
        // A connector's tunnel over TCP (where UDP is blocked): one record for its life.
        serve_tunnel(client, ctx, &hello_state, rec).await;
        return None;
    }

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

    // Identity, service lookup, source ranges, authorization, protocol choice: one pure
    // decision on the peer's facts.
    let sni = rec.sni.clone().unwrap_or_default();
    let decision = admission::decide(
        &active.policy,
        &PeerFacts {
            leaf: tls::peer_chain(&client).first().map(|c| c.as_ref()),
            sni: &sni,
            source: rec.peer.ip(),
            alpn: client.get_ref().1.alpn_protocol(),
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
            return refused(&mut client, rec, cause.refusal(), cause.reason()).await;
        }
    };
    // In the span at once; in the record when the connection ends.
    record_in_span(&admission.identity.id, &admission.permit.route.name);

    // Protocol: declared, or, for `auto`, tcp forwarding at once (whatever the client
    // speaks, it is forwarded as a stream): nothing waits for the client's first bytes,
    // which name the detected kind in the record afterwards.
    let (protocol, detect) = match admission.choice {
        Choice::Declared(p) => (p, false),
        Choice::Detect => (Protocol::Tcp, true),
    };
    rec.protocol = Some(protocol.as_str());

    // Handler.
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
        rec.identity = Some(admission.identity.id.clone());
        rec.service = Some(route.name.clone());
        rec.user = Some(admission.permit.user.name.clone());
        rec.allow("protocol not supported by handler");
        rec.code = Some(Refusal::NotImplemented.code());
        refusal::deliver(&mut client, Refusal::NotImplemented).await;
        return None;
    }
    Some(Admitted {
        client: Box::new(client),
        protocol,
        detect,
        admission,
        handler,
        sni,
    })
}

/// A connector's tunnel over TCP + TLS: HTTP/2 with this node as the client
/// (`ztp_infra::mux`), its first stream the control stream; then as over QUIC
/// ([`crate::tunnel`]).
async fn serve_tunnel(
    mut client: ClientStream,
    ctx: &ConnContext,
    hello_state: &Arc<Active>,
    rec: &mut Record,
) {
    let chain: Vec<_> = tls::peer_chain(&client).to_vec();
    // A resumed session's chain is verified again (the tunnel's config issues no
    // tickets, but one another config issued could be offered).
    let verifier = ctx.state.borrow().tls.verifier.clone();
    if tls::recheck_chain(&client, &verifier, false).is_err() {
        rec.code = Some(Refusal::Forbidden.code());
        rec.deny("certificate refused on re-check");
        refusal::deliver(&mut client, Refusal::Forbidden).await;
        return;
    }
    if let Err(e) = ztp_infra::mux::tcp_liveness(client.get_ref().0) {
        tracing::debug!(error = %e, "tcp keepalive");
    }
    let name = match crate::tunnel::admit(ctx, &chain, hello_state, rec) {
        Ok(name) => name,
        Err(refusal) => {
            refusal::deliver(&mut client, refusal).await;
            return;
        }
    };
    let started = tokio::time::timeout(crate::tunnel::CONTROL_TIMEOUT, async {
        let (opener, drive) = ztp_infra::mux::client(client).await?;
        let link = crate::handler::tunnel::TcpLink::spawn(opener.clone(), drive, rec.peer);
        let control = opener.open(ztp_infra::mux::CONTROL_PATH).await;
        Ok::<_, std::io::Error>((link, control))
    })
    .await;
    let (link, control) = match started {
        Ok(Ok((link, Ok(control)))) => (link, control),
        Ok(Ok((link, Err(_)))) => {
            crate::handler::tunnel::Link::Tcp(link).close(0, b"");
            rec.deny("no control stream");
            return;
        }
        _ => {
            rec.deny("no http/2");
            return;
        }
    };
    let link = crate::handler::tunnel::Link::Tcp(link);
    crate::tunnel::serve(ctx, name, link, &chain, Box::new(control), rec).await;
}

/// What the client's first bytes look like (`silent` if it sent none).
pub(crate) fn detected(first: &[u8]) -> Detected {
    if first.is_empty() {
        return Detected::Silent;
    }
    protocol::detect(first).unwrap_or(Detected::Unknown)
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
    // A connector dials a replica by the replica's own name: its tunnel is judged on its
    // certificate after the handshake (`crate::tunnel`).
    if start
        .client_hello()
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == ztp_proto::tunnel::ALPN))
    {
        rec.sni = start.client_hello().server_name().map(str::to_owned);
        return match tls::complete(start, active.tls.tunnel.clone(), active.tls.offload).await {
            Ok(client) => Some((client, active)),
            Err(e) => {
                rec.tls_error = Some(e.to_string());
                rec.deny(e.reason());
                None
            }
        };
    }
    let Some(sni) = start.client_hello().server_name().map(str::to_owned) else {
        rec.deny("no sni");
        tls::refuse_hello(start.io, HelloAlert::MissingExtension).await;
        return None;
    };
    tracing::Span::current().record("tls.sni", sni.as_str());
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
    // The service is known from here on: a handshake refused below is recorded with it.
    rec.service = Some(route.name.clone());
    // A certificate the verifier refuses is noted, on the polling thread, with the
    // identity it claims: taken right after each poll, so it is this connection's.
    let mut handshake = std::pin::pin!(tls::complete(start, config, active.tls.offload));
    let mut claimed = None;
    let done = std::future::poll_fn(|cx| {
        let _ = tls::take_refused_identity();
        let poll = handshake.as_mut().poll(cx);
        if let Some(id) = tls::take_refused_identity() {
            claimed = Some(id);
        }
        poll
    })
    .await;
    match done {
        Ok(client) => Some((client, active)),
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            if let Some(id) = claimed {
                // What the refused certificate claims, marked as such: an operator can
                // find alice's refused attempts under her name.
                rec.identity = Some(id);
                rec.identity_unverified = true;
            }
            rec.tls_error = Some(e.to_string());
            rec.deny(e.reason());
            None
        }
    }
}

/// Records the caller's identity and service in the connection's span, in one call (each
/// call grows the span's formatted fields, kept for the connection's life).
pub(crate) fn record_in_span(identity: &str, service: &str) {
    let span = tracing::Span::current();
    let Some(meta) = span.metadata() else {
        return;
    };
    let fields = meta.fields();
    let (Some(id), Some(svc)) = (fields.field("client.id"), fields.field("service.name")) else {
        return;
    };
    let service = (!service.is_empty()).then_some(service);
    span.record_all(&fields.value_set(&[
        (&id, Some(&identity as &dyn tracing::Value)),
        (&svc, service.as_ref().map(|s| s as &dyn tracing::Value)),
    ]));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{HandlerLimits, Registry};
    use crate::snapshot::{Policy, Publisher};
    use std::time::Duration;

    /// An idle session's memory is its task: the pipeline's future. It must not keep
    /// the admission's transient state (handshake, peeking, the session's setup) for the
    /// session's life. It was 560 bytes before the session stage (608 in a debug build
    /// with it: the connection's span, the byte counts and the stage's own state,
    /// against ~11 KiB of TLS state per idle connection).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let (publisher, state) = Publisher::new(
            Policy::empty(),
            crate::tls::test_material(),
            crate::tls::provider(),
        )
        .unwrap();
        let ctx = Arc::new(ConnContext {
            state,
            trust_domain: ztp_proto::names::DEFAULT_TRUST_DOMAIN.into(),
            handshake_timeout: Duration::from_secs(1),
            handler: HandlerLimits {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                udp_timeout: Duration::from_secs(1),
            },
            registry: Registry::builtin(),
            metrics: Arc::default(),
            audit: None,
            ready: Arc::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let task = serve(tcp, addr, ctx);
        let size = std::mem::size_of_val(&task);
        eprintln!("connection task: {size} bytes");
        assert!(size <= 640, "a connection's task is {size} bytes");
        drop(publisher);
    }
}
