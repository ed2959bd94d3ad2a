//! Snapshots from the control plane: a gRPC subscription over mutual TLS with the node's
//! certificate.
//!
//! Initial sync, then every new version; each is converted, validated and compiled off
//! the async workers (a 100,000-user snapshot must not stall connections in flight),
//! swapped in, and acked — or nacked with the reason, keeping the last good one. When
//! the control plane is away the node keeps serving what it has and reconnects with
//! jittered exponential backoff.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::sign::SingleCertAndKey;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use ztp_proto::wire::{pb, WireError, MAX_MESSAGE_BYTES};
use ztp_proto::Snapshot;

use super::{Policy, Publisher};
use crate::handler::Registry;
use crate::snapshot::Readiness;

use pb::node_message::Kind;

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct ControlSource {
    /// `https://HOST:PORT`.
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
    #[error(transparent)]
    Material(#[from] ztp_infra::tls::TlsError),
    #[error("{0}: the node certificate carries no node URI (spiffe://DOMAIN/node/ID) in trust domain {1}")]
    NotANode(PathBuf, String),
    #[error("node TLS config: {0}")]
    Tls(String),
}

/// A connected-and-checked setup: the TLS client config and the node's identity.
pub struct Subscriber {
    source: ControlSource,
    host: String,
    port: u16,
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
}

/// Connection records a node keeps for the control plane while it is away.
pub const AUDIT_QUEUE: usize = 10_000;

impl Subscriber {
    /// Loads the node's certificate, key and the control plane's CA; checks the URL.
    pub fn new(
        source: ControlSource,
        publisher: Arc<Mutex<Publisher>>,
        registry: Registry,
        ready: Arc<Readiness>,
        audit: mpsc::Receiver<pb::ConnectionRecord>,
    ) -> Result<Self, SourceError> {
        let uri: Uri = source
            .url
            .parse()
            .map_err(|_| SourceError::BadUrl(source.url.clone()))?;
        if uri.scheme_str() != Some("https") {
            return Err(SourceError::BadUrl(source.url.clone()));
        }
        let host = uri
            .host()
            .ok_or_else(|| SourceError::BadUrl(source.url.clone()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(9781);

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
            host,
            port,
            tls: Arc::new(tls),
            node_id,
            publisher,
            registry,
            ready,
            audit: tokio::sync::Mutex::new(audit),
            node_key: certified,
            advertise: String::new(),
        })
    }

    /// The node's certificate and key.
    pub fn node_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.node_key.clone()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Subscribes until the process ends, reconnecting with jittered backoff.
    pub async fn run(self) {
        let mut applied = 0u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            let before = applied;
            let result = self.session(&mut applied).await;
            self.ready.lost_contact();
            match result {
                Ok(()) => tracing::warn!("control plane closed the config stream"),
                Err(e) => {
                    tracing::warn!(error = %e, "config stream failed; serving the last good snapshot")
                }
            }
            // A session that delivered a snapshot was healthy: start the backoff afresh.
            if applied != before {
                backoff = Duration::from_millis(100);
            }
            let wait = jitter(backoff);
            tracing::info!(
                retry_in_ms = wait.as_millis() as u64,
                "reconnecting to the control plane"
            );
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
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

    async fn session(&self, applied: &mut u64) -> Result<(), SessionError> {
        let tls = TlsConnector::from(self.tls.clone());
        let (host, port) = (self.host.clone(), self.port);
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
        // The scheme is http because the connector does TLS itself.
        let channel =
            Endpoint::from_shared(format!("http://{}:{}", bracket(&self.host), self.port))
                .map_err(|e| SessionError::Connect(e.to_string()))?
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
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
        client
            .ready()
            .await
            .map_err(|e| SessionError::Connect(e.to_string()))?;
        let mut stream = client
            .streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/ztp.config.v1.ConfigService/Subscribe",
                ),
                ztp_proto::wire::NodeCodec,
            )
            .await
            .map_err(SessionError::Status)?
            .into_inner();
        tracing::info!(node.id = %self.node_id, url = %self.source.url, "subscribed to the control plane");
        self.ready.in_contact();
        // Where the connectors' tunnels are, cluster-wide (a control plane without the
        // call serves no relays: this node then serves its own tunnels only).
        let mut holders = match client.ready().await {
            Ok(()) => client
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
                .ok(),
            Err(_) => None,
        };
        let mut audit = self.audit.lock().await;
        // The tunnels this node holds, now and on every change.
        let mut tunnels = self.registry.tunnels().changes();
        tunnels.mark_changed();
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
            };
            let schema = self.source.schema;
            let registry = self.registry.clone();
            // Decoding, conversion, validation, indexing, publishing and dropping the
            // replaced state take a while for large snapshots: off the workers, at low
            // priority.
            let publisher = self.publisher.clone();
            let (version, applied_result) =
                super::background::run(move || apply(raw, schema, &registry, &publisher))
                    .await
                    .ok_or_else(|| SessionError::Connect("snapshot worker failed".into()))?;
            let reply = match applied_result {
                Ok((services, users)) => {
                    *applied = version;
                    self.ready.set(true);
                    tracing::info!(
                        snapshot.version = version,
                        services,
                        users,
                        "snapshot applied"
                    );
                    Kind::Ack(pb::Applied { version })
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

/// Decodes, converts, validates, compiles and publishes one snapshot: its version, and
/// (services, users) or why it was refused. A snapshot that differs from the one being
/// served only in its version, schema and revoked serials (a revocation, mostly) reuses
/// the compiled services and users: its cost does not grow with the configuration.
fn apply(
    raw: bytes::Bytes,
    schema: u32,
    registry: &Registry,
    publisher: &Mutex<Publisher>,
) -> (u64, Result<(usize, usize), String>) {
    use prost::Message as _;
    let digest = config_digest(&raw);
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
    let current = publisher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .current()
        .policy
        .clone();
    let policy = match digest {
        Some(d) if current.config_digest == Some(d) => current
            .with_revoked(version, &snap.revoked)
            .map_err(|e| e.to_string()),
        _ => Snapshot::try_from(snap)
            .map_err(|e| e.to_string())
            // The conversion validated it.
            .and_then(|snap| Policy::compile_validated(&snap, registry).map_err(|e| e.to_string()))
            .map(|p| Policy {
                config_digest: digest,
                ..p
            }),
    };
    let policy = match policy {
        Ok(p) => p,
        Err(e) => return (version, Err(e)),
    };
    let counts = (policy.routes.len(), policy.users);
    let published = publisher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .apply(Some(policy), None);
    (
        version,
        published.map(|()| counts).map_err(|e| e.to_string()),
    )
}

/// SHA-256 over every top-level field of a wire snapshot but `schema` (1), `version` (2)
/// and `revoked` (6), in the order and bytes they arrived in; `None` if the bytes are not
/// a well-formed protobuf message. Equal digests mean equal services, users and groups
/// (and any field added later); different encodings of equal content only cost a full
/// compile. What else a compile depends on must not change under it: the handler
/// registry is fixed for the process today; were it reloadable, it would have to enter
/// the digest.
pub fn config_digest(raw: &[u8]) -> Option<[u8; 32]> {
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
            connectors: vec![],
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
        let current = || p.lock().unwrap().current().policy.clone();
        assert_eq!(
            apply(wire(1, &["alice", "bob"], &[]), 2, &reg, &p),
            (1, Ok((1, 2)))
        );
        let v1 = current();
        assert!(v1.directory.user("bob@example.com").is_some());

        // Only the revoked serials moved: same compiled services and users.
        assert_eq!(
            apply(wire(2, &["alice", "bob"], &["0a"]), 2, &reg, &p),
            (2, Ok((1, 2)))
        );
        let v2 = current();
        assert_eq!(v2.version, 2);
        assert!(Arc::ptr_eq(&v1.directory, &v2.directory));
        assert!(Arc::ptr_eq(&v1.routes, &v2.routes));
        assert!(v2
            .revoked
            .contains(&ztp_proto::names::Serial::parse_hex("0a").unwrap()));

        // A bad serial in an otherwise unchanged snapshot is refused; nothing changes.
        let (v, r) = apply(wire(3, &["alice", "bob"], &["not hex"]), 2, &reg, &p);
        assert_eq!(v, 3);
        assert!(r.unwrap_err().contains("revoked[0]"));
        assert_eq!(current().version, 2);

        // A user removed: compiled again, and the user is gone.
        assert_eq!(
            apply(wire(4, &["alice"], &["0a"]), 2, &reg, &p),
            (4, Ok((1, 1)))
        );
        let v4 = current();
        assert!(!Arc::ptr_eq(&v2.directory, &v4.directory));
        assert!(v4.directory.user("bob@example.com").is_none());
        assert!(v4.directory.user("alice@example.com").is_some());

        // Too new a schema is refused even when the configuration is unchanged.
        let mut newer = pb::Snapshot::decode(wire(5, &["alice"], &["0a"])).unwrap();
        newer.schema = 3;
        let (v, r) = apply(newer.encode_to_vec().into(), 2, &reg, &p);
        assert_eq!(v, 5);
        assert!(r.is_err());
        assert_eq!(current().version, 4);
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
