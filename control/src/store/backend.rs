//! The seam between the store's rules and where its records live.
//!
//! A backend keeps records (services, users, groups, connectors, revoked serials,
//! tokens), the two counters (the config version and the write sequence), the admin audit
//! and the connection audit. It knows nothing of what a record means: every rule
//! (validation, integrity, `If-Match`, the last admin token) is checked once, above it,
//! on the configuration the store holds in memory.
//!
//! Every write is one [`Commit`]: it lands only if the write sequence is still the one
//! the writer read its state at, moves the sequence by one (and the config version when
//! it changes the configuration), and appends its admin audit record, all atomically.
//! That one comparison serializes the writes of every `ztp-control` instance sharing a
//! backend. A backend shared by several instances reports the others' commits through
//! [`Backend::updates`].

use std::future::Future;
use std::pin::Pin;

use super::conn_audit::{AuditQuery, ConnectionRecord};
use super::AuditRecord;

/// A boxed future, for async methods of an object-safe trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What kind of record a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    User,
    Group,
    Connector,
    /// A revoked serial (normalized hex); the value is empty.
    Revoked,
    Token,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::User,
        Kind::Group,
        Kind::Connector,
        Kind::Revoked,
        Kind::Token,
    ];

    /// The name of the kind's collection (a sled tree, an etcd key segment).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::User => "users",
            Kind::Group => "groups",
            Kind::Connector => "connectors",
            Kind::Revoked => "revoked",
            Kind::Token => "tokens",
        }
    }

    /// Whether records of this kind are part of the configuration the nodes get
    /// (services, users, groups, connectors; revoked serials travel on their own).
    pub fn is_config_record(self) -> bool {
        matches!(
            self,
            Kind::Service | Kind::User | Kind::Group | Kind::Connector
        )
    }
}

/// One record written (`Some`, its JSON) or removed (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub kind: Kind,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// One atomic write.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The write sequence the writer read its state at; the commit lands only if it is
    /// still the backend's.
    pub expect_seq: u64,
    /// The config version after the commit (the one before, if `bump` is false).
    pub version: u64,
    /// Whether the commit moves the config version.
    pub bump: bool,
    /// Writes, applied in order (a later write of a key wins).
    pub ops: Vec<Op>,
    /// The admin audit record; its `seq` is `expect_seq + 1`.
    pub audit: AuditRecord,
}

impl Commit {
    /// The write sequence after the commit.
    pub fn seq(&self) -> u64 {
        self.expect_seq + 1
    }
}

/// Everything a backend holds of the configuration and the tokens, at one point.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub seq: u64,
    pub version: u64,
    /// Every record, each as `(kind, key, JSON)`.
    pub records: Vec<(Kind, String, Vec<u8>)>,
}

/// A change made by another instance sharing the backend.
#[derive(Debug, Clone)]
pub enum Update {
    /// One commit: the sequence and version after it, and its writes.
    Commit {
        seq: u64,
        version: u64,
        ops: Vec<Op>,
    },
    /// The backend cannot tell what changed (a watch resumed below a compaction, a
    /// broken stream): here is everything.
    Reset(Loaded),
}

/// Backend-neutral failures. Domain refusals (not found, conflicts) are the store's.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The write sequence moved since the writer read its state: another instance wrote.
    #[error("another write landed first")]
    Moved,
    /// The backend cannot be reached or did not answer in time; a write may or may not
    /// have landed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The backend's data cannot be opened.
    #[error("cannot open the store at {location}: {reason}")]
    Open { location: String, reason: String },
    /// A record that cannot be read.
    #[error("store record {key:?} in {collection} is damaged: {reason}")]
    Damaged {
        collection: &'static str,
        key: String,
        reason: String,
    },
    /// Anything else the backend reports.
    #[error("store I/O failed: {0}")]
    Io(String),
}

/// Where the store's records live: sled on one machine, or etcd shared by many
/// instances.
pub trait Backend: Send + Sync + 'static {
    /// `sled` or `etcd`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Where, for people: a folder or the etcd endpoints and prefix.
    fn location(&self) -> String;

    /// Everything the backend holds, at one point.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, BackendError>>;

    /// Applies a commit, or refuses it with [`BackendError::Moved`]. Returns once the
    /// commit is visible to readers; it is durable once [`Backend::sync`] returns.
    fn commit<'a>(&'a self, commit: &'a Commit) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Waits until every commit made so far is durable (a no-op where a commit is
    /// durable when it returns).
    fn sync(&self) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Whether other `ztp-control` instances may write it too (then the store follows
    /// [`Backend::updates`]).
    fn is_shared(&self) -> bool;

    /// The other instances' commits after `seq`, in order, as they land. A backend only
    /// this process writes yields nothing. Ends only when the backend is closed.
    fn updates(&self, seq: u64) -> BoxFuture<'_, Result<UpdateStream, BackendError>>;

    /// The newest admin audit records, newest first.
    fn audit(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, BackendError>>;

    /// Appends connection records, keeping at most the retention.
    fn append_connections(
        &self,
        records: Vec<ConnectionRecord>,
    ) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Connection records matching `q`, newest first.
    fn query_connections(
        &self,
        q: AuditQuery,
    ) -> BoxFuture<'_, Result<Vec<ConnectionRecord>, BackendError>>;

    /// How many connection records are kept.
    fn set_conn_audit_cap(&self, cap: u64);

    /// Publishes the data-plane nodes subscribed to this instance (each its id and
    /// JSON), replacing what it published before, for the other instances' node lists.
    /// A backend with one instance has no one to tell.
    fn publish_nodes(
        &self,
        nodes: Vec<(String, Vec<u8>)>,
    ) -> BoxFuture<'_, Result<(), BackendError>>;

    /// The nodes the other instances published (JSON each).
    fn cluster_nodes(&self) -> BoxFuture<'_, Result<Vec<Vec<u8>>, BackendError>>;
}

/// Updates as they come; `None` at the end.
pub type UpdateStream = tokio::sync::mpsc::Receiver<Result<Update, BackendError>>;
