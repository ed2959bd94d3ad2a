//! The gRPC `ConfigService`: snapshots streamed to data-plane nodes over mutual TLS.
//!
//! Only node certificates are accepted: issued by `--node-ca` and carrying the URI
//! `spiffe://TRUST_DOMAIN/node/ID` (DESIGN.md "Identities of machines"); a user's
//! certificate fails the handshake. A node subscribes with its last applied version,
//! gets the current snapshot when behind, then each new version (a slow node skips the
//! versions it missed: bursts coalesce), and acks or nacks each one.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::sign::SingleCertAndKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use ztp_proto::wire::{pb, ServerCodec, MAX_MESSAGE_BYTES};

use crate::nodes::Nodes;
use crate::store::Store;

use pb::node_message::Kind;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress on the gRPC port, at most.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// The gRPC port's TLS config: TLS 1.3, ALPN h2, node certificates only.
pub fn server_config(
    cert: &Path,
    key: &Path,
    node_ca: &Path,
    trust_domain: &str,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context as _;
    let provider = ztp_infra::tls::provider();
    // The key enters as a rustls signer, so a remote one can replace it.
    let certified = ztp_infra::tls::certified_key(cert, key, &provider)?;
    let roots = ztp_infra::tls::read_roots(node_ca)?;
    let verifier = ztp_infra::tls::node_verifier(roots, provider.clone(), trust_domain)
        .context("cannot build the node verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Who is on the other end of a gRPC connection.
#[derive(Debug, Clone)]
pub struct NodePeer {
    pub id: String,
    pub addr: SocketAddr,
}

/// A verified node connection.
pub struct NodeConn {
    tls: TlsStream<TcpStream>,
    peer: NodePeer,
}

impl tonic::transport::server::Connected for NodeConn {
    type ConnectInfo = NodePeer;

    fn connect_info(&self) -> NodePeer {
        self.peer.clone()
    }
}

impl AsyncRead for NodeConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Accepts TCP, completes TLS off the accept loop, and yields verified node connections.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    trust_domain: String,
) -> ReceiverStream<Result<NodeConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "grpc accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            // Unauthenticated peers may hold at most this many handshakes at once; more
            // are closed at once, so they cannot use up the descriptors nodes need.
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                drop(tcp);
                continue;
            };
            // Small messages (acks, snapshots of small configs) must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, td) = (acceptor.clone(), tx.clone(), trust_domain.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        // Debug, not warn: anyone can cause these, and logs are not free.
                        tracing::debug!(client.addr = %addr, error = %e, "grpc handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                // The verifier guaranteed a node URI; read the ID it names.
                let id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| ztp_proto::names::node_id_of_cert(c, &td));
                if let Some(id) = id {
                    let _ = tx
                        .send(Ok(NodeConn {
                            tls,
                            peer: NodePeer { id, addr },
                        }))
                        .await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The newest snapshot in wire form, encoded once per version and shared by every node.
#[derive(Default)]
struct Cache(tokio::sync::Mutex<Option<Built>>);

struct Built {
    version: u64,
    /// The store's configuration generation `config` was read at.
    generation: u64,
    schema: u32,
    /// The encoded services, users, groups and connectors (fields 3, 4, 5 and 7 of
    /// `pb::Snapshot`): everything but the head's fields, which is what a node's
    /// configuration digest covers.
    config: bytes::Bytes,
    /// The encoded schema, version and revoked serials: `config` follows it on the wire.
    head: bytes::Bytes,
}

impl Cache {
    /// The newest version and its message, in two parts.
    async fn current(&self, store: &Store) -> Result<(u64, [bytes::Bytes; 2]), Status> {
        use prost::Message as _;
        let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
        let mut cached = self.0.lock().await;
        let version = store.version().map_err(internal)?;
        if let Some(b) = cached.as_ref().filter(|b| b.version == version) {
            return Ok((b.version, [b.head.clone(), b.config.clone()]));
        }
        let t = std::time::Instant::now();
        let seen = cached.as_ref().map(|b| b.generation);
        let (snap, generation, whole) = store.snapshot_since(seen).await.map_err(internal)?;
        let (schema, config) = match cached.as_ref() {
            // Only the version and the revoked serials moved (a revocation, mostly): the
            // encoded configuration is reused, and a node sees the same bytes for it.
            Some(b) if !whole => (b.schema, b.config.clone()),
            _ => {
                // Every field but the head's (schema, version, revoked), named one by one
                // so that a field added to the message cannot be left out unnoticed.
                let pb::Snapshot {
                    schema,
                    version: _,
                    services,
                    users,
                    groups,
                    revoked: _,
                    connectors,
                    // A whole snapshot is no delta: these stay empty.
                    delta: _,
                    previous_version: _,
                    deleted_services: _,
                    deleted_users: _,
                    deleted_groups: _,
                    deleted_connectors: _,
                    unrevoked: _,
                } = pb::Snapshot::from(&snap);
                let config = pb::Snapshot {
                    services,
                    users,
                    groups,
                    connectors,
                    ..Default::default()
                };
                (schema, bytes::Bytes::from(config.encode_to_vec()))
            }
        };
        // Fields may come in any order: the head, then the configuration.
        let head = pb::Snapshot {
            schema,
            version: snap.version,
            revoked: snap.revoked,
            ..Default::default()
        };
        let head = bytes::Bytes::from(head.encode_to_vec());
        tracing::debug!(
            version = snap.version,
            whole,
            bytes = head.len() + config.len(),
            build_ms = t.elapsed().as_millis() as u64,
            "snapshot built"
        );
        *cached = Some(Built {
            version: snap.version,
            generation,
            schema,
            config: config.clone(),
            head: head.clone(),
        });
        Ok((snap.version, [head, config]))
    }
}

/// The service.
pub struct ConfigServer {
    store: Arc<Store>,
    nodes: Arc<Nodes>,
    cache: Arc<Cache>,
    /// Ends every subscription when the server stops, so that shutdown need not wait
    /// for streams that would otherwise never end.
    stop: tokio::sync::watch::Receiver<bool>,
    /// The live subscription of each node: a new one ends the old, so a node holds one
    /// stream however often it reconnects.
    live: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>>,
    /// Until then the replica set is not published: after a start, the nodes are still
    /// reconnecting, and a partial set would read as replicas that left.
    replicas_from: tokio::time::Instant,
}

/// How long after its start the control plane publishes no replica set.
const REPLICAS_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

impl ConfigServer {
    pub fn new(
        store: Arc<Store>,
        nodes: Arc<Nodes>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        ConfigServer {
            store,
            nodes,
            cache: Arc::default(),
            stop,
            live: Arc::default(),
            replicas_from: tokio::time::Instant::now() + REPLICAS_GRACE,
        }
    }

    /// The gRPC service.
    pub fn into_service(self) -> ConfigService {
        ConfigService(Arc::new(self))
    }

    /// Where the connectors' tunnels are, for a node: now, then on every change (at once,
    /// and at most one message each 100 ms, so that a burst of reports is one message).
    async fn tunnels(
        &self,
        req: Request<pb::TunnelsRequest>,
    ) -> Result<Response<ReceiverStream<Result<pb::TunnelMap, Status>>>, Status> {
        let peer = req
            .extensions()
            .get::<NodePeer>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("not a node connection"))?;
        let (tx, rx) = mpsc::channel(1);
        let nodes = self.nodes.clone();
        let mut changes = nodes.tunnel_changes();
        let mut stop = self.stop.clone();
        let replicas_from = self.replicas_from;
        tokio::spawn(async move {
            tracing::debug!(node.id = %peer.id, "tunnel map subscribed");
            loop {
                changes.borrow_and_update();
                // Empty means unknown: the nodes keep the set they had.
                let known = tokio::time::Instant::now() >= replicas_from;
                let map = pb::TunnelMap {
                    holders: nodes
                        .holders()
                        .into_iter()
                        .map(|(connector, node_id, address)| pb::TunnelHolder {
                            connector,
                            node_id,
                            address,
                        })
                        .collect(),
                    replicas: if known { nodes.replicas() } else { Vec::new() },
                    replicas_at_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                };
                if tx.send(Ok(map)).await.is_err() {
                    return;
                }
                let sent = tokio::time::Instant::now();
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => return,
                    // The set becomes known.
                    _ = tokio::time::sleep_until(replicas_from), if !known => {}
                }
                // A change goes out at once; a burst of them becomes one message each
                // 100 ms (well within the second the replicas have to learn where tunnels
                // are).
                tokio::time::sleep_until(sent + std::time::Duration::from_millis(100)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<ReceiverStream<Result<[bytes::Bytes; 2], Status>>>, Status> {
        let peer = req
            .extensions()
            .get::<NodePeer>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("not a node connection"))?;
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::NodeMessage {
                kind: Some(Kind::Hello(h)),
            }))) => h,
            Ok(Err(e)) => return Err(e),
            _ => return Err(Status::invalid_argument("the stream must open with Hello")),
        };
        if hello.node_id != peer.id {
            tracing::warn!(node.id = %peer.id, claimed = %hello.node_id, "node claimed another id");
            return Err(Status::permission_denied(
                "node_id differs from the certificate's node ID",
            ));
        }
        let id = peer.id.clone();
        tracing::info!(node.id = %id, node.peer = %peer.addr, last_version = hello.last_version, "node subscribed");
        self.nodes.connected_at(
            &id,
            peer.addr.to_string(),
            hello.listen.chars().take(256).collect(),
            hello.advertise.chars().take(256).collect(),
            hello.last_version,
            hello.schema,
        );

        // Outbound: the current snapshot when behind, then each new version: as a delta
        // from the version the node has, when it takes deltas and the store's change log
        // reaches back to it; whole otherwise, and after the node refused a delta.
        let (tx, rx) = mpsc::channel(1);
        let (store, cache) = (self.store.clone(), self.cache.clone());
        let mut versions = store.watch_version();
        // A node known to have diverged gets the whole configuration, whatever version
        // it has.
        let mut sent =
            (hello.last_version > 0 && !self.nodes.is_diverged(&id)).then_some(hello.last_version);
        let takes_deltas = hello.schema >= ztp_proto::wire::DELTA_SCHEMA;
        let refused = Arc::new(RefusedDelta::default());
        let refused_out = refused.clone();
        let mut stop = self.stop.clone();
        let replaced = Arc::new(tokio::sync::Notify::new());
        if let Some(old) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), replaced.clone())
        {
            old.notify_one();
        }
        let mine = replaced.clone();
        tokio::spawn(async move {
            let refused = refused_out;
            loop {
                let whole = refused.take();
                if whole {
                    sent = None;
                }
                let version = *versions.borrow_and_update();
                if sent != Some(version) {
                    let delta = match sent {
                        Some(from) if takes_deltas && !whole => delta_since(&store, from),
                        _ => None,
                    };
                    let (version, message) = match delta {
                        Some((version, bytes)) => {
                            refused.sent_delta(version);
                            (version, [bytes, bytes::Bytes::new()])
                        }
                        None => match cache.current(&store).await {
                            Ok(s) => {
                                refused.sent_whole(s.0);
                                s
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        },
                    };
                    sent = Some(version);
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = versions.changed() => if r.is_err() { return },
                    _ = refused.wake.notified() => {}
                    _ = tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => return,
                    _ = replaced.notified() => return,
                }
            }
        });

        // Inbound: acks, nacks and connection records, until the node goes.
        let nodes = self.nodes.clone();
        let store = self.store.clone();
        let live = self.live.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::NodeMessage {
                        kind: Some(Kind::Ack(a)),
                    })) => {
                        tracing::debug!(node.id = %id, version = a.version, "node applied");
                        nodes.acked(&id, a.version);
                        check_digest(&store, &nodes, &refused, &id, &a);
                    }
                    Ok(Some(pb::NodeMessage {
                        kind: Some(Kind::Nack(n)),
                    })) => {
                        let reason: String = n.reason.chars().take(1024).collect();
                        tracing::warn!(node.id = %id, version = n.version, reason = %reason, "node refused a snapshot");
                        // A refused delta is followed by the whole configuration.
                        refused.nacked(n.version);
                        nodes.nacked(&id, n.version, reason);
                    }
                    Ok(Some(pb::NodeMessage {
                        kind: Some(Kind::Record(r)),
                    })) => {
                        let record = connection_record(&id, r, crate::store::now_ms());
                        nodes.seen(&id);
                        if let Err(e) = store.append_connections(vec![record]).await {
                            tracing::error!(error = %e, "cannot keep a connection record");
                        }
                    }
                    Ok(Some(pb::NodeMessage {
                        kind: Some(Kind::Tunnels(report)),
                    })) => {
                        nodes.set_tunnels(
                            &id,
                            report.tunnels.into_iter().map(|t| {
                                (
                                    clip(t.connector),
                                    crate::nodes::Tunnel {
                                        replica: id.clone(),
                                        transport: match t.transport.as_str() {
                                            "quic" => "quic".into(),
                                            "tcp" => "tcp".into(),
                                            _ => "other".into(),
                                        },
                                        since_ms: t.since_ms,
                                    },
                                )
                            }),
                        );
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            // A newer subscription of the same node may have replaced this one: only
            // the live one decides whether the node is connected.
            let current = {
                let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
                let current = live.get(&id).is_some_and(|n| Arc::ptr_eq(n, &mine));
                if current {
                    live.remove(&id);
                }
                current
            };
            if current {
                tracing::info!(node.id = %id, "node disconnected");
                nodes.disconnected(&id);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Further ahead than this, a node's record time is its clock's error (or a lie): it is
/// kept as now plus this, so that records from the future cannot push every honest one
/// out of the retention.
const MAX_CLOCK_AHEAD_MS: u64 = 60_000;

/// Longest text field kept from a node's record: the trail's size is bounded per record
/// whatever a node sends.
const MAX_RECORD_FIELD: usize = 1024;

fn clip(mut s: String) -> String {
    if s.len() > MAX_RECORD_FIELD {
        let mut end = MAX_RECORD_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A node's connection record as the audit trail keeps it.
fn connection_record(
    node: &str,
    r: pb::ConnectionRecord,
    now_ms: u64,
) -> crate::store::ConnectionRecord {
    crate::store::ConnectionRecord {
        time_ms: r.time_ms.min(now_ms.saturating_add(MAX_CLOCK_AHEAD_MS)),
        node: node.to_owned(),
        peer: clip(r.peer),
        sni: clip(r.sni),
        identity: clip(r.identity),
        identity_unverified: r.identity_unverified,
        user: clip(r.user),
        service: clip(r.service),
        decision: clip(r.decision),
        reason: clip(r.reason),
        code: r.code,
        bytes_up: r.bytes_up,
        bytes_down: r.bytes_down,
        duration_ms: r.duration_ms,
        transport: match r.transport.as_str() {
            "" | "tcp" => "tcp".into(),
            "quic" => "quic".into(),
            // A node's free text must not grow the record: anything else is named so.
            _ => "other".into(),
        },
        connector: clip(r.connector),
    }
}

/// The config service, written out by hand rather than generated: the generated server
/// would encode every node's copy of a snapshot itself, where this one sends the bytes
/// the cache encoded once per version (`ServerCodec`).
#[derive(Clone)]
pub struct ConfigService(Arc<ConfigServer>);

const SUBSCRIBE: &str = "/ztp.config.v1.ConfigService/Subscribe";
const TUNNELS: &str = "/ztp.config.v1.ConfigService/Tunnels";

impl tonic::server::NamedService for ConfigService {
    const NAME: &'static str = "ztp.config.v1.ConfigService";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for ConfigService {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move {
            match req.uri().path() {
                SUBSCRIBE => {
                    let mut grpc = tonic::server::Grpc::new(ServerCodec)
                        .apply_max_message_size_config(Some(1 << 20), Some(MAX_MESSAGE_BYTES));
                    Ok(grpc.streaming(Subscribe(server), req).await)
                }
                TUNNELS => {
                    let mut grpc = tonic::server::Grpc::new(ztp_proto::wire::ProstCodec::<
                        pb::TunnelMap,
                        pb::TunnelsRequest,
                    >::default())
                    .apply_max_message_size_config(Some(1 << 10), Some(MAX_MESSAGE_BYTES));
                    Ok(grpc.server_streaming(TunnelsCall(server), req).await)
                }
                _ => Ok(Status::unimplemented("no such method").into_http()),
            }
        })
    }
}

struct TunnelsCall(Arc<ConfigServer>);

impl tonic::server::ServerStreamingService<pb::TunnelsRequest> for TunnelsCall {
    type Response = pb::TunnelMap;
    type ResponseStream = ReceiverStream<Result<pb::TunnelMap, Status>>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: Request<pb::TunnelsRequest>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move { server.tunnels(req).await })
    }
}

struct Subscribe(Arc<ConfigServer>);

impl tonic::server::StreamingService<pb::NodeMessage> for Subscribe {
    type Response = [bytes::Bytes; 2];
    type ResponseStream = ReceiverStream<Result<[bytes::Bytes; 2], Status>>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: Request<Streaming<pb::NodeMessage>>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move { server.subscribe(req).await })
    }
}

/// Serves the config stream on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    trust_domain: String,
    server: ConfigServer,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(server.into_service())
        .serve_with_incoming_shutdown(incoming(listener, config, trust_domain), shutdown)
        .await
}

/// Between the two halves of a node's stream: which version went as a delta and which
/// whole, and whether the whole configuration must go next (the node refused a delta, or
/// acked a version with a configuration digest other than the store's).
#[derive(Default)]
struct RefusedDelta {
    /// The version last sent as a delta.
    delta: std::sync::Mutex<Option<u64>>,
    /// The version last sent whole.
    whole_at: std::sync::Mutex<Option<u64>>,
    whole: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl RefusedDelta {
    fn sent_delta(&self, version: u64) {
        *self.delta.lock().unwrap_or_else(|p| p.into_inner()) = Some(version);
    }

    fn sent_whole(&self, version: u64) {
        *self.whole_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(version);
    }

    /// A nack of `version`: if it was a delta, the whole configuration goes next.
    fn nacked(&self, version: u64) {
        let was_delta = self
            .delta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_if(|v| *v == version)
            .is_some();
        if was_delta {
            self.send_whole();
        }
    }

    /// An ack of `version` whose digest differs from the store's: the whole
    /// configuration goes next, unless `version` itself went whole (the same snapshot
    /// again would end the same way, and again: a loop). Whether it goes.
    fn diverged(&self, version: u64) -> bool {
        let was_whole = *self.whole_at.lock().unwrap_or_else(|p| p.into_inner()) == Some(version);
        if !was_whole {
            self.send_whole();
        }
        !was_whole
    }

    fn send_whole(&self) {
        self.whole.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn take(&self) -> bool {
        self.whole.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Compares the configuration digest an ack carries with the store's at the acked
/// version. A node whose configuration differs is diverged (until an ack matches again)
/// and gets the whole configuration next. No digest (a node from before digests), a
/// malformed one, or a version whose digest the store cannot tell: no verdict.
fn check_digest(store: &Store, nodes: &Nodes, refused: &RefusedDelta, id: &str, ack: &pb::Applied) {
    use ztp_proto::digest::Digest;
    if ack.digest.is_empty() {
        return;
    }
    let Some(theirs) = Digest::from_bytes(&ack.digest) else {
        tracing::debug!(node.id = %id, version = ack.version, bytes = ack.digest.len(), "an ack's digest is not 32 bytes; ignored");
        return;
    };
    let ours = store.digest_at(ack.version);
    let matched = ours.map(|ours| ours == theirs);
    nodes.digest_acked(id, &theirs.to_string(), matched);
    if let (Some(ours), Some(false)) = (ours, matched) {
        let resent = refused.diverged(ack.version);
        tracing::warn!(
            node.id = %id,
            version = ack.version,
            node.digest = %theirs,
            store.digest = %ours,
            resent,
            "the node's configuration differs from the control plane's at this version; {}",
            if resent {
                "the whole configuration follows"
            } else {
                "it was sent whole already"
            }
        );
    }
}

/// The encoded delta from version `from` to the store's current one, if the change log
/// reaches back to `from` and the store is past it (the last write of each record wins).
/// Versions that changed no record (or only tokens) make an empty delta: the node still
/// learns it is at the current version.
fn delta_since(store: &Store, from: u64) -> Option<(u64, bytes::Bytes)> {
    use prost::Message as _;
    use std::collections::BTreeMap;

    use crate::store::Kind;
    let (changes, at) = store.changes_since(from);
    let changes = changes?;
    if at <= from {
        return None;
    }
    let mut last: BTreeMap<(Kind, String), Option<Vec<u8>>> = BTreeMap::new();
    for c in &changes {
        for op in &c.ops {
            last.insert((op.kind, op.key.clone()), op.value.clone());
        }
    }
    let mut d = ztp_proto::wire::Delta {
        version: at,
        previous_version: from,
        ..Default::default()
    };
    for ((kind, key), value) in last {
        match (kind, value) {
            (Kind::Service, Some(v)) => d.services.push(serde_json::from_slice(&v).ok()?),
            (Kind::Service, None) => d.deleted_services.push(key),
            (Kind::User, Some(v)) => d.users.push(serde_json::from_slice(&v).ok()?),
            (Kind::User, None) => d.deleted_users.push(key),
            (Kind::Group, Some(v)) => d.groups.push(serde_json::from_slice(&v).ok()?),
            (Kind::Group, None) => d.deleted_groups.push(key),
            (Kind::Connector, Some(v)) => d.connectors.push(serde_json::from_slice(&v).ok()?),
            (Kind::Connector, None) => d.deleted_connectors.push(key),
            (Kind::Revoked, Some(_)) => d.revoked.push(key),
            (Kind::Revoked, None) => d.unrevoked.push(key),
            (Kind::Token, _) => {}
        }
    }
    Some((at, pb::Snapshot::from(&d).encode_to_vec().into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Actor;
    use prost::Message as _;
    use ztp_proto::{Group, User};

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            identities: vec![format!("{name}@example.com")],
            groups: vec!["g".into()],
            disabled: false,
        }
    }

    #[test]
    fn a_record_from_the_future_is_kept_at_now_plus_the_allowed_skew() {
        let r = |time_ms| pb::ConnectionRecord {
            time_ms,
            ..Default::default()
        };
        let now = 1_800_000_000_000;
        assert_eq!(connection_record("n1", r(now - 5), now).time_ms, now - 5);
        assert_eq!(
            connection_record("n1", r(now + 30_000), now).time_ms,
            now + 30_000
        );
        assert_eq!(
            connection_record("n1", r(u64::MAX), now).time_ms,
            now + MAX_CLOCK_AHEAD_MS
        );
        assert_eq!(connection_record("n1", r(0), now).node, "n1");
    }

    #[test]
    fn a_record_s_text_fields_are_bounded() {
        let long = "é".repeat(3000);
        let r = pb::ConnectionRecord {
            identity: long.clone(),
            sni: long.clone(),
            reason: long.clone(),
            identity_unverified: true,
            ..Default::default()
        };
        let kept = connection_record("n1", r, 0);
        for f in [&kept.identity, &kept.sni, &kept.reason] {
            assert!(f.len() <= MAX_RECORD_FIELD && f.len() >= MAX_RECORD_FIELD - 1);
            assert!(long.starts_with(f.as_str()));
        }
        assert!(kept.identity_unverified);
        assert_eq!(kept.transport, "tcp", "a node that names no transport");
        for (sent, kept) in [("quic", "quic"), ("tcp", "tcp"), ("pigeon", "other")] {
            let r = pb::ConnectionRecord {
                transport: sent.into(),
                ..Default::default()
            };
            assert_eq!(connection_record("n1", r, 0).transport, kept);
        }
    }

    /// A delta says what changed from the node's version (the last write of each record
    /// wins) and, applied to the node's configuration, gives the store's; none when the
    /// log does not reach back to the node's version or nothing changed.
    #[tokio::test]
    async fn a_delta_from_the_node_s_version_gives_the_store_s_configuration() {
        use ztp_proto::wire::Delta;
        let dir = std::env::temp_dir().join(format!("ztp-grpc-delta-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let a = Actor::system();
        store
            .create_group(Group { name: "g".into() }, None, &a)
            .await
            .unwrap();
        store.put_user(user("alice"), true, None, &a).await.unwrap();
        store.put_user(user("bob"), true, None, &a).await.unwrap();
        let (base, from) = (store.snapshot().await.unwrap(), store.version().unwrap());
        assert!(delta_since(&store, from).is_none(), "nothing changed");

        store.put_user(user("carol"), true, None, &a).await.unwrap();
        store.delete_user("bob", None, &a).await.unwrap();
        let mut alice = user("alice");
        alice.disabled = true;
        store.put_user(alice, false, None, &a).await.unwrap();
        store
            .revoke(&["0a".into(), "0b".into()], None, &a)
            .await
            .unwrap();
        store.unrevoke("0a", None, &a).await.unwrap();
        let (to, bytes) = delta_since(&store, from).unwrap();
        assert_eq!(to, store.version().unwrap());
        assert!(bytes.len() < 1024, "{} bytes", bytes.len());
        let delta = Delta::try_from(pb::Snapshot::decode(&bytes[..]).unwrap()).unwrap();
        assert_eq!(delta.deleted_users, ["bob"]);
        assert_eq!(delta.unrevoked, ["0a"]);
        let applied = delta.apply_to(&base).unwrap();
        assert_eq!(applied, store.snapshot().await.unwrap());
        // From a version the log does not hold: none (a whole snapshot goes instead).
        assert!(delta_since(&store, from + 1000).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A data-plane node on a stream served in process: its messages go to the server
    /// gRPC-framed, as on the wire; the server's messages come back as the parts it
    /// sends. It keeps its configuration as a node does (whole snapshots and deltas) to
    /// ack with its digest.
    struct TestNode {
        to_server: mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
        from_server: ReceiverStream<Result<[bytes::Bytes; 2], Status>>,
        config: Option<ztp_proto::config::Config>,
    }

    impl TestNode {
        async fn subscribe(server: &ConfigServer, id: &str, last_version: u64) -> TestNode {
            use tonic::codec::Codec as _;
            let (to_server, rx) = mpsc::channel(16);
            let body = axum::body::Body::from_stream(ReceiverStream::new(rx));
            let inbound = Streaming::new_request(ServerCodec.decoder(), body, None, None);
            let mut req = Request::new(inbound);
            req.extensions_mut().insert(NodePeer {
                id: id.into(),
                addr: "127.0.0.1:1".parse().unwrap(),
            });
            let node = |from_server| TestNode {
                to_server: to_server.clone(),
                from_server,
                config: None,
            };
            let hello = Kind::Hello(pb::Hello {
                node_id: id.into(),
                last_version,
                schema: ztp_proto::wire::DELTA_SCHEMA,
                ..Default::default()
            });
            // Sent before the call: the server waits for it.
            node(ReceiverStream::new(mpsc::channel(1).1))
                .send(hello)
                .await;
            let from_server = server.subscribe(req).await.unwrap().into_inner();
            node(from_server)
        }

        async fn send(&self, kind: Kind) {
            let msg = pb::NodeMessage { kind: Some(kind) }.encode_to_vec();
            let mut frame = vec![0u8];
            frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            frame.extend_from_slice(&msg);
            self.to_server.send(Ok(frame.into())).await.unwrap();
        }

        /// The next message, decoded.
        async fn next(&mut self) -> pb::Snapshot {
            use tonic::codegen::tokio_stream::StreamExt as _;
            let parts = tokio::time::timeout(Duration::from_secs(5), self.from_server.next())
                .await
                .expect("a message within 5 s")
                .expect("the stream goes on")
                .unwrap();
            pb::Snapshot::decode(&[&parts[0][..], &parts[1][..]].concat()[..]).unwrap()
        }

        /// Whether a message comes within `ms`.
        async fn quiet_for(&mut self, ms: u64) -> bool {
            use tonic::codegen::tokio_stream::StreamExt as _;
            tokio::time::timeout(Duration::from_millis(ms), self.from_server.next())
                .await
                .is_err()
        }

        /// Applies a message as a node does; its version.
        fn apply(&mut self, m: pb::Snapshot) -> u64 {
            use ztp_proto::config::Config;
            if m.delta {
                let d = ztp_proto::wire::Delta::try_from(m).unwrap();
                let c = self
                    .config
                    .as_mut()
                    .expect("a delta after a whole snapshot");
                c.apply(d).unwrap();
            } else {
                let snap = ztp_proto::Snapshot::try_from(m).unwrap();
                self.config = Some(Config::new(snap).unwrap());
            }
            self.config.as_ref().unwrap().version()
        }

        fn digest(&self) -> ztp_proto::digest::Digest {
            self.config.as_ref().unwrap().digest()
        }

        async fn ack(&self, version: u64, digest: Vec<u8>) {
            self.send(Kind::Ack(pb::Applied { version, digest })).await;
        }
    }

    /// Waits until the registry's entry for `id` satisfies `ok`.
    async fn wait_node(nodes: &Nodes, id: &str, what: &str, ok: impl Fn(&NodeInfo) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if nodes.local().iter().any(|n| n.id == id && ok(n)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {:?}",
                nodes.local()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    use crate::nodes::NodeInfo;

    /// A server on a fresh store in `dir`; it stops when the sender is dropped.
    fn server_on(
        dir: &std::path::Path,
    ) -> (
        Arc<Store>,
        Arc<Nodes>,
        ConfigServer,
        tokio::sync::watch::Sender<bool>,
    ) {
        let _ = std::fs::remove_dir_all(dir);
        let store = Arc::new(Store::open(dir).unwrap());
        let nodes = Arc::new(Nodes::default());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let server = ConfigServer::new(store.clone(), nodes.clone(), stop);
        (store, nodes, server, stop_tx)
    }

    /// A node's ack carries its configuration digest: the right one leaves it in sync; a
    /// wrong one (a divergence) marks it diverged at once, counts, and brings the whole
    /// configuration next, which repairs it (the next ack's digest matches and clears
    /// it). A digest the store cannot judge changes nothing; a whole snapshot the node
    /// still disagrees with is not sent again and again; a diverged node that
    /// reconnects gets the whole configuration although it is at the current version.
    #[tokio::test]
    async fn a_node_whose_digest_differs_is_diverged_and_gets_the_whole_configuration() {
        let dir = std::env::temp_dir().join(format!("ztp-grpc-diverge-{}", std::process::id()));
        let (store, nodes, server, _stop) = server_on(&dir);
        let a = Actor::system();
        store
            .create_group(Group { name: "g".into() }, None, &a)
            .await
            .unwrap();
        store.put_user(user("alice"), true, None, &a).await.unwrap();
        let v1 = store.version().unwrap();

        let mut node = TestNode::subscribe(&server, "n1", 0).await;
        let first = node.next().await;
        assert!(!first.delta, "the first is whole");
        assert_eq!(node.apply(first), v1);
        node.ack(v1, node.digest().to_bytes().to_vec()).await;
        let digest = node.digest().to_string();
        wait_node(&nodes, "n1", "the digest acked", |n| {
            n.digest.as_deref() == Some(digest.as_str())
        })
        .await;
        assert!(!nodes.list()[0].diverged, "the same configuration");
        assert_eq!(nodes.divergences(), 0);

        // A delta, applied wrong: the node misses bob.
        store.put_user(user("bob"), true, None, &a).await.unwrap();
        let v2 = store.version().unwrap();
        let delta = node.next().await;
        assert!(delta.delta && delta.previous_version == v1 && delta.version == v2);
        let wrong = node.digest();
        node.apply(delta);
        assert_ne!(node.digest(), wrong);
        node.ack(v2, wrong.to_bytes().to_vec()).await;
        wait_node(&nodes, "n1", "diverged after one ack", |n| n.diverged).await;
        assert_eq!(nodes.divergences(), 1);
        // The whole configuration, at the version the node already has.
        let whole = node.next().await;
        assert!(!whole.delta, "whole");
        assert_eq!(whole.version, v2);
        assert_eq!(whole.users.len(), 2);
        node.apply(whole);
        node.ack(v2, node.digest().to_bytes().to_vec()).await;
        wait_node(&nodes, "n1", "repaired", |n| !n.diverged).await;
        assert_eq!(nodes.divergences(), 1, "a match counts nothing");

        // No verdict: a version the store cannot tell, no digest, a malformed one.
        node.ack(v2 + 100, wrong.to_bytes().to_vec()).await;
        node.ack(v2, Vec::new()).await;
        node.ack(v2, vec![1, 2, 3]).await;
        // A match after them shows they were all handled.
        node.ack(v2, node.digest().to_bytes().to_vec()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!nodes.list()[0].diverged);
        assert_eq!(nodes.divergences(), 1);
        assert!(node.quiet_for(200).await, "nothing sent for them");

        // Disagreeing with a whole snapshot: diverged and counted, but the same snapshot
        // is not sent again (it would end the same way, over and over).
        node.ack(v2, wrong.to_bytes().to_vec()).await;
        wait_node(&nodes, "n1", "diverged again", |n| n.diverged).await;
        assert_eq!(nodes.divergences(), 2);
        assert!(node.quiet_for(300).await, "no loop of whole snapshots");

        // Reconnecting at the current version while diverged: the whole configuration.
        let mut again = TestNode::subscribe(&server, "n1", v2).await;
        let whole = again.next().await;
        assert!(!whole.delta && whole.version == v2);
        again.apply(whole);
        again.ack(v2, again.digest().to_bytes().to_vec()).await;
        wait_node(&nodes, "n1", "repaired after reconnecting", |n| !n.diverged).await;
        drop((node, again, server));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A version that changed no record reaches a node that takes deltas as an empty
    /// delta from its version (not a whole snapshot, and not nothing).
    #[tokio::test]
    async fn a_version_that_changes_nothing_reaches_the_node_as_an_empty_delta() {
        let dir = std::env::temp_dir().join(format!("ztp-grpc-empty-{}", std::process::id()));
        let (store, nodes, server, _stop) = server_on(&dir);
        let a = Actor::system();
        store
            .create_group(Group { name: "g".into() }, None, &a)
            .await
            .unwrap();
        let v1 = store.version().unwrap();
        let mut node = TestNode::subscribe(&server, "n1", 0).await;
        let first = node.next().await;
        node.apply(first);
        node.ack(v1, node.digest().to_bytes().to_vec()).await;

        let v2 = store.empty_version().await.unwrap();
        assert_eq!(v2, v1 + 1);
        let m = node.next().await;
        assert!(m.delta, "a delta");
        assert_eq!((m.previous_version, m.version), (v1, v2));
        let d = ztp_proto::wire::Delta::try_from(m.clone()).unwrap();
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(node.apply(m), v2);
        // The digest at a version that changed nothing is the one before it.
        node.ack(v2, node.digest().to_bytes().to_vec()).await;
        let digest = node.digest().to_string();
        wait_node(&nodes, "n1", "acked", |n| {
            n.applied == v2 && n.digest.as_deref() == Some(digest.as_str())
        })
        .await;
        assert!(!nodes.list()[0].diverged);
        // And from the function itself: empty, from the version before.
        let (to, bytes) = delta_since(&store, v1).unwrap();
        let d =
            ztp_proto::wire::Delta::try_from(pb::Snapshot::decode(&bytes[..]).unwrap()).unwrap();
        assert_eq!((to, d.previous_version, d.is_empty()), (v2, v1, true));
        drop((node, server));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_a_refused_delta_brings_the_whole_configuration() {
        let r = RefusedDelta::default();
        r.nacked(5);
        assert!(!r.take(), "a refused whole snapshot is not sent again");
        r.sent_delta(6);
        r.nacked(5);
        assert!(!r.take(), "another version");
        r.nacked(6);
        assert!(r.take());
        assert!(!r.take(), "once");
        r.nacked(6);
        assert!(!r.take(), "the same refusal twice asks once");
    }

    #[tokio::test]
    async fn a_version_that_only_revokes_reuses_the_encoded_configuration() {
        let dir = std::env::temp_dir().join(format!("ztp-grpc-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let a = Actor::system();
        store
            .create_group(Group { name: "g".into() }, None, &a)
            .await
            .unwrap();
        store.put_user(user("alice"), true, None, &a).await.unwrap();
        let cache = Cache::default();

        // What a node receives: the parts, one after the other.
        let whole = |parts: &[bytes::Bytes; 2]| [&parts[0][..], &parts[1][..]].concat();
        let (v1, m1) = cache.current(&store).await.unwrap();
        let s1 = pb::Snapshot::decode(&whole(&m1)[..]).unwrap();
        assert_eq!((s1.version, s1.users.len(), s1.groups.len()), (v1, 1, 1));
        let config1 = cache.0.lock().await.as_ref().unwrap().config.clone();
        // Asked again at the same version: the same message.
        assert_eq!(cache.current(&store).await.unwrap(), (v1, m1.clone()));

        // A revocation: a new version whose message decodes to the whole snapshot, with
        // the configuration's bytes the very ones encoded before.
        store.revoke(&["0a".into()], None, &a).await.unwrap();
        let (v2, m2) = cache.current(&store).await.unwrap();
        assert_eq!(v2, v1 + 1);
        let s2 = pb::Snapshot::decode(&whole(&m2)[..]).unwrap();
        assert_eq!(s2.version, v2);
        assert_eq!(s2.revoked, ["0a"]);
        assert_eq!((s2.users, s2.groups), (s1.users, s1.groups));
        let config2 = cache.0.lock().await.as_ref().unwrap().config.clone();
        assert_eq!(config1.as_ptr(), config2.as_ptr(), "not encoded again");
        assert_eq!(m2[1].as_ptr(), config1.as_ptr(), "the same bytes sent");

        // A user added: the configuration is read and encoded again.
        store.put_user(user("bob"), true, None, &a).await.unwrap();
        let (v3, m3) = cache.current(&store).await.unwrap();
        let s3 = pb::Snapshot::decode(&whole(&m3)[..]).unwrap();
        assert_eq!((s3.version, s3.users.len()), (v3, 2));
        assert_eq!(s3.revoked, ["0a"]);

        // Unrevoked: back to no serials, the users kept.
        store.unrevoke("0a", None, &a).await.unwrap();
        let (_, m4) = cache.current(&store).await.unwrap();
        let s4 = pb::Snapshot::decode(&whole(&m4)[..]).unwrap();
        assert!(s4.revoked.is_empty());
        assert_eq!(s4.users.len(), 2);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Connectors are configuration: they travel in the configuration part (what a
    /// node's digest covers), a change to them alone encodes that part again, and a
    /// service served by one makes the snapshot schema 3.
    #[tokio::test]
    async fn connectors_travel_in_the_configuration_part() {
        let dir = std::env::temp_dir().join(format!("ztp-grpc-connectors-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let a = Actor::system();
        let lab = ztp_proto::Connector {
            name: "lab".into(),
            description: "the lab".into(),
        };
        store
            .put_connector(lab.clone(), true, None, &a)
            .await
            .unwrap();
        let cache = Cache::default();
        let (_, m1) = cache.current(&store).await.unwrap();
        let head = pb::Snapshot::decode(&m1[0][..]).unwrap();
        let config = pb::Snapshot::decode(&m1[1][..]).unwrap();
        assert!(head.connectors.is_empty(), "not in the head");
        assert_eq!(head.schema, 1, "no service names a connector yet");
        assert_eq!(
            config.connectors,
            [pb::Connector {
                name: "lab".into(),
                description: "the lab".into()
            }]
        );

        // A connector's description alone: the configuration is encoded again.
        store
            .put_connector(
                ztp_proto::Connector {
                    description: "moved".into(),
                    ..lab
                },
                false,
                None,
                &a,
            )
            .await
            .unwrap();
        let (_, m2) = cache.current(&store).await.unwrap();
        let config = pb::Snapshot::decode(&m2[1][..]).unwrap();
        assert_eq!(config.connectors[0].description, "moved");

        store
            .put_service(
                ztp_proto::Service {
                    name: "db.svc.internal".into(),
                    protocol: ztp_proto::Protocol::Tcp,
                    address: Some("10.1.2.3:5432".into()),
                    groups: vec![],
                    allow: vec![],
                    deny: vec![],
                    handler: None,
                    connector: Some("lab".into()),
                },
                true,
                None,
                &a,
            )
            .await
            .unwrap();
        let (v3, m3) = cache.current(&store).await.unwrap();
        let whole = pb::Snapshot::decode(&[&m3[0][..], &m3[1][..]].concat()[..]).unwrap();
        assert_eq!((whole.version, whole.schema), (v3, 3));
        assert_eq!(whole.services[0].connector.as_deref(), Some("lab"));
        // What a node builds from it is valid: the service's connector is there.
        ztp_proto::Snapshot::try_from(whole).unwrap();
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
