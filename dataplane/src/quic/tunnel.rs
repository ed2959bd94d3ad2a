//! A connector's tunnel, on the QUIC listener (ALPN `ztp-tunnel/1`; the contract is
//! `ztp_proto::tunnel`).
//!
//! The handshake verified the chain like any client's; here the certificate must be a
//! connector's (`spiffe://DOMAIN/connector/NAME`, one URI and no email) and NAME a
//! connector of the snapshot. The connector's control stream then gets its assignments
//! (the services that name it, with their addresses), again whenever they change, and the
//! tunnel serves sessions ([`crate::handler::tunnel`]) until it ends. A later snapshot
//! that removes the connector, or revokes its certificate, closes the tunnel with 403
//! and the line, and with it every session through it; drain closes it with 0.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::HandshakeData;
use quinn::{Connection, VarInt};
use rustls::pki_types::CertificateDer;
use ztp_proto::quic::CLOSE_DONE;
use ztp_proto::tunnel::{encode_assignments, Assignments, ALPN};

use super::conn::close_refused;
use super::Quic;
use crate::conn::Record;
use crate::refusal::Refusal;
use crate::snapshot::Active;
use crate::tls;

/// How long a connector has to open its control stream.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Whether the connection negotiated the tunnel's ALPN.
pub fn is_tunnel(conn: &Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN)
}

fn chain(conn: &Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
        .unwrap_or_default()
}

/// Serves a connector's tunnel to its end; `rec` is its connection record.
pub(crate) async fn serve(
    q: &Arc<Quic>,
    conn: Connection,
    hello_state: &Arc<Active>,
    rec: &mut Record,
) {
    rec.protocol = Some("tunnel");
    let chain = chain(&conn);
    let Some(name) = chain
        .first()
        .and_then(|leaf| ztp_proto::names::connector_name_of_cert(leaf, &q.trust_domain))
    else {
        // A user's (or a node's) certificate is never a connector's.
        rec.code = Some(Refusal::Forbidden.code());
        rec.deny("not a connector");
        close_refused(&conn, Refusal::Forbidden);
        return;
    };
    rec.identity = Some(format!("spiffe://{}/connector/{name}", q.trust_domain));
    let mut state = q.ctx.state.clone();
    let active = state.borrow_and_update().clone();
    if !Arc::ptr_eq(&active, hello_state) && tls::recheck(&chain, &active.tls.verifier).is_err() {
        rec.code = Some(Refusal::Forbidden.code());
        rec.deny("certificate refused on re-check");
        close_refused(&conn, Refusal::Forbidden);
        return;
    }
    if !active.policy.connectors.contains(&name) {
        rec.code = Some(Refusal::Forbidden.code());
        rec.deny("unknown connector");
        close_refused(&conn, Refusal::Forbidden);
        return;
    }
    // The connector's first stream is its control stream (it writes one byte to open
    // it: a stream exists for the peer only once it carries something).
    let control = tokio::time::timeout(CONTROL_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let mut version = [0u8; 1];
        recv.read_exact(&mut version).await.ok()?;
        (version[0] == ztp_proto::tunnel::VERSION).then_some((send, recv))
    })
    .await;
    let Ok(Some((mut control, _recv))) = control else {
        rec.deny("no control stream");
        conn.close(VarInt::from_u32(CLOSE_DONE), b"no control stream");
        return;
    };
    let mut sent: Option<Assignments> = None;
    let expiry = tokio::time::Instant::now() + until_expiry(&chain);
    let mut registered = Some(q.ctx.registry.tunnels().register(&name, conn.clone()));
    tracing::info!(connector = %name, "tunnel up");
    let mut stopping = q.stopping.clone();
    let end: &'static str = loop {
        let active = state.borrow_and_update().clone();
        if !active.policy.connectors.contains(&name) {
            close_refused(&conn, Refusal::Forbidden);
            break "connector removed";
        }
        if tls::recheck(&chain, &active.tls.verifier).is_err() {
            close_refused(&conn, Refusal::Forbidden);
            break "certificate revoked";
        }
        if active.draining {
            conn.close(VarInt::from_u32(CLOSE_DONE), b"drained");
            break "drained";
        }
        let now = Assignments {
            version: active.policy.version,
            services: active.policy.routes.assignments(&name),
        };
        if sent.as_ref().map(|a| &a.services) != Some(&now.services) {
            let Ok(bytes) = encode_assignments(&now) else {
                close_refused(&conn, Refusal::Unavailable);
                break "assignments too large";
            };
            // Bounded: a connector that stops reading its control stream must not hold
            // this loop (and with it revocation and removal) up.
            match tokio::time::timeout(CONTROL_TIMEOUT, control.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                _ => {
                    close_refused(&conn, Refusal::Unavailable);
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
            // The connector's certificate ends the tunnel when it expires, as a
            // client's ends its sessions.
            _ = tokio::time::sleep_until(expiry) => {
                close_refused(&conn, Refusal::Forbidden);
                break "certificate expired";
            }
            _ = conn.closed() => break "closed",
            // The node stops: the tunnel takes no new session (the replicas learn it is
            // gone, and relay elsewhere), and closes once its sessions have ended, so that
            // it does not hold the drain up; the connector moves to another replica.
            _ = stopping.changed(), if registered.is_some() => {
                if *stopping.borrow() {
                    registered = None;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)), if registered.is_none() => {
                if q.ctx.registry.tunnels().in_use(&conn) == 0 {
                    conn.close(VarInt::from_u32(CLOSE_DONE), b"drained");
                    break "drained";
                }
            }
        }
    };
    drop(registered);
    tracing::info!(connector = %name, end, "tunnel down");
    rec.allow(end);
}
