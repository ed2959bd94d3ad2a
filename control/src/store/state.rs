//! The configuration and the tokens in memory, as the backend holds them at one write
//! sequence, and how a commit's writes apply to them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use serde::Deserialize;
use ztp_proto::names::identity_key;
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
    /// A commit's outcome is unknown (the backend failed mid-write, or the writer went
    /// away during it): read everything again before it is trusted.
    pub(super) unsure: bool,
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
        Ok(st)
    }

    /// Applies a commit's writes, in order, and the sequence and version it made.
    pub(super) fn apply(&mut self, seq: u64, version: u64, ops: &[Op]) -> Result<(), StoreError> {
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
