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
