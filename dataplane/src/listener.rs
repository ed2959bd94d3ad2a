//! The listener: bind (dual-stack by default), accept with backoff, shed over the
//! connection cap, and spawn one task per connection until shutdown.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::conn::{self, ConnContext};
use crate::preauth::{self, Gate};

/// Binds a listening socket. An IPv6 wildcard address is bound dual-stack (IPv4 peers
/// arrive IPv4-mapped); where IPv6 is off, `[::]:PORT` falls back to `0.0.0.0:PORT`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    match bind_exact(addr) {
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() && ipv6_unavailable(&e) => {
            tracing::warn!(error = %e, "IPv6 unavailable; listening on IPv4 only");
            bind_exact(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
        }
        other => other,
    }
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    // EAFNOSUPPORT (97) or EADDRNOTAVAIL.
    e.raw_os_error() == Some(97) || e.kind() == io::ErrorKind::AddrNotAvailable
}

fn bind_exact(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Accepts connections until `shutdown` completes. Returns once accepting stopped; the
/// connections already running go on (see [`Gate::all_closed`]).
pub async fn run(
    listener: TcpListener,
    ctx: Arc<ConnContext>,
    gate: Gate,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Out of descriptors or memory: wait, do not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let peer = preauth::canonical(peer);
        if ctx.ready.stale() {
            // Fail closed: the policy may have changed while the control plane was away.
            ctx.metrics.connection_shed("snapshot stale", peer);
            drop(tcp);
            continue;
        }
        let permit = match gate.admit(peer.ip()) {
            Ok(p) => p,
            Err(shed) => {
                ctx.metrics.connection_shed(shed.as_str(), peer);
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            conn::serve(tcp, peer, ctx).await;
            drop(permit);
        });
    }
}
