//! Token roles through the real binaries (DESIGN.md "REST conventions"): `ztpctl token
//! create NAME --role viewer|operator|admin`, `token list` shows the role, a request
//! beyond a token's role is refused with 403 and one clear line from `ztpctl`, and the
//! admin audit trail names the role of each writer.

use serde_json::Value;
use ztp_tests::{Control, TestPki};

use crate::plane::assert_one_line_error;

/// Creates a token with `role` through `ztpctl`; returns its secret.
async fn token(control: &Control, name: &str, role: &str) -> String {
    let created = control
        .ztpctl_json(["token", "create", name, "--role", role])
        .await;
    assert_eq!(created["role"], role, "{created}");
    created["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {created}"))
        .to_owned()
}

fn service_add(name: &str) -> [&str; 7] {
    [
        "service",
        "add",
        name,
        "--proto",
        "tcp",
        "--addr",
        "127.0.0.1:5432",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_reads_operator_writes_services_and_neither_manages_tokens() {
    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    let viewer = token(&control, "dashboard", "viewer").await;
    let operator = token(&control, "ops-robot", "operator").await;
    // Without --role: admin, as every token was before roles existed.
    let admin = control.ztpctl_json(["token", "create", "ci"]).await;
    assert_eq!(admin["role"], "admin", "{admin}");

    let listing = control.ztpctl_ok(["token", "list"]).await;
    assert!(
        listing.lines().next().unwrap_or("").contains("ROLE"),
        "{listing}"
    );
    for (name, role) in [
        ("dashboard", "viewer"),
        ("ops-robot", "operator"),
        ("ci", "admin"),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.contains(name) && l.split_whitespace().any(|w| w == role)),
            "{name} listed as {role}:\n{listing}"
        );
    }

    let version = control.config_version().await;
    // The viewer reads, and its write is refused in one line naming the role.
    let as_viewer = [("ZTP_TOKEN", viewer.as_str())];
    let out = control.ztpctl_env(["service", "list"], &as_viewer).await;
    assert!(out.status.success(), "a viewer reads: {out:?}");
    let out = control
        .ztpctl_env(service_add("db.svc.internal"), &as_viewer)
        .await;
    assert_one_line_error(&out, "viewer writes", &["403", "viewer"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&viewer));
    let out = control.ztpctl_env(["token", "list"], &as_viewer).await;
    assert_one_line_error(&out, "viewer lists tokens", &["403", "viewer"]);
    assert_eq!(
        control.config_version().await,
        version,
        "the viewer changed nothing"
    );

    // The operator writes services, but neither creates nor lists tokens.
    let as_operator = [("ZTP_TOKEN", operator.as_str())];
    let out = control
        .ztpctl_env(service_add("db.svc.internal"), &as_operator)
        .await;
    assert!(out.status.success(), "an operator writes services: {out:?}");
    assert_eq!(control.config_version().await, version + 1);
    let out = control
        .ztpctl_env(
            ["token", "create", "escalate", "--role", "admin"],
            &as_operator,
        )
        .await;
    assert_one_line_error(&out, "operator creates a token", &["403", "operator"]);
    let tokens = control.get_json("/v1/tokens").await;
    assert!(
        !tokens.to_string().contains("escalate"),
        "no token was made: {tokens}"
    );

    // The admin audit trail names the operator's role.
    let audit = control.ztpctl_json(["audit", "--admin"]).await;
    let items: Vec<Value> = audit
        .as_array()
        .cloned()
        .or_else(|| audit["items"].as_array().cloned())
        .unwrap_or_default();
    let create = items
        .iter()
        .find(|r| r["action"] == "service.create")
        .unwrap_or_else(|| panic!("no service.create in {audit}"));
    assert_eq!(create["actor"]["token_name"], "ops-robot", "{create}");
    assert_eq!(create["actor"]["role"], "operator", "{create}");
    let made = items
        .iter()
        .find(|r| r["action"] == "token.create")
        .unwrap_or_else(|| panic!("no token.create in {audit}"));
    assert_eq!(made["actor"]["role"], "admin", "{made}");
}
