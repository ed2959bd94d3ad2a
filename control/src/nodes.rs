//! The node registry: what each data-plane replica last said. Kept in memory: nodes are
//! stateless and re-announce themselves on every (re)connect.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::store::now_ms;

/// One replica as `/v1/nodes` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct NodeInfo {
    pub id: String,
    /// Where the node's gRPC connection comes from.
    pub peer: String,
    /// The node's client-facing listener, as it reports it.
    pub listen: String,
    /// The last config version the node acked (0: none yet).
    pub applied: u64,
    /// The highest snapshot schema the node understands.
    pub schema: u32,
    /// The last version the node refused, and why.
    pub last_nack: Option<Nack>,
    /// Milliseconds since the Unix epoch of the last message from the node.
    pub last_seen_ms: u64,
    pub connected: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Nack {
    pub version: u64,
    pub reason: String,
}

/// Most nodes remembered; disconnected ones are forgotten first.
const MAX_NODES: usize = 10_000;

#[derive(Debug, Default)]
pub struct Nodes {
    map: Mutex<BTreeMap<String, NodeInfo>>,
}

impl Nodes {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, NodeInfo>) -> R) -> R {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map)
    }

    pub fn connected(&self, id: &str, peer: String, listen: String, applied: u64, schema: u32) {
        self.with(|m| {
            if m.len() >= MAX_NODES && !m.contains_key(id) {
                m.retain(|_, n| n.connected);
            }
            let last_nack = m.get(id).and_then(|n| n.last_nack.clone());
            m.insert(
                id.to_owned(),
                NodeInfo {
                    id: id.to_owned(),
                    peer,
                    listen,
                    applied,
                    schema,
                    last_nack,
                    last_seen_ms: now_ms(),
                    connected: true,
                },
            );
        })
    }

    pub fn acked(&self, id: &str, version: u64) {
        self.with(|m| {
            if let Some(n) = m.get_mut(id) {
                n.applied = n.applied.max(version);
                n.last_seen_ms = now_ms();
            }
        })
    }

    pub fn nacked(&self, id: &str, version: u64, reason: String) {
        self.with(|m| {
            if let Some(n) = m.get_mut(id) {
                n.last_nack = Some(Nack { version, reason });
                n.last_seen_ms = now_ms();
            }
        })
    }

    /// Any message from the node (a connection record, say) shows it is alive.
    pub fn seen(&self, id: &str) {
        self.with(|m| {
            if let Some(n) = m.get_mut(id) {
                n.last_seen_ms = now_ms();
            }
        })
    }

    pub fn disconnected(&self, id: &str) {
        self.with(|m| {
            if let Some(n) = m.get_mut(id) {
                n.connected = false;
            }
        })
    }

    pub fn list(&self) -> Vec<NodeInfo> {
        self.with(|m| m.values().cloned().collect())
    }
}
