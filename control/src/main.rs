//! `ztp-control`: see `--help` and README.md.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ztp_control::api::{self, AppState};
use ztp_control::grpc;
use ztp_control::store::{Actor, Store};

/// sysexits EX_USAGE: invalid command line or configuration.
const EX_USAGE: u8 = 64;

/// ZTP control plane: keeps services, users and groups, and serves the admin API.
#[derive(Debug, Parser)]
#[command(name = "ztp-control", version, about, max_term_width = 100)]
struct Args {
    /// Folder of the store (created if missing; mode 0700). On first start an admin
    /// token is written to DIR/admin-token.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,

    /// Address of the REST admin API (plain HTTP unless --api-cert is given).
    #[arg(long, default_value = "127.0.0.1:9780", value_name = "ADDR")]
    api_listen: SocketAddr,

    /// Certificate chain (PEM) to serve the admin API over HTTPS.
    #[arg(long, value_name = "FILE", requires = "api_key")]
    api_cert: Option<PathBuf>,

    /// Key (PEM) of --api-cert.
    #[arg(long, value_name = "FILE", requires = "api_cert")]
    api_key: Option<PathBuf>,

    /// Address of the gRPC config stream to data-plane nodes (mutual TLS). Needs
    /// --grpc-cert, --grpc-key and --node-ca; without them the stream is off.
    #[arg(long, default_value = "[::]:9781", value_name = "ADDR")]
    grpc_listen: SocketAddr,

    /// Certificate chain (PEM) of the gRPC port.
    #[arg(long, value_name = "FILE", requires_all = ["grpc_key", "node_ca"])]
    grpc_cert: Option<PathBuf>,

    /// Key (PEM) of --grpc-cert.
    #[arg(long, value_name = "FILE", requires = "grpc_cert")]
    grpc_key: Option<PathBuf>,

    /// CA certificates (PEM) that node certificates must chain to.
    #[arg(long, value_name = "FILE", requires = "grpc_cert")]
    node_ca: Option<PathBuf>,

    /// Trust domain of node identities (`spiffe://DOMAIN/node/ID`).
    #[arg(long, default_value = ztp_proto::names::DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN")]
    trust_domain: String,

    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], value_name = "FORMAT")]
    log_format: String,
}

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
    init_tracing(args.log_format == "json");
    // Everything this process creates (store files, the token file) is private.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztp-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztp-control: {e:#}");
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

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let store = Store::open(dir)?;
    restrict_modes(dir).with_context(|| format!("cannot set modes under {}", dir.display()))?;
    let store = Arc::new(store);
    bootstrap_token(&store, dir).await?;
    tracing::info!(
        path = %dir.display(),
        config.version = store.version()?,
        "store open"
    );

    let nodes = Arc::new(ztp_control::nodes::Nodes::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let grpc_task = match (&args.grpc_cert, &args.grpc_key, &args.node_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let config = grpc::server_config(cert, key, ca, &args.trust_domain)?;
            let listener = bind_dual_stack(args.grpc_listen)
                .with_context(|| format!("cannot listen for gRPC on {}", args.grpc_listen))?;
            tracing::info!(addr = %listener.local_addr()?, "grpc listening");
            let server = grpc::ConfigServer::new(store.clone(), nodes.clone());
            Some(tokio::spawn(grpc::serve(
                listener,
                config,
                args.trust_domain.clone(),
                server,
                stopped(),
            )))
        }
        _ => {
            tracing::warn!(
                "no --grpc-cert/--grpc-key/--node-ca: the config stream to data planes is off"
            );
            None
        }
    };

    let state = AppState::with_nodes(store, nodes);
    let app = api::router(state).into_make_service_with_connect_info::<api::auth::ClientAddr>();
    let tcp = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("cannot listen for the API on {}", args.api_listen))?;
    let addr = tcp.local_addr()?;
    let shutdown = async move {
        let sig = signal().await;
        tracing::info!(signal = sig, "stopping");
        let _ = stop_tx.send(true);
    };
    match (&args.api_cert, &args.api_key) {
        (Some(cert), Some(key)) => {
            let config = api::https::server_config(cert, key)?;
            let listener = api::https::HttpsListener::new(tcp, config)?;
            tracing::info!(%addr, scheme = "https", "api listening");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
        _ => {
            tracing::info!(%addr, scheme = "http", "api listening");
            axum::serve(tcp, app)
                .with_graceful_shutdown(shutdown)
                .await?;
        }
    }
    if let Some(t) = grpc_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Binds a listener; an IPv6 wildcard is dual-stack, falling back to IPv4 where IPv6 is
/// off.
fn bind_dual_stack(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let bind = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
        let sock = if addr.is_ipv6() {
            tokio::net::TcpSocket::new_v6()?
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        sock.listen(1024)
    };
    match bind(addr) {
        Err(_) if addr.is_ipv6() && addr.ip().is_unspecified() => bind(SocketAddr::from((
            std::net::Ipv4Addr::UNSPECIFIED,
            addr.port(),
        ))),
        other => other,
    }
}

/// On first start (no token in the store), creates the admin token and writes it to
/// `DIR/admin-token` (0600) for the operator; the store keeps only its hash.
async fn bootstrap_token(store: &Store, dir: &Path) -> anyhow::Result<()> {
    if store.token_count() > 0 {
        return Ok(());
    }
    let path = dir.join("admin-token");
    let token = store.create_token("admin", &Actor::system()).await?;
    write_private(&path, format!("{}\n", token.token).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "admin token written");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Store files 0600 and folders 0700, whatever made them.
fn restrict_modes(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir)?;
    let mode = if meta.is_dir() { 0o700 } else { 0o600 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            restrict_modes(&entry?.path())?;
        }
    }
    Ok(())
}

async fn signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => tokio::select! {
            _ = t.recv() => "SIGTERM",
            _ = i.recv() => "SIGINT",
        },
        _ => std::future::pending().await,
    }
}
