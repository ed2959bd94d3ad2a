//! The configuration and the tokens in memory, as the backend holds them at one write
//! sequence, and how a commit's writes apply to them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;

use serde::Deserialize;
use ztp_proto::digest::{Digest, Record};
use ztp_proto::names::{identity_key, Serial};
use ztp_proto::{Connector, Group, Service, Snapshot, User};

use super::backend::{BackendError, Kind, Loaded, Op};
use super::{Page, StoreError, TokenInfo};

/// The configuration and the tokens as a backend holds them, at one write sequence.
#[derive(Default)]
pub(super) struct State {
    /// The write sequence: moved by every commit.
    pub(super) seq: u64,
    /// The config version: moved by every commit that changes the configuration.
    pub(super) version: u64,
    /// Moves with every change to services, users, groups or connectors: a reader that
    /// saw it unchanged needs only the version and the revoked serials.
    pub(super) generation: u64,
    pub(super) services: BTreeMap<String, Service>,
    pub(super) users: BTreeMap<String, User>,
    pub(super) groups: BTreeMap<String, Group>,
    pub(super) connectors: BTreeMap<String, Connector>,
    /// Revoked serials, normalized hex.
    pub(super) revoked: BTreeSet<String>,
    pub(super) tokens: BTreeMap<String, TokenInfo>,
    /// Identity key → the user that claims it.
    pub(super) identities: HashMap<String, String>,
    /// The digest of the configuration's records (services, users, groups, connectors,
    /// revoked serials), kept up to date by every write: what a node's ack is compared
    /// with.
    pub(super) digest: Digest,
    /// A commit's outcome is unknown (the backend failed mid-write, or the writer went
    /// away during it): read everything again before it is trusted.
    pub(super) unsure: bool,
    /// What the latest versions changed, oldest first, without a gap: each the commit
    /// that made it (its own and other instances' alike). Empty after a full read: then
    /// nothing before the current version can be told.
    pub(super) log: VecDeque<Change>,
    /// The operations the log holds, bounded by [`LOG_OPS`].
    log_ops: usize,
}

/// What one config version changed from the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub version: u64,
    pub previous_version: u64,
    /// The records written (`Some`, the JSON) or removed, in order: services, users,
    /// groups, connectors and revoked serials (tokens are not configuration).
    pub ops: Vec<Op>,
    /// The digest of the configuration at `version`.
    pub digest: Digest,
}

/// Versions the change log keeps at most, and operations (an import of 100,000 users is
/// one version of 100,000 operations: it alone may fill the log).
pub(super) const LOG_VERSIONS: usize = 4096;
pub(super) const LOG_OPS: usize = 200_000;

fn decode<V: for<'de> Deserialize<'de>>(kind: Kind, key: &str, v: &[u8]) -> Result<V, StoreError> {
    serde_json::from_slice(v).map_err(|e| {
        StoreError::Backend(BackendError::Damaged {
            collection: kind.as_str(),
            key: key.to_owned(),
            reason: e.to_string(),
        })
    })
}

/// What a stored value counts for in the configuration's digest: a record, or nothing
/// (a token).
trait Digested {
    fn record(&self) -> Option<Record<'_>>;
}

impl Digested for Service {
    fn record(&self) -> Option<Record<'_>> {
        Some(Record::Service(self))
    }
}

impl Digested for User {
    fn record(&self) -> Option<Record<'_>> {
        Some(Record::User(self))
    }
}

impl Digested for Group {
    fn record(&self) -> Option<Record<'_>> {
        Some(Record::Group(self))
    }
}

impl Digested for Connector {
    fn record(&self) -> Option<Record<'_>> {
        Some(Record::Connector(self))
    }
}

impl Digested for TokenInfo {
    fn record(&self) -> Option<Record<'_>> {
        None
    }
}

impl State {
    pub(super) fn from_loaded(loaded: Loaded) -> Result<State, StoreError> {
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
        // Everything read at once: no version before this one can be told apart.
        st.log.clear();
        st.log_ops = 0;
        Ok(st)
    }

    /// Applies a commit's writes, in order, and the sequence and version it made.
    pub(super) fn apply(&mut self, seq: u64, version: u64, ops: &[Op]) -> Result<(), StoreError> {
        /// Writes `op` to `map`; the digest loses the record replaced or removed and gains
        /// the one written.
        fn put<V: for<'de> Deserialize<'de> + Digested>(
            map: &mut BTreeMap<String, V>,
            op: &Op,
            digest: &mut Digest,
        ) -> Result<Option<V>, StoreError> {
            let old = match &op.value {
                Some(v) => map.insert(op.key.clone(), decode(op.kind, &op.key, v)?),
                None => map.remove(&op.key),
            };
            if let Some(r) = old.as_ref().and_then(Digested::record) {
                digest.remove(r);
            }
            if let Some(r) = map.get(&op.key).and_then(Digested::record) {
                digest.add(r);
            }
            Ok(old)
        }
        let d = &mut self.digest;
        for op in ops {
            match op.kind {
                Kind::Service => drop(put(&mut self.services, op, d)?),
                Kind::Group => drop(put(&mut self.groups, op, d)?),
                Kind::Connector => drop(put(&mut self.connectors, op, d)?),
                Kind::Token => drop(put(&mut self.tokens, op, d)?),
                Kind::User => {
                    if let Some(old) = put(&mut self.users, op, d)? {
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
                    // Keys are normalized hex; one that does not parse counts as nothing,
                    // as in `Digest::of`.
                    let serial = Serial::parse_hex(&op.key).ok();
                    let changed = if op.value.is_some() {
                        self.revoked.insert(op.key.clone())
                    } else {
                        self.revoked.remove(&op.key)
                    };
                    if let (true, Some(s)) = (changed, &serial) {
                        if op.value.is_some() {
                            d.add(Record::Revoked(s));
                        } else {
                            d.remove(Record::Revoked(s));
                        }
                    }
                }
            }
        }
        if ops.iter().any(|op| op.kind.is_config_record()) {
            self.generation += 1;
        }
        if version > self.version {
            self.log_change(Change {
                version,
                previous_version: self.version,
                ops: ops
                    .iter()
                    .filter(|o| o.kind != Kind::Token)
                    .cloned()
                    .collect(),
                digest: self.digest,
            });
        }
        self.seq = seq;
        self.version = version;
        Ok(())
    }

    fn log_change(&mut self, change: Change) {
        self.log_ops += change.ops.len();
        self.log.push_back(change);
        while self.log.len() > LOG_VERSIONS || (self.log_ops > LOG_OPS && self.log.len() > 1) {
            if let Some(old) = self.log.pop_front() {
                self.log_ops -= old.ops.len();
            }
        }
    }

    /// The changes after `version`, oldest first, if the log reaches back to it (`Some`
    /// and empty at the current version); `None` when it does not: then only the whole
    /// configuration says what changed.
    pub(super) fn changes_since(&self, version: u64) -> Option<Vec<Change>> {
        if version == self.version {
            return Some(Vec::new());
        }
        let start = self
            .log
            .iter()
            .position(|c| c.previous_version == version)?;
        Some(self.log.iter().skip(start).cloned().collect())
    }

    /// The digest of the configuration at `version`: the current one, or one the change
    /// log holds; `None` for any other (too old, from before a full read, not yet here),
    /// and while the configuration in memory is not trusted.
    pub(super) fn digest_at(&self, version: u64) -> Option<Digest> {
        if self.unsure {
            return None;
        }
        if version == self.version {
            return Some(self.digest);
        }
        let i = self
            .log
            .binary_search_by_key(&version, |c| c.version)
            .ok()?;
        Some(self.log[i].digest)
    }

    pub(super) fn snapshot(&self) -> Snapshot {
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

/// A page of `map` after `cursor` (a key).
pub(super) fn page_in<V: Clone>(
    map: &BTreeMap<String, V>,
    cursor: Option<&str>,
    limit: usize,
) -> Page<V> {
    let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
    let entries = map.range::<str, _>((start, Bound::Unbounded));
    page_of(entries.map(|(k, v)| (k.as_str(), v)), limit)
}

/// A page of at most `limit` of `entries` (keys and values, in key order).
pub(super) fn page_of<'a, V: Clone + 'a>(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn revoke(serial: &str) -> Op {
        Op {
            kind: Kind::Revoked,
            key: serial.into(),
            value: Some(vec![]),
        }
    }

    #[test]
    fn the_change_log_is_bounded_by_versions_and_by_operations() {
        let mut st = State::default();
        for v in 1..=(LOG_VERSIONS as u64 + 10) {
            st.apply(v, v, &[revoke(&format!("{v:x}"))]).unwrap();
        }
        assert_eq!(st.log.len(), LOG_VERSIONS);
        assert_eq!(st.changes_since(9), None, "older than the log");
        assert_eq!(st.changes_since(10).map(|c| c.len()), Some(LOG_VERSIONS));
        // One version larger than the whole bound is kept alone: the newest is always
        // told.
        let v = st.version + 1;
        let big: Vec<Op> = (0..LOG_OPS + 1)
            .map(|i| revoke(&format!("{i:x}")))
            .collect();
        st.apply(v, v, &big).unwrap();
        assert_eq!(st.log.len(), 1);
        assert_eq!(st.changes_since(v - 1).map(|c| c.len()), Some(1));
        assert_eq!(st.changes_since(v - 2), None);
        // Commits that do not move the version (tokens, audit-only) add nothing.
        st.apply(v + 1, v, &[]).unwrap();
        assert_eq!(st.log.len(), 1);
    }
}
