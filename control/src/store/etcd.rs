//! The shared backend: etcd, for any number of `ztp-control` instances.
//!
//! Every key is under the prefix (`--etcd-prefix`, default `/ztp/`):
//!
//! - `meta/seq`, `meta/version`: the write sequence and the config version (decimal),
//!   ZTP's own counters, not etcd's revision (other users of the cluster move that).
//! - `rec/<kind>/<key>`: one record per key, its JSON (kinds as [`Kind::as_str`]).
//! - `audit/<seq, 20 digits>`: the admin audit.
//! - `conn/<end ms, 20 digits>/<instance>/<n, 20 digits>`: the connection audit, in etcd
//!   so that every instance answers the same query; written in batches, capped by the
//!   retention (a query never returns more; the instance holding the chores lease trims).
//! - `meta/pending` and `staged/<id>/<n>`: a commit too large for one etcd transaction
//!   (128 operations, 1.5 MiB): its writes are staged first, the commit point is one
//!   transaction that moves the counters and names the staged writes in `meta/pending`,
//!   and the records are then written in batches ("rolled forward", by whichever
//!   instance gets there) before `meta/pending` goes. No commit lands while one is
//!   pending, and a reader applies a pending commit's staged writes over the records.
//! - `chores`: held under a lease by the one instance that trims and compacts.
//!
//! A commit is one transaction that compares `meta/seq` with the sequence the writer read
//! and `meta/pending` with nothing; committed in etcd is durable. Other instances' commits
//! arrive through a watch from the revision the configuration was read at; a watch
//! resumed below etcd's compaction reads everything again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::backend::{
    Backend, BackendError, BoxFuture, Commit, Kind, Loaded, Op, Update, UpdateStream,
};
use super::conn_audit::{self, AuditQuery, ConnectionRecord};
use super::{json, AuditRecord};
use crate::etcd::{
    self as client, prefix_end, Compare, CompareOp, Etcd, EtcdError, Range, Txn, WatchOptions,
};

/// Operations a commit may carry in the transaction that makes it (the rest of etcd's
/// 128 go to the counters, the audit record and the guards).
const MAX_DIRECT_OPS: usize = 120;
/// Bytes a transaction may carry, well under etcd's 1.5 MiB request limit.
const MAX_TXN_BYTES: usize = 1024 * 1024;
/// How often the chores run on the instance holding the lease, and the lease's life.
const CHORES_EVERY: Duration = Duration::from_secs(5);
const CHORES_TTL: i64 = 10;
/// Revisions of history kept when compacting (watches resume within them).
const HISTORY: i64 = 10_000;

/// Where to find etcd and the prefix to keep everything under.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub client: client::EtcdConfig,
    pub prefix: String,
}

/// The keys under the prefix and what reads and writes them; shared with the task that
/// follows other instances' commits.
struct Space {
    etcd: Etcd,
    prefix: String,
}

pub struct EtcdBackend {
    space: Arc<Space>,
    etcd: Etcd,
    prefix: String,
    location: String,
    instance: String,
    conn_cap: Arc<AtomicU64>,
    /// Connection records waiting to be written, with who waits for them.
    conn_tx: mpsc::Sender<ConnBatch>,
    /// The write sequence and etcd revision of the last full read, for the watch that
    /// follows it (taken once: a later follower reads again).
    last_load: std::sync::Mutex<Option<(u64, i64)>>,
    /// This instance's lease for what lives only while it does (its nodes), and what it
    /// published under it.
    presence: tokio::sync::Mutex<Presence>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How long an instance's published nodes outlive it.
const PRESENCE_TTL: i64 = 10;

#[derive(Default)]
struct Presence {
    lease: Option<client::KeepAlive>,
    /// Node id → the JSON published for it.
    published: BTreeMap<String, Vec<u8>>,
}

/// Connection records to write, and who waits for them.
type ConnBatch = (Vec<ConnectionRecord>, oneshot::Sender<Result<(), String>>);

/// A commit's writes waiting in `staged/`, named by `meta/pending`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    id: String,
    seq: u64,
    chunks: u32,
}

/// One staged write.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StagedOp {
    kind: String,
    key: String,
    value: Option<String>,
}

fn kind_of(name: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.as_str() == name)
}

impl From<EtcdError> for BackendError {
    fn from(e: EtcdError) -> Self {
        match e {
            EtcdError::Unavailable(m) | EtcdError::Indeterminate(m) => {
                BackendError::Unavailable(format!("etcd: {m}"))
            }
            other => BackendError::Io(other.to_string()),
        }
    }
}

fn random_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn parse_u64(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl Space {
    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }

    fn rec_key(&self, kind: Kind, key: &str) -> Vec<u8> {
        self.key(&format!("rec/{}/{key}", kind.as_str()))
    }

    fn audit_key(&self, seq: u64) -> Vec<u8> {
        self.key(&format!("audit/{seq:020}"))
    }

    /// Everything, at one revision: the counters, the records, and a pending commit's
    /// staged writes applied over them.
    async fn load_at(&self) -> Result<(Loaded, i64), BackendError> {
        let rec = self.key("rec/");
        let staged = self.key("staged/");
        let txn = Txn::new().and_then([
            client::Op::range(Range::prefix(self.key("meta/"))),
            client::Op::range(Range::prefix(rec.clone())),
            client::Op::range(Range::prefix(staged)),
        ]);
        let result = self.etcd.txn(txn).await?;
        let mut ranges = result.responses.into_iter().filter_map(|r| match r {
            client::OpResponse::Range(r) => Some(r),
            _ => None,
        });
        let (meta, records, staged) = match (ranges.next(), ranges.next(), ranges.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => {
                return Err(BackendError::Io(
                    "etcd answered a load without its ranges".into(),
                ))
            }
        };
        let mut loaded = Loaded::default();
        let mut pending = None;
        for kv in &meta.kvs {
            match &kv.key[self.prefix.len()..] {
                b"meta/seq" => loaded.seq = parse_u64(&kv.value),
                b"meta/version" => loaded.version = parse_u64(&kv.value),
                b"meta/pending" => {
                    pending = Some(serde_json::from_slice::<Pending>(&kv.value).map_err(|e| {
                        BackendError::Damaged {
                            collection: "meta",
                            key: "pending".into(),
                            reason: e.to_string(),
                        }
                    })?)
                }
                _ => {}
            }
        }
        let mut map: BTreeMap<(Kind, String), Vec<u8>> = BTreeMap::new();
        for kv in records.kvs {
            let rest = String::from_utf8_lossy(&kv.key[rec.len()..]).into_owned();
            let Some((kind, key)) = rest.split_once('/') else {
                continue;
            };
            let Some(kind) = kind_of(kind) else { continue };
            map.insert((kind, key.to_owned()), kv.value);
        }
        if let Some(p) = pending {
            for op in self.staged_ops(&p, &staged.kvs)? {
                match op.value {
                    Some(v) => map.insert((op.kind, op.key), v),
                    None => map.remove(&(op.kind, op.key)),
                };
            }
        }
        loaded.records = map.into_iter().map(|((k, key), v)| (k, key, v)).collect();
        Ok((loaded, result.revision))
    }

    /// A pending commit's writes, from its staged chunks (read with the load).
    fn staged_ops(&self, p: &Pending, kvs: &[client::Kv]) -> Result<Vec<Op>, BackendError> {
        let dir = self.key(&format!("staged/{}/", p.id));
        let damaged = |reason: String| BackendError::Damaged {
            collection: "staged",
            key: p.id.clone(),
            reason,
        };
        let mut chunks: Vec<&client::Kv> =
            kvs.iter().filter(|kv| kv.key.starts_with(&dir)).collect();
        chunks.sort_by(|a, b| a.key.cmp(&b.key));
        if chunks.len() != p.chunks as usize {
            return Err(damaged(format!(
                "{} of {} staged chunks found",
                chunks.len(),
                p.chunks
            )));
        }
        let mut ops = Vec::new();
        for kv in chunks {
            let staged: Vec<StagedOp> =
                serde_json::from_slice(&kv.value).map_err(|e| damaged(e.to_string()))?;
            for s in staged {
                let kind = kind_of(&s.kind).ok_or_else(|| damaged(format!("kind {:?}", s.kind)))?;
                ops.push(Op {
                    kind,
                    key: s.key,
                    value: s.value.map(String::into_bytes),
                });
            }
        }
        Ok(ops)
    }

    /// The guards of every commit: the sequence it was decided at, and no commit pending.
    fn guards(&self, expect_seq: u64) -> Vec<Compare> {
        let seq = self.key("meta/seq");
        vec![
            if expect_seq == 0 {
                Compare::absent(seq)
            } else {
                Compare::value(seq, CompareOp::Equal, expect_seq.to_string())
            },
            Compare::absent(self.key("meta/pending")),
        ]
    }

    fn counter_ops(&self, c: &Commit) -> Vec<client::Op> {
        let mut ops = vec![
            client::Op::put(self.key("meta/seq"), c.seq().to_string()),
            client::Op::put(self.audit_key(c.seq()), json(&c.audit)),
        ];
        if c.bump {
            ops.push(client::Op::put(
                self.key("meta/version"),
                c.version.to_string(),
            ));
        }
        ops
    }

    fn record_op(&self, op: &Op) -> client::Op {
        let key = self.rec_key(op.kind, &op.key);
        match &op.value {
            Some(v) => client::Op::put(key, v.clone()),
            None => client::Op::delete(key),
        }
    }

    async fn commit_now(&self, c: &Commit) -> Result<(), BackendError> {
        let size: usize = c
            .ops
            .iter()
            .map(|o| o.key.len() + o.value.as_ref().map_or(0, Vec::len) + 64)
            .sum();
        let direct = c.ops.len() <= MAX_DIRECT_OPS && size <= MAX_TXN_BYTES;
        // A commit pending from another writer is finished first, then this one decided
        // on (a few rounds at most: only one commit is pending at a time).
        for _ in 0..8 {
            let mut ops = self.counter_ops(c);
            let staged = if direct {
                ops.extend(c.ops.iter().map(|o| self.record_op(o)));
                None
            } else {
                let p = self.stage(c).await?;
                ops.push(client::Op::put(self.key("meta/pending"), json(&p)));
                Some(p)
            };
            let txn = Txn::new()
                .when(self.guards(c.expect_seq))
                .and_then(ops)
                .or_else([
                    client::Op::range(Range::key(self.key("meta/seq"))),
                    client::Op::range(Range::key(self.key("meta/pending"))),
                ]);
            let result = match self.etcd.txn(txn).await {
                Ok(r) => r,
                Err(EtcdError::Indeterminate(m)) => {
                    // The answer was lost (a member that lost its leader, a timeout). Once
                    // a linearizable read is served again (by a leader that has committed
                    // in its term, so whatever it holds of this commit is applied), the
                    // audit record under the new sequence tells: this commit landed,
                    // another did, or none did and it is sent again.
                    tracing::debug!(reason = %m, "a commit's answer was lost; finding out");
                    match self.etcd.get(self.audit_key(c.seq())).await? {
                        Some((v, _)) if v == json(&c.audit) => {
                            if let Some(p) = staged {
                                self.roll_forward(&p).await?;
                            }
                            return Ok(());
                        }
                        Some(_) => return Err(BackendError::Moved),
                        None => {
                            if let Some(p) = &staged {
                                self.drop_staged(p).await;
                            }
                            continue;
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            };
            if result.succeeded {
                if let Some(p) = staged {
                    self.roll_forward(&p).await?;
                }
                return Ok(());
            }
            if let Some(p) = &staged {
                self.drop_staged(p).await;
            }
            let mut seq_now = 0;
            let mut pending = None;
            for (i, r) in result.responses.into_iter().enumerate() {
                if let client::OpResponse::Range(r) = r {
                    if let Some(kv) = r.kvs.into_iter().next() {
                        if i == 0 {
                            seq_now = parse_u64(&kv.value);
                        } else {
                            pending = serde_json::from_slice::<Pending>(&kv.value).ok();
                        }
                    }
                }
            }
            if seq_now != c.expect_seq {
                return Err(BackendError::Moved);
            }
            match pending {
                Some(p) => self.roll_forward(&p).await?,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        Err(BackendError::Unavailable(
            "etcd: a large commit of another instance is still being written".into(),
        ))
    }

    /// Removes the staged writes of a commit that did not land.
    async fn drop_staged(&self, p: &Pending) {
        let dir = self.key(&format!("staged/{}/", p.id));
        let _ = self.etcd.delete_range(dir.clone(), prefix_end(&dir)).await;
    }

    /// Writes a large commit's records to `staged/`, in chunks that fit a request.
    async fn stage(&self, c: &Commit) -> Result<Pending, BackendError> {
        let id = format!("{}-{}", c.seq(), random_id());
        let mut chunks: Vec<Vec<StagedOp>> = vec![Vec::new()];
        let mut size = 0;
        for op in &c.ops {
            let s = StagedOp {
                kind: op.kind.as_str().into(),
                key: op.key.clone(),
                value: op
                    .value
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
            };
            let n = s.key.len() + s.value.as_ref().map_or(0, String::len) + 48;
            if size + n > MAX_TXN_BYTES && !chunks.last().is_some_and(Vec::is_empty) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += n;
            if let Some(last) = chunks.last_mut() {
                last.push(s);
            }
        }
        for (i, chunk) in chunks.iter().enumerate() {
            self.etcd
                .put(self.key(&format!("staged/{id}/{i:06}")), json(chunk))
                .await?;
        }
        Ok(Pending {
            id,
            seq: c.seq(),
            chunks: chunks.len() as u32,
        })
    }

    /// Writes a pending commit's records, then clears it; each step only while it is
    /// still the pending one (a slower instance finishing the same commit writes nothing
    /// once it is done).
    async fn roll_forward(&self, p: &Pending) -> Result<(), BackendError> {
        let dir = self.key(&format!("staged/{}/", p.id));
        let staged = self.etcd.range(Range::prefix(dir.clone())).await?;
        let ops = self.staged_ops(p, &staged.kvs)?;
        let still = || Compare::value(self.key("meta/pending"), CompareOp::Equal, json(p));
        let mut batch: Vec<client::Op> = Vec::new();
        let mut size = 0;
        for op in &ops {
            let n = op.key.len() + op.value.as_ref().map_or(0, Vec::len) + 64;
            if batch.len() >= MAX_DIRECT_OPS || size + n > MAX_TXN_BYTES {
                let txn = Txn::new()
                    .when([still()])
                    .and_then(std::mem::take(&mut batch))
                    .resend_if_unknown();
                if !self.etcd.txn(txn).await?.succeeded {
                    return Ok(());
                }
                size = 0;
            }
            size += n;
            batch.push(self.record_op(op));
        }
        batch.push(client::Op::delete(self.key("meta/pending")));
        let txn = Txn::new()
            .when([still()])
            .and_then(batch)
            .resend_if_unknown();
        self.etcd.txn(txn).await?;
        let _ = self.etcd.delete_range(dir.clone(), prefix_end(&dir)).await;
        Ok(())
    }

    /// Follows commits from `revision` on, sending them to `tx`, until `tx` closes.
    async fn follow(
        self: Arc<Self>,
        mut revision: i64,
        tx: mpsc::Sender<Result<Update, BackendError>>,
    ) {
        let start = self.key("meta/");
        let end = prefix_end(&self.key("rec/"));
        loop {
            let watch = self
                .etcd
                .watch(
                    start.clone(),
                    WatchOptions {
                        range_end: end.clone(),
                        start_revision: revision + 1,
                        prev_kv: false,
                        progress_notify: true,
                    },
                )
                .await;
            let mut watcher = match watch {
                Ok(w) => w,
                Err(e) => {
                    if tx.is_closed() {
                        return;
                    }
                    tracing::warn!(error = %e, "cannot watch etcd; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let batch = tokio::select! {
                    b = watcher.next() => b,
                    _ = tx.closed() => return,
                };
                let batch = match batch {
                    Ok(b) => b,
                    Err(EtcdError::Compacted { compact_revision }) => {
                        // Resumed below the compaction: read everything again.
                        tracing::info!(
                            from = revision + 1,
                            compacted = compact_revision,
                            "etcd's history was compacted past this instance's watch; reading \
                             everything again"
                        );
                        match self.load_at().await {
                            Ok((loaded, rev)) => {
                                revision = rev;
                                if tx.send(Ok(Update::Reset(loaded))).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read etcd after a compaction");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd watch broken; resuming");
                        break;
                    }
                };
                // Events by revision: a revision that moves `meta/seq` is a commit.
                let mut by_rev: BTreeMap<i64, Vec<client::Event>> = BTreeMap::new();
                for e in batch.events {
                    by_rev.entry(e.kv.mod_revision).or_default().push(e);
                }
                for (rev, events) in by_rev {
                    revision = rev;
                    match self.commit_of(&events, rev).await {
                        Ok(Some(u)) => {
                            if tx.send(Ok(u)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            if tx.send(Err(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The commit one revision's events make, if they make one.
    async fn commit_of(
        &self,
        events: &[client::Event],
        rev: i64,
    ) -> Result<Option<Update>, BackendError> {
        let seq_key = self.key("meta/seq");
        let Some(seq) = events
            .iter()
            .find(|e| e.kv.key == seq_key && e.kind == client::EventKind::Put)
            .map(|e| parse_u64(&e.kv.value))
        else {
            return Ok(None);
        };
        let version_key = self.key("meta/version");
        let pending_key = self.key("meta/pending");
        let rec = self.key("rec/");
        let mut version = None;
        let mut ops = Vec::new();
        for e in events {
            if e.kv.key == version_key {
                version = Some(parse_u64(&e.kv.value));
            } else if e.kv.key == pending_key && e.kind == client::EventKind::Put {
                let p: Pending =
                    serde_json::from_slice(&e.kv.value).map_err(|err| BackendError::Damaged {
                        collection: "meta",
                        key: "pending".into(),
                        reason: err.to_string(),
                    })?;
                let dir = self.key(&format!("staged/{}/", p.id));
                let staged = self.etcd.range(Range::prefix(dir).revision(rev)).await?;
                ops.extend(self.staged_ops(&p, &staged.kvs)?);
            } else if e.kv.key.starts_with(&rec) {
                let rest = String::from_utf8_lossy(&e.kv.key[rec.len()..]).into_owned();
                if let Some((kind, key)) = rest.split_once('/') {
                    if let Some(kind) = kind_of(kind) {
                        ops.push(Op {
                            kind,
                            key: key.to_owned(),
                            value: (e.kind == client::EventKind::Put).then(|| e.kv.value.clone()),
                        });
                    }
                }
            }
        }
        let version = match version {
            Some(v) => v,
            None => match self.etcd.range(Range::key(version_key).revision(rev)).await {
                Ok(r) => r.kvs.first().map_or(0, |kv| parse_u64(&kv.value)),
                Err(e) => return Err(e.into()),
            },
        };
        Ok(Some(Update::Commit { seq, version, ops }))
    }
}

impl EtcdBackend {
    /// Connects (the endpoints are tried as requests need them) and checks that etcd
    /// answers.
    pub async fn connect(opts: EtcdOptions) -> Result<EtcdBackend, BackendError> {
        let mut prefix = opts.prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let location = format!("etcd {} under {prefix}", opts.client.endpoints.join(","));
        let etcd = Etcd::connect(opts.client)
            .await
            .map_err(|e| BackendError::Open {
                location: location.clone(),
                reason: e.to_string(),
            })?;
        etcd.get(format!("{prefix}meta/seq"))
            .await
            .map_err(|e| BackendError::Open {
                location: location.clone(),
                reason: e.to_string(),
            })?;
        let conn_cap = Arc::new(AtomicU64::new(conn_audit::DEFAULT_CAP));
        let (conn_tx, conn_rx) = mpsc::channel(1024);
        let instance = random_id();
        let mut backend = EtcdBackend {
            space: Arc::new(Space {
                etcd: etcd.clone(),
                prefix: prefix.clone(),
            }),
            etcd,
            prefix,
            location,
            instance,
            conn_cap,
            conn_tx,
            presence: Default::default(),
            last_load: Default::default(),
            tasks: Vec::new(),
        };
        let writer = ConnWriter {
            etcd: backend.etcd.clone(),
            prefix: backend.prefix.clone(),
            instance: backend.instance.clone(),
            cap: backend.conn_cap.clone(),
        };
        backend.tasks.push(tokio::spawn(writer.run(conn_rx)));
        let chores = Chores {
            etcd: backend.etcd.clone(),
            prefix: backend.prefix.clone(),
            instance: backend.instance.clone(),
            cap: backend.conn_cap.clone(),
        };
        backend.tasks.push(tokio::spawn(chores.run()));
        Ok(backend)
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        self.space.key(rest)
    }
}

/// Writes connection records in batches (one transaction per batch), trimming to the
/// retention.
struct ConnWriter {
    etcd: Etcd,
    prefix: String,
    instance: String,
    cap: Arc<AtomicU64>,
}

impl ConnWriter {
    async fn run(self, mut rx: mpsc::Receiver<ConnBatch>) {
        let mut n: u64 = 0;
        // Counting the records walks etcd's index: at most once a second (a query never
        // returns more than the retention meanwhile).
        let mut trimmed: Option<tokio::time::Instant> = None;
        while let Some(first) = rx.recv().await {
            let mut waiting = vec![first];
            while waiting.iter().map(|w| w.0.len()).sum::<usize>() < MAX_DIRECT_OPS {
                match rx.try_recv() {
                    Ok(more) => waiting.push(more),
                    Err(_) => break,
                }
            }
            let mut ops = Vec::new();
            for (records, _) in &waiting {
                for r in records {
                    n += 1;
                    let key = format!(
                        "{}conn/{:020}/{}/{n:020}",
                        self.prefix, r.time_ms, self.instance
                    );
                    ops.push(client::Op::put(key, json(r)));
                }
            }
            let mut result = Ok(());
            for chunk in ops.chunks(MAX_DIRECT_OPS) {
                if let Err(e) = self.etcd.txn(Txn::new().and_then(chunk.to_vec())).await {
                    result = Err(e.to_string());
                    break;
                }
            }
            let due = trimmed.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if result.is_ok() && due {
                trimmed = Some(tokio::time::Instant::now());
                if let Err(e) =
                    trim(&self.etcd, &self.prefix, self.cap.load(Ordering::Relaxed)).await
                {
                    tracing::warn!(error = %e, "cannot trim the connection audit");
                }
            }
            for (_, done) in waiting {
                let _ = done.send(result.clone());
            }
        }
    }
}

/// Drops the oldest connection records beyond `cap`.
async fn trim(etcd: &Etcd, prefix: &str, cap: u64) -> Result<(), EtcdError> {
    let dir = format!("{prefix}conn/").into_bytes();
    let count = etcd
        .range(Range::prefix(dir.clone()).count_only())
        .await?
        .count as u64;
    if count <= cap {
        return Ok(());
    }
    let excess = (count - cap) as i64;
    let oldest = etcd
        .range(Range::prefix(dir.clone()).keys_only().limit(excess))
        .await?;
    if let Some(last) = oldest.kvs.last() {
        let mut end = last.key.clone();
        end.push(0);
        etcd.delete_range(dir, end).await?;
    }
    Ok(())
}

/// The chores one instance does at a time: trimming the connection audit, compacting
/// etcd's history under ZTP's own pace.
struct Chores {
    etcd: Etcd,
    prefix: String,
    instance: String,
    cap: Arc<AtomicU64>,
}

impl Chores {
    async fn run(self) {
        let key = format!("{}chores", self.prefix).into_bytes();
        loop {
            tokio::time::sleep(CHORES_EVERY).await;
            let Ok(lease) = self.etcd.grant(CHORES_TTL).await else {
                continue;
            };
            let took = Txn::new().when([Compare::absent(key.clone())]).and_then([
                client::Op::put_with_lease(key.clone(), self.instance.clone(), lease),
            ]);
            let held = matches!(self.etcd.txn(took).await, Ok(r) if r.succeeded);
            if !held {
                let _ = self.etcd.revoke(lease).await;
                continue;
            }
            let Ok(mut alive) = self.etcd.keep_alive(lease).await else {
                continue;
            };
            tracing::info!(instance = %self.instance, "this instance does the store's chores");
            loop {
                tokio::select! {
                    _ = alive.lost() => break,
                    _ = tokio::time::sleep(CHORES_EVERY) => {}
                }
                if let Err(e) =
                    trim(&self.etcd, &self.prefix, self.cap.load(Ordering::Relaxed)).await
                {
                    tracing::warn!(error = %e, "cannot trim the connection audit");
                }
                if let Ok(r) = self.etcd.range(Range::key(key.clone()).count_only()).await {
                    if r.revision > HISTORY {
                        if let Err(e) = self.etcd.compact(r.revision - HISTORY).await {
                            tracing::debug!(error = %e, "compaction");
                        }
                    }
                }
            }
        }
    }
}

impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, BackendError>> {
        Box::pin(async move {
            let (loaded, revision) = self.space.load_at().await?;
            *self.last_load.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((loaded.seq, revision));
            Ok(loaded)
        })
    }

    fn commit<'a>(&'a self, commit: &'a Commit) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.space.commit_now(commit))
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        // Committed in etcd is durable (a quorum has it).
        Box::pin(async { Ok(()) })
    }

    fn updates(&self, seq: u64) -> BoxFuture<'_, Result<UpdateStream, BackendError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(256);
            // Right after the full read the store was made from, the watch starts where
            // that read was; otherwise everything is read again.
            let last = self
                .last_load
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let revision = match last {
                Some((at, revision)) if at == seq => revision,
                _ => {
                    let (loaded, revision) = self.space.load_at().await?;
                    if loaded.seq != seq {
                        let _ = tx.send(Ok(Update::Reset(loaded))).await;
                    }
                    revision
                }
            };
            tokio::spawn(self.space.clone().follow(revision, tx));
            Ok(rx)
        })
    }

    fn audit(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AuditRecord>, BackendError>> {
        Box::pin(async move {
            let r = self
                .etcd
                .range(
                    Range::prefix(self.key("audit/"))
                        .descending()
                        .limit(limit as i64),
                )
                .await?;
            r.kvs
                .iter()
                .map(|kv| {
                    serde_json::from_slice(&kv.value).map_err(|e| BackendError::Damaged {
                        collection: "audit",
                        key: String::from_utf8_lossy(&kv.key).into_owned(),
                        reason: e.to_string(),
                    })
                })
                .collect()
        })
    }

    fn append_connections(
        &self,
        records: Vec<ConnectionRecord>,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            self.conn_tx
                .send((records, done))
                .await
                .map_err(|_| BackendError::Io("the connection audit writer stopped".into()))?;
            match wait.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(BackendError::Unavailable(e)),
                Err(_) => Err(BackendError::Io(
                    "the connection audit writer stopped".into(),
                )),
            }
        })
    }

    fn query_connections(
        &self,
        q: AuditQuery,
    ) -> BoxFuture<'_, Result<Vec<ConnectionRecord>, BackendError>> {
        Box::pin(async move {
            let dir = self.key("conn/");
            let lo = [
                dir.clone(),
                format!("{:020}", q.since_ms.unwrap_or(0)).into_bytes(),
            ]
            .concat();
            let hi = match q.until_ms {
                Some(u) => [dir.clone(), format!("{:020}/\u{ff}", u).into_bytes()].concat(),
                None => prefix_end(&dir),
            };
            let cap = self.conn_cap.load(Ordering::Relaxed) as usize;
            let scan = conn_audit::MAX_SCAN.min(cap);
            let mut out = Vec::new();
            let mut end = hi;
            let mut seen = 0usize;
            // Newest first, a page at a time, looking at no more than the retention (a
            // trim may lag the writes) nor MAX_SCAN records.
            while seen < scan && out.len() < q.limit {
                let page = (scan - seen).min(1000) as i64;
                let r = self
                    .etcd
                    .range(
                        Range::between(lo.clone(), end.clone())
                            .descending()
                            .limit(page),
                    )
                    .await?;
                for kv in &r.kvs {
                    seen += 1;
                    let rec: ConnectionRecord =
                        serde_json::from_slice(&kv.value).map_err(|e| BackendError::Damaged {
                            collection: "conn",
                            key: String::from_utf8_lossy(&kv.key).into_owned(),
                            reason: e.to_string(),
                        })?;
                    if q.matches(&rec) {
                        out.push(rec);
                        if out.len() >= q.limit {
                            break;
                        }
                    }
                    if seen >= scan {
                        break;
                    }
                }
                match r.kvs.last() {
                    Some(kv) if r.more => end = kv.key.clone(),
                    _ => break,
                }
            }
            Ok(out)
        })
    }

    fn set_conn_audit_cap(&self, cap: u64) {
        self.conn_cap.store(cap.max(1), Ordering::Relaxed);
    }

    fn publish_nodes(
        &self,
        nodes: Vec<(String, Vec<u8>)>,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let mut presence = self.presence.lock().await;
            let lease = match presence.lease.as_ref().filter(|l| l.is_alive()) {
                Some(l) => l.id(),
                None => {
                    // A new lease (the first, or the old one expired with its keys):
                    // everything is published again under it.
                    let id = self.etcd.grant(PRESENCE_TTL).await?;
                    presence.lease = Some(self.etcd.keep_alive(id).await?);
                    presence.published.clear();
                    id
                }
            };
            let dir = format!("nodes/{}/", self.instance);
            let wanted: BTreeMap<String, Vec<u8>> = nodes.into_iter().collect();
            let mut ops = Vec::new();
            for (id, json) in &wanted {
                if presence.published.get(id) != Some(json) {
                    ops.push(client::Op::put_with_lease(
                        self.key(&format!("{dir}{id}")),
                        json.clone(),
                        lease,
                    ));
                }
            }
            for id in presence.published.keys() {
                if !wanted.contains_key(id) {
                    ops.push(client::Op::delete(self.key(&format!("{dir}{id}"))));
                }
            }
            for chunk in ops.chunks(MAX_DIRECT_OPS) {
                self.etcd.txn(Txn::new().and_then(chunk.to_vec())).await?;
            }
            presence.published = wanted;
            Ok(())
        })
    }

    fn cluster_nodes(&self) -> BoxFuture<'_, Result<Vec<Vec<u8>>, BackendError>> {
        Box::pin(async move {
            let own = self.key(&format!("nodes/{}/", self.instance));
            let r = self.etcd.range(Range::prefix(self.key("nodes/"))).await?;
            Ok(r.kvs
                .into_iter()
                .filter(|kv| !kv.key.starts_with(&own))
                .map(|kv| kv.value)
                .collect())
        })
    }
}
