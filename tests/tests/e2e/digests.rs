//! Configuration digests (DESIGN.md "Snapshot deltas", issue 19): every ack carries the
//! node's configuration digest and the control plane compares it with its own at that
//! version. After changes of every kind, a node fed deltas and a node fed whole
//! snapshots both hold the control plane's configuration: each shows a digest, the same
//! one, and neither is `diverged`; no divergence is counted or logged.
//!
//! At the current version the control plane always has its own digest, so a node that
//! acked it with a digest and is not diverged had a matching one.

use serde_json::Value;
use ztp_tests::Dataplane;

use crate::common::STEP;
use crate::plane::{wait_items, Plane};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_fed_deltas_and_whole_snapshots_agree_with_the_control_plane_s_digest() {
    let mut p = Plane::start(&["digest-delta"], &[]).await;
    let whole = Dataplane::start_control(
        &p.pki,
        &p.control.grpc_url(),
        "digest-whole",
        &["--snapshot-schema", "3"],
    )
    .await;
    p.replicas.push(whole);
    for dp in &mut p.replicas {
        assert!(dp.wait_ready(STEP).await, "{:?} not ready", dp.node_id());
    }
    p.wait_current().await;

    let c = &p.control;
    c.ztpctl_ok(["group", "add", "ops"]).await;
    c.ztpctl_ok(["connector", "add", "lab", "--description", "the lab"])
        .await;
    c.ztpctl_ok([
        "user",
        "add",
        "carol",
        "--identity",
        "carol@example.com",
        "--group",
        "ops",
    ])
    .await;
    c.ztpctl_ok([
        "service",
        "add",
        "db.svc.internal",
        "--proto",
        "tcp",
        "--addr",
        "127.0.0.1:1",
        "--group",
        "ops",
    ])
    .await;
    c.ztpctl_ok(["user", "disable", "bob"]).await;
    c.ztpctl_ok(["pki", "revoke", "0a0b", "0c"]).await;
    c.ztpctl_ok(["service", "rm", "db.svc.internal"]).await;
    c.ztpctl_ok(["user", "rm", "carol"]).await;
    let v = p.wait_current().await;

    let ids: Vec<&str> = p.replicas.iter().filter_map(|d| d.node_id()).collect();
    let nodes = wait_items(c, "/v1/nodes", "every node acked with a digest", |items| {
        ids.iter().all(|id| {
            items
                .iter()
                .any(|n| n["id"] == *id && n["applied"] == v && n["digest"].as_str().is_some())
        })
    })
    .await;
    let ours: Vec<&Value> = nodes
        .iter()
        .filter(|n| ids.contains(&n["id"].as_str().unwrap_or_default()))
        .collect();
    for n in &ours {
        assert_eq!(n["diverged"], false, "{n}");
    }
    assert_eq!(ours[0]["digest"], ours[1]["digest"], "{ours:?}");
    let table = c.ztpctl_ok(["node", "list"]).await;
    assert!(!table.contains("diverged"), "{table}");

    let r = c.api("GET", "/metrics", None).await;
    assert_eq!(r.status, 200, "GET /metrics: {r}");
    let metrics = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        metrics.contains("ztp_node_divergences_total 0\n"),
        "{metrics}"
    );
    assert!(metrics.contains("ztp_nodes_diverged 0\n"), "{metrics}");
    let warned: Vec<Value> = c
        .logs()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("differs from the control plane's"))
        })
        .collect();
    assert!(warned.is_empty(), "{warned:?}");
}
