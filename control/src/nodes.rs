//! The node registry: what each data-plane replica last said. Kept in memory: nodes are
//! stateless and re-announce themselves on every (re)connect.
//!
//! A connected node is seen now: its subscription is open, and the gRPC server's HTTP/2
//! keepalive (a ping every 20 s, 10 s to answer) ends a stream whose node has gone, so
//! "connected" is never more than about 30 s stale. An idle healthy node sends nothing
//! for hours; its last message is not when it was last seen. A node that is gone keeps
//! the time its subscription ended, until an operator removes it.
//!
//! The live tunnels of connectors are kept here too, as each replica reports them (soft
//! state: never in the store, gone with the replica's subscription). Nothing reports
//! them yet: the data planes will, over their config stream, and [`Nodes::set_tunnels`]
//! is where those reports land; `/v1/connectors` shows them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::store::now_ms;

/// One replica as `/v1/nodes` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct NodeInfo {
    pub id: String,
    /// Where the node's gRPC connection comes from.
    pub peer: String,
    /// The node's client-facing listener, as it reports it.
    pub listen: String,
    /// Where other replicas relay sessions to it (empty: nowhere).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub advertise: String,
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
    /// The node's configuration differed from the control plane's at a version it acked
    /// (their digests differ): it is sent the whole configuration, and this holds until
    /// an ack's digest matches again.
    #[serde(default)]
    pub diverged: bool,
    /// The configuration digest of the node's last ack that carried one (the first 8
    /// bytes in hex); absent from nodes that send none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Nack {
    pub version: u64,
    pub reason: String,
}

/// A connector's live tunnel to one replica, as that replica reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Tunnel {
    /// The replica (node id) the tunnel ends at.
    pub replica: String,
    /// `quic`, or `tcp` where UDP is blocked.
    pub transport: String,
    /// Milliseconds since the Unix epoch the tunnel was established.
    pub since_ms: u64,
}

/// Most nodes remembered; disconnected ones are forgotten first.
const MAX_NODES: usize = 10_000;

/// Most tunnels one replica's report may hold.
const MAX_TUNNELS_PER_NODE: usize = 100_000;

/// A node as one instance publishes it to the others sharing the store: what it knows of
/// the node, and the connectors' tunnels the node reported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    pub node: NodeInfo,
    #[serde(default)]
    pub tunnels: Vec<(String, Tunnel)>,
}

#[derive(Debug)]
pub struct Nodes {
    map: Mutex<BTreeMap<String, NodeInfo>>,
    /// Nodes subscribed to other instances, as they published them.
    remote: Mutex<Vec<Published>>,
    /// Per node id: the tunnels it last reported, each with its connector's name.
    tunnels: Mutex<BTreeMap<String, Vec<(String, Tunnel)>>>,
    /// Moves whenever where the tunnels are may have changed (a report, a node's
    /// subscription or its end): the replicas are told (`holders`).
    tunnel_changes: tokio::sync::watch::Sender<u64>,
    /// Acks whose digest differed from the control plane's, since this instance started.
    divergences: AtomicU64,
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes {
            map: Mutex::default(),
            remote: Mutex::default(),
            tunnels: Mutex::default(),
            tunnel_changes: tokio::sync::watch::Sender::new(0),
            divergences: AtomicU64::new(0),
        }
    }
}

impl Nodes {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, NodeInfo>) -> R) -> R {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map)
    }

    pub fn connected(&self, id: &str, peer: String, listen: String, applied: u64, schema: u32) {
        self.connected_at(id, peer, listen, String::new(), applied, schema)
    }

    /// [`Nodes::connected`] with the address other replicas relay to it at.
    pub fn connected_at(
        &self,
        id: &str,
        peer: String,
        listen: String,
        advertise: String,
        applied: u64,
        schema: u32,
    ) {
        self.with(|m| {
            if m.len() >= MAX_NODES && !m.contains_key(id) {
                m.retain(|_, n| n.connected);
            }
            // What the node's earlier subscriptions told survives a reconnect.
            let (last_nack, diverged, digest) = m.get(id).map_or((None, false, None), |n| {
                (n.last_nack.clone(), n.diverged, n.digest.clone())
            });
            m.insert(
                id.to_owned(),
                NodeInfo {
                    id: id.to_owned(),
                    peer,
                    listen,
                    advertise,
                    applied,
                    schema,
                    last_nack,
                    last_seen_ms: now_ms(),
                    connected: true,
                    diverged,
                    digest,
                },
            );
        });
        // The replica set changed (connectors place their tunnels by it).
        self.tunnel_changes.send_modify(|n| *n += 1);
    }

    pub fn acked(&self, id: &str, version: u64) {
        self.with(|m| {
            if let Some(n) = m.get_mut(id) {
                n.applied = n.applied.max(version);
                n.last_seen_ms = now_ms();
            }
        })
    }

    /// The digest an ack carried, and whether it matched the control plane's for that
    /// version (`Some(false)`: it did not, the node diverged; `None`: no verdict, which
    /// changes nothing).
    pub fn digest_acked(&self, id: &str, digest: &str, matched: Option<bool>) {
        if matched == Some(false) {
            self.divergences.fetch_add(1, Ordering::Relaxed);
        }
        self.with(|m| {
            if let Some(n) = m.get_mut(id) {
                n.digest = Some(digest.to_owned());
                if let Some(matched) = matched {
                    n.diverged = !matched;
                }
            }
        })
    }

    /// Whether the node is known here as diverged.
    pub fn is_diverged(&self, id: &str) -> bool {
        self.with(|m| m.get(id).is_some_and(|n| n.diverged))
    }

    /// Divergences found since this instance started (acks whose digest differed).
    pub fn divergences(&self) -> u64 {
        self.divergences.load(Ordering::Relaxed)
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
        });
        // What a replica no longer reports is not known to be live.
        self.tunnels_map().remove(id);
        self.tunnel_changes.send_modify(|n| *n += 1);
    }

    /// Changes to where the tunnels are (the value only counts them).
    pub fn tunnel_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.tunnel_changes.subscribe()
    }

    /// The advertised addresses of every connected replica, sorted and deduplicated.
    pub fn replicas(&self) -> Vec<String> {
        let mut out: Vec<String> = self.with(|m| {
            m.values()
                .filter(|n| n.connected && !n.advertise.is_empty())
                .map(|n| n.advertise.clone())
                .collect()
        });
        out.extend(
            self.remote()
                .iter()
                .filter(|p| p.node.connected && !p.node.advertise.is_empty())
                .map(|p| p.node.advertise.clone()),
        );
        out.sort();
        out.dedup();
        out
    }

    /// Where every connector's tunnels are: `(connector, node id, the node's address)`
    /// for each connected replica holding one, sorted.
    pub fn holders(&self) -> Vec<(String, String, String)> {
        let listen: BTreeMap<String, String> = self.with(|m| {
            m.values()
                .filter(|n| n.connected && !n.advertise.is_empty())
                .map(|n| (n.id.clone(), n.advertise.clone()))
                .collect()
        });
        let mut out: Vec<(String, String, String)> = self
            .tunnels_map()
            .iter()
            .filter_map(|(id, list)| Some((id, list, listen.get(id)?)))
            .flat_map(|(id, list, addr)| {
                list.iter()
                    .map(move |(c, _)| (c.clone(), id.clone(), addr.clone()))
            })
            .collect();
        // Replicas subscribed to other instances (a node subscribed here is as seen here).
        for p in self.remote().iter() {
            if p.node.connected && !p.node.advertise.is_empty() && !listen.contains_key(&p.node.id)
            {
                out.extend(
                    p.tunnels
                        .iter()
                        .map(|(c, _)| (c.clone(), p.node.id.clone(), p.node.advertise.clone())),
                );
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, Vec<Published>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces what the other instances published; the replicas are told if where the
    /// replicas or tunnels are changed.
    pub fn set_remote(&self, mut list: Vec<Published>) {
        list.sort_by(|a, b| a.node.id.cmp(&b.node.id));
        let changed = {
            let mut remote = self.remote();
            let changed = *remote != list;
            *remote = list;
            changed
        };
        if changed {
            self.tunnel_changes.send_modify(|n| *n += 1);
        }
    }

    fn tunnels_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<(String, Tunnel)>>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the tunnels node `id` holds: `(connector name, tunnel)` pairs, the
    /// tunnel's `replica` being `id` whatever the report says. A node that is not
    /// connected reports nothing.
    pub fn set_tunnels(&self, id: &str, tunnels: impl IntoIterator<Item = (String, Tunnel)>) {
        if !self.with(|m| m.get(id).is_some_and(|n| n.connected)) {
            return;
        }
        let list: Vec<(String, Tunnel)> = tunnels
            .into_iter()
            .take(MAX_TUNNELS_PER_NODE)
            .map(|(c, t)| {
                (
                    c,
                    Tunnel {
                        replica: id.to_owned(),
                        ..t
                    },
                )
            })
            .collect();
        {
            let mut map = self.tunnels_map();
            if list.is_empty() {
                map.remove(id);
            } else {
                map.insert(id.to_owned(), list);
            }
        }
        self.tunnel_changes.send_modify(|n| *n += 1);
    }

    /// The live tunnels of connector `name`, by replica then age (empty until the data
    /// planes report tunnels).
    pub fn tunnels(&self, name: &str) -> Vec<Tunnel> {
        let local: Vec<(String, Tunnel)> = self
            .tunnels_map()
            .values()
            .flatten()
            .filter(|(c, _)| c == name)
            .cloned()
            .collect();
        let here: std::collections::BTreeSet<String> =
            local.iter().map(|(_, t)| t.replica.clone()).collect();
        let mut out: Vec<Tunnel> = local.into_iter().map(|(_, t)| t).collect();
        for p in self.remote().iter().filter(|p| p.node.connected) {
            out.extend(
                p.tunnels
                    .iter()
                    .filter(|(c, t)| c == name && !here.contains(&t.replica))
                    .map(|(_, t)| t.clone()),
            );
        }
        out.sort_by(|a, b| (&a.replica, a.since_ms).cmp(&(&b.replica, b.since_ms)));
        out.dedup();
        out
    }

    /// Every node of the cluster: this instance's and those other instances published.
    pub fn list(&self) -> Vec<NodeInfo> {
        let others: Vec<NodeInfo> = self.remote().iter().map(|p| p.node.clone()).collect();
        self.list_with(others)
    }

    /// This instance's nodes; a connected one is seen now.
    pub fn local(&self) -> Vec<NodeInfo> {
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

    /// This instance's nodes as recorded (a connected one with the time it connected)
    /// and their tunnels, to publish to other instances: it changes only when something
    /// about them does.
    pub fn recorded(&self) -> Vec<Published> {
        let nodes: Vec<NodeInfo> = self.with(|m| m.values().cloned().collect());
        let tunnels = self.tunnels_map();
        nodes
            .into_iter()
            .map(|node| Published {
                tunnels: tunnels.get(&node.id).cloned().unwrap_or_default(),
                node,
            })
            .collect()
    }

    /// This instance's nodes and those other instances published (`others`), one entry
    /// per node: a node subscribed here is as this instance sees it; of the others' a
    /// connected entry wins over a disconnected one, then the one seen last. A
    /// connected node is seen now.
    pub fn list_with(&self, others: impl IntoIterator<Item = NodeInfo>) -> Vec<NodeInfo> {
        let now = now_ms();
        let mut all: BTreeMap<String, NodeInfo> = self
            .local()
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        for n in others {
            let keep_ours = all.get(&n.id).is_some_and(|ours| {
                ours.connected || !n.connected && ours.last_seen_ms >= n.last_seen_ms
            });
            if !keep_ours {
                let seen = if n.connected { now } else { n.last_seen_ms };
                all.insert(
                    n.id.clone(),
                    NodeInfo {
                        last_seen_ms: seen,
                        ..n
                    },
                );
            }
        }
        all.into_values().collect()
    }

    /// Forgets a node that is gone for good. A connected node is not removed: it would
    /// only come back, and its removal would hide a live replica.
    pub fn remove(&self, id: &str) -> Result<(), RemoveError> {
        let elsewhere = self.remote().iter().any(|p| p.node.id == id);
        self.with(|m| match m.get(id) {
            None if elsewhere => Err(RemoveError::Elsewhere),
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
    /// Only another control-plane instance on the same store knows the node.
    #[error("another instance knows the node")]
    Elsewhere,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, connected: bool, last_seen_ms: u64, applied: u64) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            peer: "127.0.0.1:1".into(),
            listen: "127.0.0.1:9743".into(),
            advertise: String::new(),
            applied,
            schema: 3,
            last_nack: None,
            last_seen_ms,
            connected,
            diverged: false,
            digest: None,
        }
    }

    #[test]
    fn replicas_and_tunnels_of_other_instances_count_for_connectors() {
        let nodes = Nodes::default();
        nodes.connected_at("a", "p".into(), "l".into(), "10.0.0.1:9743".into(), 1, 3);
        let tunnel = |replica: &str| Tunnel {
            replica: replica.into(),
            transport: "quic".into(),
            since_ms: 5,
        };
        nodes.set_tunnels("a", [("lab".to_string(), tunnel("a"))]);
        let mut changes = nodes.tunnel_changes();
        changes.borrow_and_update();
        let mut far = info("b", true, 1, 1);
        far.advertise = "10.0.0.2:9743".into();
        let mut gone = info("c", false, 1, 1);
        gone.advertise = "10.0.0.3:9743".into();
        nodes.set_remote(vec![
            Published {
                node: far,
                tunnels: vec![("lab".into(), tunnel("b")), ("edge".into(), tunnel("b"))],
            },
            Published {
                node: gone,
                tunnels: vec![("lab".into(), tunnel("c"))],
            },
        ]);
        assert!(changes.has_changed().unwrap(), "the replicas are told");
        assert_eq!(nodes.replicas(), ["10.0.0.1:9743", "10.0.0.2:9743"]);
        assert_eq!(
            nodes.holders(),
            [
                (
                    "edge".to_string(),
                    "b".to_string(),
                    "10.0.0.2:9743".to_string()
                ),
                (
                    "lab".to_string(),
                    "a".to_string(),
                    "10.0.0.1:9743".to_string()
                ),
                (
                    "lab".to_string(),
                    "b".to_string(),
                    "10.0.0.2:9743".to_string()
                ),
            ]
        );
        let lab: Vec<String> = nodes
            .tunnels("lab")
            .into_iter()
            .map(|t| t.replica)
            .collect();
        assert_eq!(lab, ["a", "b"]);
        // The same again tells no one.
        changes.borrow_and_update();
        let same = nodes.remote().clone();
        nodes.set_remote(same);
        assert!(!changes.has_changed().unwrap());
        // A node only another instance knows is not removed here.
        assert_eq!(nodes.remove("b"), Err(RemoveError::Elsewhere));
        assert_eq!(nodes.remove("nobody"), Err(RemoveError::NotFound));
        // What this instance publishes carries its own tunnels.
        let published = nodes.recorded();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].tunnels[0].0, "lab");
    }

    #[test]
    fn other_instances_nodes_join_the_list_once_each() {
        let nodes = Nodes::default();
        nodes.connected("here", "p".into(), "l".into(), 5, 3);
        nodes.connected("moved", "p".into(), "l".into(), 7, 3);
        nodes.disconnected("moved");
        let list = nodes.list_with([
            // Another instance still shows the node that is subscribed here: ours wins.
            info("here", true, 1, 4),
            // The node that left here is connected there now: theirs wins, seen now.
            info("moved", true, 1, 8),
            // A node only there.
            info("there", false, 42, 9),
        ]);
        let view: Vec<(&str, bool, u64)> = list
            .iter()
            .map(|n| (n.id.as_str(), n.connected, n.applied))
            .collect();
        assert_eq!(
            view,
            [("here", true, 5), ("moved", true, 8), ("there", false, 9)]
        );
        assert!(list[1].last_seen_ms > 1, "a connected node is seen now");
        assert_eq!(list[2].last_seen_ms, 42);
        // Of two disconnected entries, the one seen last.
        nodes.disconnected("here");
        let seen_here = nodes.list()[0].last_seen_ms;
        let list = nodes.list_with([info("here", false, seen_here + 1000, 6)]);
        assert_eq!(list[0].applied, 6);
    }

    #[test]
    fn the_replica_set_is_every_connected_node_that_advertises_and_moves_the_map() {
        let nodes = Nodes::default();
        let mut changes = nodes.tunnel_changes();
        changes.borrow_and_update();
        nodes.connected_at("a", "p".into(), "l".into(), "10.0.0.2:9743".into(), 1, 3);
        assert!(
            changes.has_changed().unwrap(),
            "a replica joining moves the map"
        );
        nodes.connected_at("b", "p".into(), "l".into(), "10.0.0.1:9743".into(), 1, 3);
        nodes.connected_at("c", "p".into(), "l".into(), String::new(), 1, 3);
        assert_eq!(nodes.replicas(), ["10.0.0.1:9743", "10.0.0.2:9743"]);
        changes.borrow_and_update();
        nodes.disconnected("a");
        assert!(
            changes.has_changed().unwrap(),
            "a replica leaving moves the map"
        );
        assert_eq!(nodes.replicas(), ["10.0.0.1:9743"]);
    }

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

    #[test]
    fn tunnels_are_what_connected_replicas_last_reported() {
        let nodes = Nodes::default();
        let t = |transport: &str, since_ms| Tunnel {
            replica: "claimed".into(),
            transport: transport.into(),
            since_ms,
        };
        assert!(nodes.tunnels("lab").is_empty(), "nothing reported");
        // Not connected: ignored.
        nodes.set_tunnels("n1", [("lab".into(), t("quic", 5))]);
        assert!(nodes.tunnels("lab").is_empty());

        nodes.connected("n1", "127.0.0.1:1".into(), "[::]:9743".into(), 0, 3);
        nodes.connected("n2", "127.0.0.1:2".into(), "[::]:9743".into(), 0, 3);
        nodes.set_tunnels("n2", [("lab".into(), t("tcp", 9))]);
        nodes.set_tunnels(
            "n1",
            [("lab".into(), t("quic", 5)), ("edge".into(), t("quic", 7))],
        );
        let lab = nodes.tunnels("lab");
        assert_eq!(
            lab.iter()
                .map(|t| (t.replica.as_str(), t.transport.as_str(), t.since_ms))
                .collect::<Vec<_>>(),
            [("n1", "quic", 5), ("n2", "tcp", 9)],
            "the replica is the reporter, whatever the report claims"
        );
        assert_eq!(nodes.tunnels("edge").len(), 1);

        // A new report replaces the old; a replica that leaves takes its tunnels along.
        nodes.set_tunnels("n1", [("edge".into(), t("quic", 8))]);
        assert_eq!(nodes.tunnels("lab").len(), 1);
        nodes.disconnected("n2");
        assert!(nodes.tunnels("lab").is_empty());
        assert_eq!(nodes.tunnels("edge")[0].since_ms, 8);
    }
}
