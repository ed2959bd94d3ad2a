//! The control plane as a library: open the store, then serve the REST API and the gRPC
//! config stream until shutdown. `ztp-control` and `ztpctl up` both run it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use ztp_infra::fs::write_private;
use ztp_infra::http;

use crate::api::{self, AppState};
use crate::grpc;
use crate::store::{Actor, Store};

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    /// Certificate and key to serve the API over HTTPS.
    pub api_tls: Option<(PathBuf, PathBuf)>,
    /// The config stream; `None` leaves it off.
    pub grpc: Option<GrpcOptions>,
    /// Connection records kept (the oldest are dropped beyond it).
    pub audit_retention: u64,
}

#[derive(Debug, Clone)]
pub struct GrpcOptions {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub node_ca: PathBuf,
    pub trust_domain: String,
}

/// Where the store's records live.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// sled in the data folder.
    Sled,
    /// An etcd cluster, shared with other instances.
    Etcd(crate::store::etcd::EtcdOptions),
}

/// Opens (or creates) the sled store in `dir`, with private file modes; on first start
/// writes the admin token to `dir/admin-token`.
pub async fn open_store(dir: &Path) -> anyhow::Result<Arc<Store>> {
    open_store_on(dir, StoreBackend::Sled).await
}

/// Opens the store on `backend`; `dir` holds the sled store (with sled) and the first
/// admin token (written by the one instance that initializes the store).
pub async fn open_store_on(dir: &Path, backend: StoreBackend) -> anyhow::Result<Arc<Store>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let store = match backend {
        StoreBackend::Sled => Store::open(dir)?,
        StoreBackend::Etcd(opts) => {
            let backend = crate::store::etcd::EtcdBackend::connect(opts).await?;
            Store::connect(Arc::new(backend)).await?
        }
    };
    restrict_modes(dir).with_context(|| format!("cannot set modes under {}", dir.display()))?;
    let store = Arc::new(store);
    bootstrap_token(&store, dir).await?;
    let (backend, location) = store.describe();
    tracing::info!(
        backend,
        location = %location,
        config.version = store.version()?,
        "store open"
    );
    Ok(store)
}

/// Serves the API (and the config stream) until `shutdown` completes.
pub async fn serve(
    store: Arc<Store>,
    opts: &Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    store.set_conn_audit_cap(opts.audit_retention);
    let nodes = Arc::new(crate::nodes::Nodes::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx2 = stop_rx.clone();
    let stopped = move || {
        let mut rx = stop_rx2.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let grpc_task = match &opts.grpc {
        Some(g) => {
            let config = grpc::server_config(&g.cert, &g.key, &g.node_ca, &g.trust_domain)?;
            let listener = bind_dual_stack(g.listen)
                .with_context(|| format!("cannot listen for gRPC on {}", g.listen))?;
            tracing::info!(addr = %listener.local_addr()?, "grpc listening");
            let server = grpc::ConfigServer::new(store.clone(), nodes.clone(), stop_rx.clone());
            Some(tokio::spawn(grpc::serve(
                listener,
                config,
                g.trust_domain.clone(),
                server,
                stopped(),
            )))
        }
        None => {
            tracing::warn!(
                "the config stream to data planes is off (no gRPC certificate and node CA)"
            );
            None
        }
    };

    // Nodes (and their connectors' tunnels) shared with the other instances on the same
    // store: this instance's offered on every change and each second (the backend writes
    // only what changed, and everything again if its lease for them was lost); the
    // others' read twice a second. A store of one instance has no one to tell.
    let sharing = store.is_shared().then(|| {
        let (store, nodes) = (store.clone(), nodes.clone());
        tokio::spawn(async move {
            let mut changes = nodes.tunnel_changes();
            let mut read = tokio::time::interval(std::time::Duration::from_millis(500));
            let mut offer = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = offer.tick() => {}
                    r = changes.changed() => if r.is_err() { return },
                    _ = read.tick() => {
                        match store.cluster_nodes().await {
                            Ok(list) => nodes.set_remote(
                                list.iter()
                                    .filter_map(|j| serde_json::from_slice(j).ok())
                                    .collect(),
                            ),
                            Err(e) => tracing::debug!(error = %e, "cannot read the other instances' nodes"),
                        }
                        continue;
                    }
                }
                let now: Vec<(String, Vec<u8>)> = nodes
                    .recorded()
                    .into_iter()
                    .map(|p| (p.node.id.clone(), serde_json::to_vec(&p).unwrap_or_default()))
                    .collect();
                if let Err(e) = store.publish_nodes(now).await {
                    tracing::debug!(error = %e, "cannot publish this instance's nodes");
                }
            }
        })
    });
    let state = AppState::with_nodes(store, nodes);
    let app = api::router(state);
    let tcp = tokio::net::TcpListener::bind(opts.api_listen)
        .await
        .with_context(|| format!("cannot listen for the API on {}", opts.api_listen))?;
    let addr = tcp.local_addr()?;
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let limits = http::Limits::default();
    match &opts.api_tls {
        Some((cert, key)) => {
            let config = api::https::server_config(cert, key)?;
            let tls = api::https::Tls(tokio_rustls::TlsAcceptor::from(config));
            tracing::info!(%addr, scheme = "https", "api listening");
            http::serve(tcp, tls, app, limits, shutdown).await;
        }
        None => {
            tracing::info!(%addr, scheme = "http", "api listening");
            http::serve(tcp, http::Plain, app, limits, shutdown).await;
        }
    }
    if let Some(t) = sharing {
        t.abort();
    }
    if let Some(t) = grpc_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    Ok(())
}

/// On first start (no token in the store), creates the admin token and writes it to
/// `DIR/admin-token` (0600) for the operator; the store keeps only its hash.
async fn bootstrap_token(store: &Store, dir: &Path) -> anyhow::Result<()> {
    let (path, tmp) = (dir.join("admin-token"), dir.join("admin-token.tmp"));
    if store.token_count() > 0 {
        // A crash between storing the hash and the rename below left the secret here.
        if tmp.exists() && !path.exists() {
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(());
    }
    // The secret reaches the disk before the store knows its hash: a crash in between
    // leaves no token in the store, and the next start makes a new one.
    let (token, info) = Store::mint_token("admin")?;
    write_private(&tmp, format!("{}\n", token.token).as_bytes())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    // Of several instances starting together on an empty shared store, one stores its
    // token; the others write none.
    if !store.save_first_token(info, &Actor::system()).await? {
        let _ = std::fs::remove_file(&tmp);
        tracing::info!("another instance initialized the store; no admin token written here");
        return Ok(());
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "admin token written");
    Ok(())
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
