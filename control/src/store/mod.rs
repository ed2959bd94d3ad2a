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
//! 2. is one [`Commit`] that the backend applies only if its write sequence is still the
//!    one that configuration was read at (another instance may have written meanwhile:
//!    then the configuration catches up and the write is decided again);
//! 3. is applied to the configuration in memory, announced, and acknowledged once the
//!    backend has made it durable.
//!
//! Commits made by other instances reach the configuration in memory through
//! [`Backend::updates`]; a reader of records and their version (the admin API's bodies
//! and `ETag`s) takes both from one state, without waiting for writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use ztp_proto::names::{identity_key, Serial, ServiceName};
use ztp_proto::{Connector, FieldError, Group, Invalid, Service, Snapshot, User};

pub mod backend;
mod conn_audit;
pub mod etcd;
pub mod sled;
mod tokens;

pub use backend::{Backend, BackendError, Kind, Op};
pub use conn_audit::{AuditQuery, ConnectionRecord};
pub use tokens::{NewToken, Role, TokenInfo};

use backend::{Commit, Loaded, Update};

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

/// The configuration and the tokens as a backend holds them, at one write sequence.
#[derive(Default)]
struct State {
    /// The write sequence: moved by every commit.
    seq: u64,
    /// The config version: moved by every commit that changes the configuration.
    version: u64,
    /// Moves with every change to services, users, groups or connectors: a reader that
    /// saw it unchanged needs only the version and the revoked serials.
    generation: u64,
    services: BTreeMap<String, Service>,
    users: BTreeMap<String, User>,
    groups: BTreeMap<String, Group>,
    connectors: BTreeMap<String, Connector>,
    /// Revoked serials, normalized hex.
    revoked: BTreeSet<String>,
    tokens: BTreeMap<String, TokenInfo>,
    /// Identity key → the user that claims it.
    identities: HashMap<String, String>,
    /// A commit's outcome is unknown (the backend failed mid-write, or the writer went
    /// away during it): read everything again before it is trusted.
    unsure: bool,
}

fn decode<V: for<'de> Deserialize<'de>>(kind: Kind, key: &str, v: &[u8]) -> Result<V, StoreError> {
    serde_json::from_slice(v).map_err(|e| {
        StoreError::Backend(BackendError::Damaged {
            collection: kind.as_str(),
            key: key.to_owned(),
            reason: e.to_string(),
        })
    })
}

impl State {
    fn from_loaded(loaded: Loaded) -> Result<State, StoreError> {
        let mut st = State::default();
        let ops: Vec<Op> = loaded
            .records
            .into_iter()
            .map(|(kind, key, value)| Op {
                kind,
                key,
                value: Some(value),
            })
            .collect();
        st.apply(loaded.seq, loaded.version, &ops)?;
        Ok(st)
    }

    /// Applies a commit's writes, in order, and the sequence and version it made.
    fn apply(&mut self, seq: u64, version: u64, ops: &[Op]) -> Result<(), StoreError> {
        fn put<V: for<'de> Deserialize<'de>>(
            map: &mut BTreeMap<String, V>,
            op: &Op,
        ) -> Result<Option<V>, StoreError> {
            Ok(match &op.value {
                Some(v) => map.insert(op.key.clone(), decode(op.kind, &op.key, v)?),
                None => map.remove(&op.key),
            })
        }
        for op in ops {
            match op.kind {
                Kind::Service => drop(put(&mut self.services, op)?),
                Kind::Group => drop(put(&mut self.groups, op)?),
                Kind::Connector => drop(put(&mut self.connectors, op)?),
                Kind::Token => drop(put(&mut self.tokens, op)?),
                Kind::User => {
                    if let Some(old) = put(&mut self.users, op)? {
                        for id in &old.identities {
                            let k = identity_key(id);
                            if self.identities.get(&k) == Some(&old.name) {
                                self.identities.remove(&k);
                            }
                        }
                    }
                    if let Some(user) = self.users.get(&op.key) {
                        for id in &user.identities {
                            self.identities.insert(identity_key(id), user.name.clone());
                        }
                    }
                }
                Kind::Revoked => {
                    if op.value.is_some() {
                        self.revoked.insert(op.key.clone());
                    } else {
                        self.revoked.remove(&op.key);
                    }
                }
            }
        }
        if ops.iter().any(|op| op.kind.is_config_record()) {
            self.generation += 1;
        }
        self.seq = seq;
        self.version = version;
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: self.version,
            services: self.services.values().cloned().collect(),
            users: self.users.values().cloned().collect(),
            groups: self.groups.values().cloned().collect(),
            revoked: self.revoked.iter().cloned().collect(),
            connectors: self.connectors.values().cloned().collect(),
        }
    }
}

/// What a write does: its records, whether it changes the configuration, and its audit
/// line.
struct Plan {
    ops: Vec<Op>,
    bump: bool,
    action: String,
    target: String,
}

impl Plan {
    fn config(ops: Vec<Op>, action: &str, target: &str) -> Plan {
        Plan {
            ops,
            bump: true,
            action: action.to_owned(),
            target: target.to_owned(),
        }
    }
}

fn put_op<V: Serialize>(kind: Kind, key: &str, v: &V) -> Op {
    Op {
        kind,
        key: key.to_owned(),
        value: Some(json(v)),
    }
}

fn del_op(kind: Kind, key: &str) -> Op {
    Op {
        kind,
        key: key.to_owned(),
        value: None,
    }
}

/// How long a write that lost a race waits for the configuration to catch up, and how
/// often it tries again, before it reports the store busy.
const CATCH_UP: Duration = Duration::from_secs(5);
const MAX_ATTEMPTS: usize = 32;

/// The configuration in memory and what moves it, shared with the task that follows
/// other instances' commits.
struct Shared {
    backend: Arc<dyn Backend>,
    state: Mutex<State>,
    /// The write sequence, published as the state moves.
    seqs: tokio::sync::watch::Sender<u64>,
    /// The config version, published after each acknowledged change.
    versions: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// The state; a panic while it was held (none is known) leaves it to be read again
    /// from the backend rather than trusted.
    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                guard.unsure = true;
                self.state.clear_poison();
                guard
            }
        }
    }

    fn publish(&self, seq: u64, version: u64) {
        self.seqs
            .send_if_modified(|s| std::mem::replace(s, seq) != seq);
        self.versions
            .send_if_modified(|v| std::mem::replace(v, version) != version);
    }

    /// Replaces the state with everything the backend holds.
    async fn reload(&self) -> Result<(), StoreError> {
        let loaded = self.backend.load().await?;
        self.replace(loaded)
    }

    /// Replaces the state with `loaded`, and announces it.
    fn replace(&self, loaded: Loaded) -> Result<(), StoreError> {
        let fresh = State::from_loaded(loaded)?;
        let (seq, version) = (fresh.seq, fresh.version);
        {
            let mut st = self.state();
            // Generations only grow: a reader that saw one must not see it again for
            // other records.
            let generation = st.generation + 1;
            *st = fresh;
            st.generation = generation;
        }
        self.publish(seq, version);
        Ok(())
    }

    /// Applies one update from another instance.
    async fn update(&self, u: Update) -> Result<(), StoreError> {
        match u {
            Update::Commit { seq, version, ops } => {
                let gap = {
                    let mut st = self.state();
                    if seq <= st.seq {
                        return Ok(());
                    }
                    if seq == st.seq + 1 && !st.unsure {
                        if let Err(e) = st.apply(seq, version, &ops) {
                            st.unsure = true;
                            return Err(e);
                        }
                        false
                    } else {
                        true
                    }
                };
                if gap {
                    return self.reload().await;
                }
                self.publish(seq, version);
                Ok(())
            }
            Update::Reset(loaded) => {
                if loaded.seq < self.state().seq {
                    return Ok(());
                }
                self.replace(loaded)
            }
        }
    }
}

/// Follows other instances' commits for as long as the store lives.
async fn follow(shared: std::sync::Weak<Shared>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(s) = shared.upgrade() else { return };
        let from = s.state().seq;
        let stream = s.backend.updates(from).await;
        drop(s);
        let mut rx = match stream {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the store's changes; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        while let Some(u) = rx.recv().await {
            let Some(s) = shared.upgrade() else { return };
            let result = match u {
                Ok(u) => s.update(u).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "lost track of the store's changes; reading it again");
                if let Err(e) = s.reload().await {
                    tracing::warn!(error = %e, "cannot read the store");
                }
                break;
            }
            pause = Duration::from_millis(100);
        }
        tokio::time::sleep(pause).await;
    }
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

/// Announces a committed version to the config stream when dropped: after the backend
/// made it durable, or when the commit's future is dropped while it does.
struct Announce<'a> {
    shared: &'a Shared,
    at: (u64, u64),
}

impl Drop for Announce<'_> {
    fn drop(&mut self) {
        self.shared.publish(self.at.0, self.at.1);
    }
}

/// Marks the state unsure when dropped armed: a commit whose outcome is unknown.
struct Unsure<'a>(Option<&'a Shared>);

impl Drop for Unsure<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            s.state().unsure = true;
        }
    }
}

/// A page of `map` after `cursor` (a key).
fn page_in<V: Clone>(map: &BTreeMap<String, V>, cursor: Option<&str>, limit: usize) -> Page<V> {
    let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
    let entries = map.range::<str, _>((start, Bound::Unbounded));
    page_of(entries.map(|(k, v)| (k.as_str(), v)), limit)
}

/// A page of at most `limit` of `entries` (keys and values, in key order).
fn page_of<'a, V: Clone + 'a>(
    mut entries: impl Iterator<Item = (&'a str, &'a V)>,
    limit: usize,
) -> Page<V> {
    let mut items = Vec::new();
    let mut last = None;
    for (k, v) in entries.by_ref().take(limit) {
        items.push(v.clone());
        last = Some(k);
    }
    let more = entries.next().is_some();
    Page {
        items,
        next: last.filter(|_| more).map(str::to_owned),
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

    /// Reads everything again if a commit's outcome is unknown; the caller holds the
    /// write lock.
    async fn settle(&self) -> Result<(), StoreError> {
        if self.state().unsure {
            self.shared.reload().await?;
        }
        Ok(())
    }

    /// Decides and commits one write: `plan` runs on the configuration in memory, after
    /// the `If-Match` check, and again if another instance's commit landed first.
    /// Returns the config version after the change.
    async fn write(
        &self,
        expect: Option<u64>,
        actor: &Actor,
        plan: impl Fn(&State) -> Result<Plan, StoreError>,
    ) -> Result<u64, StoreError> {
        let _w = self.write.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            self.settle().await?;
            let commit = {
                let st = self.state();
                if let Some(want) = expect {
                    if want != st.version {
                        return Err(StoreError::Stale {
                            current: st.version,
                        });
                    }
                }
                let plan = plan(&st)?;
                let version = st.version + u64::from(plan.bump);
                Commit {
                    expect_seq: st.seq,
                    version,
                    bump: plan.bump,
                    audit: AuditRecord {
                        seq: st.seq + 1,
                        time_ms: now_ms(),
                        actor: actor.clone(),
                        action: plan.action,
                        target: plan.target,
                        version,
                    },
                    ops: plan.ops,
                }
            };
            let mut unsure = Unsure(Some(&self.shared));
            match self.shared.backend.commit(commit.clone()).await {
                Ok(()) => {
                    unsure.0 = None;
                    let (seq, version) = (commit.seq(), commit.version);
                    {
                        let mut st = self.state();
                        if st.seq < seq {
                            if let Err(e) = st.apply(seq, version, &commit.ops) {
                                tracing::warn!(error = %e, "configuration in memory dropped; it is read again");
                                st.unsure = true;
                            }
                        }
                    }
                    // Acknowledged only once durable. The version is announced to the
                    // nodes even if this future is dropped meanwhile (a client that went
                    // away): the change is committed and readable.
                    let announce = Announce {
                        shared: &self.shared,
                        at: (seq, version),
                    };
                    self.shared.backend.sync().await?;
                    drop(announce);
                    return Ok(version);
                }
                Err(BackendError::Moved) => {
                    unsure.0 = None;
                    self.catch_up(commit.expect_seq).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Unavailable(
            "the store is busy with other writers; retry".into(),
        ))
    }

    /// Waits until the configuration in memory is past `seq` (another instance's
    /// commit); when it does not come in time, reads everything again.
    async fn catch_up(&self, seq: u64) {
        if !self.shared.backend.is_shared() {
            // Nothing reports the other writer's commit: read everything again.
            self.state().unsure = true;
            return;
        }
        let mut seqs = self.shared.seqs.subscribe();
        let moved = tokio::time::timeout(CATCH_UP, seqs.wait_for(|s| *s > seq)).await;
        if !matches!(moved, Ok(Ok(_))) {
            self.state().unsure = true;
        }
    }

    // ----- services -----

    /// A service and the config version it is at, from one state: the version names
    /// exactly this record (what an `ETag` needs).
    pub async fn service(&self, name: &str) -> Result<(Service, u64), StoreError> {
        let not_found = || StoreError::NotFound {
            kind: "service",
            name: name.into(),
        };
        let key = service_key(name).map_err(|_| not_found())?;
        self.read_config(|c| c.services.get(&key).cloned().ok_or_else(not_found))
            .await
    }

    /// A page of services after `cursor`, and the config version it is at.
    pub async fn services(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<Service>, u64), StoreError> {
        self.read_config(|c| Ok(page_in(&c.services, cursor, limit)))
            .await
    }

    /// Creates (`create`) or replaces a service. Replacing one that does not exist is
    /// 404; creating one that does is 409.
    pub async fn put_service(
        &self,
        svc: Service,
        create: bool,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        svc.validate().map_err(StoreError::Invalid)?;
        let key = service_key(&svc.name)?;
        self.write(expect, actor, |st| {
            check_presence("service", &svc.name, st.services.contains_key(&key), create)?;
            check_groups_exist(st, &svc.groups)?;
            check_connector_exists(st, svc.connector.as_deref())?;
            let action = if create {
                "service.create"
            } else {
                "service.replace"
            };
            Ok(Plan::config(
                vec![put_op(Kind::Service, &key, &svc)],
                action,
                &key,
            ))
        })
        .await
    }

    pub async fn delete_service(
        &self,
        name: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        let not_found = || StoreError::NotFound {
            kind: "service",
            name: name.into(),
        };
        self.write(expect, actor, |st| {
            let key = service_key(name).map_err(|_| not_found())?;
            if !st.services.contains_key(&key) {
                return Err(not_found());
            }
            Ok(Plan::config(
                vec![del_op(Kind::Service, &key)],
                "service.delete",
                &key,
            ))
        })
        .await
    }

    // ----- users -----

    /// A user and the config version it is at, from one state.
    pub async fn user(&self, name: &str) -> Result<(User, u64), StoreError> {
        self.read_config(|c| {
            c.users
                .get(name)
                .cloned()
                .ok_or_else(|| StoreError::NotFound {
                    kind: "user",
                    name: name.into(),
                })
        })
        .await
    }

    /// A page of users after `cursor`, and the config version it is at.
    pub async fn users(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<User>, u64), StoreError> {
        self.read_config(|c| Ok(page_in(&c.users, cursor, limit)))
            .await
    }

    /// Creates or replaces a user; its identities must not be claimed by another user.
    pub async fn put_user(
        &self,
        user: User,
        create: bool,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        user.validate().map_err(StoreError::Invalid)?;
        self.write(expect, actor, |st| {
            check_presence(
                "user",
                &user.name,
                st.users.contains_key(&user.name),
                create,
            )?;
            check_groups_exist(st, &user.groups)?;
            let conflicts: Vec<FieldError> = user
                .identities
                .iter()
                .enumerate()
                .filter_map(|(k, id)| {
                    let owner = st.identities.get(&identity_key(id))?;
                    (owner != &user.name).then(|| FieldError {
                        field: format!("identities[{k}]"),
                        message: format!("identity {id:?} is already claimed by user {owner:?}"),
                    })
                })
                .collect();
            if !conflicts.is_empty() {
                return Err(StoreError::Conflict {
                    detail: "an identity maps to at most one user".into(),
                    errors: conflicts,
                });
            }
            let action = if create {
                "user.create"
            } else {
                "user.replace"
            };
            Ok(Plan::config(
                vec![put_op(Kind::User, &user.name, &user)],
                action,
                &user.name,
            ))
        })
        .await
    }

    pub async fn delete_user(
        &self,
        name: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        self.write(expect, actor, |st| {
            if !st.users.contains_key(name) {
                return Err(StoreError::NotFound {
                    kind: "user",
                    name: name.into(),
                });
            }
            Ok(Plan::config(
                vec![del_op(Kind::User, name)],
                "user.delete",
                name,
            ))
        })
        .await
    }

    // ----- groups -----

    /// A group and the config version it is at, from one state.
    pub async fn group(&self, name: &str) -> Result<(Group, u64), StoreError> {
        self.read_config(|c| {
            c.groups
                .get(name)
                .cloned()
                .ok_or_else(|| StoreError::NotFound {
                    kind: "group",
                    name: name.into(),
                })
        })
        .await
    }

    /// A page of groups after `cursor`, and the config version it is at.
    pub async fn groups(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<Group>, u64), StoreError> {
        self.read_config(|c| Ok(page_in(&c.groups, cursor, limit)))
            .await
    }

    pub async fn create_group(
        &self,
        group: Group,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        group.validate().map_err(StoreError::Invalid)?;
        self.write(expect, actor, |st| {
            if st.groups.contains_key(&group.name) {
                return Err(StoreError::Exists {
                    kind: "group",
                    name: group.name.clone(),
                });
            }
            Ok(Plan::config(
                vec![put_op(Kind::Group, &group.name, &group)],
                "group.create",
                &group.name,
            ))
        })
        .await
    }

    /// Replaces a group: a group is only its name, so this checks that it exists and
    /// records the change.
    pub async fn replace_group(
        &self,
        group: Group,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        group.validate().map_err(StoreError::Invalid)?;
        self.write(expect, actor, |st| {
            if !st.groups.contains_key(&group.name) {
                return Err(StoreError::NotFound {
                    kind: "group",
                    name: group.name.clone(),
                });
            }
            Ok(Plan::config(
                vec![put_op(Kind::Group, &group.name, &group)],
                "group.replace",
                &group.name,
            ))
        })
        .await
    }

    /// Deletes a group. In use, it is refused unless `cascade`, which removes it from
    /// every user and service naming it, except that a service is never left with no
    /// groups: that would open it to every user, so such a cascade is refused.
    pub async fn delete_group(
        &self,
        name: &str,
        cascade: bool,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        self.write(expect, actor, |st| {
            if !st.groups.contains_key(name) {
                return Err(StoreError::NotFound {
                    kind: "group",
                    name: name.into(),
                });
            }
            let names = |groups: &[String]| groups.iter().any(|g| g == name);
            let services: Vec<(&String, &Service)> = st
                .services
                .iter()
                .filter(|(_, s)| names(&s.groups))
                .collect();
            let users: Vec<&User> = st.users.values().filter(|u| names(&u.groups)).collect();
            let refers = |field: String| FieldError {
                field,
                message: format!("refers to group {name:?}"),
            };
            let in_use = !(services.is_empty() && users.is_empty());
            if in_use && !cascade {
                return Err(StoreError::Conflict {
                    detail: format!(
                        "group {name:?} is in use; remove the references or delete with \
                         cascade=true"
                    ),
                    errors: services
                        .iter()
                        .map(|(k, _)| refers(format!("services/{k}")))
                        .chain(users.iter().map(|u| refers(format!("users/{}", u.name))))
                        .collect(),
                });
            }
            let mut ops = Vec::new();
            let mut widening = Vec::new();
            for (key, svc) in &services {
                let mut svc = (*svc).clone();
                svc.groups.retain(|g| g != name);
                if svc.groups.is_empty() {
                    widening.push(FieldError {
                        field: format!("services/{key}"),
                        message: "would be left with no groups (open to every user); change \
                                  its groups first"
                            .into(),
                    });
                }
                ops.push(put_op(Kind::Service, key, &svc));
            }
            if !widening.is_empty() {
                return Err(StoreError::Conflict {
                    detail: format!("deleting group {name:?} would widen access"),
                    errors: widening,
                });
            }
            for u in &users {
                let mut user = (*u).clone();
                user.groups.retain(|g| g != name);
                ops.push(put_op(Kind::User, &user.name, &user));
            }
            let action = if ops.is_empty() {
                "group.delete"
            } else {
                "group.delete.cascade"
            };
            ops.push(del_op(Kind::Group, name));
            Ok(Plan::config(ops, action, name))
        })
        .await
    }

    // ----- connectors -----

    /// A connector and the config version it is at, from one state.
    pub async fn connector(&self, name: &str) -> Result<(Connector, u64), StoreError> {
        self.read_config(|c| {
            c.connectors
                .get(name)
                .cloned()
                .ok_or_else(|| StoreError::NotFound {
                    kind: "connector",
                    name: name.into(),
                })
        })
        .await
    }

    /// A page of connectors after `cursor`, and the config version it is at.
    pub async fn connectors(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<Connector>, u64), StoreError> {
        self.read_config(|c| Ok(page_in(&c.connectors, cursor, limit)))
            .await
    }

    /// Creates (`create`) or replaces a connector (its description: a connector is its
    /// name). Replacing one that does not exist is 404; creating one that does is 409.
    /// Either is a new config version: the snapshot carries the registry.
    pub async fn put_connector(
        &self,
        connector: Connector,
        create: bool,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        connector.validate().map_err(StoreError::Invalid)?;
        self.write(expect, actor, |st| {
            let exists = st.connectors.contains_key(&connector.name);
            check_presence("connector", &connector.name, exists, create)?;
            let action = if create {
                "connector.create"
            } else {
                "connector.replace"
            };
            Ok(Plan::config(
                vec![put_op(Kind::Connector, &connector.name, &connector)],
                action,
                &connector.name,
            ))
        })
        .await
    }

    /// Deletes a connector. One that a service names is refused (409 naming the
    /// services), and there is no cascade: taking the connector off a service would have
    /// the data planes dial its address themselves, which is for the operator to decide,
    /// service by service.
    pub async fn delete_connector(
        &self,
        name: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        self.write(expect, actor, |st| {
            if !st.connectors.contains_key(name) {
                return Err(StoreError::NotFound {
                    kind: "connector",
                    name: name.into(),
                });
            }
            let errors: Vec<FieldError> = st
                .services
                .iter()
                .filter(|(_, s)| s.connector.as_deref() == Some(name))
                .map(|(key, _)| FieldError {
                    field: format!("services/{key}"),
                    message: format!(
                        "is served through connector {name:?}; remove the service, or change \
                         its connector, first"
                    ),
                })
                .collect();
            if !errors.is_empty() {
                return Err(StoreError::Conflict {
                    detail: format!(
                        "connector {name:?} serves {} service(s); remove them, or change their \
                         connector, first",
                        errors.len()
                    ),
                    errors,
                });
            }
            Ok(Plan::config(
                vec![del_op(Kind::Connector, name)],
                "connector.delete",
                name,
            ))
        })
        .await
    }

    // ----- whole configuration -----

    /// The whole configuration as one snapshot, at one version.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(self.read_config(|c| Ok(c.snapshot())).await?.0)
    }

    /// The configuration at one version, for a reader that last read its services,
    /// users, groups and connectors at generation `seen`: `(snapshot, generation,
    /// whole)`. When the generation has not moved, the snapshot carries only the version
    /// and the revoked serials (`whole` is false) and the reader's services, users, groups
    /// and connectors still hold.
    pub async fn snapshot_since(
        &self,
        seen: Option<u64>,
    ) -> Result<(Snapshot, u64, bool), StoreError> {
        let (answer, _) = self
            .read_config(|c| {
                Ok(if seen == Some(c.generation) {
                    let snap = Snapshot {
                        version: c.version,
                        services: vec![],
                        users: vec![],
                        groups: vec![],
                        revoked: c.revoked.iter().cloned().collect(),
                        connectors: vec![],
                    };
                    (snap, c.generation, false)
                } else {
                    (c.snapshot(), c.generation, true)
                })
            })
            .await?;
        Ok(answer)
    }

    /// Runs `read` on the configuration in memory; returns its answer and the version
    /// that configuration is at, both from one state. Waits for no write, unless the
    /// configuration must be read from the backend again.
    async fn read_config<R>(
        &self,
        read: impl FnOnce(&State) -> Result<R, StoreError>,
    ) -> Result<(R, u64), StoreError> {
        if self.state().unsure {
            let _w = self.write.lock().await;
            self.settle().await?;
        }
        let st = self.state();
        Ok((read(&st)?, st.version))
    }

    /// Replaces the whole configuration with `snap` as one new version (its own
    /// `version` field is ignored: the store assigns the next one).
    pub async fn import(
        &self,
        snap: Snapshot,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        snap.validate().map_err(StoreError::Invalid)?;
        let mut serials = BTreeSet::new();
        for r in &snap.revoked {
            let s = Serial::parse_hex(r).map_err(|e| StoreError::invalid("revoked", e))?;
            serials.insert(s.to_string());
        }
        let mut new: Vec<Op> = Vec::new();
        for g in &snap.groups {
            new.push(put_op(Kind::Group, &g.name, g));
        }
        for c in &snap.connectors {
            new.push(put_op(Kind::Connector, &c.name, c));
        }
        for s in &snap.services {
            new.push(put_op(Kind::Service, &service_key(&s.name)?, s));
        }
        for u in &snap.users {
            new.push(put_op(Kind::User, &u.name, u));
        }
        for s in &serials {
            new.push(Op {
                kind: Kind::Revoked,
                key: s.clone(),
                value: Some(vec![]),
            });
        }
        let target = format!(
            "{} services, {} users, {} groups, {} connectors",
            snap.services.len(),
            snap.users.len(),
            snap.groups.len(),
            snap.connectors.len()
        );
        self.write(expect, actor, |st| {
            // Removals of what the import does not keep, then its records.
            let keep: BTreeSet<(Kind, &str)> =
                new.iter().map(|o| (o.kind, o.key.as_str())).collect();
            let mut ops: Vec<Op> = Vec::new();
            let gone = |kind: Kind, keys: &mut dyn Iterator<Item = &String>, ops: &mut Vec<Op>| {
                for k in keys {
                    if !keep.contains(&(kind, k.as_str())) {
                        ops.push(del_op(kind, k));
                    }
                }
            };
            gone(Kind::Service, &mut st.services.keys(), &mut ops);
            gone(Kind::User, &mut st.users.keys(), &mut ops);
            gone(Kind::Group, &mut st.groups.keys(), &mut ops);
            gone(Kind::Connector, &mut st.connectors.keys(), &mut ops);
            gone(Kind::Revoked, &mut st.revoked.iter(), &mut ops);
            ops.extend(new.iter().cloned());
            Ok(Plan::config(ops, "import", &target))
        })
        .await
    }

    // ----- revoked certificates -----

    /// A page of revoked serials (normalized hex, in order) after `cursor`, and the
    /// config version it is at.
    pub async fn revoked(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<String>, u64), StoreError> {
        self.read_config(|c| {
            let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
            let entries = c.revoked.range::<str, _>((start, Bound::Unbounded));
            Ok(page_of(entries.map(|s| (s.as_str(), s)), limit))
        })
        .await
    }

    /// Revokes certificates by serial (hex, any form operators copy) as one version;
    /// serials already revoked are fine. Returns the version.
    pub async fn revoke(
        &self,
        serials: &[String],
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        let mut parsed = BTreeSet::new();
        let mut errors = Vec::new();
        for (i, s) in serials.iter().enumerate() {
            match Serial::parse_hex(s) {
                Ok(s) => {
                    parsed.insert(s.to_string());
                }
                Err(e) => errors.push(FieldError {
                    field: format!("serials[{i}]"),
                    message: e,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(StoreError::Invalid(Invalid(errors)));
        }
        if parsed.is_empty() {
            return Err(StoreError::invalid(
                "serials",
                "at least one serial is needed",
            ));
        }
        let target = parsed.iter().cloned().collect::<Vec<_>>().join(",");
        self.write(expect, actor, |_| {
            let ops = parsed
                .iter()
                .map(|s| Op {
                    kind: Kind::Revoked,
                    key: s.clone(),
                    value: Some(vec![]),
                })
                .collect();
            Ok(Plan::config(ops, "revoke", &target))
        })
        .await
    }

    /// Lifts a revocation (for mistakes).
    pub async fn unrevoke(
        &self,
        serial: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        let s = Serial::parse_hex(serial)
            .map_err(|e| StoreError::invalid("serial", e))?
            .to_string();
        self.write(expect, actor, |st| {
            if !st.revoked.contains(&s) {
                return Err(StoreError::NotFound {
                    kind: "revoked serial",
                    name: s.clone(),
                });
            }
            Ok(Plan::config(
                vec![del_op(Kind::Revoked, &s)],
                "unrevoke",
                &s,
            ))
        })
        .await
    }

    /// Audits an admin action that changes nothing in the store (the node registry is
    /// kept in memory): no version bump.
    pub async fn record(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
    ) -> Result<(), StoreError> {
        self.write(None, actor, |_| {
            Ok(Plan {
                ops: vec![],
                bump: false,
                action: action.to_owned(),
                target: target.to_owned(),
            })
        })
        .await?;
        Ok(())
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

/// A create needs the name free; a replace needs the record there.
fn check_presence(
    kind: &'static str,
    name: &str,
    exists: bool,
    create: bool,
) -> Result<(), StoreError> {
    match (exists, create) {
        (true, true) => Err(StoreError::Exists {
            kind,
            name: name.to_owned(),
        }),
        (false, false) => Err(StoreError::NotFound {
            kind,
            name: name.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn check_groups_exist(st: &State, groups: &[String]) -> Result<(), StoreError> {
    let errors: Vec<FieldError> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| !st.groups.contains_key(g.as_str()))
        .map(|(k, g)| FieldError {
            field: format!("groups[{k}]"),
            message: format!("unknown group {g:?}"),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Invalid(Invalid(errors)))
    }
}

/// A service may name only a registered connector (400 naming `connector`).
fn check_connector_exists(st: &State, connector: Option<&str>) -> Result<(), StoreError> {
    match connector {
        Some(c) if !st.connectors.contains_key(c) => Err(StoreError::invalid(
            "connector",
            format!("unknown connector {c:?}"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
