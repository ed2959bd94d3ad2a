//! The ZTP key server (`ztp-keyserver`): signs TLS handshakes for data-plane nodes that
//! hold no server key (DESIGN.md "Keyless").
//!
//! ```text
//! data plane ──TLS 1.3, node certificate──► listener    --max-connections, --handshake-timeout,
//!   (--key keyless://HOST:2407)                 │         node identities only (tls)
//!                                               ▼
//!                                           connection    message after message, each holding
//!                                               │         one of --max-inflight places
//!                                               ▼
//!                                            request ───► error, pong, ECDSA P-256 or Ed25519
//!                                               │         signature (tens of µs): made and
//!                                               │         answered on the connection's task
//!                                               ▼
//!                                       SignPool thread ─► RSA or ECDSA P-384 signature (up to
//!                                       (--sign-threads)   ms): made and answered there
//! ```
//!
//! Answers go out as they are ready, in any order; a place is freed once its answer is
//! written.
//!
//! Owns: the keys of `--keys DIR` and who may use them ([`keys`]), the listener's TLS
//! ([`tls`]), serving the protocol ([`server`]), its metrics ([`metrics`]) and settings
//! ([`config`]). Does not own: the protocol's codec (`ztp_proto::keyless`, shared with
//! the data plane's client) or anything of the data plane.
//!
//! What a client sees: a request that cannot be served is answered with its error code
//! and the connection goes on (malformed or a body over [`server::MAX_BODY`] 0x07, unknown opcode 0x05, an answer's opcode
//! 0x06, major version other than 1 0x04); a key id unknown, or a key this node may not
//! use, 0x02 alike; an opcode that does not fit the key's algorithm (RSA-PSS on an ECDSA
//! key...) 0x06; a signing failure 0x01.

#![forbid(unsafe_code)]

pub mod config;
pub mod keys;
pub mod metrics;
pub mod server;
pub mod tls;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::routing::get;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::keys::KeySet;
use crate::metrics::Metrics;
use crate::server::Server;

/// sysexits EX_USAGE: invalid command line or configuration (files included).
pub const EX_USAGE: u8 = 64;

/// Why the server did not start (or stopped): the exit code and one line.
#[derive(Debug)]
pub struct RunError {
    pub code: u8,
    pub line: String,
}

/// Everything loaded and bound, ready to serve.
pub struct Started {
    pub server: Arc<Server>,
    pub listener: TcpListener,
    pub admin: TcpListener,
}

/// Binds `addr`; a dual-stack wildcard falls back to `0.0.0.0` where IPv6 is off.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let bind = |a: SocketAddr| {
        let l = std::net::TcpListener::bind(a)?;
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    match bind(addr) {
        Err(e)
            if addr.ip().is_unspecified()
                && addr.is_ipv6()
                && (e.raw_os_error() == Some(97)
                    || e.kind() == std::io::ErrorKind::AddrNotAvailable) =>
        {
            tracing::warn!(error = %e, "IPv6 unavailable; listening on IPv4 only");
            bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
        }
        other => other,
    }
}

/// Loads the TLS files and the keys, and binds both ports; any failure is one line.
pub async fn start(config: &Config) -> Result<Started, RunError> {
    let usage = |line: String| RunError {
        code: EX_USAGE,
        line,
    };
    let tls =
        tls::server_config(&config.tls, &config.trust_domain).map_err(|e| usage(e.to_string()))?;
    let keys =
        KeySet::load_dir(&config.keys, &config.trust_domain).map_err(|e| usage(e.to_string()))?;
    log_keys(&keys);
    let server = Server::new(
        keys,
        tls,
        config.limits,
        config.sign_threads,
        &config.trust_domain,
        Arc::new(Metrics::default()),
    )
    .map_err(|e| RunError {
        code: 1,
        line: format!("cannot start the signing threads: {e}"),
    })?;
    let bind_err = |what: &str, addr: SocketAddr, e: std::io::Error| RunError {
        code: 1,
        line: format!("cannot listen for {what} on {addr}: {e}"),
    };
    let listener = bind(config.listen).map_err(|e| bind_err("clients", config.listen, e))?;
    let admin = bind(config.admin_listen).map_err(|e| bind_err("admin", config.admin_listen, e))?;
    Ok(Started {
        server,
        listener,
        admin,
    })
}

fn log_keys(keys: &KeySet) {
    let mut list: Vec<_> = keys.iter().collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    for k in &list {
        tracing::info!(
            key.name = %k.name,
            key.id = %keys::short_id(&k.id),
            key.algorithm = %k.algorithm,
            nodes = k.nodes.as_ref().map(|n| n.len()),
            "key loaded"
        );
    }
    if list.is_empty() {
        tracing::warn!("no key loaded: every signing request will get `key not found`");
    }
}

/// The admin port's routes: `/healthz` and `/metrics`.
pub fn admin_router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
}

/// Reads the TLS files and the key folder again; a failure keeps what runs and is
/// logged.
pub async fn reload(server: &Arc<Server>, config: &Config) {
    let config = config.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        (
            tls::server_config(&config.tls, &config.trust_domain),
            KeySet::load_dir(&config.keys, &config.trust_domain),
        )
    })
    .await;
    let Ok((tls, keys)) = loaded else {
        server.metrics().reloaded(false, 0);
        tracing::error!("reload failed; keeping the running keys and TLS files");
        return;
    };
    let mut ok = true;
    match tls {
        Ok(tls) => server.set_tls(tls),
        Err(e) => {
            ok = false;
            tracing::error!(error = %e, "reload: TLS files refused; keeping the running ones");
        }
    }
    let count = match keys {
        Ok(keys) => {
            log_keys(&keys);
            let n = keys.len();
            server.set_keys(keys);
            n
        }
        Err(e) => {
            ok = false;
            tracing::error!(error = %e, "reload: keys refused; keeping the running ones");
            server.keys().len()
        }
    };
    server.metrics().reloaded(ok, count);
    if ok {
        tracing::info!(keys = count, "reloaded");
    }
}

/// Runs the key server until `shutdown`: serves clients and the admin port, reloads on
/// SIGHUP.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let Started {
        server,
        listener,
        admin,
    } = start(&config).await?;
    let mut hangups = ztp_infra::signal::hangups().map_err(|e| RunError {
        code: 1,
        line: format!("cannot listen for SIGHUP: {e}"),
    })?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    if let Ok(addr) = admin.local_addr() {
        tracing::info!(%addr, "admin listening");
    }
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(ztp_infra::http::serve(
        admin,
        ztp_infra::http::Plain,
        admin_router(server.metrics().clone()),
        ztp_infra::http::Limits::default(),
        async {
            let _ = admin_stopped.await;
        },
    ));
    let reloader = {
        let server = server.clone();
        let config = config.clone();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                reload(&server, &config).await;
            }
        })
    };
    server.serve(listener, shutdown).await;
    reloader.abort();
    let _ = stop_admin.send(());
    let _ = admin_task.await;
    Ok(())
}
