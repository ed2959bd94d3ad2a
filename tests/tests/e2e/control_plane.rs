//! `ztp-control` on its own (DESIGN.md "Processes and flags", "REST conventions",
//! "Security notes"; README "Walkthrough: the control plane"): durability of acknowledged
//! writes across SIGKILL, the store's file modes and admin token, flag errors, a second
//! instance on the same store, the walkthrough's REST calls as a new user would make them,
//! and `ztpctl` errors.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use ztp_tests::bins::{run_bounded_with, Bin};
use ztp_tests::http::{self, HttpResponse};
use ztp_tests::{Control, ControlOptions, TempDir, TestPki};

use crate::common::STEP;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every entry under `dir` (recursively) with its mode.
fn modes_under(dir: &Path) -> Vec<(String, u32, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let p = entry.expect("entry").path();
        let is_dir = p.is_dir();
        out.push((p.display().to_string(), mode(&p), is_dir));
        if is_dir {
            out.extend(modes_under(&p));
        }
    }
    out
}

fn assert_private_store(dir: &Path) {
    assert_eq!(mode(dir), 0o700, "the data folder {}", dir.display());
    let entries = modes_under(dir);
    assert!(!entries.is_empty(), "the store wrote nothing");
    for (path, m, is_dir) in entries {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{path} has mode {m:o}, expected {want:o}");
    }
}

/// A fresh store (a folder ztp-control creates, and one that exists with mode 0755): the
/// folder is 0700, every file 0600, `admin-token` holds one `ztp_…` token that works, and
/// the token never appears in the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_store_is_private_and_holds_a_working_admin_token() {
    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    let token_file = control.data_dir().join("admin-token");
    assert_eq!(mode(&token_file), 0o600, "admin-token");
    let text = std::fs::read_to_string(&token_file).expect("read admin-token");
    let token = text.trim();
    assert_eq!(
        token.lines().count(),
        1,
        "admin-token holds one line: {text:?}"
    );
    assert!(
        token.starts_with("ztp_") && token.len() > 20,
        "admin-token does not hold a ztp_ token: {token:?}"
    );
    assert_private_store(control.data_dir());
    let r = control.api("GET", "/v1/services", None).await;
    assert_eq!(r.status, 200, "the admin token is accepted: {r}");
    let r = control
        .api("POST", "/v1/groups", Some(&json!({"name": "g"})))
        .await;
    assert_eq!(r.status, 201, "{r}");
    assert_private_store(control.data_dir());
    assert!(
        control.raw_logs().iter().all(|l| !l.contains(token)),
        "the admin token appears in the logs"
    );

    // A folder that already exists, world-readable.
    let parent = TempDir::new("store");
    let dir = parent.join("pre-existing");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let control = Control::start_with(
        &pki,
        ControlOptions {
            data_dir: Some(&dir),
            no_grpc: true,
            ..Default::default()
        },
    )
    .await;
    assert!(control.token().starts_with("ztp_"));
    assert_private_store(&dir);
}

/// Invalid flags exit 64 with a message naming the problem, before touching the store.
#[tokio::test]
async fn bad_flags_exit_64() {
    let dir = TempDir::new("flags");
    let data = dir.join("data");
    let data_s = data.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--data-dir", &data_s, "--no-such-flag"],
            "--no-such-flag",
        ),
        (vec!["--api-listen", "127.0.0.1:0"], "--data-dir"),
        (
            vec!["--data-dir", &data_s, "--api-listen", "not-an-address"],
            "--api-listen",
        ),
        (
            vec!["--data-dir", &data_s, "--log-format", "xml"],
            "--log-format",
        ),
        (
            // --grpc-cert without --grpc-key and --node-ca.
            vec!["--data-dir", &data_s, "--grpc-cert", "x.pem"],
            "--grpc-key",
        ),
    ];
    for (args, names) in cases {
        let out = run_bounded_with(Bin::Control, args.iter().copied(), &[], STEP);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(64),
            "ztp-control {args:?}: exit {}; stderr: {stderr}",
            out.status
        );
        assert!(
            stderr.contains(names),
            "ztp-control {args:?}: the message does not name {names}: {stderr}"
        );
    }
    assert!(!data.exists(), "a refused start created the data folder");
}

/// A second ztp-control on a store in use exits non-zero with a clear message (sled's
/// lock) instead of opening it; the first keeps serving, with its data and token intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instance_on_the_same_store_is_refused() {
    let pki = TestPki::new();
    let mut first = Control::start_api_only(&pki).await;
    let r = first
        .api("POST", "/v1/groups", Some(&json!({"name": "kept"})))
        .await;
    assert_eq!(r.status, 201, "{r}");
    let token_before = std::fs::read(first.data_dir().join("admin-token")).unwrap();

    let data = first.data_dir().to_str().unwrap().to_string();
    let out = run_bounded_with(
        Bin::Control,
        [
            "--data-dir",
            &data,
            "--api-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &[],
        STEP,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second instance on the same store started (exit {}); stderr: {stderr}",
        out.status
    );
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("lock") || lower.contains("in use"),
        "the second instance's message does not say the store is in use: {stderr}"
    );
    assert!(
        lower.contains(&data.to_lowercase()),
        "the message does not name the store: {stderr}"
    );

    assert!(first.try_wait().is_none(), "the first instance died");
    assert_eq!(
        std::fs::read(first.data_dir().join("admin-token")).unwrap(),
        token_before,
        "the admin token was rewritten"
    );
    let groups = first.list_all("groups").await;
    assert_eq!(groups, vec![json!({"name": "kept"})]);
    let r = first
        .api("POST", "/v1/groups", Some(&json!({"name": "after"})))
        .await;
    assert_eq!(r.status, 201, "the first instance still writes: {r}");
    assert_eq!(first.config_version().await, 2);
}

/// What write `i` of the burst creates: a group, a user in group `base`, or a service in
/// group `base` (so writes that touch reverse indexes are cut by the kill too).
fn burst_write(i: usize) -> (&'static str, String, Value) {
    match i % 3 {
        0 => {
            let name = format!("g{i:04}");
            ("groups", name.clone(), json!({ "name": name }))
        }
        1 => {
            let name = format!("u{i:04}");
            let body = json!({
                "name": name,
                "identities": [format!("{name}@example.com")],
                "groups": ["base"],
            });
            ("users", name, body)
        }
        _ => {
            let name = format!("s{i:04}.svc.internal");
            let body = json!({
                "name": name,
                "protocol": "tcp",
                "address": "127.0.0.1:9",
                "groups": ["base"],
            });
            ("services", name, body)
        }
    }
}

/// Issue 4: writes acknowledged with a 2xx survive a SIGKILL in the middle of a burst.
///
/// Eight connections make up to 400 writes concurrently (groups, users and services, the
/// latter two in group `base`); the control plane is SIGKILLed once 120 are acknowledged.
/// Restarted on the same store (same admin token): every acknowledged record is there,
/// nothing but attempted names is, at most the requests in flight at the kill are there
/// unacknowledged, the config version counts exactly the stored writes (each write and
/// its version bump are one transaction), the exported snapshot is valid, and the group
/// `base` is still known to be in use (its reverse index survived).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    const TOTAL: usize = 400;
    const WORKERS: usize = 8;
    const KILL_AFTER: usize = 120;
    let pki = TestPki::new();
    let mut control = Control::start_api_only(&pki).await;
    let r = control
        .api("POST", "/v1/groups", Some(&json!({"name": "base"})))
        .await;
    assert_eq!(r.status, 201, "{r}");
    let token_before = control.token().to_string();
    let addr = control.api_addr();
    let auth = format!("Bearer {}", control.token());

    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(BTreeSet::<(String, String)>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let unanswered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (next, acked, refused, unanswered, auth) = (
            next.clone(),
            acked.clone(),
            refused.clone(),
            unanswered.clone(),
            auth.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= TOTAL {
                    return;
                }
                let (kind, name, body) = burst_write(i);
                let body = serde_json::to_vec(&body).unwrap();
                let r: std::io::Result<HttpResponse> = http::request(
                    addr,
                    "POST",
                    &format!("/v1/{kind}"),
                    &[
                        ("Authorization", &auth),
                        ("Content-Type", "application/json"),
                    ],
                    Some(&body),
                )
                .await;
                match r {
                    Ok(r) if r.is_success() => {
                        acked.lock().unwrap().insert((kind.to_string(), name));
                    }
                    Ok(r) => refused.lock().unwrap().push(format!("{kind} {name}: {r}")),
                    Err(_) => {
                        unanswered.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = acked.lock().unwrap().len();
        if n >= KILL_AFTER {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {n} writes acknowledged in 20 s; refused: {:?}",
            refused.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    control.kill9().expect("it was running");
    let started_before_kill = next.load(Ordering::SeqCst).min(TOTAL);
    for t in tasks {
        tokio::time::timeout(STEP, t)
            .await
            .expect("the writers stop once the server is gone")
            .expect("writer task");
    }
    let acked = acked.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(refused.is_empty(), "writes refused: {refused:?}");
    assert!(
        acked.len() < TOTAL,
        "the kill came after the whole burst ({} acknowledged)",
        acked.len()
    );
    eprintln!(
        "burst: {} acknowledged, {} unanswered, {started_before_kill} started before the kill",
        acked.len(),
        unanswered.load(Ordering::SeqCst)
    );

    control.restart().await;
    assert_eq!(
        control.token(),
        token_before,
        "the admin token changed on restart"
    );
    let mut stored = BTreeSet::new();
    for kind in ["groups", "users", "services"] {
        for item in control.list_all(kind).await {
            let name = item["name"].as_str().expect("name").to_string();
            stored.insert((kind.to_string(), name));
        }
    }
    assert!(stored.remove(&("groups".to_string(), "base".to_string())));
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost after kill -9: {lost:?}",
        lost.len()
    );
    let attempted: BTreeSet<(String, String)> = (0..TOTAL)
        .map(|i| {
            let (kind, name, _) = burst_write(i);
            (kind.to_string(), name)
        })
        .collect();
    let foreign: Vec<_> = stored.difference(&attempted).collect();
    assert!(foreign.is_empty(), "records nobody wrote: {foreign:?}");
    let unacked_stored = stored.len() - acked.len();
    assert!(
        unacked_stored <= WORKERS,
        "{unacked_stored} unacknowledged writes are stored; at most {WORKERS} were in flight"
    );
    let version = control.config_version().await;
    assert!(
        version > acked.len() as u64,
        "config version {version} <= {} acknowledged writes (plus group base)",
        acked.len()
    );
    assert_eq!(
        version,
        stored.len() as u64 + 1,
        "each stored write (and group base) bumped the version once"
    );

    // The store is consistent: its snapshot validates, and `base` is known to be in use.
    let r = control.api("GET", "/v1/snapshot?format=yaml", None).await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.etag_version(), Some(version));
    let dir = TempDir::new("burst");
    std::fs::write(dir.join("snapshot.yaml"), r.body).unwrap();
    let check = ztp_tests::dataplane::check(&dir.join("snapshot.yaml"));
    assert!(
        check.status.success(),
        "the snapshot after kill -9 does not validate: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let in_use = stored.iter().any(|(k, _)| k != "groups");
    let r = control.api("DELETE", "/v1/groups/base", None).await;
    if in_use {
        assert_eq!(r.status, 409, "group base is in use: {r}");
    }
    // The store takes writes again, and the version moves on from there.
    let r = control
        .api(
            "POST",
            "/v1/groups",
            Some(&json!({"name": "after-restart"})),
        )
        .await;
    assert_eq!(r.status, 201, "{r}");
    let expected = if in_use { version + 1 } else { version + 2 };
    assert_eq!(r.etag_version(), Some(expected), "{r}");
}

fn problem(r: &HttpResponse) -> Value {
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{r}"
    );
    let p = r.json();
    assert_eq!(p["status"].as_u64(), Some(r.status as u64), "{p}");
    for k in ["type", "title", "detail"] {
        assert!(p[k].is_string(), "problem without {k}: {p}");
    }
    assert!(p["errors"].is_array(), "{p}");
    p
}

fn fields(p: &Value) -> Vec<String> {
    p["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["field"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The README walkthrough, as a new user would type it with curl (bodies without a
/// Content-Type, as `curl -d` sends them as form data): 201s with ETag and Location, the
/// YAML snapshot, the import round trip; problem+json 400s naming the field, 409 on a
/// duplicate, 412 on a stale If-Match, 401 without or with a wrong token; health checks
/// without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_rest_calls() {
    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    // What `curl -d` sends.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let post = |path: &'static str, body: &'static str| {
        let control = &control;
        async move {
            control
                .request("POST", path, &form, Some(body.as_bytes()))
                .await
                .unwrap_or_else(|e| panic!("POST {path}: {e}"))
        }
    };

    let r = post("/v1/groups", r#"{"name":"admins"}"#).await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(r.header("etag"), Some("\"1\""), "{r}");
    assert_eq!(r.header("location"), Some("/v1/groups/admins"), "{r}");
    assert_eq!(r.json(), json!({"name": "admins"}));
    let r = post(
        "/v1/services",
        r#"{"name":"ssh.svc.internal","protocol":"tcp","address":"127.0.0.1:22","groups":["admins"]}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(r.etag_version(), Some(2), "{r}");
    assert_eq!(r.json()["groups"], json!(["admins"]));
    let r = post(
        "/v1/users",
        r#"{"name":"alice","identities":["alice@example.com"],"groups":["admins"]}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(r.etag_version(), Some(3), "{r}");

    // The snapshot a data plane can serve.
    let r = control.api("GET", "/v1/snapshot?format=yaml", None).await;
    assert_eq!(r.status, 200, "{r}");
    assert!(
        r.header("content-type").is_some_and(|c| c.contains("yaml")),
        "{r}"
    );
    assert_eq!(r.etag_version(), Some(3), "{r}");
    let yaml = r.text();
    for want in [
        "version: 3",
        "ssh.svc.internal",
        "alice@example.com",
        "admins",
    ] {
        assert!(
            yaml.contains(want),
            "the YAML snapshot lacks {want:?}:\n{yaml}"
        );
    }
    let snapshot_file = TempDir::new("walkthrough");
    std::fs::write(snapshot_file.join("snapshot.yaml"), &yaml).unwrap();
    let check = ztp_tests::dataplane::check(&snapshot_file.join("snapshot.yaml"));
    assert!(
        check.status.success(),
        "ztp-dataplane --check refuses the exported snapshot: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let json_snapshot = control.get_json("/v1/snapshot").await;
    assert_eq!(
        json_snapshot["version"].as_u64(),
        Some(3),
        "{json_snapshot}"
    );
    assert_eq!(json_snapshot["users"][0]["name"], "alice");

    // Import of what was exported: the whole configuration as one new version.
    let r = control
        .request(
            "POST",
            "/v1/import",
            &[("Content-Type", "application/yaml")],
            Some(yaml.as_bytes()),
        )
        .await
        .unwrap();
    assert!(r.is_success(), "import of the exported snapshot: {r}");
    assert_eq!(control.config_version().await, 4);
    let again = control.get_json("/v1/snapshot").await;
    assert_eq!(again["services"], json_snapshot["services"]);
    assert_eq!(again["users"], json_snapshot["users"]);
    assert_eq!(again["groups"], json_snapshot["groups"]);

    // Refusals name the field; nothing is stored.
    let r = post(
        "/v1/users",
        r#"{"name":"bob","identities":["bob@example.com"],"groups":["ops"]}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{r}");
    let p = problem(&r);
    assert_eq!(fields(&p), ["groups[0]"], "{p}");
    assert!(
        p["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("ops"),
        "{p}"
    );
    let r = post(
        "/v1/services",
        r#"{"name":"x.svc.internal","protocol":"tcp","adress":"127.0.0.1:22"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{r}");
    assert!(fields(&problem(&r)).contains(&"adress".to_string()), "{r}");
    let r = post(
        "/v1/services",
        r#"{"name":"y.svc.internal","protocol":"tcp","address":"not an address"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{r}");
    assert_eq!(fields(&problem(&r)), ["address"], "{r}");
    // DESIGN.md: a directory user may not claim a data-plane node's URI.
    let r = post(
        "/v1/users",
        r#"{"name":"mallory","identities":["spiffe://ztp.internal/node/n1"]}"#,
    )
    .await;
    assert_eq!(r.status, 400, "a user claiming a node identity: {r}");
    assert_eq!(fields(&problem(&r)), ["identities[0]"], "{r}");
    let r = post("/v1/groups", r#"{"name":"admins"}"#).await;
    assert_eq!(r.status, 409, "{r}");
    problem(&r);
    let r = post("/v1/groups", r#"{"name": "#).await;
    assert_eq!(r.status, 400, "malformed JSON: {r}");
    problem(&r);
    assert_eq!(
        control.config_version().await,
        4,
        "a refusal stored something"
    );
    assert_eq!(control.list_all("users").await.len(), 1);

    // Conditional writes.
    let stale = [("Content-Type", "application/json"), ("If-Match", "\"1\"")];
    let r = control
        .request("POST", "/v1/groups", &stale, Some(br#"{"name":"ops"}"#))
        .await
        .unwrap();
    assert_eq!(r.status, 412, "a stale If-Match: {r}");
    problem(&r);
    let current = [("Content-Type", "application/json"), ("If-Match", "\"4\"")];
    let r = control
        .request("POST", "/v1/groups", &current, Some(br#"{"name":"ops"}"#))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "a current If-Match: {r}");

    // Lists page.
    let page = control.get_json("/v1/groups?limit=1").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    let next = page["next"].as_str().expect("a next cursor").to_string();
    let page2 = control
        .get_json(&format!(
            "/v1/groups?limit=1&cursor={}",
            ztp_tests::control::query_escape(&next)
        ))
        .await;
    assert_ne!(page2["items"][0], page["items"][0], "{page2}");
    let r = control.api("GET", "/v1/groups?limit=0", None).await;
    assert_eq!(r.status, 400, "{r}");
    assert_eq!(fields(&problem(&r)), ["limit"]);

    // Tokens: none, wrong, revoked. Health checks need none.
    for (token, what) in [(None, "no token"), (Some("ztp_wrong"), "a wrong token")] {
        let r = control
            .request_as(token, "GET", "/v1/services", &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{what}: {r}");
        problem(&r);
        let r = control
            .request_as(token, "POST", "/v1/groups", &form, Some(br#"{"name":"x"}"#))
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{what}: {r}");
    }
    let r = control
        .api("POST", "/v1/tokens", Some(&json!({"name": "ci"})))
        .await;
    assert!(r.is_success(), "{r}");
    let created = r.json();
    let secret = created["token"]
        .as_str()
        .expect("the secret is shown once")
        .to_string();
    let id = created["id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| created["id"].to_string());
    let r = control
        .request_as(Some(&secret), "GET", "/v1/services", &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "a created token works: {r}");
    let list = control.get_json("/v1/tokens").await;
    assert!(
        !list.to_string().contains(&secret),
        "the token list shows a secret: {list}"
    );
    let r = control
        .api("DELETE", &format!("/v1/tokens/{id}"), None)
        .await;
    assert!(r.is_success(), "revoke: {r}");
    let r = control
        .request_as(Some(&secret), "GET", "/v1/services", &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, 401, "a revoked token: {r}");
    // The last token cannot be revoked.
    let list = control.get_json("/v1/tokens").await;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "only the admin token is left: {list}");
    let admin_id = match &items[0]["id"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let r = control
        .api("DELETE", &format!("/v1/tokens/{admin_id}"), None)
        .await;
    assert!(!r.is_success(), "the last token was revoked: {r}");
    problem(&r);
    assert_eq!(control.api("GET", "/v1/services", None).await.status, 200);
    for path in ["/healthz", "/readyz"] {
        let r = control
            .request_as(None, "GET", path, &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path} without a token: {r}");
    }
    assert!(
        control
            .raw_logs()
            .iter()
            .all(|l| !l.contains(&secret) && !l.contains(control.token())),
        "a token appears in the logs"
    );
}

/// `ztpctl` errors: a non-zero exit and one line on stderr that says what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_errors_are_one_clear_line() {
    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    let one_line = |out: &std::process::Output, what: &str, needle: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: exit {}", out.status);
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{what}: not one line: {stderr:?}"
        );
        assert!(
            stderr.contains(needle),
            "{what}: {stderr:?} does not mention {needle:?}"
        );
    };
    let out = control
        .ztpctl([
            "user",
            "add",
            "bob",
            "--identity",
            "bob@example.com",
            "--group",
            "nope",
        ])
        .await;
    one_line(&out, "unknown group", "nope");
    control.ztpctl_ok(["group", "add", "ops"]).await;
    let out = control.ztpctl(["group", "add", "ops"]).await;
    one_line(&out, "duplicate", "ops");
    let out = control
        .ztpctl(["service", "get", "nothing.svc.internal"])
        .await;
    one_line(&out, "missing service", "nothing.svc.internal");
    let out = control
        .ztpctl_env(["service", "list"], &[("ZTP_TOKEN", "ztp_wrong")])
        .await;
    assert!(!out.status.success(), "a wrong token: exit {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
    assert!(
        !stderr.contains("ztp_wrong"),
        "the token is echoed: {stderr:?}"
    );
    assert_eq!(control.config_version().await, 1);
}

/// The API exposed over HTTPS (`--api-cert`, `--api-key`): `ztpctl` with an `https://`
/// server and `--api-ca` writes and reads through it; a plain-HTTP request to the port
/// gets no HTTP answer; `https://` without the CA is one clear error line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_over_https_serves_ztpctl_and_nothing_in_plaintext() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = TestPki::new();
    let dir = TempDir::new("https-api");
    pki.server.write(dir.path(), "api").unwrap();
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    let (cert, key, ca) = (
        dir.join("api.pem").display().to_string(),
        dir.join("api.key").display().to_string(),
        dir.join("ca.pem").display().to_string(),
    );
    let control = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            args: &["--api-cert", &cert, "--api-key", &key],
            ..Default::default()
        },
    )
    .await;
    let url = format!("https://localhost:{}", control.api_addr().port());
    let env = [("ZTP_SERVER", url.as_str()), ("ZTP_API_CA", ca.as_str())];

    let out = control.ztpctl_env(["group", "add", "ops"], &env).await;
    assert!(out.status.success(), "{out:?}");
    let out = control
        .ztpctl_env(["-o", "json", "group", "list"], &env)
        .await;
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        listed.to_string().contains("\"ops\""),
        "the group written over HTTPS is listed: {listed}"
    );

    // Plain HTTP to the HTTPS port: never an HTTP answer.
    let mut s = tokio::net::TcpStream::connect(control.api_addr())
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got))
        .await
        .expect("the HTTPS port neither refused nor closed a plaintext request");
    assert!(!got.starts_with(b"HTTP/"), "answered in plaintext: {got:?}");

    // https:// without the CA: one line saying what is missing.
    let out = control
        .ztpctl_env(["group", "list"], &[("ZTP_SERVER", url.as_str())])
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-ca"), "{err}");
}

/// A healthy idle node is seen now (DESIGN.md: nodes subscribe; their stream is their
/// liveness): `ztpctl node list` says `now` and `ztp_node_last_seen_seconds` stays 0 while
/// it sends nothing. A connected node cannot be removed (409, one line); once it is gone,
/// `ztpctl node rm` forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_nodes_are_seen_now_and_gone_ones_can_be_removed() {
    use crate::plane::{assert_one_line_error, Plane};

    let mut p = Plane::start(&["idle-a"], &[]).await;
    p.wait_current().await;
    // Idle: no config change, no connection; the node sends nothing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let list = p.control.ztpctl_ok(["node", "list"]).await;
    let row = list
        .lines()
        .find(|l| l.starts_with("idle-a"))
        .unwrap_or_else(|| panic!("no idle-a in:\n{list}"));
    assert!(row.contains(" up ") && row.contains(" now"), "{list}");
    let metrics = p.control.api("GET", "/metrics", None).await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        text.contains("ztp_node_last_seen_seconds{node=\"idle-a\"} 0\n"),
        "{text}"
    );

    let out = p.control.ztpctl(["node", "rm", "idle-a"]).await;
    assert_one_line_error(&out, "removing a connected node", &["409", "connected"]);
    let out = p.control.ztpctl(["node", "rm", "nope"]).await;
    assert_one_line_error(&out, "removing an unknown node", &["404", "nope"]);

    // Gone for good: down, aging, and removable.
    drop(p.replicas.pop());
    let deadline = tokio::time::Instant::now() + STEP;
    while p.control.nodes().await[0]["connected"] != false {
        assert!(tokio::time::Instant::now() < deadline, "still connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = p.control.ztpctl_ok(["node", "rm", "idle-a"]).await;
    assert!(out.contains("idle-a"), "{out}");
    assert!(p.control.nodes().await.is_empty());
    let list = p.control.ztpctl_ok(["node", "list"]).await;
    assert!(!list.contains("idle-a"), "{list}");
}

/// A missing and a wrong token get different lines from `ztpctl`, neither echoing a
/// token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_tells_a_missing_token_from_a_wrong_one() {
    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    let out = control
        .ztpctl_env(["service", "list"], &[("ZTP_TOKEN", "")])
        .await;
    crate::plane::assert_one_line_error(&out, "no token", &["no token", "ZTP_TOKEN", "--token"]);
    let out = control
        .ztpctl_env(["service", "list"], &[("ZTP_TOKEN", "ztp_wrong")])
        .await;
    crate::plane::assert_one_line_error(&out, "wrong token", &["refused the token (401)"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("ztp_wrong"));
}

/// `http://` to the HTTPS API port and `https://` to a plain one are each named in one
/// line, not as a TLS or HTTP parse error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_names_a_scheme_that_does_not_match_the_port() {
    let pki = TestPki::new();
    let dir = TempDir::new("scheme-mismatch");
    pki.server.write(dir.path(), "api").unwrap();
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    let (cert, key, ca) = (
        dir.join("api.pem").display().to_string(),
        dir.join("api.key").display().to_string(),
        dir.join("ca.pem").display().to_string(),
    );
    let https = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            args: &["--api-cert", &cert, "--api-key", &key],
            ..Default::default()
        },
    )
    .await;
    let url = format!("http://localhost:{}", https.api_addr().port());
    let out = https
        .ztpctl_env(["service", "list"], &[("ZTP_SERVER", url.as_str())])
        .await;
    crate::plane::assert_one_line_error(&out, "http:// to HTTPS", &["speaks HTTPS", "https://"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("invalid HTTP version"), "{err}");

    let plain = Control::start_api_only(&pki).await;
    let url = format!("https://localhost:{}", plain.api_addr().port());
    let out = plain
        .ztpctl_env(
            ["service", "list"],
            &[("ZTP_SERVER", url.as_str()), ("ZTP_API_CA", ca.as_str())],
        )
        .await;
    crate::plane::assert_one_line_error(
        &out,
        "https:// to HTTP",
        &["speaks plain HTTP", "http://"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("InvalidContentType"), "{err}");
}
