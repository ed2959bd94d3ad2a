//! Tables for people show times as ages or local date-times, never epoch milliseconds;
//! json and yaml carry the API's values unchanged.

use serde_json::{json, Value};

use super::*;

const NOW: u64 = 1_700_000_000_000;

/// No cell of a table is an epoch in milliseconds (13 digits).
fn assert_no_epoch_ms(table: &str) {
    for word in table.split(|c: char| !c.is_ascii_digit()) {
        assert!(
            word.len() < 13,
            "raw epoch milliseconds {word:?} in:\n{table}"
        );
    }
}

fn first_row(table: &str) -> &str {
    table.lines().nth(1).unwrap_or_default()
}

#[test]
fn node_list_shows_ages() {
    let nodes = [json!({
        "id": "n1", "listen": "[::]:9743", "peer": "10.0.0.1:5000", "applied": 7,
        "schema": 1, "last_nack": null, "connected": false,
        "last_seen_ms": NOW - 3 * 60_000 - 4_000,
    })];
    let t = nodes_table(&nodes, NOW, false);
    assert_no_epoch_ms(&t);
    assert!(first_row(&t).contains("3m ago"), "{t}");
    let w = nodes_table(&nodes, NOW, true);
    assert_no_epoch_ms(&w);
    assert!(w.contains("SEEN AT") && w.contains("2023-11-14"), "{w}");
}

#[test]
fn tokens_show_date_time_and_age() {
    let tokens = [json!({"id": "ab12", "name": "ci", "created_ms": NOW - 2 * 86_400_000})];
    let t = tokens_table(&tokens, NOW);
    assert_no_epoch_ms(&t);
    let row = first_row(&t);
    assert!(row.contains("2023-11-1") && row.contains("2d ago"), "{t}");
}

#[test]
fn audit_shows_ages_and_date_times() {
    let records = [json!({
        "time_ms": NOW - 5 * 3_600_000, "node": "n1", "peer": "10.0.0.9:4000",
        "sni": "echo.svc.internal", "identity": "alice@example.com", "user": "alice",
        "service": "echo.svc.internal", "decision": "allow", "reason": "closed", "code": 0,
        "bytes_up": 10, "bytes_down": 20, "duration_ms": 1500,
    })];
    for wide in [false, true] {
        let t = audit_table(&records, NOW, wide);
        assert_no_epoch_ms(&t);
        assert!(first_row(&t).starts_with("5h ago"), "{t}");
    }
    assert!(audit_table(&records, NOW, true).contains("2023-11-14"));
    let admin = [json!({
        "seq": 3, "time_ms": NOW, "actor": {"token_name": "admin"}, "action": "user.add",
        "target": "alice", "version": 4,
    })];
    let t = admin_audit_table(&admin);
    assert_no_epoch_ms(&t);
    assert!(first_row(&t).contains("2023-11-1"), "{t}");
}

#[test]
fn wide_services_add_source_ranges() {
    let svc = [json!({
        "name": "db.svc.internal", "protocol": "tcp", "address": "10.0.0.5:5432",
        "groups": ["ops"], "handler": null, "allow": ["10.0.0.0/8"], "deny": [],
    })];
    assert!(!services_table_text(&svc, false).contains("10.0.0.0/8"));
    let w = services_table_text(&svc, true);
    assert!(w.contains("ALLOW") && w.contains("10.0.0.0/8"), "{w}");
}

#[test]
fn json_and_yaml_parse_back_to_the_api_values() {
    let v = json!([{
        "name": "*.svc.internal", "created_ms": NOW, "groups": ["ops", "yes", "null"],
        "handler": null, "disabled": false, "note": "a: b # c\nd",
    }]);
    let j = for_scripts(Output::Json, &v).unwrap().unwrap();
    assert_eq!(serde_json::from_str::<Value>(&j).unwrap(), v);
    let y = for_scripts(Output::Yaml, &v).unwrap().unwrap();
    assert_eq!(serde_yaml_ng::from_str::<Value>(&y).unwrap(), v, "{y}");
    assert!(for_scripts(Output::Table, &v).unwrap().is_none());
    assert!(for_scripts(Output::Wide, &v).unwrap().is_none());
}

#[test]
fn tokens_and_admin_audit_show_roles() {
    let tokens = [
        json!({"id": "ab12", "name": "ci", "created_ms": NOW, "role": "viewer"}),
        // A server from before roles lists none: admin.
        json!({"id": "cd34", "name": "old", "created_ms": NOW}),
    ];
    let t = tokens_table(&tokens, NOW);
    assert!(t.lines().next().unwrap().contains("ROLE"), "{t}");
    assert!(t.lines().nth(1).unwrap().contains("viewer"), "{t}");
    assert!(t.lines().nth(2).unwrap().contains("admin"), "{t}");
    let admin = [json!({
        "seq": 3, "time_ms": NOW, "actor": {"token_name": "robot", "role": "operator"},
        "action": "service.create", "target": "a", "version": 4,
    })];
    let t = admin_audit_table(&admin);
    assert!(first_row(&t).contains("operator"), "{t}");
}

#[test]
fn a_connected_node_is_seen_now() {
    let nodes = [json!({
        "id": "n1", "listen": "[::]:9743", "peer": "10.0.0.1:5000", "applied": 7,
        "schema": 1, "last_nack": null, "connected": true,
        "last_seen_ms": NOW - 3 * 60_000,
    })];
    let t = nodes_table(&nodes, NOW, false);
    let row = first_row(&t);
    assert!(row.contains(" now") && !row.contains("ago"), "{t}");
}

#[test]
fn a_diverged_node_says_so_in_its_state() {
    let node = |diverged: bool, connected: bool| {
        json!({
            "id": "n1", "listen": "[::]:9743", "peer": "10.0.0.1:5000", "applied": 7,
            "schema": 4, "last_nack": null, "connected": connected,
            "last_seen_ms": NOW, "diverged": diverged, "digest": "00ff00ff00ff00ff",
        })
    };
    let t = nodes_table(&[node(true, true)], NOW, false);
    let header: Vec<&str> = t.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = first_row(&t).split_whitespace().collect();
    let state = header.iter().position(|h| *h == "STATE").unwrap();
    assert_eq!(row[state], "up,diverged", "{t}");
    assert!(
        !t.contains("00ff00ff00ff00ff"),
        "the digest only in wide: {t}"
    );
    let row = first_row(&nodes_table(&[node(true, false)], NOW, false)).to_owned();
    assert!(row.contains("down,diverged"), "{row}");
    let t = nodes_table(&[node(false, true)], NOW, false);
    assert!(!t.contains("diverged"), "{t}");
    // From a server before digests: no field, no mark.
    let mut old = node(false, true);
    old.as_object_mut().unwrap().remove("diverged");
    old.as_object_mut().unwrap().remove("digest");
    assert!(!nodes_table(&[old.clone()], NOW, false).contains("diverged"));
    let w = nodes_table(&[node(true, true)], NOW, true);
    assert!(
        w.contains("DIGEST") && w.contains("00ff00ff00ff00ff"),
        "{w}"
    );
    assert!(nodes_table(&[old], NOW, true)
        .lines()
        .nth(1)
        .unwrap()
        .contains(" - "));
}
