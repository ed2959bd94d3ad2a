//! The store: the system of record, and the only module that touches sled.
//!
//! Every write is checked (each record's rules, referential integrity through the reverse
//! indexes), applied as one sled transaction across trees that also bumps the global
//! config version and appends an audit record, and acknowledged only after sled has
//! flushed it to disk. Writes are serialized by one lock, which also gives readers of the
//! whole configuration (snapshots) a consistent view.
//!
//! Services, users, groups, connectors and revoked serials are also kept in memory with
//! the version they are at, updated under one mutex as each commit applies: a reader of
//! records and their version (the admin API's bodies and `ETag`s) takes both from there,
//! one state, without waiting for writes.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::Mutex;
use ztp_migrations::layout;
use ztp_proto::names::{identity_key, Serial, ServiceName};
use ztp_proto::{Connector, FieldError, Group, Invalid, Service, Snapshot, User};

mod conn_audit;
mod tokens;

pub use conn_audit::{AuditQuery, ConnectionRecord};
pub use tokens::{NewToken, Role, TokenInfo};

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

/// One admin change, as kept in the audit tree.
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
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("store record {key:?} in {tree} is damaged: {reason}")]
    Damaged {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("store I/O failed: {0}")]
    Sled(#[from] sled::Error),
}

impl StoreError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid(Invalid(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }]))
    }
}

/// A file in the store's folder that says the store was set up.
const MARKER: &str = "ZTP-STORE";

/// The trees, in the order of [`T`].
const TREES: [&str; 12] = [
    layout::META,
    layout::SERVICES,
    layout::USERS,
    layout::GROUPS,
    layout::REVOKED,
    layout::TOKENS,
    layout::AUDIT,
    layout::IDENTITIES,
    layout::GROUP_REFS,
    layout::CONN_AUDIT,
    layout::CONNECTORS,
    layout::CONNECTOR_REFS,
];

/// Index of a tree in [`TREES`].
#[derive(Debug, Clone, Copy)]
enum T {
    Meta = 0,
    Services,
    Users,
    Groups,
    Revoked,
    Tokens,
    Audit,
    Identities,
    GroupRefs,
    ConnAudit,
    Connectors,
    ConnectorRefs,
}

/// One write of a transaction: insert (`Some`) or remove (`None`).
type Op = (T, Vec<u8>, Option<Vec<u8>>);

/// A page of a listing.
#[derive(Debug, Clone)]
pub struct Page<V> {
    pub items: Vec<V>,
    /// Cursor of the next page, if there is one.
    pub next: Option<String>,
}

pub struct Store {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    write: Mutex<()>,
    path: PathBuf,
    /// The config version, published after each acknowledged change.
    versions: tokio::sync::watch::Sender<u64>,
    /// Connection records kept and the next sequence number.
    conn_audit: std::sync::Mutex<(u64, u64)>,
    /// Most connection records kept; older ones are dropped.
    conn_audit_cap: std::sync::atomic::AtomicU64,
    /// Moves (under the write lock) with every change to services, users, groups or
    /// connectors: a reader that saw it unchanged needs only the version and the revoked
    /// serials.
    config_gen: std::sync::atomic::AtomicU64,
    /// The configuration in memory with its version, kept in step by every commit
    /// (`None` until first read, or after a commit that could not be applied to it).
    config: std::sync::Mutex<Option<ConfigCache>>,
}

/// Announces a committed version to the config stream when dropped: after the flush, or
/// when the commit's future is dropped during it.
struct Announce<'a> {
    versions: &'a tokio::sync::watch::Sender<u64>,
    version: Option<u64>,
}

impl Drop for Announce<'_> {
    fn drop(&mut self) {
        if let Some(v) = self.version {
            self.versions.send_replace(v);
        }
    }
}

/// The configuration's records by their store keys, in the store's order, and the config
/// version they are at: one state, as a commit left it.
#[derive(Default)]
struct ConfigCache {
    version: u64,
    services: BTreeMap<Vec<u8>, Service>,
    users: BTreeMap<Vec<u8>, User>,
    groups: BTreeMap<Vec<u8>, Group>,
    connectors: BTreeMap<Vec<u8>, Connector>,
    /// Revoked serials, normalized hex.
    revoked: BTreeSet<String>,
}

impl ConfigCache {
    /// Applies a commit's writes, in order, and the version it made.
    fn apply(&mut self, ops: &[Op], version: u64) -> Result<(), StoreError> {
        fn put<V: for<'de> Deserialize<'de>>(
            map: &mut BTreeMap<Vec<u8>, V>,
            t: T,
            k: &[u8],
            v: &Option<Vec<u8>>,
        ) -> Result<(), StoreError> {
            match v {
                Some(v) => {
                    map.insert(k.to_vec(), Store::decode(t, k, v)?);
                }
                None => {
                    map.remove(k);
                }
            }
            Ok(())
        }
        for (t, k, v) in ops {
            match t {
                T::Services => put(&mut self.services, *t, k, v)?,
                T::Users => put(&mut self.users, *t, k, v)?,
                T::Groups => put(&mut self.groups, *t, k, v)?,
                T::Connectors => put(&mut self.connectors, *t, k, v)?,
                T::Revoked => {
                    let serial = String::from_utf8_lossy(k).into_owned();
                    if v.is_some() {
                        self.revoked.insert(serial);
                    } else {
                        self.revoked.remove(&serial);
                    }
                }
                _ => {}
            }
        }
        self.version = version;
        Ok(())
    }
}

/// A page of `map` after `cursor` (a key).
fn page_in<V: Clone>(map: &BTreeMap<Vec<u8>, V>, cursor: Option<&str>, limit: usize) -> Page<V> {
    let start = cursor.map_or(Bound::Unbounded, |c| Bound::Excluded(c.as_bytes()));
    let entries = map.range::<[u8], _>((start, Bound::Unbounded));
    page_of(entries.map(|(k, v)| (k.as_slice(), v)), limit)
}

/// A page of at most `limit` of `entries` (keys and values, in key order).
fn page_of<'a, V: Clone + 'a>(
    mut entries: impl Iterator<Item = (&'a [u8], &'a V)>,
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
        next: last
            .filter(|_| more)
            .map(|k| String::from_utf8_lossy(k).into_owned()),
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
    /// Opens (or creates) the store in `dir` and brings its schema up to date. A
    /// damaged store, or one of a newer schema, is refused with a message, never
    /// half-read and never a panic.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.to_owned(),
            reason,
        };
        // sled 0.34 can panic on a damaged file instead of returning an error.
        let opened = std::panic::catch_unwind(AssertUnwindSafe(|| {
            sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .open()
        }));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(open_err(
                    "another process (a running ztp-control?) holds this store's lock".into(),
                ))
            }
            Ok(Err(e)) => return Err(open_err(e.to_string())),
            Err(_) => {
                return Err(open_err(
                    "the store is damaged (sled panicked reading it)".into(),
                ))
            }
        };
        // sled treats unreadable log segments as the end of the log, so a damaged store
        // can open as an empty one. The marker, written once the store was first set up,
        // tells an empty store from a lost one.
        let marker = dir.join(MARKER);
        if marker.exists() {
            match ztp_migrations::schema_version(&db) {
                Ok(v) if v > 0 => {}
                Ok(_) => {
                    return Err(open_err(format!(
                        "the store is damaged: {} says it was set up, but it holds no schema; \
                         restore it from a backup",
                        marker.display()
                    )))
                }
                Err(e) => return Err(open_err(e.to_string())),
            }
        }
        let applied = std::panic::catch_unwind(AssertUnwindSafe(|| ztp_migrations::run(&db)));
        match applied {
            Ok(Ok(a)) if a.from != a.to => {
                tracing::info!(from = a.from, to = a.to, "store schema upgraded")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(open_err(e.to_string())),
            Err(_) => {
                return Err(open_err(
                    "the store is damaged (sled panicked reading it)".into(),
                ))
            }
        }
        if !marker.exists() {
            std::fs::write(&marker, b"ztp control-plane store\n")
                .map_err(|e| open_err(format!("cannot write {}: {e}", marker.display())))?;
        }
        let trees = TREES
            .iter()
            .map(|t| db.open_tree(t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut store = Store {
            db,
            trees,
            write: Mutex::new(()),
            path: dir.to_owned(),
            versions: tokio::sync::watch::Sender::new(0),
            conn_audit: std::sync::Mutex::new((0, 0)),
            conn_audit_cap: std::sync::atomic::AtomicU64::new(conn_audit::DEFAULT_CAP),
            config_gen: std::sync::atomic::AtomicU64::new(0),
            config: std::sync::Mutex::new(None),
        };
        store.init_conn_audit()?;
        store.versions = tokio::sync::watch::Sender::new(store.version()?);
        // Read every record once: a damaged record is found now, not on a request.
        store.snapshot_unlocked()?;
        Ok(store)
    }

    /// The config version now and after every acknowledged change.
    pub fn watch_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tree(&self, t: T) -> &sled::Tree {
        &self.trees[t as usize]
    }

    fn meta_u64(&self, key: &[u8]) -> Result<u64, StoreError> {
        Ok(self
            .tree(T::Meta)
            .get(key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// The current config version.
    pub fn version(&self) -> Result<u64, StoreError> {
        self.meta_u64(layout::CONFIG_VERSION)
    }

    fn decode<V: for<'de> Deserialize<'de>>(
        tree: T,
        key: &[u8],
        v: &[u8],
    ) -> Result<V, StoreError> {
        serde_json::from_slice(v).map_err(|e| StoreError::Damaged {
            tree: TREES[tree as usize],
            key: String::from_utf8_lossy(key).into_owned(),
            reason: e.to_string(),
        })
    }

    fn get<V: for<'de> Deserialize<'de>>(&self, t: T, key: &str) -> Result<Option<V>, StoreError> {
        match self.tree(t).get(key)? {
            None => Ok(None),
            Some(v) => Self::decode(t, key.as_bytes(), &v).map(Some),
        }
    }

    fn list<V: for<'de> Deserialize<'de>>(
        &self,
        t: T,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<V>, StoreError> {
        self.page(t, cursor, limit, |k, v| Self::decode(t, k, v))
    }

    /// A page of `t` after `cursor` (a key), each entry made by `item`.
    fn page<V>(
        &self,
        t: T,
        cursor: Option<&str>,
        limit: usize,
        item: impl Fn(&[u8], &[u8]) -> Result<V, StoreError>,
    ) -> Result<Page<V>, StoreError> {
        let start = match cursor {
            Some(c) => Bound::Excluded(c.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut last = None;
        let mut iter = self.tree(t).range::<Vec<u8>, _>((start, Bound::Unbounded));
        for kv in iter.by_ref().take(limit) {
            let (k, v) = kv?;
            items.push(item(&k, &v)?);
            last = Some(String::from_utf8_lossy(&k).into_owned());
        }
        let more = iter.next().is_some();
        Ok(Page {
            items,
            next: if more { last } else { None },
        })
    }

    /// Applies `ops` atomically with a version bump (when `bump`) and an audit record,
    /// then flushes. Returns the config version after the change. The caller holds the
    /// write lock. `expect` (an `If-Match`) is checked against the version inside the
    /// same transaction: a write never lands on a version it did not expect.
    async fn commit(
        &self,
        ops: Vec<Op>,
        bump: bool,
        expect: Option<u64>,
        actor: &Actor,
        action: &str,
        target: &str,
    ) -> Result<u64, StoreError> {
        let time_ms = now_ms();
        let result = self.trees.as_slice().transaction(|tx| {
            let meta = &tx[T::Meta as usize];
            let read = |k: &[u8]| -> Result<u64, ConflictableTransactionError<u64>> {
                Ok(meta
                    .get(k)?
                    .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                    .map_or(0, u64::from_be_bytes))
            };
            let mut version = read(layout::CONFIG_VERSION)?;
            if expect.is_some_and(|want| want != version) {
                return Err(ConflictableTransactionError::Abort(version));
            }
            if bump {
                version += 1;
                meta.insert(layout::CONFIG_VERSION, &version.to_be_bytes())?;
            }
            for (t, k, v) in &ops {
                match v {
                    Some(v) => tx[*t as usize].insert(k.as_slice(), v.as_slice())?,
                    None => tx[*t as usize].remove(k.as_slice())?,
                };
            }
            let seq = read(layout::AUDIT_SEQ)? + 1;
            meta.insert(layout::AUDIT_SEQ, &seq.to_be_bytes())?;
            let record = AuditRecord {
                seq,
                time_ms,
                actor: actor.clone(),
                action: action.to_owned(),
                target: target.to_owned(),
                version,
            };
            tx[T::Audit as usize].insert(&seq.to_be_bytes(), json(&record))?;
            Ok(version)
        });
        let version = match result {
            Ok(v) => v,
            Err(TransactionError::Storage(e)) => {
                // Whatever sled kept, the copy in memory is read again from it.
                *self.config_cache() = None;
                return Err(e.into());
            }
            Err(TransactionError::Abort(current)) => return Err(StoreError::Stale { current }),
        };
        if ops
            .iter()
            .any(|(t, _, _)| matches!(t, T::Services | T::Users | T::Groups | T::Connectors))
        {
            self.config_gen
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        {
            // Records and version move together: a reader sees this commit whole or not
            // at all.
            let mut cache = self.config_cache();
            if let Some(c) = cache.as_mut() {
                if let Err(e) = c.apply(&ops, version) {
                    tracing::warn!(error = %e, "configuration cache dropped; it is read again");
                    *cache = None;
                }
            }
        }
        // Acknowledged only once it is on disk. The version is announced to the nodes
        // even if this future is dropped while flushing (a client that went away): the
        // change is committed and readable, and sled flushes it in the background.
        let announce = Announce {
            versions: &self.versions,
            version: bump.then_some(version),
        };
        self.db.flush_async().await?;
        drop(announce);
        Ok(version)
    }

    /// Refuses a stale `expect` before any work, and before other refusals; [`commit`]
    /// checks it again inside the write's transaction.
    ///
    /// [`commit`]: Store::commit
    fn check_expected(&self, expect: Option<u64>) -> Result<(), StoreError> {
        if let Some(want) = expect {
            let current = self.version()?;
            if current != want {
                return Err(StoreError::Stale { current });
            }
        }
        Ok(())
    }

    fn check_groups_exist(&self, groups: &[String]) -> Result<(), StoreError> {
        let errors: Vec<FieldError> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !matches!(self.tree(T::Groups).contains_key(g.as_str()), Ok(true)))
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
    fn check_connector_exists(&self, connector: Option<&str>) -> Result<(), StoreError> {
        match connector {
            Some(c) if !self.tree(T::Connectors).contains_key(c)? => Err(StoreError::invalid(
                "connector",
                format!("unknown connector {c:?}"),
            )),
            _ => Ok(()),
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
        self.read_config(|c| {
            c.services
                .get(key.as_bytes())
                .cloned()
                .ok_or_else(not_found)
        })
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

    /// A service as sled holds it, for a write (which holds the write lock).
    fn get_service(&self, name: &str) -> Result<Service, StoreError> {
        let key = service_key(name).map_err(|_| StoreError::NotFound {
            kind: "service",
            name: name.into(),
        })?;
        self.get(T::Services, &key)?
            .ok_or_else(|| StoreError::NotFound {
                kind: "service",
                name: name.into(),
            })
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        let old: Option<Service> = self.get(T::Services, &key)?;
        check_presence("service", &svc.name, old.is_some(), create)?;
        self.check_groups_exist(&svc.groups)?;
        self.check_connector_exists(svc.connector.as_deref())?;
        let mut ops: Vec<Op> = Vec::new();
        if let Some(old) = &old {
            ops.extend(service_index_ops(old, &key, false));
        }
        ops.extend(service_index_ops(&svc, &key, true));
        ops.push((T::Services, key.clone().into_bytes(), Some(json(&svc))));
        let action = if create {
            "service.create"
        } else {
            "service.replace"
        };
        self.commit(ops, true, expect, actor, action, &key).await
    }

    pub async fn delete_service(
        &self,
        name: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        let old = self.get_service(name)?;
        let key = service_key(&old.name)?;
        let mut ops = service_index_ops(&old, &key, false);
        ops.push((T::Services, key.clone().into_bytes(), None));
        self.commit(ops, true, expect, actor, "service.delete", &key)
            .await
    }

    // ----- users -----

    /// A user and the config version it is at, from one state.
    pub async fn user(&self, name: &str) -> Result<(User, u64), StoreError> {
        self.read_config(|c| {
            c.users
                .get(name.as_bytes())
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

    /// A user as sled holds it, for a write (which holds the write lock).
    fn get_user(&self, name: &str) -> Result<User, StoreError> {
        self.get(T::Users, name)?
            .ok_or_else(|| StoreError::NotFound {
                kind: "user",
                name: name.into(),
            })
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        let old: Option<User> = self.get(T::Users, &user.name)?;
        check_presence("user", &user.name, old.is_some(), create)?;
        self.check_groups_exist(&user.groups)?;
        let mut conflicts = Vec::new();
        for (k, id) in user.identities.iter().enumerate() {
            if let Some(owner) = self.tree(T::Identities).get(identity_key(id))? {
                if owner.as_ref() != user.name.as_bytes() {
                    conflicts.push(FieldError {
                        field: format!("identities[{k}]"),
                        message: format!(
                            "identity {id:?} is already claimed by user {:?}",
                            String::from_utf8_lossy(&owner)
                        ),
                    });
                }
            }
        }
        if !conflicts.is_empty() {
            return Err(StoreError::Conflict {
                detail: "an identity maps to at most one user".into(),
                errors: conflicts,
            });
        }
        let mut ops = Vec::new();
        if let Some(old) = &old {
            ops.extend(user_index_ops(old, false));
        }
        ops.extend(user_index_ops(&user, true));
        ops.push((T::Users, user.name.clone().into_bytes(), Some(json(&user))));
        let action = if create {
            "user.create"
        } else {
            "user.replace"
        };
        self.commit(ops, true, expect, actor, action, &user.name)
            .await
    }

    pub async fn delete_user(
        &self,
        name: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        let old = self.get_user(name)?;
        let mut ops = user_index_ops(&old, false);
        ops.push((T::Users, name.as_bytes().to_vec(), None));
        self.commit(ops, true, expect, actor, "user.delete", name)
            .await
    }

    // ----- groups -----

    /// A group and the config version it is at, from one state.
    pub async fn group(&self, name: &str) -> Result<(Group, u64), StoreError> {
        self.read_config(|c| {
            c.groups
                .get(name.as_bytes())
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

    /// A group as sled holds it, for a write (which holds the write lock).
    fn get_group(&self, name: &str) -> Result<Group, StoreError> {
        self.get(T::Groups, name)?
            .ok_or_else(|| StoreError::NotFound {
                kind: "group",
                name: name.into(),
            })
    }

    pub async fn create_group(
        &self,
        group: Group,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        group.validate().map_err(StoreError::Invalid)?;
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        if self.tree(T::Groups).contains_key(&group.name)? {
            return Err(StoreError::Exists {
                kind: "group",
                name: group.name,
            });
        }
        let ops = vec![(
            T::Groups,
            group.name.clone().into_bytes(),
            Some(json(&group)),
        )];
        self.commit(ops, true, expect, actor, "group.create", &group.name)
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        self.get_group(&group.name)?;
        let ops = vec![(
            T::Groups,
            group.name.clone().into_bytes(),
            Some(json(&group)),
        )];
        self.commit(ops, true, expect, actor, "group.replace", &group.name)
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        self.get_group(name)?;
        let mut referrers: Vec<(u8, String)> = Vec::new();
        for kv in self
            .tree(T::GroupRefs)
            .scan_prefix(layout::group_ref_prefix(name))
        {
            let (k, _) = kv?;
            let rest = &k[name.len() + 1..];
            if rest.len() >= 2 {
                referrers.push((rest[0], String::from_utf8_lossy(&rest[2..]).into_owned()));
            }
        }
        let describe = |(kind, n): &(u8, String)| FieldError {
            field: if *kind == layout::REF_SERVICE {
                format!("services/{n}")
            } else {
                format!("users/{n}")
            },
            message: format!("refers to group {name:?}"),
        };
        if !referrers.is_empty() && !cascade {
            return Err(StoreError::Conflict {
                detail: format!(
                    "group {name:?} is in use; remove the references or delete with cascade=true"
                ),
                errors: referrers.iter().map(describe).collect(),
            });
        }
        let mut ops: Vec<Op> = Vec::new();
        let mut widening = Vec::new();
        for (kind, n) in &referrers {
            ops.push((T::GroupRefs, layout::group_ref(name, *kind, n), None));
            if *kind == layout::REF_SERVICE {
                let mut svc: Service =
                    self.get(T::Services, n)?
                        .ok_or_else(|| StoreError::Damaged {
                            tree: layout::GROUP_REFS,
                            key: n.clone(),
                            reason: "refers to a missing service".into(),
                        })?;
                svc.groups.retain(|g| g != name);
                if svc.groups.is_empty() {
                    widening.push(FieldError {
                        field: format!("services/{n}"),
                        message: "would be left with no groups (open to every user); change its groups first"
                            .into(),
                    });
                }
                ops.push((T::Services, n.clone().into_bytes(), Some(json(&svc))));
            } else {
                let mut user: User = self.get(T::Users, n)?.ok_or_else(|| StoreError::Damaged {
                    tree: layout::GROUP_REFS,
                    key: n.clone(),
                    reason: "refers to a missing user".into(),
                })?;
                user.groups.retain(|g| g != name);
                ops.push((T::Users, n.clone().into_bytes(), Some(json(&user))));
            }
        }
        if !widening.is_empty() {
            return Err(StoreError::Conflict {
                detail: format!("deleting group {name:?} would widen access"),
                errors: widening,
            });
        }
        ops.push((T::Groups, name.as_bytes().to_vec(), None));
        let action = if cascade && !referrers.is_empty() {
            "group.delete.cascade"
        } else {
            "group.delete"
        };
        self.commit(ops, true, expect, actor, action, name).await
    }

    // ----- connectors -----

    /// A connector and the config version it is at, from one state.
    pub async fn connector(&self, name: &str) -> Result<(Connector, u64), StoreError> {
        self.read_config(|c| {
            c.connectors
                .get(name.as_bytes())
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        let exists = self.tree(T::Connectors).contains_key(&connector.name)?;
        check_presence("connector", &connector.name, exists, create)?;
        let ops = vec![(
            T::Connectors,
            connector.name.clone().into_bytes(),
            Some(json(&connector)),
        )];
        let action = if create {
            "connector.create"
        } else {
            "connector.replace"
        };
        self.commit(ops, true, expect, actor, action, &connector.name)
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        if !self.tree(T::Connectors).contains_key(name)? {
            return Err(StoreError::NotFound {
                kind: "connector",
                name: name.into(),
            });
        }
        let prefix = layout::connector_ref_prefix(name);
        let mut errors = Vec::new();
        for kv in self.tree(T::ConnectorRefs).scan_prefix(&prefix) {
            let (k, _) = kv?;
            let service = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            errors.push(FieldError {
                field: format!("services/{service}"),
                message: format!(
                    "is served through connector {name:?}; remove the service, or change its \
                     connector, first"
                ),
            });
        }
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
        let ops: Vec<Op> = vec![(T::Connectors, name.as_bytes().to_vec(), None)];
        self.commit(ops, true, expect, actor, "connector.delete", name)
            .await
    }

    // ----- whole configuration -----

    /// The whole configuration as one snapshot, at one version.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let _w = self.write.lock().await;
        self.snapshot_unlocked()
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
        let _w = self.write.lock().await;
        let generation = self.config_gen.load(std::sync::atomic::Ordering::SeqCst);
        if seen == Some(generation) {
            let snap = Snapshot {
                version: self.version()?,
                services: vec![],
                users: vec![],
                groups: vec![],
                revoked: self.revoked_unlocked()?,
                connectors: vec![],
            };
            return Ok((snap, generation, false));
        }
        Ok((self.snapshot_unlocked()?, generation, true))
    }

    fn revoked_unlocked(&self) -> Result<Vec<String>, StoreError> {
        self.tree(T::Revoked)
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    /// The whole configuration; the caller holds the write lock (or opens the store).
    fn snapshot_unlocked(&self) -> Result<Snapshot, StoreError> {
        let mut cache = self.config_cache();
        let c = self.filled(&mut cache)?;
        Ok(Snapshot {
            version: c.version,
            services: c.services.values().cloned().collect(),
            users: c.users.values().cloned().collect(),
            groups: c.groups.values().cloned().collect(),
            revoked: c.revoked.iter().cloned().collect(),
            connectors: c.connectors.values().cloned().collect(),
        })
    }

    /// The configuration in memory, read from sled first if it is not there; the caller
    /// holds the write lock (or opens the store), so that no commit is under way.
    fn filled<'a>(
        &self,
        cache: &'a mut Option<ConfigCache>,
    ) -> Result<&'a ConfigCache, StoreError> {
        let c = match cache.take() {
            Some(c) => c,
            None => self.config_from_disk()?,
        };
        Ok(cache.insert(c))
    }

    /// Runs `read` on the configuration in memory; returns its answer and the version
    /// that configuration is at, both from one state (a commit updates them together).
    /// Waits for no write, unless the configuration must be read from sled again.
    async fn read_config<R>(
        &self,
        read: impl FnOnce(&ConfigCache) -> Result<R, StoreError>,
    ) -> Result<(R, u64), StoreError> {
        {
            let cache = self.config_cache();
            if let Some(c) = cache.as_ref() {
                return Ok((read(c)?, c.version));
            }
        }
        // Dropped after a commit that could not be applied to it: read it again from
        // sled, with no commit under way.
        let _w = self.write.lock().await;
        let mut cache = self.config_cache();
        let c = self.filled(&mut cache)?;
        Ok((read(c)?, c.version))
    }

    /// The in-memory configuration; a panic while it was held (none is known) leaves it
    /// to be read again from sled rather than trusted.
    fn config_cache(&self) -> std::sync::MutexGuard<'_, Option<ConfigCache>> {
        match self.config.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                *guard = None;
                self.config.clear_poison();
                guard
            }
        }
    }

    /// The configuration as sled holds it; the caller holds the write lock (or opens the
    /// store), so that it is one version's.
    fn config_from_disk(&self) -> Result<ConfigCache, StoreError> {
        fn all<V: for<'de> Deserialize<'de>>(
            store: &Store,
            t: T,
        ) -> Result<BTreeMap<Vec<u8>, V>, StoreError> {
            store
                .tree(t)
                .iter()
                .map(|kv| {
                    let (k, v) = kv?;
                    Ok((k.to_vec(), Store::decode(t, &k, &v)?))
                })
                .collect()
        }
        Ok(ConfigCache {
            version: self.version()?,
            services: all(self, T::Services)?,
            users: all(self, T::Users)?,
            groups: all(self, T::Groups)?,
            connectors: all(self, T::Connectors)?,
            revoked: self.revoked_unlocked()?.into_iter().collect(),
        })
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        let mut ops: Vec<Op> = Vec::new();
        for t in [
            T::Services,
            T::Users,
            T::Groups,
            T::Revoked,
            T::Identities,
            T::GroupRefs,
            T::Connectors,
            T::ConnectorRefs,
        ] {
            for k in self.tree(t).iter().keys() {
                ops.push((t, k?.to_vec(), None));
            }
        }
        // Later inserts of the same key win over the removals above.
        for g in &snap.groups {
            ops.push((T::Groups, g.name.clone().into_bytes(), Some(json(g))));
        }
        for c in &snap.connectors {
            ops.push((T::Connectors, c.name.clone().into_bytes(), Some(json(c))));
        }
        for s in &snap.services {
            let key = service_key(&s.name)?;
            ops.extend(service_index_ops(s, &key, true));
            ops.push((T::Services, key.into_bytes(), Some(json(s))));
        }
        for u in &snap.users {
            ops.extend(user_index_ops(u, true));
            ops.push((T::Users, u.name.clone().into_bytes(), Some(json(u))));
        }
        let mut serials = BTreeSet::new();
        for r in &snap.revoked {
            let s = Serial::parse_hex(r).map_err(|e| StoreError::invalid("revoked", e))?;
            serials.insert(s.to_string());
        }
        for s in serials {
            ops.push((T::Revoked, s.into_bytes(), Some(vec![])));
        }
        let target = format!(
            "{} services, {} users, {} groups, {} connectors",
            snap.services.len(),
            snap.users.len(),
            snap.groups.len(),
            snap.connectors.len()
        );
        self.commit(ops, true, expect, actor, "import", &target)
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
            Ok(page_of(entries.map(|s| (s.as_bytes(), s)), limit))
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        let target = parsed.iter().cloned().collect::<Vec<_>>().join(",");
        let ops: Vec<Op> = parsed
            .into_iter()
            .map(|s| (T::Revoked, s.into_bytes(), Some(vec![])))
            .collect();
        self.commit(ops, true, expect, actor, "revoke", &target)
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
        let _w = self.write.lock().await;
        self.check_expected(expect)?;
        if !self.tree(T::Revoked).contains_key(&s)? {
            return Err(StoreError::NotFound {
                kind: "revoked serial",
                name: s,
            });
        }
        let ops: Vec<Op> = vec![(T::Revoked, s.clone().into_bytes(), None)];
        self.commit(ops, true, expect, actor, "unrevoke", &s).await
    }

    /// Audits an admin action that changes nothing in the store (the node registry is
    /// kept in memory): no version bump.
    pub async fn record(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
    ) -> Result<(), StoreError> {
        let _w = self.write.lock().await;
        self.commit(vec![], false, None, actor, action, target)
            .await?;
        Ok(())
    }

    /// The newest admin audit records, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.tree(T::Audit)
            .iter()
            .rev()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Self::decode(T::Audit, &k, &v)
            })
            .collect()
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

/// Index entries of a service stored under `key`: its group references and its
/// connector's.
fn service_index_ops(svc: &Service, key: &str, insert: bool) -> Vec<Op> {
    let mut ops: Vec<Op> = svc
        .groups
        .iter()
        .map(|g| {
            (
                T::GroupRefs,
                layout::group_ref(g, layout::REF_SERVICE, key),
                insert.then(Vec::new),
            )
        })
        .collect();
    if let Some(c) = &svc.connector {
        ops.push((
            T::ConnectorRefs,
            layout::connector_ref(c, key),
            insert.then(Vec::new),
        ));
    }
    ops
}

/// Index entries of a user: identities → name, and group references.
fn user_index_ops(user: &User, insert: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    for id in &user.identities {
        let v = insert.then(|| user.name.clone().into_bytes());
        ops.push((T::Identities, identity_key(id).into_bytes(), v));
    }
    for g in &user.groups {
        ops.push((
            T::GroupRefs,
            layout::group_ref(g, layout::REF_USER, &user.name),
            insert.then(Vec::new),
        ));
    }
    ops
}

#[cfg(test)]
mod tests;
