//! A connector's tunnel on the QUIC listener (ALPN `ztp-tunnel/1`): the connector's
//! first stream is its control stream; the rest is [`crate::tunnel`], as over TCP.

use std::sync::Arc;

use quinn::crypto::rustls::HandshakeData;
use quinn::{Connection, VarInt};
use rustls::pki_types::CertificateDer;
use ztp_infra::mux::QuicIo;
use ztp_proto::quic::CLOSE_DONE;
use ztp_proto::tunnel::ALPN;

use super::conn::close_refused;
use super::Quic;
use crate::conn::Record;
use crate::handler::tunnel::Link;
use crate::snapshot::Active;
use crate::tunnel::CONTROL_TIMEOUT;

/// Whether the connection negotiated the tunnel's ALPN.
pub fn is_tunnel(conn: &Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN)
}

pub(crate) fn chain(conn: &Connection) -> Vec<CertificateDer<'static>> {
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
    let chain = chain(&conn);
    let name = match crate::tunnel::admit(&q.ctx, &chain, hello_state, rec) {
        Ok(name) => name,
        Err(refusal) => {
            close_refused(&conn, refusal);
            return;
        }
    };
    // The connector's first stream is its control stream (it writes one byte to open
    // it: a stream exists for the peer only once it carries something).
    let control = tokio::time::timeout(CONTROL_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let mut version = [0u8; 1];
        recv.read_exact(&mut version).await.ok()?;
        (version[0] == ztp_proto::tunnel::VERSION).then_some((send, recv))
    })
    .await;
    let Ok(Some((send, recv))) = control else {
        rec.deny("no control stream");
        conn.close(VarInt::from_u32(CLOSE_DONE), b"no control stream");
        return;
    };
    let control = Box::new(QuicIo::new(send, recv));
    crate::tunnel::serve(&q.ctx, name, Link::Quic(conn), &chain, control, rec).await;
}
