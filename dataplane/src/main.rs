//! `ztp-dataplane`: see `--help` and README.md.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use ztp_dataplane::admin::{self, Readiness};
use ztp_dataplane::config::{Args, Config, Source};
use ztp_dataplane::conn::ConnContext;
use ztp_dataplane::handler::{HandlerLimits, Registry};
use ztp_dataplane::preauth::ConnectionCap;
use ztp_dataplane::snapshot::grpc::Subscriber;
use ztp_dataplane::snapshot::{file, Policy, Publisher};
use ztp_dataplane::{listener, shutdown, tls};

/// sysexits EX_USAGE: invalid command line or configuration.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind::*;
            let code = match e.kind() {
                DisplayHelp | DisplayVersion => 0,
                _ => EX_USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(path) = &args.check {
        return check(path);
    }
    let json = args.log_format == "json";
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztp-dataplane: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    init_tracing(json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztp-dataplane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

fn check(path: &std::path::Path) -> ExitCode {
    match file::load(path) {
        Ok(snap) => {
            println!(
                "ok: {}: version {}, {} services, {} users, {} groups, {} revoked",
                path.display(),
                snap.version,
                snap.services.len(),
                snap.users.len(),
                snap.groups.len(),
                snap.revoked.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}

async fn run(config: Config) -> ExitCode {
    let provider = tls::provider();
    // The process-wide default, for any rustls user that does not name one.
    let _ = provider.as_ref().clone().install_default();

    let ready = Arc::new(Readiness::default());
    let started = match start(&config, provider, ready.clone()).await {
        Ok(s) => s,
        Err((code, msg)) => {
            for line in msg {
                eprintln!("ztp-dataplane: {line}");
            }
            return ExitCode::from(code);
        }
    };
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
    tokio::spawn(reload_on_sighup(
        snapshot_path,
        config.tls.clone(),
        provider,
        ctx.registry.clone(),
        publisher,
    ));
    match subscriber {
        Some(sub) => {
            tokio::spawn(sub.run());
        }
        // A file snapshot is held from the start.
        None => ready.set(true),
    }

    let (trigger, stop) = shutdown::channel();
    let admin_task = tokio::spawn(admin::serve(admin, ready.clone(), stop.clone().wait()));

    let cap = ConnectionCap::new(config.max_connections as usize);
    let signal = async {
        let sig = shutdown::signal().await;
        tracing::info!(signal = sig, "stopping: no new connections");
        ready.set(false);
        trigger.fire();
    };
    let left = ztp_dataplane::serve(listener, ctx, cap, signal, config.drain_timeout).await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout: closing live connections"
        );
    }
    let _ = admin_task.await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
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
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot watch SIGHUP; reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        let mut publisher = publisher.lock().unwrap_or_else(|p| p.into_inner());
        match file::reload(
            path.as_deref(),
            &files,
            &provider,
            &registry,
            &mut publisher,
        ) {
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
            let policy =
                Policy::compile(&snap, &registry).map_err(|e| usage(vec![e.to_string()]))?;
            tracing::info!(
                snapshot.version = snap.version,
                services = policy.routes.len(),
                users = snap.users.len(),
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
    let subscriber = match &config.source {
        Source::Control(source) => {
            let sub = Subscriber::new(source.clone(), publisher.clone(), registry.clone(), ready)
                .map_err(|e| usage(vec![e.to_string()]))?;
            tracing::info!(node.id = sub.node_id(), control = %source.url, "waiting for the first snapshot");
            Some(sub)
        }
        Source::File(_) => None,
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
    if let Ok(addr) = admin.local_addr() {
        tracing::info!(%addr, "admin listening");
    }
    let ctx = Arc::new(ConnContext {
        state,
        handshake_timeout: config.handshake_timeout,
        handler: HandlerLimits {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            udp_timeout: config.udp_timeout,
        },
        registry,
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
