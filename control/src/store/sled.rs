//! The embedded backend: sled in `--data-dir`, for one `ztp-control` process.
//!
//! A commit is one sled transaction across the record trees, the meta tree (the config
//! version and the write sequence) and the admin audit tree; [`Backend::sync`] flushes it
//! (sled keeps writes in memory until then). The connection audit is its own tree with a
//! bounded retention, written in batches and flushed by sled's periodic flush.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use ztp_migrations::layout;

use super::backend::{Backend, BackendError, BoxFuture, Commit, Kind, Loaded, UpdateStream};
use super::conn_audit::{self, AuditQuery, ConnectionRecord};
use super::{json, AuditRecord};

/// A file in the store's folder that says the store was set up.
const MARKER: &str = "ZTP-STORE";

/// The trees a commit writes: meta, audit, then one per [`Kind`] in [`Kind::ALL`] order.
const META: usize = 0;
const AUDIT: usize = 1;

fn tree_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => layout::SERVICES,
        Kind::User => layout::USERS,
        Kind::Group => layout::GROUPS,
        Kind::Connector => layout::CONNECTORS,
        Kind::Revoked => layout::REVOKED,
        Kind::Token => layout::TOKENS,
    }
}

fn kind_index(kind: Kind) -> usize {
    2 + Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl From<sled::Error> for BackendError {
    fn from(e: sled::Error) -> Self {
        BackendError::Io(e.to_string())
    }
}

pub struct SledBackend {
    db: sled::Db,
    /// meta, audit, then the record trees.
    trees: Vec<sled::Tree>,
    conn: sled::Tree,
    path: PathBuf,
    /// Connection records kept and the next sequence number.
    conn_state: Mutex<(u64, u64)>,
    /// Most connection records kept; older ones are dropped.
    conn_cap: AtomicU64,
}

impl SledBackend {
    /// Opens (or creates) the store in `dir` and brings its schema up to date. A
    /// damaged store, or one of a newer schema, is refused with a message, never
    /// half-read and never a panic.
    pub fn open(dir: &Path) -> Result<SledBackend, BackendError> {
        let open_err = |reason: String| BackendError::Open {
            location: dir.display().to_string(),
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
        let mut trees = vec![db.open_tree(layout::META)?, db.open_tree(layout::AUDIT)?];
        for kind in Kind::ALL {
            trees.push(db.open_tree(tree_name(kind))?);
        }
        let conn = db.open_tree(layout::CONN_AUDIT)?;
        let backend = SledBackend {
            db,
            trees,
            conn,
            path: dir.to_owned(),
            conn_state: Mutex::new((0, 0)),
            conn_cap: AtomicU64::new(conn_audit::DEFAULT_CAP),
        };
        backend.init_conn_audit()?;
        Ok(backend)
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta_u64(&self, key: &[u8]) -> Result<u64, BackendError> {
        Ok(self.trees[META]
            .get(key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    pub(super) fn load_now(&self) -> Result<Loaded, BackendError> {
        let mut records = Vec::new();
        for kind in Kind::ALL {
            for kv in self.trees[kind_index(kind)].iter() {
                let (k, v) = kv?;
                records.push((kind, String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
            }
        }
        Ok(Loaded {
            seq: self.meta_u64(layout::AUDIT_SEQ)?,
            version: self.meta_u64(layout::CONFIG_VERSION)?,
            records,
        })
    }

    fn commit_now(&self, c: &Commit) -> Result<(), BackendError> {
        let result = self.trees.as_slice().transaction(|tx| {
            let meta = &tx[META];
            let seq = meta
                .get(layout::AUDIT_SEQ)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes);
            if seq != c.expect_seq {
                return Err(ConflictableTransactionError::Abort(()));
            }
            if c.bump {
                meta.insert(layout::CONFIG_VERSION, &c.version.to_be_bytes())?;
            }
            for op in &c.ops {
                let t = &tx[kind_index(op.kind)];
                match &op.value {
                    Some(v) => t.insert(op.key.as_bytes(), v.as_slice())?,
                    None => t.remove(op.key.as_bytes())?,
                };
            }
            let seq = c.seq();
            meta.insert(layout::AUDIT_SEQ, &seq.to_be_bytes())?;
            tx[AUDIT].insert(&seq.to_be_bytes(), json(&c.audit))?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(BackendError::Moved),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn init_conn_audit(&self) -> Result<(), BackendError> {
        let count = self.conn.len() as u64;
        let next = match self.conn.last()? {
            Some((k, _)) if k.len() == 16 => {
                u64::from_be_bytes(k[8..].try_into().unwrap_or([0; 8])) + 1
            }
            _ => 0,
        };
        *self.conn_state.lock().unwrap_or_else(|p| p.into_inner()) = (count, next);
        Ok(())
    }

    /// Appends records, dropping the oldest beyond the retention, in one atomic batch: a
    /// query never sees more records than the retention.
    fn append_now(&self, records: &[ConnectionRecord]) -> Result<(), BackendError> {
        let mut state = self.conn_state.lock().unwrap_or_else(|p| p.into_inner());
        let mut new: Vec<([u8; 16], Vec<u8>)> = records
            .iter()
            .map(|r| {
                let k = conn_key(r.time_ms, state.1);
                state.1 += 1;
                (k, json(r))
            })
            .collect();
        new.sort_by_key(|a| a.0);
        let total = state.0 + new.len() as u64;
        let excess = total.saturating_sub(self.conn_cap.load(Ordering::Relaxed)) as usize;
        // The `excess` oldest keys, from the stored ones and the new ones (a data plane's
        // clock may be behind): stored ones are removed, new ones never written.
        let mut stored = self.conn.iter().keys();
        let mut next_stored = stored.next().transpose()?;
        let (mut old_gone, mut new_gone) = (Vec::new(), 0usize);
        while old_gone.len() + new_gone < excess {
            match (&next_stored, new.get(new_gone)) {
                (Some(o), Some((n, _))) if n.as_slice() < o.as_ref() => new_gone += 1,
                (Some(o), _) => {
                    old_gone.push(o.clone());
                    next_stored = stored.next().transpose()?;
                }
                (None, Some(_)) => new_gone += 1,
                (None, None) => break,
            }
        }
        let mut batch = sled::Batch::default();
        for (k, v) in new.into_iter().skip(new_gone) {
            batch.insert(&k, v);
        }
        for k in &old_gone {
            batch.remove(k);
        }
        self.conn.apply_batch(batch)?;
        state.0 = total - (old_gone.len() + new_gone) as u64;
        Ok(())
    }

    fn audit_now(&self, limit: usize) -> Result<Vec<AuditRecord>, BackendError> {
        self.trees[AUDIT]
            .iter()
            .rev()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|e| BackendError::Damaged {
                    collection: layout::AUDIT,
                    key: show_key(&k),
                    reason: e.to_string(),
                })
            })
            .collect()
    }
}

fn show_key(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn conn_key(time_ms: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&time_ms.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Runs sled work off the async workers.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, BackendError> + Send + 'static,
) -> Result<R, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Io(format!("store task failed: {e}")))?
}

impl Backend for SledBackend {
    fn name(&self) -> &'static str {
        "sled"
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, BackendError>> {
        Box::pin(async move { self.load_now() })
    }

    fn commit<'a>(&'a self, commit: &'a Commit) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { self.commit_now(commit) })
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.db.flush_async().await?;
            Ok(())
        })
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn updates(&self, _seq: u64) -> BoxFuture<'_, Result<UpdateStream, BackendError>> {
        // Only this process writes a sled store: nothing to report.
        Box::pin(async move { Ok(tokio::sync::mpsc::channel(1).1) })
    }

    fn audit(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, BackendError>> {
        Box::pin(async move { self.audit_now(limit) })
    }

    fn append_connections(
        &self,
        records: Vec<ConnectionRecord>,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.append_now(&records) })
    }

    fn query_connections(
        &self,
        q: AuditQuery,
    ) -> BoxFuture<'_, Result<Vec<ConnectionRecord>, BackendError>> {
        let tree = self.conn.clone();
        // A query may scan up to MAX_SCAN records: off the async workers.
        Box::pin(blocking(move || query(&tree, &q)))
    }

    fn set_conn_audit_cap(&self, cap: u64) {
        self.conn_cap.store(cap.max(1), Ordering::Relaxed);
    }

    fn publish_nodes(
        &self,
        _nodes: Vec<(String, Vec<u8>)>,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        // One process: its own registry is the whole list.
        Box::pin(async { Ok(()) })
    }

    fn cluster_nodes(&self) -> BoxFuture<'_, Result<Vec<Vec<u8>>, BackendError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// Connection records matching `q`, newest first, looking at no more than
/// [`conn_audit::MAX_SCAN`].
fn query(tree: &sled::Tree, q: &AuditQuery) -> Result<Vec<ConnectionRecord>, BackendError> {
    let lo = conn_key(q.since_ms.unwrap_or(0), 0);
    let hi = conn_key(q.until_ms.unwrap_or(u64::MAX), u64::MAX);
    let mut out = Vec::new();
    for kv in tree.range(lo..=hi).rev().take(conn_audit::MAX_SCAN) {
        let (k, v) = kv?;
        let r: ConnectionRecord =
            serde_json::from_slice(&v).map_err(|e| BackendError::Damaged {
                collection: layout::CONN_AUDIT,
                key: show_key(&k),
                reason: e.to_string(),
            })?;
        if q.matches(&r) {
            out.push(r);
            if out.len() >= q.limit {
                break;
            }
        }
    }
    Ok(out)
}
