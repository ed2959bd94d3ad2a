//! The store: the system of record, its rules, and the configuration in memory.
//!
//! Where records live is a [`Backend`] (sled in `--data-dir`, or etcd shared by several
//! `ztp-control` instances); what they mean is here, once. The whole configuration
//! (services, users, groups, connectors, revoked serials) and the tokens are kept in
//! memory with the config version and the write sequence they are at. Every write:
//!
//! 1. is validated on its own, then, under the write lock, checked against `If-Match`
//!    and the rules that need the rest of the configuration (an identity maps to one
//!    user, a group in use stays, a service names only groups and connectors that
//!    exist, the last admin token stays), all on the configuration in memory;
//! 2. is one [`backend::Commit`] that the backend applies only if its write sequence is still the
//!    one that configuration was read at (another instance may have written meanwhile:
//!    then the configuration catches up and the write is decided again);
//! 3. is applied to the configuration in memory, announced, and acknowledged once the
//!    backend has made it durable.
//!
//! Commits made by other instances reach the configuration in memory through
//! [`Backend::updates`]; a reader of records and their version (the admin API's bodies
//! and `ETag`s) takes both from one state, without waiting for writes.
//!
//! - `records.rs`, `tokens.rs`: the rules of each write and the reads.
//! - `commit.rs`: the write loop (plan, commit, catch up, announce) and the follower of
//!   other instances' commits.
//! - `state.rs`: the configuration in memory and how commits apply to it.
//! - `backend.rs`: the trait; `sled.rs` and `etcd.rs`: the two backends.
//! - `tests.rs`: the shared suite, run on each backend.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use ztp_proto::names::ServiceName;
use ztp_proto::{FieldError, Invalid};

pub mod backend;
mod commit;
mod conn_audit;
pub mod etcd;
mod records;
pub mod sled;
mod state;
mod tokens;

pub use backend::{Backend, BackendError, Kind, Op};
pub use conn_audit::{AuditQuery, ConnectionRecord};
pub use state::Change;
pub use tokens::{NewToken, Role, TokenInfo};

use commit::{follow, Shared};
use state::State;

/// Who made a change (a token, with the role it had), for the audit trail. Records
/// from before roles carry none: admin, as every token was then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Actor {
    pub token_id: String,
    pub token_name: String,
    #[serde(default)]
    pub role: Role,
}

impl Actor {
    /// Changes made by the process itself (first start).
    pub fn system() -> Self {
        Actor {
            token_id: "-".into(),
            token_name: "ztp-control".into(),
            role: Role::Admin,
        }
    }
}

/// One admin change, as kept in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Who, with the role their token had: `{"token_id", "token_name", "role"}`.
    pub actor: Actor,
    /// e.g. `service.create`.
    pub action: String,
    pub target: String,
    /// The config version after the change.
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("the configuration changed (now version {current}); re-read it and retry")]
    Stale { current: u64 },
    #[error("invalid: {0}")]
    Invalid(Invalid),
    #[error("{detail}")]
    Conflict {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// The backend could not be reached or did not answer in time: the write may or may
    /// not have landed (re-read before retrying).
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Backend(BackendError),
}

impl From<BackendError> for StoreError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unavailable(m) => StoreError::Unavailable(format!(
                "the store is unavailable: {m}; the change may or may not have been made: \
                 re-read before retrying"
            )),
            other => StoreError::Backend(other),
        }
    }
}

impl StoreError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid(Invalid(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }]))
    }
}

/// A page of a listing.
#[derive(Debug, Clone)]
pub struct Page<V> {
    pub items: Vec<V>,
    /// Cursor of the next page, if there is one.
    pub next: Option<String>,
}

pub struct Store {
    shared: Arc<Shared>,
    write: tokio::sync::Mutex<()>,
    follower: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(f) = &self.follower {
            f.abort();
        }
    }
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn json<V: Serialize>(v: &V) -> Vec<u8> {
    // Plain structs of strings, numbers and lists always serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The key a service is stored under: its lowercase name.
fn service_key(name: &str) -> Result<String, StoreError> {
    ServiceName::parse(name)
        .map(|n| n.key())
        .map_err(|e| StoreError::invalid("name", e))
}

impl Store {
    /// Opens (or creates) the sled store in `dir` and brings its schema up to date. A
    /// damaged store, or one of a newer schema, is refused with a message, never
    /// half-read and never a panic.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let backend = sled::SledBackend::open(dir)?;
        // Read every record once: a damaged record is found now, not on a request.
        let loaded = backend.load_now()?;
        Store::with_state(Arc::new(backend), State::from_loaded(loaded)?, false)
    }

    /// A store on `backend`, read whole; a shared backend is followed for other
    /// instances' commits (which needs a tokio runtime).
    pub async fn connect(backend: Arc<dyn Backend>) -> Result<Store, StoreError> {
        let loaded = backend.load().await?;
        let shared = backend.is_shared();
        Store::with_state(backend, State::from_loaded(loaded)?, shared)
    }

    fn with_state(
        backend: Arc<dyn Backend>,
        state: State,
        follow_it: bool,
    ) -> Result<Store, StoreError> {
        let (seq, version) = (state.seq, state.version);
        let shared = Arc::new(Shared {
            backend,
            state: Mutex::new(state),
            seqs: tokio::sync::watch::Sender::new(seq),
            versions: tokio::sync::watch::Sender::new(version),
        });
        let follower = follow_it.then(|| tokio::spawn(follow(Arc::downgrade(&shared))));
        Ok(Store {
            shared,
            write: tokio::sync::Mutex::new(()),
            follower,
        })
    }

    /// What every version after `version` changed, oldest first, and the version they
    /// lead to, from one state; `None` when the change log does not reach back to
    /// `version` (too old, or from before a full read of the store).
    pub fn changes_since(&self, version: u64) -> (Option<Vec<Change>>, u64) {
        let st = self.state();
        (st.changes_since(version), st.version)
    }

    /// The digest of the configuration at `version` (what a node that applied it
    /// should hold): the current version's, or an older one's the change log still
    /// holds; `None` when it cannot be told.
    pub fn digest_at(&self, version: u64) -> Option<ztp_proto::digest::Digest> {
        self.state().digest_at(version)
    }

    /// A new version that changes no record (no write makes one; a version that only
    /// moves must still reach the nodes).
    #[cfg(test)]
    pub(crate) async fn empty_version(&self) -> Result<u64, StoreError> {
        self.write(None, &Actor::system(), |_| {
            Ok(commit::Plan::config(vec![], "test.empty", ""))
        })
        .await
    }

    /// Whether other instances share the backend.
    pub fn is_shared(&self) -> bool {
        self.shared.backend.is_shared()
    }

    /// The backend's name (`sled`, `etcd`) and where it keeps the records.
    pub fn describe(&self) -> (&'static str, String) {
        (self.shared.backend.name(), self.shared.backend.location())
    }

    /// The config version now and after every acknowledged change.
    pub fn watch_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.versions.subscribe()
    }

    /// The current config version.
    pub fn version(&self) -> Result<u64, StoreError> {
        Ok(self.shared.state().version)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    /// The newest admin audit records, newest first.
    pub async fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(self.shared.backend.audit(limit).await?)
    }

    // ----- connection audit -----

    /// Sets how many connection records are kept.
    pub fn set_conn_audit_cap(&self, cap: u64) {
        self.shared.backend.set_conn_audit_cap(cap);
    }

    /// Appends connection records, dropping the oldest beyond the retention.
    pub async fn append_connections(
        &self,
        records: Vec<ConnectionRecord>,
    ) -> Result<(), StoreError> {
        Ok(self.shared.backend.append_connections(records).await?)
    }

    /// Publishes this instance's nodes (id and JSON each) to the other instances.
    pub async fn publish_nodes(&self, nodes: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        Ok(self.shared.backend.publish_nodes(nodes).await?)
    }

    /// The nodes other instances published (JSON each).
    pub async fn cluster_nodes(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self.shared.backend.cluster_nodes().await?)
    }

    /// Connection records matching `q`, newest first.
    pub async fn query_connections(
        &self,
        q: AuditQuery,
    ) -> Result<Vec<ConnectionRecord>, StoreError> {
        Ok(self.shared.backend.query_connections(q).await?)
    }
}

#[cfg(test)]
mod tests;
