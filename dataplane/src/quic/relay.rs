//! A replica relaying sessions to this one (ALPN `ztp-relay/1`): it holds no tunnel of
//! their connector, this one does. Both present node certificates; the relaying one's
//! passed the gate's verifier (the client CA set, revocations) and must name a node. Each
//! stream is one session: a header naming the connector, then, like a tunnel's session,
//! one status byte back and the session's bytes. The relaying replica decided the client
//! (identity, authorization) and records the session; this one carries it.

use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_proto::quic::STREAM_ABORTED;
use ztp_proto::tunnel::{decode_header, encode_header, SessionHeader, Status, MAX_HEADER};

use super::conn::close_refused;
use super::Quic;
use crate::conn::Record;
use crate::refusal::Refusal;

/// Sessions one relay may carry at once.
const RELAY_STREAMS: u32 = 4096;

/// How long a relayed session's header may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the connection negotiated the relay's ALPN.
pub fn is_relay(conn: &Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ztp_proto::tunnel::RELAY_ALPN)
}

/// Serves a relaying replica's connection to its end; `rec` is its record.
pub(crate) async fn serve(q: &Arc<Quic>, conn: Connection, rec: &mut Record) {
    rec.protocol = Some("relay");
    let leaf = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|c| c.first().cloned());
    let Some(node) = leaf.and_then(|l| ztp_proto::names::node_id_of_cert(&l, &q.trust_domain))
    else {
        rec.code = Some(Refusal::Forbidden.code());
        rec.deny("not a node");
        close_refused(&conn, Refusal::Forbidden);
        return;
    };
    rec.identity = Some(format!("spiffe://{}/node/{node}", q.trust_domain));
    // One relay carries many sessions: more than a client connection's streams.
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(RELAY_STREAMS));
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
        .unwrap_or_default();
    let mut state = q.ctx.state.clone();
    state.mark_changed();
    let expiry = tokio::time::Instant::now() + crate::tunnel::until_expiry(&chain);
    let mut sessions = tokio::task::JoinSet::new();
    let end = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    sessions.spawn(session(q.clone(), send, recv));
                }
                Err(_) => break "closed",
            },
            // The relaying node's certificate is judged again on every snapshot (its
            // revocation ends the relay) and at its expiry.
            changed = state.changed() => {
                if changed.is_err() {
                    break "stopping";
                }
                let active = state.borrow_and_update().clone();
                if crate::tls::recheck(&chain, &active.tls.verifier).is_err() {
                    close_refused(&conn, Refusal::Forbidden);
                    break "node certificate refused";
                }
            }
            _ = tokio::time::sleep_until(expiry) => {
                close_refused(&conn, Refusal::Forbidden);
                break "node certificate expired";
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    };
    rec.allow(end);
}

/// One relayed session: through a tunnel of its connector held here, or `NoTunnel`.
async fn session(q: Arc<Quic>, mut send: SendStream, mut recv: RecvStream) {
    let header = tokio::time::timeout(HEADER_TIMEOUT, async {
        let mut len = [0u8; 2];
        recv.read_exact(&mut len).await.ok()?;
        let len = u16::from_be_bytes(len) as usize;
        if len > MAX_HEADER {
            return None;
        }
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.ok()?;
        decode_header(&body).ok()
    })
    .await;
    let Ok(Some(header)) = header else {
        let _ = send.reset(VarInt::from_u32(STREAM_ABORTED));
        return;
    };
    let Some(connector) = header.connector.clone() else {
        let _ = send.reset(VarInt::from_u32(STREAM_ABORTED));
        return;
    };
    // Local tunnels only: a relayed session is never relayed again.
    let Some(tunnel) = q.ctx.registry.tunnels().pick(&connector) else {
        let _ = send.write_all(&[Status::NoTunnel as u8]).await;
        let _ = send.finish();
        return;
    };
    let _use = q.ctx.registry.tunnels().hold(&tunnel);
    // The relaying replica records the session; this one says it carried it.
    tracing::info!(
        connector = %connector,
        service.name = %header.service,
        client.id = %header.identity,
        "relayed session"
    );
    let Ok(bytes) = encode_header(&SessionHeader {
        connector: None,
        ..header
    }) else {
        let _ = send.reset(VarInt::from_u32(STREAM_ABORTED));
        return;
    };
    let opened = tokio::time::timeout(q.ctx.handler.connect_timeout, async {
        let mut t = tunnel.open().await.ok()?;
        t.write_all(&bytes).await.ok()?;
        let mut status = [0u8; 1];
        t.read_exact(&mut status).await.ok()?;
        Some((t, status[0]))
    })
    .await;
    let (t, status) = match opened {
        Ok(Some(o)) => o,
        // The tunnel failed (it just closed): as good as none.
        Ok(None) => {
            let _ = send.write_all(&[Status::NoTunnel as u8]).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            let _ = send.write_all(&[Status::Timeout as u8]).await;
            let _ = send.finish();
            return;
        }
    };
    if send.write_all(&[status]).await.is_err() || status != Status::Connected as u8 {
        let _ = send.finish();
        return;
    }
    let (mut trecv, mut tsend) = tokio::io::split(t);
    // The session's bytes, both ways, with the half-closes and the resets passed on.
    let up = async {
        // On an error the stream is cut when both halves are dropped unfinished.
        if tokio::io::copy(&mut recv, &mut tsend).await.is_ok() {
            let _ = tsend.shutdown().await;
        }
    };
    let down = async {
        match tokio::io::copy(&mut trecv, &mut send).await {
            Ok(_) => {
                let _ = send.finish();
            }
            Err(_) => {
                let _ = send.reset(VarInt::from_u32(STREAM_ABORTED));
            }
        }
    };
    tokio::join!(up, down);
}
