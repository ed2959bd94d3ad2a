//! The audit trail: every data plane (subscribed to the control plane) sends one record per
//! connection on its gRPC subscription; the control plane keeps them with a bounded
//! retention and serves them newest first at `GET /v1/audit` with filters, and through
//! `ztpctl audit`. Admin changes are at `GET /v1/audit/admin` and `ztpctl audit --admin`.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::AlertDescription;
use serde_json::{json, Value};
use ztp_tests::backend::{pseudo_random_bytes, sha256};
use ztp_tests::client::{alert_of, read_to_end_or_alert_within};
use ztp_tests::control::query_escape;
use ztp_tests::http::HttpResponse;
use ztp_tests::{Control, TestPki};

use crate::common::STEP;
use crate::plane::{
    assert_one_line_error, dial, now_ms, send_and_drain, wait_items, Plane, ECHO, HASH, UNKNOWN,
};

/// The fields of a connection record, exactly.
const RECORD_FIELDS: [&str; 14] = [
    "time_ms",
    "node",
    "peer",
    "sni",
    "identity",
    "user",
    "service",
    "decision",
    "reason",
    "code",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "transport",
];

/// Polls `/v1/audit` (bounded) until the record of the client at `peer` is there.
async fn wait_record(control: &Control, peer: SocketAddr) -> Value {
    let want = peer.to_string();
    let items = wait_items(
        control,
        "/v1/audit?limit=1000",
        &format!("the record of {want}"),
        |items| items.iter().any(|r| r["peer"] == want.as_str()),
    )
    .await;
    items
        .into_iter()
        .find(|r| r["peer"] == want.as_str())
        .expect("found")
}

/// The peers of `items`, in order.
fn peers(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|r| r["peer"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// `GET /v1/audit?QUERY`: 200, `next` null, and the items.
async fn audit(control: &Control, query: &str) -> Vec<Value> {
    let path = format!("/v1/audit?{query}");
    let v = control.get_json(&path).await;
    assert!(v["next"].is_null(), "GET {path}: `next` is not null: {v}");
    v["items"]
        .as_array()
        .unwrap_or_else(|| panic!("GET {path}: no items: {v}"))
        .clone()
}

fn sleep_ms(ms: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(ms))
}

/// One control plane and one replica; four connections, one after the other, each waited
/// for in the trail before the next (so time marks taken in between separate them):
///
/// 1. alice to the echo service, 1234 bytes each way, held open 250 ms: allow, `closed`;
/// 2. alice to the hash service, 777 bytes up and the 32-byte digest down: allow;
/// 3. bob (in no group) to the echo service: the 403 line, deny, `not in group`, code 403;
/// 4. an unknown SNI: `unrecognized_name` in the handshake, deny, `unknown sni`.
///
/// Each record carries the replica's node id, the client's address, SNI, identity, user,
/// service, decision, reason, code, bytes each way and a plausible time and duration.
/// The list is newest first; the identity (case-insensitive for emails), service (names
/// case-insensitive), decision and time-window filters, their combinations and `limit`
/// return exactly the matching records; `ztpctl audit -o json` with filters prints the same records, and its
/// table names the node, identity and reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_recorded_with_decision_reason_and_bytes_and_filtered() {
    let p = Plane::start(&["audit-n1"], &[]).await;
    let dp = &p.replicas[0];
    let control = &p.control;
    assert!(
        audit(control, "").await.is_empty(),
        "records before any connection"
    );

    let m0 = now_ms();
    sleep_ms(5).await;

    // 1: alice, echo.
    let up1 = pseudo_random_bytes(1234, 1);
    let (peer1, s) = dial(dp.addr(), &p.opts(ECHO, &p.alice)).await;
    let mut s = s.expect("alice's handshake to the echo service");
    let back = send_and_drain(&mut s, &up1, Duration::from_millis(250)).await;
    assert_eq!(back, up1, "the echo differs");
    let r1 = wait_record(control, peer1).await;
    sleep_ms(5).await;
    let m1 = now_ms();
    sleep_ms(5).await;

    // 2: alice, hash sink.
    let up2 = pseudo_random_bytes(777, 2);
    let (peer2, s) = dial(dp.addr(), &p.opts(HASH, &p.alice)).await;
    let mut s = s.expect("alice's handshake to the hash service");
    let back = send_and_drain(&mut s, &up2, Duration::ZERO).await;
    assert_eq!(back, sha256(&up2), "the hash sink's answer differs");
    let r2 = wait_record(control, peer2).await;
    sleep_ms(5).await;
    let m2 = now_ms();
    sleep_ms(5).await;

    // 3: bob, refused after the handshake.
    let (peer3, s) = dial(dp.addr(), &p.opts(ECHO, &p.bob)).await;
    let mut s = s.expect("bob's handshake");
    let got = read_to_end_or_alert_within(&mut s, STEP)
        .await
        .unwrap_or_else(|e| panic!("bob: expected the 403 line and a clean end: {e}"));
    assert_eq!(String::from_utf8_lossy(&got), "ZTP-ERROR 403 forbidden\n");
    let r3 = wait_record(control, peer3).await;
    sleep_ms(5).await;
    let m3 = now_ms();
    sleep_ms(5).await;

    // 4: an unknown SNI, refused in the handshake.
    let (peer4, r) = dial(dp.addr(), &p.opts(UNKNOWN, &p.alice)).await;
    match r {
        Ok(_) => panic!("a handshake for an unknown SNI succeeded"),
        Err(e) => assert_eq!(
            alert_of(&e),
            Some(AlertDescription::UnrecognisedName),
            "unknown SNI: {e}"
        ),
    }
    let r4 = wait_record(control, peer4).await;
    sleep_ms(5).await;
    let m4 = now_ms();
    assert_eq!(
        (p.echo.connections(), p.hash.connections()),
        (1, 1),
        "the backends saw exactly the two allowed connections"
    );

    // The records, field by field.
    let expect = |r: &Value, peer: SocketAddr, fields: Value, what: &str| {
        let obj = r.as_object().expect("a record is an object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = RECORD_FIELDS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want, "{what}: the record's fields: {r}");
        assert_eq!(r["node"], "audit-n1", "{what}: {r}");
        assert_eq!(r["peer"], peer.to_string().as_str(), "{what}: {r}");
        for (k, v) in fields.as_object().expect("fields") {
            assert_eq!(&r[k], v, "{what}: field {k}: {r}");
        }
    };
    expect(
        &r1,
        peer1,
        json!({"sni": ECHO, "identity": "alice@example.com", "user": "alice", "service": ECHO,
               "decision": "allow", "reason": "closed", "code": 0,
               "bytes_up": 1234, "bytes_down": 1234}),
        "alice to echo",
    );
    expect(
        &r2,
        peer2,
        json!({"sni": HASH, "identity": "alice@example.com", "user": "alice", "service": HASH,
               "decision": "allow", "reason": "closed", "code": 0,
               "bytes_up": 777, "bytes_down": 32}),
        "alice to hash",
    );
    expect(
        &r3,
        peer3,
        json!({"sni": ECHO, "identity": "bob@example.com", "user": "bob", "service": ECHO,
               "decision": "deny", "reason": "not in group", "code": 403,
               "bytes_up": 0, "bytes_down": 0}),
        "bob refused",
    );
    expect(
        &r4,
        peer4,
        json!({"sni": UNKNOWN, "identity": "", "user": "", "service": "",
               "decision": "deny", "reason": "unknown sni", "code": 0,
               "bytes_up": 0, "bytes_down": 0}),
        "unknown SNI",
    );
    let d1 = r1["duration_ms"].as_u64().expect("duration_ms");
    assert!(
        (250..15_000).contains(&d1),
        "alice's session was held 250 ms: duration_ms {d1}"
    );
    let marks = [m0, m1, m2, m3, m4];
    for (i, r) in [&r1, &r2, &r3, &r4].into_iter().enumerate() {
        let t = r["time_ms"].as_u64().expect("time_ms");
        assert!(
            marks[i] < t && t < marks[i + 1],
            "record {} time_ms {t} is not between the marks {} and {}",
            i + 1,
            marks[i],
            marks[i + 1]
        );
        assert!(r["duration_ms"].as_u64().is_some_and(|d| d < 15_000), "{r}");
    }

    // Newest first; filters return exactly the matching records.
    let (p1, p2, p3, p4) = (
        peer1.to_string(),
        peer2.to_string(),
        peer3.to_string(),
        peer4.to_string(),
    );
    let all = audit(control, "").await;
    assert_eq!(
        peers(&all),
        [&*p4, &*p3, &*p2, &*p1],
        "newest first: {all:#?}"
    );
    assert_eq!(all, [r4.clone(), r3.clone(), r2.clone(), r1.clone()]);
    let alice = query_escape("alice@example.com");
    let cases: Vec<(String, Vec<&String>)> = vec![
        (format!("identity={alice}"), vec![&p2, &p1]),
        (
            format!("identity={}", query_escape("ALICE@Example.COM")),
            vec![&p2, &p1],
        ),
        (
            format!("identity={}", query_escape("bob@example.com")),
            vec![&p3],
        ),
        (
            format!("identity={}", query_escape("carol@example.com")),
            vec![],
        ),
        (format!("service={ECHO}"), vec![&p3, &p1]),
        (format!("service={HASH}"), vec![&p2]),
        // Service names compare case-insensitively (DESIGN.md "service lookup").
        ("service=ECHO.svc.INTERNAL".into(), vec![&p3, &p1]),
        ("decision=allow".into(), vec![&p2, &p1]),
        ("decision=deny".into(), vec![&p4, &p3]),
        (format!("since={m1}&until={m3}"), vec![&p3, &p2]),
        (format!("since={m3}"), vec![&p4]),
        (format!("until={m1}"), vec![&p1]),
        (format!("since={m4}"), vec![]),
        (format!("until={m0}"), vec![]),
        (format!("decision=deny&service={ECHO}"), vec![&p3]),
        (format!("identity={alice}&since={m1}"), vec![&p2]),
        (
            format!("identity={alice}&decision=allow&service={ECHO}&since={m0}&until={m4}"),
            vec![&p1],
        ),
        ("limit=1".into(), vec![&p4]),
        ("limit=1&decision=allow".into(), vec![&p2]),
        ("limit=2&decision=deny".into(), vec![&p4, &p3]),
        ("limit=1000".into(), vec![&p4, &p3, &p2, &p1]),
    ];
    for (query, want) in &cases {
        let got = audit(control, query).await;
        assert_eq!(
            peers(&got),
            want.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "GET /v1/audit?{query}: {got:#?}"
        );
    }

    // ztpctl.
    let denied = control.ztpctl_json(["audit", "--decision", "deny"]).await;
    assert_eq!(
        denied,
        json!([r4.clone(), r3.clone()]),
        "ztpctl -o json audit --decision deny"
    );
    let out = control
        .ztpctl_json([
            "audit",
            "--identity",
            "alice@example.com",
            "--service",
            HASH,
        ])
        .await;
    assert_eq!(out, json!([r2.clone()]), "--identity alice --service hash");
    let out = control
        .ztpctl_json(["audit", "--since", "1h", "--limit", "3"])
        .await;
    assert_eq!(
        out,
        json!([r4.clone(), r3.clone(), r2.clone()]),
        "--since 1h --limit 3"
    );
    let table = control.ztpctl_ok(["audit"]).await;
    for needle in [
        "audit-n1",
        "alice@example.com",
        "bob@example.com",
        "not in group",
        "unknown sni",
        "1234/1234",
        "777/32",
    ] {
        assert!(
            table.contains(needle),
            "`ztpctl audit` does not show {needle:?}:\n{table}"
        );
    }
}

/// `ztp-control --audit-retention 3`: after five connections (alice to the echo service,
/// 101 to 105 bytes), the trail holds exactly the three newest, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_only_the_newest_records() {
    let p = Plane::start(&["ret-n1"], &["--audit-retention", "3"]).await;
    let dp = &p.replicas[0];
    for n in 101..=105usize {
        let payload = vec![b'x'; n];
        let (_, s) = dial(dp.addr(), &p.opts(ECHO, &p.alice)).await;
        let mut s = s.expect("handshake");
        assert_eq!(
            send_and_drain(&mut s, &payload, Duration::ZERO).await,
            payload
        );
    }
    let bytes = |items: &[Value]| -> Vec<u64> {
        items
            .iter()
            .map(|r| r["bytes_up"].as_u64().unwrap_or(0))
            .collect()
    };
    let items = wait_items(
        &p.control,
        "/v1/audit?limit=1000",
        "the fifth record",
        |items| items.first().is_some_and(|r| r["bytes_up"] == 105),
    )
    .await;
    assert_eq!(
        bytes(&items),
        [105, 104, 103],
        "--audit-retention 3 after five connections: {items:#?}"
    );
    // Still so a moment later (nothing else trickles in), and through ztpctl.
    sleep_ms(300).await;
    let out = p.control.ztpctl_json(["audit", "--limit", "1000"]).await;
    let out = out.as_array().expect("an array").clone();
    assert_eq!(bytes(&out), [105, 104, 103], "{out:#?}");
}

fn problem_fields(r: &HttpResponse) -> Vec<String> {
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{r}"
    );
    let p = r.json();
    assert_eq!(p["status"].as_u64(), Some(u64::from(r.status)), "{p}");
    for k in ["type", "title", "detail"] {
        assert!(p[k].is_string(), "problem without {k}: {p}");
    }
    p["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("problem without errors: {p}"))
        .iter()
        .filter_map(|e| e["field"].as_str().map(str::to_string))
        .collect()
}

/// Admin changes made with `ztpctl` under a token named `ops-robot` are in
/// `/v1/audit/admin`, newest first, each with the token's id and name, the action and
/// target, increasing seq and versions one apart (the last the current version) after the
/// `token.create` by the first token; `ztpctl audit --admin` shows the same. Bad queries
/// (`decision=maybe`, `limit=0`, `limit=1001`, an unknown parameter, a non-numeric
/// `since`) are 400 problems naming the field; both routes need a token; `ztpctl audit
/// --decision maybe` is one clear line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_are_attributed_and_bad_queries_are_refused() {
    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    let t0 = now_ms();
    let before = control.config_version().await;
    let created = control.ztpctl_json(["token", "create", "ops-robot"]).await;
    let secret = created["token"].as_str().expect("the token").to_string();
    let token_id = created["id"].as_str().expect("the token id").to_string();
    assert_eq!(created["name"], "ops-robot", "{created}");

    let writes: [(&[&str], &str, &str); 6] = [
        (&["group", "add", "ops"], "group.create", "ops"),
        (
            &[
                "service",
                "add",
                "web.svc.internal",
                "--proto",
                "tcp",
                "--addr",
                "127.0.0.1:9",
                "--group",
                "ops",
            ],
            "service.create",
            "web.svc.internal",
        ),
        (
            &[
                "user",
                "add",
                "carol",
                "--identity",
                "carol@example.com",
                "--group",
                "ops",
            ],
            "user.create",
            "carol",
        ),
        (
            &["user", "update", "carol", "--clear-groups"],
            "user.replace",
            "carol",
        ),
        (&["pki", "revoke", "0A:1B:2C"], "revoke", "0a1b2c"),
        (
            &["service", "rm", "web.svc.internal"],
            "service.delete",
            "web.svc.internal",
        ),
    ];
    for (args, _, _) in &writes {
        let out = control
            .ztpctl_env(args.iter().copied(), &[("ZTP_TOKEN", &secret)])
            .await;
        assert!(
            out.status.success(),
            "ztpctl {args:?} with the ops-robot token: {}",
            ztp_tests::process::describe_output(&out)
        );
    }
    let version = control.config_version().await;
    assert_eq!(
        version,
        before + writes.len() as u64,
        "one version per write"
    );

    let v = control.get_json("/v1/audit/admin?limit=7").await;
    assert!(v["next"].is_null(), "{v}");
    let items = v["items"].as_array().expect("items").clone();
    assert_eq!(items.len(), 7, "{items:#?}");
    // Oldest first from here on.
    let chrono: Vec<&Value> = items.iter().rev().collect();
    let token = chrono[0];
    assert_eq!(token["action"], "token.create", "{token}");
    assert_eq!(token["target"], token_id.as_str(), "{token}");
    assert_eq!(token["actor"]["token_name"], "admin", "{token}");
    assert_eq!(
        token["version"].as_u64(),
        Some(before),
        "a token is not config: {token}"
    );
    let mut last_seq = token["seq"].as_u64().expect("seq");
    let mut last_time = token["time_ms"].as_u64().expect("time_ms");
    assert!(last_time >= t0, "{token}");
    for (i, ((_, action, target), rec)) in writes.iter().zip(&chrono[1..]).enumerate() {
        assert_eq!(rec["action"], *action, "write {i}: {rec}");
        assert_eq!(rec["target"], *target, "write {i}: {rec}");
        assert_eq!(rec["actor"]["token_name"], "ops-robot", "write {i}: {rec}");
        assert_eq!(
            rec["actor"]["token_id"],
            token_id.as_str(),
            "write {i}: {rec}"
        );
        assert_eq!(
            rec["version"].as_u64(),
            Some(before + 1 + i as u64),
            "write {i}: versions one apart: {rec}"
        );
        let seq = rec["seq"].as_u64().expect("seq");
        assert_eq!(seq, last_seq + 1, "write {i}: seq: {rec}");
        let time = rec["time_ms"].as_u64().expect("time_ms");
        assert!(
            time >= last_time && time <= now_ms(),
            "write {i}: time: {rec}"
        );
        last_seq = seq;
        last_time = time;
    }
    assert_eq!(chrono[6]["version"].as_u64(), Some(version));
    let keys: Vec<&str> = items[0]
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["action", "actor", "seq", "target", "time_ms", "version"]
    );

    let out = control
        .ztpctl_json(["audit", "--admin", "--limit", "7"])
        .await;
    assert_eq!(
        out,
        Value::Array(items.clone()),
        "ztpctl -o json audit --admin"
    );
    let table = control
        .ztpctl_ok(["audit", "--admin", "--limit", "7"])
        .await;
    for needle in ["ops-robot", "service.delete", "user.replace", "0a1b2c"] {
        assert!(
            table.contains(needle),
            "`ztpctl audit --admin` does not show {needle:?}:\n{table}"
        );
    }

    // Bad queries name the field.
    for (query, field) in [
        ("/v1/audit?decision=maybe", "decision"),
        ("/v1/audit?limit=0", "limit"),
        ("/v1/audit?limit=1001", "limit"),
        ("/v1/audit/admin?limit=0", "limit"),
        ("/v1/audit/admin?limit=1001", "limit"),
    ] {
        let r = control.api("GET", query, None).await;
        assert_eq!(r.status, 400, "GET {query}: {r}");
        let fields = problem_fields(&r);
        assert_eq!(fields, [field], "GET {query}: {r}");
    }
    for query in [
        "/v1/audit?since=yesterday",
        "/v1/audit?limit=many",
        "/v1/audit?colour=blue",
    ] {
        let r = control.api("GET", query, None).await;
        assert_eq!(r.status, 400, "GET {query}: {r}");
        let fields = problem_fields(&r);
        assert_eq!(fields.len(), 1, "GET {query}: {r}");
    }
    for path in ["/v1/audit", "/v1/audit/admin"] {
        let r = control
            .request_as(None, "GET", path, &[], None)
            .await
            .expect("answered");
        assert_eq!(r.status, 401, "GET {path} without a token: {r}");
    }
    let out = control.ztpctl(["audit", "--decision", "maybe"]).await;
    assert_one_line_error(&out, "ztpctl audit --decision maybe", &["decision"]);
    let out = control.ztpctl(["audit", "--limit", "0"]).await;
    assert_one_line_error(&out, "ztpctl audit --limit 0", &["limit"]);
    assert_eq!(
        control.config_version().await,
        version,
        "reads changed nothing"
    );
}

/// The identity filter follows DESIGN.md's comparison rules: emails case-insensitively
/// (checked above), URIs exactly. A record of `spiffe://example.org/ns/x` is found by
/// that URI, not by `spiffe://example.org/NS/X` (a different principal: the data plane
/// would not admit one for the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_filter_compares_uris_exactly() {
    let p = Plane::start(&["uri-n1"], &[]).await;
    let uri = "spiffe://example.org/ns/x";
    p.control
        .ztpctl_ok([
            "user",
            "add",
            "svc-x",
            "--identity",
            uri,
            "--group",
            "admins",
        ])
        .await;
    p.wait_current().await;
    let cert = p.pki.client_uri(uri);
    let dp = &p.replicas[0];
    let (peer, s) = dial(dp.addr(), &p.opts(ECHO, &cert)).await;
    let mut s = s.expect("svc-x's handshake");
    assert_eq!(send_and_drain(&mut s, b"hi", Duration::ZERO).await, b"hi");
    let r = wait_record(&p.control, peer).await;
    assert_eq!(r["identity"], uri, "{r}");
    assert_eq!(r["user"], "svc-x", "{r}");
    let exact = audit(&p.control, &format!("identity={}", query_escape(uri))).await;
    assert_eq!(peers(&exact), [peer.to_string()]);
    for other in ["spiffe://example.org/NS/X", "spiffe://example.org/ns/X"] {
        let got = audit(&p.control, &format!("identity={}", query_escape(other))).await;
        assert!(
            got.is_empty(),
            "GET /v1/audit?identity={other} returned the records of {uri}: {got:#?}"
        );
    }
}

/// Records made while the control plane is down are queued by the data plane and arrive
/// once it is back (SIGTERM, then a restart on the same store and ports); the record
/// kept before the stop is still there; nothing was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_made_during_a_control_plane_outage_arrive_after_it_returns() {
    let mut p = Plane::start(&["outage-n1"], &[]).await;
    let dp_addr = p.replicas[0].addr();
    let (peer1, s) = dial(dp_addr, &p.opts(ECHO, &p.alice)).await;
    let mut s = s.expect("handshake before the outage");
    assert_eq!(
        send_and_drain(&mut s, b"before", Duration::ZERO).await,
        b"before"
    );
    let r1 = wait_record(&p.control, peer1).await;

    p.control.terminate();
    let status = p
        .control
        .wait_exit(STEP)
        .await
        .expect("ztp-control stops on SIGTERM");
    assert!(status.success(), "ztp-control after SIGTERM: {status}");

    // The replica serves from its last snapshot meanwhile.
    let (peer2, s) = dial(dp_addr, &p.opts(HASH, &p.alice)).await;
    let mut s = s.expect("handshake during the outage");
    let payload = pseudo_random_bytes(300, 9);
    assert_eq!(
        send_and_drain(&mut s, &payload, Duration::ZERO).await,
        sha256(&payload)
    );
    let (peer3, s) = dial(dp_addr, &p.opts(ECHO, &p.bob)).await;
    let mut s = s.expect("bob's handshake during the outage");
    let got = read_to_end_or_alert_within(&mut s, STEP)
        .await
        .unwrap_or_else(|e| panic!("bob: {e}"));
    assert_eq!(String::from_utf8_lossy(&got), "ZTP-ERROR 403 forbidden\n");

    p.control.restart().await;
    let r2 = wait_record(&p.control, peer2).await;
    let r3 = wait_record(&p.control, peer3).await;
    assert_eq!(
        (
            r2["decision"].as_str(),
            r2["bytes_up"].as_u64(),
            r2["bytes_down"].as_u64()
        ),
        (Some("allow"), Some(300), Some(32)),
        "{r2}"
    );
    assert_eq!(
        (r3["decision"].as_str(), r3["code"].as_u64()),
        (Some("deny"), Some(403)),
        "{r3}"
    );
    for r in [&r2, &r3] {
        assert_eq!(r["node"], "outage-n1", "{r}");
    }
    let all = audit(&p.control, "").await;
    assert_eq!(
        peers(&all),
        [peer3.to_string(), peer2.to_string(), peer1.to_string()],
        "{all:#?}"
    );
    assert_eq!(all[2], r1, "the record kept before the stop changed");
    let m = ztp_tests::http::request(p.replicas[0].admin_addr(), "GET", "/metrics", &[], None)
        .await
        .expect("GET /metrics");
    assert!(
        m.text().lines().any(|l| l == "ztp_audit_dropped_total 0"),
        "records were dropped:\n{}",
        m.text()
    );
}

/// A handshake refused for its certificate (here: revoked) reaches the trail with its
/// SNI, its service, and the identity the certificate claims, marked unverified, so that
/// `/v1/audit?identity=alice@example.com&decision=deny` (what `ztpctl audit --identity
/// alice@example.com --decision deny` asks) finds alice's refused attempt. A handshake
/// refused for its SNI claims no identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_is_recorded_with_the_identity_its_certificate_claims() {
    let p = Plane::start(&["audit-rv"], &[]).await;
    let dp = &p.replicas[0];
    let control = &p.control;
    let body = json!({ "serials": [p.alice.serial] }).to_string();
    let r = control
        .request(
            "POST",
            "/v1/revoked",
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
        .await
        .expect("POST /v1/revoked");
    assert!(r.status < 300, "POST /v1/revoked: {r:?}");
    // The revocation reaches the replica: alice is refused in the handshake.
    let deadline = tokio::time::Instant::now() + STEP;
    let peer = loop {
        let (peer, s) = dial(dp.addr(), &p.opts(ECHO, &p.alice)).await;
        let refused = match s {
            Err(e) => alert_of(&e) == Some(AlertDescription::CertificateRevoked),
            Ok(mut s) => matches!(
                read_to_end_or_alert_within(&mut s, STEP).await,
                Err(e) if e.alert() == Some(AlertDescription::CertificateRevoked)
            ),
        };
        if refused {
            break peer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice is still admitted after the revocation"
        );
        sleep_ms(50).await;
    };
    let r = wait_record(control, peer).await;
    assert_eq!(r["decision"], "deny", "{r}");
    assert_eq!(r["reason"], "certificate revoked", "{r}");
    assert_eq!(r["sni"], ECHO, "{r}");
    assert_eq!(r["service"], ECHO, "{r}");
    assert_eq!(r["identity"], "alice@example.com", "{r}");
    assert_eq!(r["identity_unverified"], true, "{r}");
    assert_eq!(r["user"], "", "an unverified claim maps to no user: {r}");
    let found = audit(
        control,
        "identity=alice%40example.com&decision=deny&limit=100",
    )
    .await;
    assert!(
        found.iter().any(|x| x["peer"] == peer.to_string().as_str()),
        "the identity and decision filters find the refused attempt: {found:?}"
    );

    // An unknown SNI: refused before any certificate is seen; it claims nothing.
    let (peer, s) = dial(dp.addr(), &p.opts(UNKNOWN, &p.bob)).await;
    assert!(s.is_err(), "a handshake for an unknown SNI succeeded");
    let r = wait_record(control, peer).await;
    assert_eq!(r["identity"], "", "{r}");
    assert!(r.get("identity_unverified").is_none(), "{r}");
}
