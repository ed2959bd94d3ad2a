//! A data-plane node as a library: load, bind, subscribe, serve until shutdown.
//! `ztp-dataplane` and `ztpctl up` both run it.

use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::admin;
use crate::config::{Config, Source};
use crate::conn::ConnContext;
use crate::handler::{HandlerLimits, Registry};
use crate::preauth::{Gate, Limits};
use crate::snapshot::grpc::Subscriber;
use crate::snapshot::Readiness;
use crate::snapshot::{file, Policy, Publisher};
use crate::{listener, shutdown, tls};

/// sysexits EX_USAGE: invalid command line or configuration.
pub const EX_USAGE: u8 = 64;

/// Why a node could not start: an exit code and the lines to print.
#[derive(Debug)]
pub struct StartError {
    pub code: u8,
    pub lines: Vec<String>,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.lines.join("; "))
    }
}

impl std::error::Error for StartError {}

/// Runs a node until `stop` completes, then drains.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Result<(), StartError> {
    let provider = tls::provider();
    // The process-wide default, for any rustls user that does not name one.
    let _ = provider.as_ref().clone().install_default();

    let ready = Arc::new(Readiness::new(config.max_snapshot_age));
    let started = start(&config, provider, ready.clone())
        .await
        .map_err(|(code, lines)| StartError { code, lines })?;
    let Started {
        listener,
        admin,
        ctx,
        publisher,
        provider,
        subscriber,
    } = started;
    let snapshot_path = match &config.source {
        Source::File(p) => Some(p.clone()),
        Source::Control(_) => None,
    };
    // With a control plane the node has a node certificate: it relays sessions to the
    // replicas holding their connector's tunnel, and takes relays from them.
    let node_key = subscriber.as_ref().map(|s| s.node_key());
    if let (Some(key), Source::Control(source)) = (&node_key, &config.source) {
        let state = ctx.state.clone();
        ctx.registry
            .tunnels()
            .set_relayer(Arc::new(crate::handler::tunnel::Relayer::new(
                key.clone(),
                provider.clone(),
                source.trust_domain.clone(),
                Box::new(move || state.borrow().tls.verifier.clone()),
            )));
    }
    tokio::spawn(reload_on_sighup(
        snapshot_path,
        config.tls.clone(),
        provider,
        ctx.registry.clone(),
        publisher.clone(),
    ));
    match subscriber {
        Some(mut sub) => {
            let me = advertise(&config, &listener);
            ctx.registry.tunnels().set_me(me.clone());
            sub.set_advertise(me);
            tokio::spawn(sub.run());
        }
        // A file snapshot is held from the start.
        None => ready.set(true),
    }

    let (trigger, stopped) = shutdown::channel();
    let admin_state = admin::AdminState {
        ready: ready.clone(),
        metrics: ctx.metrics.clone(),
        state: ctx.state.clone(),
    };
    let admin_task = tokio::spawn(admin::serve(admin, admin_state, stopped.clone().wait()));

    let cap = Gate::new(Limits {
        max_connections: config.max_connections as usize,
        per_source: config.max_connections_per_source,
        rate_per_source: config.handshake_rate_per_source,
        allow: config.allow.clone(),
        deny: config.deny.clone(),
    });
    // The QUIC listener shares the gate: caps and rates count a source's connections
    // over both transports.
    let quic = match &config.quic {
        Some(settings) => {
            // By default QUIC shares the TCP listener's port, also when that was chosen
            // by the system (port 0): clients reach both at one address.
            let mut settings = settings.clone();
            if settings.listen == config.listen && settings.listen.port() == 0 {
                if let Ok(tcp) = listener.local_addr() {
                    settings.listen.set_port(tcp.port());
                }
            }
            let settings = &settings;
            let (endpoint, shared) =
                crate::quic::bind(settings, ctx.clone(), cap.clone(), node_key.clone()).map_err(
                    |e| StartError {
                        code: 1,
                        lines: vec![format!(
                            "cannot listen for QUIC clients on {} (udp): {e} (--quic-listen off \
                         serves TCP only)",
                            settings.listen
                        )],
                    },
                )?;
            if let Ok(addr) = endpoint.local_addr() {
                tracing::info!(%addr, "listening (quic)");
            }
            tokio::spawn(crate::quic::run(
                endpoint.clone(),
                shared,
                stopped.clone().wait(),
            ));
            Some(endpoint)
        }
        None => None,
    };
    let tunnels = ctx.registry.tunnels().clone();
    let signal = async {
        stop.await;
        tracing::info!("stopping: no new connections");
        ready.set(false);
        tunnels.stop();
        trigger.fire();
    };
    let end_sessions = move || publisher.lock().unwrap_or_else(|p| p.into_inner()).drain();
    let left = crate::serve(
        listener,
        ctx,
        cap,
        signal,
        config.drain_timeout,
        end_sessions,
    )
    .await;
    if let Some(endpoint) = quic {
        // The connections' CONNECTION_CLOSE frames go out before the process ends.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    }
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout: connections still open at exit"
        );
    }
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Where other replicas relay to this node: `--advertise`, else the QUIC listener's
/// address when it is not a wildcard; empty (no relays to it) otherwise.
fn advertise(config: &Config, listener: &tokio::net::TcpListener) -> String {
    if let Some(a) = &config.advertise {
        return a.clone();
    }
    let Some(quic) = &config.quic else {
        return String::new();
    };
    let mut addr = quic.listen;
    if addr == config.listen && addr.port() == 0 {
        if let Ok(tcp) = listener.local_addr() {
            addr.set_port(tcp.port());
        }
    }
    if addr.ip().is_unspecified() {
        tracing::warn!(
            listen = %addr,
            "no --advertise: other replicas cannot relay sessions to this node's tunnels"
        );
        return String::new();
    }
    addr.to_string()
}

struct Started {
    listener: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    ctx: Arc<ConnContext>,
    publisher: Arc<Mutex<Publisher>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    subscriber: Option<Subscriber>,
}

/// SIGHUP: reload the snapshot file (when serving one) and the certificate, key and CA
/// files. A valid set is swapped in atomically; an invalid one is logged and the running
/// one kept.
async fn reload_on_sighup(
    path: Option<std::path::PathBuf>,
    files: tls::TlsFiles,
    provider: Arc<rustls::crypto::CryptoProvider>,
    registry: Registry,
    publisher: Arc<Mutex<Publisher>>,
) {
    let Ok(mut hup) = ztp_infra::signal::hangups() else {
        tracing::warn!("cannot watch SIGHUP; reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        // Reading and indexing a large snapshot must not stall a worker (see
        // `snapshot::background`).
        let (p, f, pr, r, pb) = (
            path.clone(),
            files.clone(),
            provider.clone(),
            registry.clone(),
            publisher.clone(),
        );
        let result = crate::snapshot::background::run(move || {
            let mut publisher = pb.lock().unwrap_or_else(|p| p.into_inner());
            file::reload(p.as_deref(), &f, &pr, &r, &mut publisher)
        })
        .await;
        let Some(result) = result else { continue };
        match result {
            Ok((before, after)) => {
                if path.is_some() && after <= before {
                    tracing::warn!(
                        snapshot.version = after,
                        previous = before,
                        "reloaded snapshot does not move the version forward; applied anyway"
                    );
                }
                tracing::info!(snapshot.version = after, "reloaded");
            }
            Err(e) => tracing::error!(error = %e, "reload refused; keeping the running config"),
        }
    }
}

/// Loads everything and binds the sockets; any failure is reported before serving.
async fn start(
    config: &Config,
    provider: Arc<rustls::crypto::CryptoProvider>,
    ready: Arc<Readiness>,
) -> Result<Started, (u8, Vec<String>)> {
    let usage = |lines: Vec<String>| (EX_USAGE, lines);
    let material =
        tls::TlsMaterial::load(&config.tls, &provider).map_err(|e| usage(vec![e.to_string()]))?;
    let registry = Registry::builtin();
    let policy = match &config.source {
        Source::File(path) => {
            let snap = file::load(path).map_err(|e| usage(e.lines()))?;
            let (version, users) = (snap.version, snap.users.len());
            // `file::load` validated it.
            let policy = Policy::compile_validated(snap, &registry)
                .map_err(|e| usage(vec![e.to_string()]))?;
            tracing::info!(
                snapshot.version = version,
                services = policy.routes.len(),
                users,
                path = %path.display(),
                "snapshot loaded"
            );
            policy
        }
        Source::Control(_) => Policy::empty(),
    };
    let (publisher, state) = Publisher::new(policy, material, provider.clone())
        .map_err(|e| usage(vec![e.to_string()]))?;
    let publisher = Arc::new(Mutex::new(publisher));
    let (audit_tx, audit_rx) = tokio::sync::mpsc::channel(crate::snapshot::grpc::AUDIT_QUEUE);
    let (audit_tx, mut audit_rx) = match &config.source {
        Source::Control(_) => (Some(audit_tx), Some(audit_rx)),
        Source::File(_) => (None, None),
    };
    let bind_err = |what: &str, addr, e: std::io::Error| {
        (1, vec![format!("cannot listen for {what} on {addr}: {e}")])
    };
    let listener =
        listener::bind(config.listen).map_err(|e| bind_err("clients", config.listen, e))?;
    let admin = listener::bind(config.admin_listen)
        .map_err(|e| bind_err("admin", config.admin_listen, e))?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    let subscriber = match &config.source {
        Source::Control(source) => {
            let mut sub = Subscriber::new(
                source.clone(),
                publisher.clone(),
                registry.clone(),
                ready.clone(),
                audit_rx
                    .take()
                    .ok_or_else(|| usage(vec!["no audit queue".into()]))?,
            )
            .map_err(|e| usage(vec![e.to_string()]))?;
            // Report the address actually bound (a port 0 becomes a real one).
            if let Ok(addr) = listener.local_addr() {
                sub.set_listen(addr.to_string());
            }
            tracing::info!(node.id = sub.node_id(), control = %source.url, "waiting for the first snapshot");
            Some(sub)
        }
        Source::File(_) => None,
    };

    if let Ok(addr) = admin.local_addr() {
        tracing::info!(%addr, "admin listening");
    }
    let ctx = Arc::new(ConnContext {
        state,
        trust_domain: config.trust_domain.clone(),
        handshake_timeout: config.handshake_timeout,
        handler: HandlerLimits {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            udp_timeout: config.udp_timeout,
        },
        registry,
        metrics: Arc::default(),
        audit: audit_tx,
        ready: ready.clone(),
    });
    Ok(Started {
        listener,
        admin,
        ctx,
        publisher,
        provider,
        subscriber,
    })
}
