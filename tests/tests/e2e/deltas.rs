//! Snapshot deltas (DESIGN.md "Snapshot deltas", issue 19): after a node's first whole
//! snapshot, a change reaches it as a delta of what changed, a few hundred bytes; a node
//! that announces no delta schema (`--snapshot-schema 3`) keeps getting whole snapshots;
//! both end on the same configuration.

use serde_json::Value;
use ztp_tests::Dataplane;

use crate::common::STEP;
use crate::plane::Plane;

/// The `snapshot applied` lines of `dp` at `version`.
fn applied_at(dp: &Dataplane, version: u64) -> Vec<Value> {
    dp.logs()
        .into_iter()
        .filter(|l| l["message"] == "snapshot applied" && l["snapshot.version"] == version)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_a_node_as_a_small_delta_and_an_older_node_whole() {
    let mut p = Plane::start(&["delta-1"], &[]).await;
    let old = Dataplane::start_control(
        &p.pki,
        &p.control.grpc_url(),
        "whole-1",
        &["--snapshot-schema", "3"],
    )
    .await;
    p.replicas.push(old);
    for dp in &mut p.replicas {
        assert!(dp.wait_ready(STEP).await, "{:?} not ready", dp.node_id());
    }
    p.wait_current().await;

    // One user added, one service's groups changed, a serial revoked: three versions.
    p.control
        .ztpctl_ok([
            "user",
            "add",
            "carol",
            "--identity",
            "carol@example.com",
            "--group",
            "admins",
        ])
        .await;
    // A one-user change: at most 1 KiB on the wire.
    let v_user = p.wait_current().await;
    let line = applied_at(&p.replicas[0], v_user).pop().expect("applied");
    assert_eq!(line["delta"], true, "{line}");
    let bytes = line["bytes"].as_u64().unwrap();
    assert!(bytes <= 1024, "a one-user delta of {bytes} bytes");
    eprintln!("a one-user change on the wire: {bytes} bytes");
    p.control.ztpctl_ok(["group", "add", "ops"]).await;
    p.control.ztpctl_ok(["pki", "revoke", "0a0b"]).await;
    let v = p.wait_current().await;

    let new_lines = applied_at(&p.replicas[0], v);
    let line = new_lines
        .last()
        .expect("the delta node applied the last version");
    assert_eq!(line["delta"], true, "{line}");
    let bytes = line["bytes"].as_u64().unwrap();
    assert!(bytes <= 1024, "a one-change delta of {bytes} bytes");
    assert_eq!(line["users"], 3, "alice, bob, carol: {line}");

    let old_lines = applied_at(&p.replicas[1], v);
    let line = old_lines
        .last()
        .expect("the older node applied the last version");
    assert_eq!(
        line["delta"], false,
        "a schema-3 node gets whole snapshots: {line}"
    );
    assert_eq!(line["users"], 3, "{line}");

    // Every version after the first went to the delta node as a delta.
    let whole_after_first = p.replicas[0]
        .logs()
        .into_iter()
        .filter(|l| l["message"] == "snapshot applied" && l["delta"] == false)
        .count();
    assert_eq!(whole_after_first, 1, "only the first snapshot whole");
}

/// A TCP relay on loopback between a node and the control plane that can be cut: while
/// cut, every relayed connection is closed and new ones are closed at once.
struct Relay {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if *cut_rx.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Relay { addr, cut, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node cut off from the control plane while 1,000 versions are written catches up,
/// when it is back, with deltas from the version it applied: no whole snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_for_1000_versions_catches_up_without_a_whole_snapshot() {
    let mut p = Plane::start(&[], &[]).await;
    let relay = Relay::start(p.control.grpc_addr()).await;
    let url = format!("https://localhost:{}", relay.addr.port());
    let mut dp = Dataplane::start_control(&p.pki, &url, "away-1", &[]).await;
    assert!(dp.wait_ready(STEP).await, "not ready");
    p.replicas.push(dp);
    let before = p.wait_current().await;

    relay.cut.send_replace(true);
    // The node has noticed: it is no longer connected.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let nodes = p.control.nodes().await;
        if nodes
            .iter()
            .any(|n| n["id"] == "away-1" && n["connected"] == false)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{nodes:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // 1,000 versions: users created, changed and removed, groups created.
    for i in 0..1000u32 {
        let k = i / 4;
        let name = format!("away-{k}");
        let user = |groups: &[&str], disabled: bool| {
            Some(
                serde_json::json!({"name": name, "identities": [format!("{name}@example.com")],
                "groups": groups, "disabled": disabled}),
            )
        };
        let (method, path, body) = match i % 4 {
            0 => ("POST", "/v1/users".to_owned(), user(&[], false)),
            1 => ("PUT", format!("/v1/users/{name}"), user(&["admins"], false)),
            2 => (
                "POST",
                "/v1/groups".to_owned(),
                Some(serde_json::json!({"name": format!("away-g{k}")})),
            ),
            _ if k % 2 == 0 => ("DELETE", format!("/v1/users/{name}"), None),
            _ => ("PUT", format!("/v1/users/{name}"), user(&["admins"], true)),
        };
        let r = p.control.api(method, &path, body.as_ref()).await;
        assert!(r.status / 100 == 2, "{method} {path}: {r}");
    }
    let now = p.control.config_version().await;
    assert!(now >= before + 1000, "{before} -> {now}");

    relay.cut.send_replace(false);
    let v = p.wait_current().await;
    assert_eq!(v, now);
    let dp = &p.replicas[0];
    let lines = applied_at(dp, v);
    let line = lines.last().expect("applied the last version");
    assert_eq!(line["delta"], true, "{line}");
    let whole = dp
        .logs()
        .into_iter()
        .filter(|l| l["message"] == "snapshot applied" && l["delta"] == false)
        .count();
    assert_eq!(whole, 1, "only the first snapshot whole");
    // It really was away: it subscribed again, from the version it had applied.
    let resumed = dp
        .logs()
        .into_iter()
        .filter(|l| l["message"] == "subscribed to the control plane")
        .filter(|l| {
            l["applied"]
                .as_u64()
                .is_some_and(|a| a >= before && a < now)
        })
        .count();
    assert!(resumed >= 1, "no resubscription from an older version");
    // And it holds what the store holds: the digest it acked matched (not diverged).
    let nodes = p.control.nodes().await;
    let me = nodes.iter().find(|n| n["id"] == "away-1").unwrap();
    assert_eq!(me["applied"].as_u64(), Some(now), "{me}");
    assert_ne!(me["diverged"], true, "{me}");
}
