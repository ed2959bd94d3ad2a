//! Snapshots from the control plane: a gRPC subscription over mutual TLS with the node's
//! certificate.
//!
//! Initial sync, then every new version; each is converted, validated and compiled off
//! the async workers (a 100,000-user snapshot must not stall connections in flight),
//! swapped in, and acked — or nacked with the reason, keeping the last good one. When
//! the control plane is away the node keeps serving what it has and reconnects with
//! jittered exponential backoff.
//!
//! # Several instances (`--control URL[,URL…]`)
//!
//! The node subscribes to one instance at a time, the first of the list at start. When
//! the stream is lost, or an instance cannot be reached (connect, TLS, the subscription
//! itself), the node moves to the next instance of the list (wrapping), at once: a
//! backoff (jittered, exponential, as with one instance) comes only after every instance
//! of the list failed in a row. An instance that works stays in use: the node never moves
//! back to the first by itself. The tunnel map (`Tunnels`) comes from the instance in
//! use, over the same connection.
//!
//! On every instance the `Hello` carries the version the node applied, so an instance at
//! that version sends nothing until the version moves, and one at another version sends
//! its snapshot. Instances sharing one store have the same versions, so a snapshot
//! *older* than the applied version means that instance lags behind the store (its watch
//! has not caught up), not that the configuration went back; applying it would undo
//! changes for a while (a revocation, say). The rule:
//!
//! - a snapshot at the applied version or newer is applied;
//! - an older one is refused (nacked, with the applied version in the reason; the node
//!   keeps what it has) and the instance gets [`LAG_GRACE`] to catch up on the same
//!   stream; if it does not, the node moves on to the next instance;
//! - only when a whole round of the list (every instance in a row) ended without an
//!   instance at the applied version or newer, and at least one of them was reached and
//!   was behind, is an older snapshot taken, from the next instance that offers one,
//!   with a warning: the store itself went back (restored from a backup, say), and the
//!   instances all agree on it.
//!
//! A dead instance is noticed by HTTP/2 keepalive (a ping after 1 s without frames, 2 s
//! for the answer, also while idle): a frozen process is left within about 3 s.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::sign::SingleCertAndKey;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use ztp_proto::config::Config;
use ztp_proto::digest::Digest;
use ztp_proto::wire::{pb, WireError, MAX_MESSAGE_BYTES};
use ztp_proto::Snapshot;

use super::{Policy, Publisher};
use crate::handler::Registry;
use crate::snapshot::Readiness;

use pb::node_message::Kind;

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct ControlSource {
    /// `https://HOST:PORT`, or several instances separated by commas (see
    /// [`parse_control_urls`]).
    pub url: String,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    pub control_ca: PathBuf,
    pub trust_domain: String,
    /// The node's client-facing address, reported for `node list`.
    pub listen: String,
    /// The highest snapshot schema to accept.
    pub schema: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--control {0:?}: expected https://HOST:PORT")]
    BadUrl(String),
    #[error("--control {0:?}: an empty entry (expected https://HOST:PORT[,https://HOST:PORT…])")]
    EmptyUrl(String),
    #[error("--control {0:?}: the same instance as {1:?} (listed twice)")]
    DuplicateUrl(String, String),
    #[error(transparent)]
    Material(#[from] ztp_infra::tls::TlsError),
    #[error("{0}: the node certificate carries no node URI (spiffe://DOMAIN/node/ID) in trust domain {1}")]
    NotANode(PathBuf, String),
    #[error("node TLS config: {0}")]
    Tls(String),
}

/// One control-plane instance of `--control`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    /// As given (spaces around it removed).
    pub url: String,
    /// Without brackets for an IPv6 address: the name the TLS handshake checks.
    pub host: String,
    pub port: u16,
}

/// The port of `https://HOST` without one.
pub const DEFAULT_CONTROL_PORT: u16 = 9781;

/// Parses `--control`: `https://HOST:PORT`, or several separated by commas (spaces around
/// an entry are ignored), in the order the node tries them. An entry that is not such a
/// URL (another scheme, a path, a query, user info, no host, port 0), an empty entry, or
/// one naming the host and port of an earlier entry is refused with a message naming it.
/// The port defaults to [`DEFAULT_CONTROL_PORT`].
pub fn parse_control_urls(list: &str) -> Result<Vec<ControlUrl>, SourceError> {
    let mut out: Vec<ControlUrl> = Vec::new();
    for entry in list.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(SourceError::EmptyUrl(list.to_owned()));
        }
        let url = parse_control_url(entry)?;
        if let Some(earlier) = out
            .iter()
            .find(|o| o.port == url.port && o.host.eq_ignore_ascii_case(&url.host))
        {
            return Err(SourceError::DuplicateUrl(url.url, earlier.url.clone()));
        }
        out.push(url);
    }
    Ok(out)
}

fn parse_control_url(entry: &str) -> Result<ControlUrl, SourceError> {
    let bad = || SourceError::BadUrl(entry.to_owned());
    let uri: Uri = entry.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?.as_str();
    if authority.contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad());
    }
    let host = uri
        .host()
        .ok_or_else(bad)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    // From the authority's text: `Uri::port` takes an out-of-range port for none.
    let after_host = match authority.rfind(']') {
        Some(i) => &authority[i + 1..],
        None => authority.rfind(':').map_or("", |i| &authority[i..]),
    };
    let port = match after_host.strip_prefix(':') {
        None if after_host.is_empty() => DEFAULT_CONTROL_PORT,
        None => return Err(bad()),
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad()),
            Ok(p) => p,
        },
    };
    if host.is_empty() || ServerName::try_from(host.clone()).is_err() {
        return Err(bad());
    }
    Ok(ControlUrl {
        url: entry.to_owned(),
        host,
        port,
    })
}

/// A connected-and-checked setup: the TLS client config and the node's identity.
pub struct Subscriber {
    source: ControlSource,
    /// The instances of `--control`, in order (at least one).
    instances: Vec<ControlUrl>,
    tls: Arc<rustls::ClientConfig>,
    node_id: String,
    publisher: Arc<Mutex<Publisher>>,
    registry: Registry,
    ready: Arc<Readiness>,
    /// Connection records waiting to go to the control plane; bounded, kept across
    /// reconnects.
    audit: tokio::sync::Mutex<mpsc::Receiver<pb::ConnectionRecord>>,
    /// The node's certificate and key: also its identity on relays between replicas.
    node_key: Arc<rustls::sign::CertifiedKey>,
    /// Where other replicas relay to this node.
    advertise: String,
    /// The configuration applied last, whole: what a delta applies to.
    last: Arc<Mutex<Option<Config>>>,
}

/// Connection records a node keeps for the control plane while it is away.
pub const AUDIT_QUEUE: usize = 10_000;

/// Time an instance has to reach the applied version after it offered an older one,
/// before the node moves to the next instance.
pub const LAG_GRACE: Duration = Duration::from_secs(5);

/// TCP connect and TLS handshake with an instance.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// From the TLS handshake to the streams' answers.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 keepalive: a ping after this long without a frame from the instance…
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// …and this long for its answer before the connection is taken for dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A subscription that lasted this long was healthy even if no snapshot came (the
/// instance was at the node's version).
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// The first backoff after a whole round of the list failed, and its bound.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Subscriber {
    /// Loads the node's certificate, key and the control plane's CA; checks the URL.
    pub fn new(
        source: ControlSource,
        publisher: Arc<Mutex<Publisher>>,
        registry: Registry,
        ready: Arc<Readiness>,
        audit: mpsc::Receiver<pb::ConnectionRecord>,
    ) -> Result<Self, SourceError> {
        let instances = parse_control_urls(&source.url)?;

        // The node's key enters as a signer (`SigningKey`), as the servers' do.
        let provider = ztp_infra::tls::provider();
        let certified =
            ztp_infra::tls::certified_key(&source.node_cert, &source.node_key, &provider)?;
        // A certified key holds at least its leaf.
        let leaf = &certified.cert[0];
        let node_id =
            ztp_proto::names::node_id_of_cert(leaf, &source.trust_domain).ok_or_else(|| {
                SourceError::NotANode(source.node_cert.clone(), source.trust_domain.clone())
            })?;
        let roots = ztp_infra::tls::read_roots(&source.control_ca)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| SourceError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone())));
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Subscriber {
            source,
            instances,
            tls: Arc::new(tls),
            node_id,
            publisher,
            registry,
            ready,
            audit: tokio::sync::Mutex::new(audit),
            node_key: certified,
            advertise: String::new(),
            last: Arc::default(),
        })
    }

    /// The node's certificate and key.
    pub fn node_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.node_key.clone()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Subscribes until the process ends, moving through the instances of the list and
    /// backing off (jittered) after a whole round of them failed (see the module docs).
    pub async fn run(self) {
        let mut applied = 0u64;
        let mut rotation = Rotation::new(self.instances.len());
        loop {
            let target = &self.instances[rotation.current()];
            self.ready.set_control(&target.url, false);
            let mut progress = Progress::default();
            let result = self
                .session(target, &mut applied, rotation.accept_older(), &mut progress)
                .await;
            self.ready.lost_contact();
            let outcome = match &result {
                Err(SessionError::Behind { .. }) => Outcome::Behind,
                _ if progress.healthy() => Outcome::Healthy,
                _ => Outcome::Failed,
            };
            let error = match &result {
                Ok(()) => "the control plane closed the config stream".to_owned(),
                Err(e) => e.to_string(),
            };
            let wait = match rotation.advance(outcome) {
                d if d.is_zero() => d,
                d => jitter(d),
            };
            let retry_in_ms = wait.as_millis() as u64;
            let next = &self.instances[rotation.current()];
            if next.url != target.url {
                tracing::warn!(
                    error = %error,
                    control.from = %target.url,
                    control.to = %next.url,
                    retry_in_ms,
                    "control plane lost; moving to {}",
                    next.url
                );
            } else {
                tracing::warn!(
                    error = %error,
                    control = %target.url,
                    retry_in_ms,
                    "config stream failed; serving the last good snapshot and reconnecting"
                );
            }
            self.ready.set_control(&next.url, false);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// The node's client-facing address, as reported to the control plane.
    pub fn set_listen(&mut self, listen: String) {
        self.source.listen = listen;
    }

    /// Where other replicas relay to this node (empty: nowhere).
    pub fn set_advertise(&mut self, advertise: String) {
        self.advertise = advertise;
    }

    /// One subscription to `target`, until it ends; `applied` follows what the node
    /// applies. An older snapshot than `applied` is taken only with `accept_older`.
    async fn session(
        &self,
        target: &ControlUrl,
        applied: &mut u64,
        accept_older: bool,
        progress: &mut Progress,
    ) -> Result<(), SessionError> {
        let tls = TlsConnector::from(self.tls.clone());
        let (host, port) = (target.host.clone(), target.port);
        let connector = tower::service_fn(move |_: Uri| {
            let (tls, host) = (tls.clone(), host.clone());
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from(host)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let stream = tls.connect(name, tcp).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        // The scheme is http because the connector does TLS itself. The connect timeout
        // bounds the connector as a whole (TCP and TLS): a frozen instance accepts TCP
        // connections (the kernel does) but never finishes a handshake.
        let channel =
            Endpoint::from_shared(format!("http://{}:{}", bracket(&target.host), target.port))
                .map_err(|e| SessionError::Connect(e.to_string()))?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .connect_with_connector(connector)
                .await
                .map_err(|e| SessionError::Connect(format!("{e}: {}", source_chain(&e))))?;
        let mut client = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(1 << 20);

        let (tx, rx) = mpsc::channel(16);
        let hello = pb::Hello {
            node_id: self.node_id.clone(),
            last_version: *applied,
            schema: self.source.schema,
            listen: self.source.listen.clone(),
            advertise: self.advertise.clone(),
        };
        let _ = tx.send(msg(Kind::Hello(hello))).await;
        let subscribe = async {
            client
                .ready()
                .await
                .map_err(|e| SessionError::Connect(e.to_string()))?;
            client
                .streaming(
                    tonic::Request::new(ReceiverStream::new(rx)),
                    tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/ztp.config.v1.ConfigService/Subscribe",
                    ),
                    ztp_proto::wire::NodeCodec,
                )
                .await
                .map_err(SessionError::Status)
        };
        let mut stream = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe)
            .await
            .map_err(|_| SessionError::Connect("no answer to the subscription".into()))??
            .into_inner();
        tracing::info!(
            node.id = %self.node_id,
            url = %target.url,
            applied = *applied,
            "subscribed to the control plane"
        );
        progress.subscribed = Some(Instant::now());
        self.ready.in_contact();
        self.ready.set_control(&target.url, true);
        // Where the connectors' tunnels are, cluster-wide (a control plane without the
        // call serves no relays: this node then serves its own tunnels only).
        let tunnel_map = async {
            client.ready().await.ok()?;
            client
                .server_streaming(
                    tonic::Request::new(pb::TunnelsRequest {}),
                    tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/ztp.config.v1.ConfigService/Tunnels",
                    ),
                    ztp_proto::wire::ProstCodec::<pb::TunnelsRequest, pb::TunnelMap>::default(),
                )
                .await
                .map(|r| r.into_inner())
                .map_err(|e| tracing::debug!(error = %e, "no tunnel map from the control plane"))
                .ok()
        };
        let mut holders = tokio::time::timeout(SUBSCRIBE_TIMEOUT, tunnel_map)
            .await
            .ok()
            .flatten();
        let mut audit = self.audit.lock().await;
        // The tunnels this node holds, now and on every change.
        let mut tunnels = self.registry.tunnels().changes();
        tunnels.mark_changed();
        // While this instance offers a version older than the applied one: until when
        // it may catch up, and what it offered.
        let mut behind: Option<(tokio::time::Instant, u64)> = None;
        loop {
            let raw = tokio::select! {
                m = stream.message() => match m.map_err(SessionError::Status)? {
                    Some(raw) => raw,
                    None => break,
                },
                m = async { holders.as_mut()?.message().await.ok().flatten() }, if holders.is_some() => {
                    match m {
                        Some(map) => {
                            let tunnels = self.registry.tunnels();
                            tunnels.set_remote(
                                &self.node_id,
                                map.holders
                                    .into_iter()
                                    .map(|h| (h.connector, h.node_id, h.address)),
                            );
                            tunnels.set_replicas(map.replicas, map.replicas_at_ms);
                        }
                        None => holders = None,
                    }
                    continue;
                }
                Ok(()) = tunnels.changed() => {
                    let report = pb::TunnelReport {
                        tunnels: self
                            .registry
                            .tunnels()
                            .report()
                            .into_iter()
                            .map(|t| pb::TunnelEntry {
                                connector: t.connector,
                                transport: t.transport.into(),
                                since_ms: t.since_ms,
                            })
                            .collect(),
                    };
                    if tx.send(msg(Kind::Tunnels(report))).await.is_err() {
                        break;
                    }
                    continue;
                }
                Some(record) = audit.recv() => {
                    if tx.send(msg(Kind::Record(record))).await.is_err() {
                        break;
                    }
                    continue;
                }
                () = async move {
                    match behind {
                        Some((until, _)) => tokio::time::sleep_until(until).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let version = behind.map_or(0, |(_, v)| v);
                    return Err(SessionError::Behind { version, applied: *applied });
                }
            };
            // Versions only move forward, unless every instance agrees they went back
            // (see the module docs).
            if let Some(version) = wire_version(&raw) {
                match version_decision(version, *applied, accept_older) {
                    VersionDecision::Apply => behind = None,
                    VersionDecision::ApplyOlder => tracing::warn!(
                        snapshot.version = version,
                        applied = *applied,
                        control = %target.url,
                        "no control plane instance reached the applied version in a whole \
                         round of the list; taking this older version as the configuration"
                    ),
                    VersionDecision::Wait => {
                        let until = match behind {
                            Some((until, _)) => until,
                            None => {
                                tracing::warn!(
                                    snapshot.version = version,
                                    applied = *applied,
                                    control = %target.url,
                                    grace_ms = LAG_GRACE.as_millis() as u64,
                                    "this control plane is behind the applied version; \
                                     waiting for it to catch up"
                                );
                                tokio::time::Instant::now() + LAG_GRACE
                            }
                        };
                        behind = Some((until, version));
                        let reason = format!(
                            "version {version} is older than the applied version {}; \
                             waiting for this control plane to catch up",
                            *applied
                        );
                        if tx.send(msg(nack(version, reason))).await.is_err() {
                            break;
                        }
                        continue;
                    }
                }
            }
            let schema = self.source.schema;
            let registry = self.registry.clone();
            // Decoding, conversion, validation, indexing, publishing and dropping the
            // replaced state take a while for large snapshots: off the workers, at low
            // priority.
            let publisher = self.publisher.clone();
            let last = self.last.clone();
            let bytes = raw.len();
            let (version, applied_result) =
                super::background::run(move || apply(raw, schema, &registry, &publisher, &last))
                    .await
                    .ok_or_else(|| SessionError::Connect("snapshot worker failed".into()))?;
            let reply = match applied_result {
                Ok(AppliedReport {
                    services,
                    users,
                    delta,
                    digest,
                }) => {
                    *applied = version;
                    progress.applied = true;
                    self.ready.set(true);
                    tracing::info!(
                        snapshot.version = version,
                        services,
                        users,
                        delta,
                        bytes,
                        digest = %digest,
                        "snapshot applied"
                    );
                    Kind::Ack(pb::Applied {
                        version,
                        digest: digest.to_bytes().to_vec(),
                    })
                }
                Err(reason) => nack(version, reason),
            };
            if tx.send(msg(reply)).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// What one session achieved, for [`Rotation::advance`].
#[derive(Debug, Default)]
struct Progress {
    /// When the subscription was answered.
    subscribed: Option<Instant>,
    /// A snapshot was applied.
    applied: bool,
}

impl Progress {
    /// The instance worked: it delivered a snapshot, or kept the stream up for
    /// [`HEALTHY_AFTER`] (it was at the node's version and had nothing to send).
    fn healthy(&self) -> bool {
        self.applied
            || self
                .subscribed
                .is_some_and(|t| t.elapsed() >= HEALTHY_AFTER)
    }
}

/// How a session with one instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It worked for a while (see [`Progress::healthy`]) and then was lost.
    Healthy,
    /// No connection, no subscription, or a stream that ended before it was healthy.
    Failed,
    /// It was reached but stayed behind the applied version for [`LAG_GRACE`].
    Behind,
}

/// The order in which the node tries the instances of the list, and when it waits.
#[derive(Debug)]
struct Rotation {
    len: usize,
    current: usize,
    /// Sessions in a row that ended `Failed` or `Behind`, since the last healthy one.
    streak: usize,
    /// The same since the last healthy session or the last backoff: a round.
    round: usize,
    /// Some instance of the streak was reached and was behind.
    behind: bool,
    /// The next backoff (before jitter).
    backoff: Duration,
}

impl Rotation {
    fn new(len: usize) -> Rotation {
        Rotation {
            len: len.max(1),
            current: 0,
            streak: 0,
            round: 0,
            behind: false,
            backoff: BACKOFF_FIRST,
        }
    }

    /// The index of the instance to use.
    fn current(&self) -> usize {
        self.current
    }

    /// Whether the next session may take a snapshot older than the applied version:
    /// every instance of the list, in a row, failed or stayed behind, and at least one
    /// of them was reached and was behind.
    fn accept_older(&self) -> bool {
        self.behind && self.streak >= self.len
    }

    /// The session on the current instance ended with `outcome`: moves to the next
    /// instance (wrapping) and returns how long to wait before trying it (before
    /// jitter): nothing for the first try of another instance, the backoff (doubling
    /// up to [`BACKOFF_MAX`]) once a whole round failed; with one instance, at least
    /// [`BACKOFF_FIRST`] between two tries.
    fn advance(&mut self, outcome: Outcome) -> Duration {
        self.current = (self.current + 1) % self.len;
        if outcome == Outcome::Healthy {
            self.streak = 0;
            self.round = 0;
            self.behind = false;
            self.backoff = BACKOFF_FIRST;
            return if self.len == 1 {
                BACKOFF_FIRST
            } else {
                Duration::ZERO
            };
        }
        self.streak += 1;
        self.round += 1;
        self.behind |= outcome == Outcome::Behind;
        if self.round < self.len {
            return Duration::ZERO;
        }
        self.round = 0;
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }
}

/// What to do with a snapshot at `version` when `applied` is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VersionDecision {
    /// The applied version or newer.
    Apply,
    /// Older, and a whole round found nothing newer: the store went back.
    ApplyOlder,
    /// Older: refuse it and give the instance time to catch up.
    Wait,
}

fn version_decision(version: u64, applied: u64, accept_older: bool) -> VersionDecision {
    if version >= applied {
        VersionDecision::Apply
    } else if accept_older {
        VersionDecision::ApplyOlder
    } else {
        VersionDecision::Wait
    }
}

/// What [`apply`] reports of an applied snapshot or delta.
#[derive(Debug, Clone, Copy)]
struct AppliedReport {
    services: usize,
    users: usize,
    delta: bool,
    digest: Digest,
}

/// Decodes, converts, validates, compiles and publishes one snapshot or delta: its
/// version, and what was applied or why it was refused.
///
/// A delta is checked against the configuration applied last and updates it in place;
/// the compiled routes and directory are copies of the published ones with the delta's
/// records changed: its cost grows with the delta. A whole snapshot that differs from
/// the one applied only in its version and revoked serials (a revocation, mostly)
/// reuses the compiled services and users. Anything else is validated and compiled
/// whole. A refused message changes nothing.
fn apply(
    raw: bytes::Bytes,
    schema: u32,
    registry: &Registry,
    publisher: &Mutex<Publisher>,
    last: &Mutex<Option<Config>>,
) -> (u64, Result<AppliedReport, String>) {
    use prost::Message as _;
    let wire_digest = config_digest(&raw);
    let snap = match pb::Snapshot::decode(raw) {
        Ok(s) => s,
        Err(e) => return (0, Err(format!("undecodable snapshot: {e}"))),
    };
    let version = snap.version;
    if snap.schema > schema {
        let e = WireError::TooNew {
            found: snap.schema,
            known: schema,
        };
        return (version, Err(e.to_string()));
    }
    let delta = snap.delta;
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let current = publisher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .current()
        .policy
        .clone();
    let policy: Result<Policy, String> = if delta {
        let d = match ztp_proto::wire::Delta::try_from(snap) {
            Ok(d) => d,
            Err(e) => return (version, Err(e.to_string())),
        };
        match last.as_mut() {
            None => Err(format!(
                "delta to version {} but no configuration applied yet; a full snapshot is \
                 needed",
                d.version
            )),
            Some(config) => match config.apply(d) {
                Err(e) => return (version, Err(e.to_string())),
                // From here the kept configuration has moved: if the policy cannot
                // follow, it is dropped below (the next delta is refused and the whole
                // configuration follows).
                Ok(applied) => current
                    .update(config, &applied, registry)
                    .map_err(|e| e.to_string()),
            },
        }
    } else {
        match last.as_mut() {
            // Only the version and the revoked serials moved: the compiled services and
            // users are reused. Not for the version applied (or older): a whole snapshot
            // sent again at it repairs a divergence, so it is compiled whole.
            Some(config)
                if wire_digest.is_some()
                    && current.config_digest == wire_digest
                    && version > current.version =>
            {
                match config.set_revoked(version, &snap.revoked) {
                    Ok(()) => Ok(current.with_revoked(config)),
                    Err(e) => return (version, Err(e.to_string())),
                }
            }
            // The conversion validates it.
            _ => {
                let next = Snapshot::try_from(snap)
                    .map_err(|e| e.to_string())
                    .and_then(|s| Config::from_validated(s).map_err(|e| e.to_string()))
                    .and_then(|config| {
                        let p =
                            Policy::from_config(&config, registry).map_err(|e| e.to_string())?;
                        Ok((config, p))
                    });
                match next {
                    Ok((config, p)) => {
                        *last = Some(config);
                        Ok(Policy {
                            config_digest: wire_digest,
                            ..p
                        })
                    }
                    Err(e) => return (version, Err(e)),
                }
            }
        }
    };
    let published = policy.and_then(|policy| {
        let report = AppliedReport {
            services: policy.routes.len(),
            users: policy.users,
            delta,
            digest: policy.digest,
        };
        publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply(Some(policy), None)
            .map(|()| report)
            .map_err(|e| e.to_string())
    });
    if published.is_err() {
        // The kept configuration may be ahead of what is served: forget it, so that
        // only a whole snapshot is taken next.
        *last = None;
    }
    (version, published)
}

/// SHA-256 over every top-level field of a wire snapshot but `schema` (1), `version` (2)
/// and `revoked` (6), in the order and bytes they arrived in; `None` if the bytes are not
/// a well-formed protobuf message. Equal digests mean equal services, users and groups
/// (and any field added later); different encodings of equal content only cost a full
/// compile. What else a compile depends on must not change under it: the handler
/// registry is fixed for the process today; were it reloadable, it would have to enter
/// the digest.
pub fn config_digest(raw: &[u8]) -> Option<[u8; 32]> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut i = 0;
    while i < raw.len() {
        let start = i;
        let key = varint(raw, &mut i)?;
        match key & 7 {
            0 => {
                varint(raw, &mut i)?;
            }
            1 => i = i.checked_add(8)?,
            2 => {
                let len = usize::try_from(varint(raw, &mut i)?).ok()?;
                i = i.checked_add(len)?;
            }
            5 => i = i.checked_add(4)?,
            _ => return None,
        }
        let field = raw.get(start..i)?;
        if !matches!(key >> 3, 1 | 2 | 6) {
            ctx.update(field);
        }
    }
    ctx.finish().as_ref().try_into().ok()
}

/// A protobuf varint at `b[*i..]`, moving `i` past it.
fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The `version` (field 2) of a wire snapshot, read without decoding the rest: the last
/// occurrence, as a decoder takes it, or 0 when absent; `None` if the bytes are not a
/// well-formed protobuf message at the top level (the full decode then refuses it).
fn wire_version(raw: &[u8]) -> Option<u64> {
    let mut version = 0;
    let mut i = 0;
    while i < raw.len() {
        let key = varint(raw, &mut i)?;
        match key & 7 {
            0 => {
                let v = varint(raw, &mut i)?;
                if key >> 3 == 2 {
                    version = v;
                }
            }
            1 => i = i.checked_add(8)?,
            2 => {
                let len = usize::try_from(varint(raw, &mut i)?).ok()?;
                i = i.checked_add(len)?;
            }
            5 => i = i.checked_add(4)?,
            _ => return None,
        }
    }
    (i == raw.len()).then_some(version)
}

fn nack(version: u64, reason: String) -> Kind {
    tracing::warn!(snapshot.version = version, reason = %reason, "snapshot refused; keeping the last good one");
    Kind::Nack(pb::Refused { version, reason })
}

fn msg(kind: Kind) -> pb::NodeMessage {
    pb::NodeMessage { kind: Some(kind) }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&s.to_string());
        out.push_str("; ");
        cur = s.source();
    }
    out
}

/// Between half and all of `d`, so that replicas do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(d.as_nanos() as u64);
    let frac = (h.finish() % 1000) as f64 / 1000.0;
    d.mul_f64(0.5 + frac / 2.0)
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Status(tonic::Status),
    #[error("the control plane stayed at version {version}, older than the applied version {applied}, for {LAG_GRACE:?}")]
    Behind { version: u64, applied: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn wire(version: u64, users: &[&str], revoked: &[&str]) -> bytes::Bytes {
        pb::Snapshot {
            schema: 1,
            version,
            services: vec![pb::Service {
                name: "a.svc.internal".into(),
                protocol: "tcp".into(),
                address: Some("127.0.0.1:1".into()),
                groups: vec!["g".into()],
                ..Default::default()
            }],
            users: users
                .iter()
                .map(|u| pb::User {
                    name: (*u).into(),
                    identities: vec![format!("{u}@example.com")],
                    groups: vec!["g".into()],
                    disabled: false,
                })
                .collect(),
            groups: vec![pb::Group { name: "g".into() }],
            revoked: revoked.iter().map(|r| (*r).into()).collect(),
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn config_digest_ignores_version_schema_and_revoked_only() {
        let base = config_digest(&wire(1, &["alice", "bob"], &[])).unwrap();
        assert_eq!(
            config_digest(&wire(9, &["alice", "bob"], &["0a", "0b"])),
            Some(base)
        );
        let mut other_schema = pb::Snapshot::decode(wire(1, &["alice", "bob"], &[])).unwrap();
        other_schema.schema = 2;
        assert_eq!(config_digest(&other_schema.encode_to_vec()), Some(base));
        assert_ne!(config_digest(&wire(1, &["alice"], &[])), Some(base));
        assert_ne!(config_digest(&wire(1, &["bob", "alice"], &[])), Some(base));
        // Not a protobuf message: no digest (a full compile, which refuses it).
        assert_eq!(config_digest(&[0x1a, 0x05, 0x01]), None);
        assert_eq!(config_digest(&[0xff]), None);
        assert_eq!(config_digest(&[0x1b]), None, "wire type 3");
    }

    /// [`apply`], with what it applied as (services, users, delta).
    fn run(
        raw: bytes::Bytes,
        schema: u32,
        registry: &Registry,
        publisher: &Mutex<Publisher>,
        last: &Mutex<Option<Config>>,
    ) -> (u64, Result<(usize, usize, bool), String>) {
        let (v, r) = apply(raw, schema, registry, publisher, last);
        (v, r.map(|a| (a.services, a.users, a.delta)))
    }

    fn publisher() -> Mutex<Publisher> {
        let (p, _rx) = Publisher::new(
            Policy::empty(),
            crate::tls::test_material(),
            crate::tls::provider(),
        )
        .unwrap();
        Mutex::new(p)
    }

    #[test]
    fn a_revocation_reuses_the_compiled_configuration_and_nothing_else_does() {
        let reg = Registry::builtin();
        let p = publisher();
        let last = Mutex::new(None);
        let current = || p.lock().unwrap().current().policy.clone();
        assert_eq!(
            run(wire(1, &["alice", "bob"], &[]), 2, &reg, &p, &last),
            (1, Ok((1, 2, false)))
        );
        let v1 = current();
        assert!(v1.directory.user("bob@example.com").is_some());

        // Only the revoked serials moved: same compiled services and users.
        assert_eq!(
            run(wire(2, &["alice", "bob"], &["0a"]), 2, &reg, &p, &last),
            (2, Ok((1, 2, false)))
        );
        let v2 = current();
        assert_eq!(v2.version, 2);
        assert!(Arc::ptr_eq(&v1.directory, &v2.directory));
        assert!(Arc::ptr_eq(&v1.routes, &v2.routes));
        assert!(v2
            .revoked
            .contains(&ztp_proto::names::Serial::parse_hex("0a").unwrap()));

        // A bad serial in an otherwise unchanged snapshot is refused; nothing changes.
        let (v, r) = run(wire(3, &["alice", "bob"], &["not hex"]), 2, &reg, &p, &last);
        assert_eq!(v, 3);
        assert!(r.unwrap_err().contains("revoked[0]"));
        assert_eq!(current().version, 2);

        // A user removed: compiled again, and the user is gone.
        assert_eq!(
            run(wire(4, &["alice"], &["0a"]), 2, &reg, &p, &last),
            (4, Ok((1, 1, false)))
        );
        let v4 = current();
        assert!(!Arc::ptr_eq(&v2.directory, &v4.directory));
        assert!(v4.directory.user("bob@example.com").is_none());
        assert!(v4.directory.user("alice@example.com").is_some());

        // Too new a schema is refused even when the configuration is unchanged.
        let mut newer = pb::Snapshot::decode(wire(5, &["alice"], &["0a"])).unwrap();
        newer.schema = 3;
        let (v, r) = run(newer.encode_to_vec().into(), 2, &reg, &p, &last);
        assert_eq!(v, 5);
        assert!(r.is_err());
        assert_eq!(current().version, 4);
    }

    /// Deltas apply to the configuration applied last, whole or by delta (a revocation
    /// reusing the compiled one included); a delta that does not follow it, or comes
    /// before any configuration, is refused and changes nothing.
    #[test]
    fn deltas_apply_to_the_configuration_applied_last_and_nothing_else() {
        use ztp_proto::wire::Delta;
        let reg = Registry::builtin();
        let p = publisher();
        let last = Mutex::new(None);
        let current = || p.lock().unwrap().current().policy.clone();
        let encode = |d: &Delta| -> bytes::Bytes { pb::Snapshot::from(d).encode_to_vec().into() };
        let user = |name: &str| ztp_proto::User {
            name: name.into(),
            identities: vec![format!("{name}@example.com")],
            groups: vec!["g".into()],
            disabled: false,
        };
        let d = Delta {
            version: 2,
            previous_version: 1,
            users: vec![user("carol")],
            ..Delta::default()
        };
        let (v, r) = run(encode(&d), 4, &reg, &p, &last);
        assert_eq!(v, 2);
        assert!(r.unwrap_err().contains("no configuration applied yet"));

        assert_eq!(
            run(wire(1, &["alice", "bob"], &[]), 4, &reg, &p, &last),
            (1, Ok((1, 2, false)))
        );
        let d = Delta {
            deleted_users: vec!["bob".into()],
            ..d
        };
        assert_eq!(run(encode(&d), 4, &reg, &p, &last), (2, Ok((1, 2, true))));
        let v2 = current();
        assert_eq!(v2.version, 2);
        assert!(v2.directory.user("carol@example.com").is_some());
        assert!(v2.directory.user("bob@example.com").is_none());
        // Replayed: refused, nothing changes.
        let (_, r) = run(encode(&d), 4, &reg, &p, &last);
        assert!(r
            .unwrap_err()
            .contains("does not follow the applied version 2"));
        assert_eq!(current().version, 2);
        // A revocation as a whole snapshot (reusing the compiled one), then a delta on it.
        assert_eq!(
            run(wire(3, &["alice", "carol"], &["0a"]), 4, &reg, &p, &last),
            (3, Ok((1, 2, false)))
        );
        let d = Delta {
            version: 4,
            previous_version: 3,
            unrevoked: vec!["0a".into()],
            revoked: vec!["0b".into()],
            ..Delta::default()
        };
        assert_eq!(run(encode(&d), 4, &reg, &p, &last), (4, Ok((1, 2, true))));
        let v4 = current();
        let serial = |s: &str| ztp_proto::names::Serial::parse_hex(s).unwrap();
        assert!(!v4.revoked.contains(&serial("0a")) && v4.revoked.contains(&serial("0b")));
        assert!(v4.directory.user("carol@example.com").is_some());
        // A delta that would leave the configuration invalid: refused, nothing changes.
        let bad = Delta {
            version: 5,
            previous_version: 4,
            deleted_groups: vec!["g".into()],
            ..Delta::default()
        };
        let (_, r) = run(encode(&bad), 4, &reg, &p, &last);
        assert!(r.is_err());
        assert_eq!(current().version, 4);
        // The kept configuration is the same as the one served, and its digest is that
        // of the whole snapshot of version 4 (what the control plane computes).
        let whole = |version: u64, users: &[&str], revoked: &[&str]| {
            ztp_proto::Snapshot::try_from(
                pb::Snapshot::decode(wire(version, users, revoked)).unwrap(),
            )
            .unwrap()
        };
        let want = ztp_proto::digest::Digest::of(&whole(4, &["alice", "carol"], &["0b"]));
        assert_eq!(current().digest, want);
        assert_eq!(last.lock().unwrap().as_ref().unwrap().digest(), want);
        // A one-user delta copies the directory and shares the routes.
        let d = Delta {
            version: 5,
            previous_version: 4,
            users: vec![user("dave")],
            ..Delta::default()
        };
        let (_, r) = run(encode(&d), 4, &reg, &p, &last);
        assert_eq!(r, Ok((1, 3, true)));
        let v5 = current();
        assert!(Arc::ptr_eq(&v4.routes, &v5.routes));
        assert!(!Arc::ptr_eq(&v4.directory, &v5.directory));
        assert!(
            v4.directory.user("dave@example.com").is_none(),
            "the old one is unchanged"
        );
        assert!(v5.directory.user("dave@example.com").is_some());
        assert_eq!(
            v5.digest,
            ztp_proto::digest::Digest::of(&whole(5, &["alice", "carol", "dave"], &["0b"]))
        );
        // A node that announced schema 3 refuses a delta as too new.
        let (_, r) = run(encode(&d), 3, &reg, &p, &last);
        assert!(r.unwrap_err().contains("newer"));
    }

    /// A node whose kept configuration was altered (a divergence) is repaired by the
    /// whole snapshot the control plane sends again at the same version: it is compiled
    /// whole, not taken as a revocation of what the node holds.
    #[test]
    fn a_whole_snapshot_sent_again_at_the_applied_version_repairs_a_divergence() {
        let reg = Registry::builtin();
        let p = publisher();
        let last = Mutex::new(None);
        assert_eq!(
            run(wire(1, &["alice", "bob"], &[]), 4, &reg, &p, &last),
            (1, Ok((1, 2, false)))
        );
        let right = p.lock().unwrap().current().policy.digest;
        // The node's state altered: bob gone from what it keeps.
        let altered =
            ztp_proto::Snapshot::try_from(pb::Snapshot::decode(wire(1, &["alice"], &[])).unwrap())
                .unwrap();
        *last.lock().unwrap() = Some(Config::from_validated(altered).unwrap());
        let (_, r) = apply(wire(1, &["alice", "bob"], &[]), 4, &reg, &p, &last);
        assert_eq!(r.unwrap().digest, right);
        assert_eq!(last.lock().unwrap().as_ref().unwrap().digest(), right);
        // A revocation at a newer version still reuses what is compiled.
        let before = p.lock().unwrap().current().policy.clone();
        run(wire(2, &["alice", "bob"], &["0a"]), 4, &reg, &p, &last)
            .1
            .unwrap();
        let after = p.lock().unwrap().current().policy.clone();
        assert!(Arc::ptr_eq(&before.directory, &after.directory));
    }

    #[test]
    fn control_urls_parse_in_order_and_refuse_bad_entries_by_name() {
        let urls = parse_control_urls(
            "https://a.example:9781, https://10.0.0.2:7000 ,https://[::1]:9,https://c.example",
        )
        .unwrap();
        let got: Vec<(&str, &str, u16)> = urls
            .iter()
            .map(|u| (u.url.as_str(), u.host.as_str(), u.port))
            .collect();
        assert_eq!(
            got,
            [
                ("https://a.example:9781", "a.example", 9781),
                ("https://10.0.0.2:7000", "10.0.0.2", 7000),
                ("https://[::1]:9", "::1", 9),
                ("https://c.example", "c.example", DEFAULT_CONTROL_PORT),
            ]
        );
        assert_eq!(parse_control_urls("https://a:1/").unwrap()[0].port, 1);

        for bad in [
            "http://a:1",
            "a:1",
            "https://",
            "https://a:0",
            "https://a:99999",
            "https://a:",
            "https://a:1/path",
            "https://a:1?x=1",
            "https://user@a:1",
            "https://a b:1",
        ] {
            let list = format!("https://ok.example:1,{bad}");
            match parse_control_urls(&list) {
                Err(SourceError::BadUrl(u)) => assert_eq!(u, bad.trim(), "{list}"),
                other => panic!("{list}: {other:?}"),
            }
            let e = parse_control_urls(&list).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        for empty in [
            "",
            " ",
            "https://a:1,",
            ",https://a:1",
            "https://a:1,,https://b:1",
        ] {
            assert!(
                matches!(parse_control_urls(empty), Err(SourceError::EmptyUrl(_))),
                "{empty:?}"
            );
        }
        // The same host and port twice, however written, is refused, naming both.
        for (list, dup) in [
            ("https://a:1,https://a:1", "https://a:1"),
            ("https://a:9781,https://A", "https://A"),
            ("https://b:2,https://a:1,https://a:1/", "https://a:1/"),
        ] {
            match parse_control_urls(list) {
                Err(SourceError::DuplicateUrl(u, _)) => assert_eq!(u, dup, "{list}"),
                other => panic!("{list}: {other:?}"),
            }
        }
        assert_eq!(
            parse_control_urls("https://a:1,https://a:2").unwrap().len(),
            2
        );
    }

    #[test]
    fn rotation_moves_on_at_once_and_backs_off_after_a_whole_round() {
        use Outcome::*;
        let zero = Duration::ZERO;
        let mut r = Rotation::new(3);
        assert_eq!(r.current(), 0);
        // The first instance fails: the two others are tried at once, then a backoff
        // that doubles with every whole round.
        assert_eq!((r.advance(Failed), r.current()), (zero, 1));
        assert_eq!((r.advance(Failed), r.current()), (zero, 2));
        assert_eq!((r.advance(Failed), r.current()), (BACKOFF_FIRST, 0));
        assert_eq!((r.advance(Failed), r.current()), (zero, 1));
        assert_eq!((r.advance(Failed), r.current()), (zero, 2));
        assert_eq!((r.advance(Failed), r.current()), (BACKOFF_FIRST * 2, 0));
        // The first works, then is lost: the next one at once, and the backoff afresh.
        assert_eq!((r.advance(Healthy), r.current()), (zero, 1));
        assert_eq!((r.advance(Failed), r.current()), (zero, 2));
        // A healthy instance stays in use: the node leaves it only when it is lost, for
        // the next one (never back to the first by itself).
        assert_eq!((r.advance(Healthy), r.current()), (zero, 0));
        assert_eq!((r.advance(Failed), r.current()), (zero, 1));
        assert_eq!((r.advance(Failed), r.current()), (zero, 2));
        assert_eq!((r.advance(Failed), r.current()), (BACKOFF_FIRST, 0));
        // Bounded.
        for _ in 0..100 {
            r.advance(Failed);
        }
        assert!(r.backoff <= BACKOFF_MAX);
        assert_eq!(r.backoff, BACKOFF_MAX);

        // One instance: every failure is a whole round, and even after a healthy
        // session a short wait before the same instance again (as before lists).
        let mut one = Rotation::new(1);
        assert_eq!((one.advance(Failed), one.current()), (BACKOFF_FIRST, 0));
        assert_eq!((one.advance(Failed), one.current()), (BACKOFF_FIRST * 2, 0));
        assert_eq!((one.advance(Healthy), one.current()), (BACKOFF_FIRST, 0));
        assert_eq!((one.advance(Failed), one.current()), (BACKOFF_FIRST, 0));
    }

    #[test]
    fn an_older_version_is_taken_only_after_a_whole_round_found_nothing_newer() {
        use Outcome::*;
        assert_eq!(version_decision(7, 7, false), VersionDecision::Apply);
        assert_eq!(version_decision(8, 7, false), VersionDecision::Apply);
        assert_eq!(version_decision(6, 7, false), VersionDecision::Wait);
        assert_eq!(version_decision(6, 7, true), VersionDecision::ApplyOlder);
        assert_eq!(version_decision(9, 7, true), VersionDecision::Apply);

        // A (dead) and B (behind): B is behind, A fails: a whole round, so B's older
        // version is taken on the next try.
        let mut r = Rotation::new(2);
        assert_eq!(r.advance(Healthy), Duration::ZERO); // A lost; to B
        assert!(!r.accept_older());
        assert_eq!(r.advance(Behind), Duration::ZERO); // B behind; to A
        assert!(!r.accept_older(), "A has not been tried yet");
        assert_eq!(r.advance(Failed), BACKOFF_FIRST); // A unreachable; to B
        assert!(r.accept_older());
        assert_eq!(r.current(), 1);
        // Having taken it, B is healthy: the slate is clean.
        r.advance(Healthy);
        assert!(!r.accept_older());

        // Only failures (nobody reached): nothing older is ever taken.
        let mut r = Rotation::new(2);
        for _ in 0..6 {
            r.advance(Failed);
            assert!(!r.accept_older());
        }
        // Behind once, then a healthy instance (at the applied version or newer):
        // forgotten.
        let mut r = Rotation::new(3);
        r.advance(Behind);
        r.advance(Healthy);
        r.advance(Failed);
        r.advance(Failed);
        assert!(!r.accept_older());
        r.advance(Behind);
        assert!(r.accept_older(), "three in a row, one behind");

        // One instance that stays behind: its version is taken on the next try.
        let mut one = Rotation::new(1);
        one.advance(Behind);
        assert!(one.accept_older());
    }

    #[test]
    fn wire_version_reads_the_version_without_decoding() {
        let raw = wire(42, &["alice"], &["0a"]);
        assert_eq!(wire_version(&raw), Some(42));
        assert_eq!(wire_version(&wire(0, &["alice"], &[])), Some(0));
        assert_eq!(wire_version(&[]), Some(0));
        // The last occurrence wins, as for a decoder.
        let mut twice = raw.to_vec();
        twice.extend_from_slice(&[0x10, 0x07]);
        assert_eq!(wire_version(&twice), Some(7));
        assert_eq!(pb::Snapshot::decode(&twice[..]).unwrap().version, 7);
        // Not a message: no version.
        assert_eq!(wire_version(&[0x1a, 0x05, 0x01]), None);
        assert_eq!(wire_version(&[0x10]), None);
        assert_eq!(wire_version(&[0x1b]), None);
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(5) && j <= Duration::from_secs(10),
                "{j:?}"
            );
        }
    }
}
