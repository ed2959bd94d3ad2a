//! A connector's tunnel, whatever carries it (QUIC on the QUIC listener, or HTTP/2 over
//! TCP + TLS 1.3 on `--listen`; both with ALPN `ztp-tunnel/1`; the contract is
//! `ztp_proto::tunnel`).
//!
//! The handshake verified the chain like any client's; [`admit`] then requires the
//! certificate to be a connector's (`spiffe://DOMAIN/connector/NAME`, one URI and no
//! email) and NAME a connector of the newest snapshot. [`serve`] writes the connector's
//! assignments (the services that name it, with their addresses) on its control stream,
//! again whenever they change, and registers the tunnel for sessions
//! ([`crate::handler::tunnel`]) until it ends. A later snapshot that removes the
//! connector, or revokes its certificate, closes the tunnel with 403 and the line, and
//! with it every session through it; its certificate's expiry does too. On drain it
//! takes no new session and closes once it carries none.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use ztp_infra::mux::BoxSession;
use ztp_proto::quic::CLOSE_DONE;
use ztp_proto::tunnel::{encode_assignments, Assignments};

use crate::handler::tunnel::Link;
use crate::record::{ConnContext, Record};
use crate::refusal::Refusal;
use crate::snapshot::Active;
use crate::tls;

/// How long a connector has to open its control stream, and to read an update on it.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the chain's leaf has left (through its notAfter second).
pub(crate) fn until_expiry(chain: &[CertificateDer<'static>]) -> Duration {
    let not_after = chain
        .first()
        .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
        .map_or(0, |(_, c)| c.validity().not_after.timestamp().max(0) as u64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(not_after + 1).saturating_sub(now)
}

/// The connector a tunnel's certificate names, if it may hold one: `Err` with the
/// refusal (already in `rec`) otherwise. `hello_state` is the snapshot the handshake
/// was decided on.
pub(crate) fn admit(
    ctx: &ConnContext,
    chain: &[CertificateDer<'static>],
    hello_state: &Arc<Active>,
    rec: &mut Record,
) -> Result<String, Refusal> {
    rec.protocol = Some("tunnel");
    let Some(name) = chain
        .first()
        .and_then(|leaf| ztp_proto::names::connector_name_of_cert(leaf, &ctx.trust_domain))
    else {
        // A user's (or a node's) certificate is never a connector's.
        rec.code = Some(Refusal::Forbidden.code());
        rec.deny("not a connector");
        return Err(Refusal::Forbidden);
    };
    rec.identity = Some(format!("spiffe://{}/connector/{name}", ctx.trust_domain));
    let active = ctx.state.borrow().clone();
    if !Arc::ptr_eq(&active, hello_state) && tls::recheck(chain, &active.tls.verifier).is_err() {
        rec.code = Some(Refusal::Forbidden.code());
        rec.deny("certificate refused on re-check");
        return Err(Refusal::Forbidden);
    }
    if !active.policy.connectors.contains(&name) {
        rec.code = Some(Refusal::Forbidden.code());
        rec.deny("unknown connector");
        return Err(Refusal::Forbidden);
    }
    Ok(name)
}

/// Closes `link` with a refusal: over QUIC its code and line.
pub(crate) fn refuse(link: &Link, r: Refusal) {
    link.close(u32::from(r.code()), r.line().trim_end().as_bytes());
}

/// Serves connector `name`'s tunnel over `link` to its end; `control` is its control
/// stream, `rec` the tunnel's connection record.
pub(crate) async fn serve(
    ctx: &ConnContext,
    name: String,
    link: Link,
    chain: &[CertificateDer<'static>],
    mut control: BoxSession,
    rec: &mut Record,
) {
    let tunnels = ctx.registry.tunnels();
    let mut state = ctx.state.clone();
    let mut sent: Option<Assignments> = None;
    let expiry = tokio::time::Instant::now() + until_expiry(chain);
    let mut registered = Some(tunnels.register(&name, link.clone()));
    tracing::info!(connector = %name, transport = link.transport(), "tunnel up");
    let mut stopping = tunnels.stopping();
    let mut replica_set = tunnels.replicas_changed();
    let end: &'static str = loop {
        if registered.is_some() && *stopping.borrow_and_update() {
            registered = None;
        }
        let active = state.borrow_and_update().clone();
        if !active.policy.connectors.contains(&name) {
            refuse(&link, Refusal::Forbidden);
            break "connector removed";
        }
        if tls::recheck(chain, &active.tls.verifier).is_err() {
            refuse(&link, Refusal::Forbidden);
            break "certificate revoked";
        }
        if active.draining {
            link.close(CLOSE_DONE, b"drained");
            break "drained";
        }
        let (replicas, replicas_at_ms) = tunnels.replicas();
        let now = Assignments {
            version: active.policy.version,
            services: active.policy.routes.assignments(&name),
            replicas,
            replicas_at_ms,
            replica: tunnels.me(),
        };
        let same = |a: &Assignments| a.services == now.services && a.replicas == now.replicas;
        if !sent.as_ref().is_some_and(same) {
            let Ok(bytes) = encode_assignments(&now) else {
                refuse(&link, Refusal::Unavailable);
                break "assignments too large";
            };
            // Bounded: a connector that stops reading its control stream must not hold
            // this loop (and with it revocation and removal) up.
            let write = async {
                control.write_all(&bytes).await?;
                control.flush().await
            };
            match tokio::time::timeout(CONTROL_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                _ => {
                    refuse(&link, Refusal::Unavailable);
                    break "control stream stalled";
                }
            }
            sent = Some(now);
        }
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    break "stopping";
                }
            }
            // Where the replicas are, for the connector's placement.
            _ = replica_set.changed() => {}
            // The connector's certificate ends the tunnel when it expires, as a
            // client's ends its sessions.
            _ = tokio::time::sleep_until(expiry) => {
                refuse(&link, Refusal::Forbidden);
                break "certificate expired";
            }
            () = link.closed() => break "closed",
            // The node stops: the tunnel takes no new session (the replicas learn it is
            // gone, and relay elsewhere), and closes once its sessions have ended, so that
            // it does not hold the drain up; the connector moves to another replica.
            _ = stopping.changed(), if registered.is_some() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)), if registered.is_none() => {
                if tunnels.in_use(&link) == 0 {
                    link.close(CLOSE_DONE, b"drained");
                    break "drained";
                }
            }
        }
    };
    drop(registered);
    // Whatever ended the loop, the link ends with it (the first close's code stands).
    link.close(CLOSE_DONE, b"");
    tracing::info!(connector = %name, end, "tunnel down");
    rec.allow(end);
}
