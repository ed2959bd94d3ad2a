//! The ZTP data plane.
//!
//! Owns: the listener, the TLS gate, identity, routing, authorization, handlers and the
//! config sources of a data-plane node. Does not own: the snapshot schema and its
//! validation (`ztp-proto`), or the system of record (`ztp-control`).
//!
//! A connection's path, one module per stage, read top to bottom in [`conn`]:
//!
//! ```text
//!  accept ─► preauth ─► TLS handshake ─► identity ─► service lookup ─► authorize ─► protocol ─► handler
//!  listener  preauth    tls (SNI, mTLS,  └──────────── admission::decide ─────────────┘        session ─► handler::{tcp,udp,
//!            (cap)      revocation)       (identity, routing, authz, protocol: pure)            (ends it)   quic,identity_echo}
//!     refusals in the handshake: alert or close │ after it: one ZTP-ERROR line (refusal)
//! ```
//!
//! Routing state is one `Arc<Active>` (a compiled snapshot and the TLS configs built for
//! it) published on a `tokio::sync::watch` by [`snapshot::Publisher`]. The decisions from
//! identity to protocol choice are one pure function of (policy, peer facts):
//! [`admission::decide`], which other transports reuse unchanged. The [`session`] stage
//! races the handler against a later decision ([`reauth`]) and the drain deadline, and
//! ends every session itself. Handlers see the client only through the transport-neutral
//! [`handler::ClientIo`] and [`handler::DatagramChannel`].
//!
//! Modules layer without cycles: `identity`, `refusal`, `handler` at the bottom;
//! `routing` → `authz` → `snapshot` → `admission` → `reauth` → `session` → `conn` above.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod authz;
pub mod config;
pub mod conn;
pub mod cowmap;
pub mod handler;
pub mod identity;
pub mod keyless;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod preauth;
pub mod protocol;
pub mod quic;
pub mod reauth;
pub mod record;
pub mod refusal;
pub mod routing;
pub mod session;
pub mod shutdown;
pub mod snapshot;
pub mod tls;
pub mod tunnel;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::conn::ConnContext;
use crate::preauth::Gate;

/// How long sessions ended at the drain deadline get to send their close (each close is
/// bounded by 2 s).
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Serves clients on `listener` until `shutdown` completes, then waits up to `drain` for
/// live connections to end; at that deadline the pipeline ends every live session
/// cleanly (close_notify). Returns the number of connections still open at the end.
///
/// `end_sessions` marks the published state draining (see
/// [`snapshot::Publisher::drain`]).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ConnContext>,
    cap: Gate,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    end_sessions: impl FnOnce(),
) -> usize {
    listener::run(listener, ctx, cap.clone(), shutdown).await;
    let live = cap.active();
    if live > 0 {
        tracing::info!(connections = live, "draining");
        if tokio::time::timeout(drain, cap.all_closed()).await.is_err() {
            tracing::info!(
                connections = cap.active(),
                "drain deadline: ending sessions"
            );
            end_sessions();
            let _ = tokio::time::timeout(CLOSE_GRACE, cap.all_closed()).await;
        }
    }
    cap.active()
}
