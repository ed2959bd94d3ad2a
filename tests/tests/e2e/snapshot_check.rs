//! `ztp-dataplane --check FILE` and startup configuration errors.
//!
//! Contract: a valid file exits 0 and prints `ok`; an invalid one exits 1 with a message
//! naming the field (`services[0].address: ...`); a startup configuration error (bad
//! flag, missing file, invalid snapshot) exits 64.

use std::process::Output;

use ztp_tests::dataplane::{check, run_bounded, RUN_TIMEOUT};
use ztp_tests::{TempDir, TestPki};

const VALID: &str = r#"version: 3
services:
  - name: echo.svc.internal
    protocol: tcp
    address: "127.0.0.1:7000"
  - name: "*.svc.internal"
    address: ":7001"
  - name: admins.svc.internal
    protocol: tcp
    address: "127.0.0.1:7002"
    groups: [admins]
    allow: ["10.0.0.0/8", "127.0.0.0/8"]
  - name: whoami.svc.internal
    protocol: tcp
    handler: identity-echo
users:
  - name: alice
    identities: ["alice@example.com"]
    groups: [admins]
  - name: bob
    identities: ["bob@example.com", "spiffe://example.org/ns/bob"]
    disabled: false
  - name: carol
    identities: ["carol"]
groups:
  - name: admins
revoked: ["0a1b2c3d", "00FF"]
"#;

fn check_text(yaml: &str) -> Output {
    let dir = TempDir::new("check");
    let path = dir.join("snapshot.yaml");
    std::fs::write(&path, yaml).expect("write snapshot");
    check(&path)
}

fn show(out: &Output) -> String {
    format!(
        "status: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts exit 1 and that stderr names every one of `needles`.
fn assert_invalid(yaml: &str, needles: &[&str]) {
    let out = check_text(yaml);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(
            stderr.contains(n),
            "stderr does not name `{n}`:\n{}",
            show(&out)
        );
    }
}

#[test]
fn check_accepts_a_valid_snapshot() {
    let out = check_text(VALID);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{}",
        show(&out)
    );
}

#[test]
fn check_refuses_an_unknown_field() {
    let yaml = VALID.replacen(
        "    address: \"127.0.0.1:7000\"",
        "    adress: \"127.0.0.1:7000\"",
        1,
    );
    assert_invalid(&yaml, &["services[0]", "adress"]);
}

#[test]
fn check_refuses_a_bad_sni_pattern() {
    let yaml = VALID.replacen(
        "  - name: echo.svc.internal",
        "  - name: \"a.*.internal\"",
        1,
    );
    assert_invalid(&yaml, &["services[0].name"]);
}

#[test]
fn check_refuses_an_unknown_group_on_a_service() {
    let yaml = VALID.replacen(
        "    groups: [admins]\n    allow",
        "    groups: [admns]\n    allow",
        1,
    );
    assert_invalid(&yaml, &["services[2].groups"]);
}

#[test]
fn check_refuses_an_unknown_group_on_a_user() {
    let yaml = VALID.replacen(
        "    identities: [\"alice@example.com\"]\n    groups: [admins]",
        "    identities: [\"alice@example.com\"]\n    groups: [wheel]",
        1,
    );
    assert_invalid(&yaml, &["users[0].groups"]);
}

#[test]
fn check_refuses_an_identity_claimed_by_two_users() {
    let yaml = VALID.replacen(
        "    identities: [\"carol\"]",
        "    identities: [\"carol\", \"alice@example.com\"]",
        1,
    );
    assert_invalid(&yaml, &["users[", "identities"]);
}

#[test]
fn check_refuses_an_unparsable_address() {
    let yaml = VALID.replacen("\"127.0.0.1:7000\"", "\"127.0.0.1:notaport\"", 1);
    assert_invalid(&yaml, &["services[0].address"]);
}

#[test]
fn unknown_flag_exits_64() {
    let out = run_bounded(["--no-such-flag"], RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(64), "{}", show(&out));
}

fn startup_args(dir: &TempDir, snapshot: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    for (flag, value) in [
        ("--listen", "127.0.0.1:0".into()),
        ("--admin-listen", "127.0.0.1:0".into()),
        ("--cert", dir.join("server.pem")),
        ("--key", dir.join("server.key")),
        ("--client-ca", dir.join("ca.pem")),
        ("--snapshot", snapshot.to_path_buf()),
    ] {
        args.push(flag.into());
        args.push(value.into_os_string());
    }
    args
}

#[test]
fn missing_snapshot_file_at_startup_exits_64() {
    let dir = TempDir::new("startup");
    TestPki::new().write_files(dir.path()).expect("write PKI");
    let out = run_bounded(
        startup_args(&dir, &dir.join("no-such-snapshot.yaml")),
        RUN_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(64), "{}", show(&out));
}

#[test]
fn missing_certificate_file_at_startup_exits_64() {
    let dir = TempDir::new("startup");
    let pki = TestPki::new();
    pki.write_files(dir.path()).expect("write PKI");
    std::fs::write(dir.join("snapshot.yaml"), VALID).expect("write snapshot");
    std::fs::remove_file(dir.join("server.pem")).expect("remove server.pem");
    let out = run_bounded(startup_args(&dir, &dir.join("snapshot.yaml")), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(64), "{}", show(&out));
}

#[test]
fn invalid_snapshot_at_startup_exits_64() {
    let dir = TempDir::new("startup");
    TestPki::new().write_files(dir.path()).expect("write PKI");
    let bad = VALID.replacen("\"127.0.0.1:7000\"", "\"127.0.0.1:notaport\"", 1);
    std::fs::write(dir.join("snapshot.yaml"), bad).expect("write snapshot");
    let out = run_bounded(startup_args(&dir, &dir.join("snapshot.yaml")), RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(64), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("services[0].address"),
        "{}",
        show(&out)
    );
}
