//! How a write is made: planned on the configuration in memory, committed by the backend
//! only if no other write landed since, applied, announced, and acknowledged once durable;
//! and how other instances' commits reach the configuration in memory.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;

use super::backend::{Backend, BackendError, Commit, Kind, Loaded, Op, Update};
use super::state::State;
use super::{json, now_ms, Actor, AuditRecord, Store, StoreError};

/// What a write does: its records, whether it changes the configuration, and its audit
/// line.
pub(super) struct Plan {
    pub(super) ops: Vec<Op>,
    pub(super) bump: bool,
    pub(super) action: String,
    pub(super) target: String,
}

impl Plan {
    pub(super) fn config(ops: Vec<Op>, action: &str, target: &str) -> Plan {
        Plan {
            ops,
            bump: true,
            action: action.to_owned(),
            target: target.to_owned(),
        }
    }
}

pub(super) fn put_op<V: Serialize>(kind: Kind, key: &str, v: &V) -> Op {
    Op {
        kind,
        key: key.to_owned(),
        value: Some(json(v)),
    }
}

pub(super) fn del_op(kind: Kind, key: &str) -> Op {
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
pub(super) struct Shared {
    pub(super) backend: std::sync::Arc<dyn Backend>,
    pub(super) state: Mutex<State>,
    /// The write sequence, published as the state moves.
    pub(super) seqs: tokio::sync::watch::Sender<u64>,
    /// The config version, published after each acknowledged change.
    pub(super) versions: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// The state; a panic while it was held (none is known) leaves it to be read again
    /// from the backend rather than trusted.
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
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

    pub(super) fn publish(&self, seq: u64, version: u64) {
        self.seqs
            .send_if_modified(|s| std::mem::replace(s, seq) != seq);
        self.versions
            .send_if_modified(|v| std::mem::replace(v, version) != version);
    }

    /// Replaces the state with everything the backend holds.
    pub(super) async fn reload(&self) -> Result<(), StoreError> {
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
pub(super) async fn follow(shared: std::sync::Weak<Shared>) {
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

impl Store {
    /// Reads everything again if a commit's outcome is unknown; the caller holds the
    /// write lock.
    pub(super) async fn settle(&self) -> Result<(), StoreError> {
        if self.state().unsure {
            self.shared.reload().await?;
        }
        Ok(())
    }

    /// Decides and commits one write: `plan` runs on the configuration in memory, after
    /// the `If-Match` check, and again if another instance's commit landed first.
    /// Returns the config version after the change.
    pub(super) async fn write(
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
            match self.shared.backend.commit(&commit).await {
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
}
