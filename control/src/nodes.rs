//! The node registry: what each data-plane replica last said. Kept in memory: nodes are
//! stateless and re-announce themselves on every (re)connect.
//!
//! A connected node is seen now: its subscription is open, and the gRPC server's HTTP/2
//! keepalive (a ping every 20 s, 10 s to answer) ends a stream whose node has gone, so
//! "connected" is never more than about 30 s stale. An idle healthy node sends nothing
//! for hours; its last message is not when it was last seen. A node that is gone keeps
//! the time its subscription ended, until an operator removes it.

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
    /// Milliseconds since the Unix epoch the node was last known alive: now while its
    /// subscription is open, else when it ended.
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
                n.last_seen_ms = now_ms();
            }
        })
    }

    /// Every node; a connected one is seen now.
    pub fn list(&self) -> Vec<NodeInfo> {
        let now = now_ms();
        self.with(|m| {
            m.values()
                .map(|n| NodeInfo {
                    last_seen_ms: if n.connected { now } else { n.last_seen_ms },
                    ..n.clone()
                })
                .collect()
        })
    }

    /// Forgets a node that is gone for good. A connected node is not removed: it would
    /// only come back, and its removal would hide a live replica.
    pub fn remove(&self, id: &str) -> Result<(), RemoveError> {
        self.with(|m| match m.get(id) {
            None => Err(RemoveError::NotFound),
            Some(n) if n.connected => Err(RemoveError::Connected),
            Some(_) => {
                m.remove(id);
                Ok(())
            }
        })
    }
}

/// Why a node was not removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RemoveError {
    #[error("no such node")]
    NotFound,
    #[error("the node is connected")]
    Connected,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_nodes_are_seen_now_and_gone_ones_when_they_left() {
        let nodes = Nodes::default();
        nodes.connected("n1", "127.0.0.1:1".into(), "[::]:9743".into(), 3, 3);
        // Long idle: the last message was an hour ago, but the stream is open.
        nodes.with(|m| m.get_mut("n1").unwrap().last_seen_ms = now_ms() - 3_600_000);
        let before = now_ms();
        let n = &nodes.list()[0];
        assert!(n.connected && n.last_seen_ms >= before, "{n:?}");

        nodes.disconnected("n1");
        let left = nodes.list()[0].last_seen_ms;
        assert!(left >= before, "seen until the stream ended");
        nodes.with(|m| m.get_mut("n1").unwrap().last_seen_ms -= 60_000);
        assert_eq!(nodes.list()[0].last_seen_ms, left - 60_000, "gone: ages");
    }

    #[test]
    fn only_nodes_that_are_gone_are_removed() {
        let nodes = Nodes::default();
        nodes.connected("n1", "127.0.0.1:1".into(), "[::]:9743".into(), 0, 3);
        assert_eq!(nodes.remove("n1"), Err(RemoveError::Connected));
        assert_eq!(nodes.remove("n2"), Err(RemoveError::NotFound));
        nodes.disconnected("n1");
        assert_eq!(nodes.remove("n1"), Ok(()));
        assert!(nodes.list().is_empty());
        assert_eq!(nodes.remove("n1"), Err(RemoveError::NotFound));
    }
}
