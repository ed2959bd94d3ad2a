//! The connector registry through the real binaries (DESIGN.md "Connectors"): `ztpctl
//! connector add|list|rm`, `ztpctl service add ... --connector NAME`, `ztpctl pki
//! connector NAME`. The registry reaches a subscribed data plane (which acks the schema-3
//! snapshot and serves the service only through the connector), a connector in use is
//! not removed, and the certificate names the connector.

use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use ztp_tests::client::{parse_ztp_error, read_to_end_or_alert_within};
use ztp_tests::{connect_with, ClientOptions, Control, Dataplane, TempDir, TestCert, TestPki};

use crate::common::STEP;
use crate::plane::assert_one_line_error;

const DB: &str = "db.svc.internal";

/// Polls `GET /v1/nodes` (bounded) until node `id` is connected and has acked `version`
/// with no refusal since; returns its entry.
async fn wait_acked(control: &Control, id: &str, version: u64) -> Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let nodes = control.nodes().await;
        if let Some(n) = nodes.iter().find(|n| {
            n["id"] == id && n["connected"] == true && n["applied"].as_u64() == Some(version)
        }) {
            assert_eq!(
                n["last_nack"],
                Value::Null,
                "the node refused a snapshot: {n}"
            );
            return n.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {id} did not ack version {version} within {STEP:?}: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a client of `sni` gets from `dp`: the refusal code of a `ZTP-ERROR` line, or
/// `None` if the session carried bytes.
async fn refusal(dp: &Dataplane, pki: &TestPki, sni: &str, cert: &TestCert) -> Option<u16> {
    let opts = ClientOptions::new(&pki.ca_pem)
        .sni(sni)
        .cert(cert)
        .timeout(Duration::from_secs(5));
    let mut s = connect_with(dp.addr(), &opts).await.expect("the handshake");
    tokio::io::AsyncWriteExt::write_all(&mut s, b"x")
        .await
        .expect("write");
    tokio::io::AsyncWriteExt::shutdown(&mut s)
        .await
        .expect("close_notify");
    let data = match read_to_end_or_alert_within(&mut s, STEP).await {
        Ok(d) => d,
        Err(e) => e.data().to_vec(),
    };
    parse_ztp_error(&data).map(|(code, _)| code)
}

/// The URI SANs of a DER certificate: each `[6] IA5String` (tag 0x86, short length)
/// whose text is a `spiffe://` URI.
fn spiffe_uris(der: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..der.len().saturating_sub(2) {
        let len = usize::from(der[i + 1]);
        if der[i] == 0x86 && len < 0x80 {
            if let Some(text) = der.get(i + 2..i + 2 + len) {
                if let Ok(t) = std::str::from_utf8(text) {
                    if t.starts_with("spiffe://") {
                        out.push(t.to_owned());
                    }
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_registry_reaches_the_data_planes_and_holds_its_services() {
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let control = Control::start(&pki).await;
    control
        .ztpctl_ok(["user", "add", "alice", "--identity", "alice@example.com"])
        .await;
    let mut dp = Dataplane::start_control(&pki, &control.grpc_url(), "n1", &[]).await;
    assert!(
        dp.wait_ready(STEP).await,
        "the data plane did not become ready"
    );
    let before = control.config_version().await;
    wait_acked(&control, "n1", before).await;

    // A connector is configuration: a version of its own.
    let out = control
        .ztpctl_ok(["connector", "add", "lab", "--description", "the lab's rack"])
        .await;
    assert_eq!(out.trim(), "connector lab added");
    assert_eq!(control.config_version().await, before + 1);
    control
        .ztpctl_ok([
            "service",
            "add",
            DB,
            "--proto",
            "tcp",
            "--addr",
            "10.1.2.3:5432",
            "--connector",
            "lab",
        ])
        .await;
    let version = control.config_version().await;
    assert_eq!(version, before + 2);

    // The data plane takes the schema-3 snapshot, and serves the service only through
    // the connector: with no tunnel anywhere, 503 (it never dials 10.1.2.3 itself).
    let node = wait_acked(&control, "n1", version).await;
    assert!(node["schema"].as_u64() >= Some(3), "{node}");
    let snapshot = control.get_json("/v1/snapshot").await;
    assert_eq!(
        snapshot["connectors"],
        json!([{"name": "lab", "description": "the lab's rack"}])
    );
    assert_eq!(snapshot["services"][0]["connector"], "lab");
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match refusal(&dp, &pki, DB, &alice).await {
            Some(503) => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a service behind a connector with no tunnel: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // In use: not removed, in one line that names the service.
    let out = control.ztpctl(["connector", "rm", "lab"]).await;
    assert_one_line_error(&out, "connector rm while in use", &["409", DB, "\"lab\""]);
    assert_eq!(control.config_version().await, version, "nothing changed");
    // A service may name only a registered connector.
    let out = control
        .ztpctl([
            "service",
            "add",
            "x.svc.internal",
            "--proto",
            "tcp",
            "--addr",
            "10.1.2.4:22",
            "--connector",
            "nope",
        ])
        .await;
    assert_one_line_error(&out, "unknown connector", &["400", "connector", "nope"]);
    let out = control.ztpctl(["connector", "add", "lab"]).await;
    assert_one_line_error(&out, "connector add twice", &["409", "lab"]);

    // Listed with its (no) live tunnels, the same way as every list.
    let listed = control.ztpctl_json(["connector", "list"]).await;
    assert_eq!(
        listed,
        json!([{"name": "lab", "description": "the lab's rack", "tunnels": []}])
    );
    assert_eq!(control.ztpctl_json(["connector", "ls"]).await, listed);
    let yaml = control.ztpctl_ok(["connector", "ls", "-o", "yaml"]).await;
    assert!(
        yaml.contains("name: lab") && yaml.contains("tunnels: []"),
        "{yaml}"
    );
    let table = control.ztpctl_ok(["connector", "list"]).await;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAME",
            "TUNNELS",
            "REPLICA",
            "TRANSPORT",
            "SINCE",
            "DESCRIPTION"
        ]
    );
    assert_eq!(rows[1][..5], ["lab", "0", "-", "-", "-"], "{table}");
    let services = control.ztpctl_ok(["service", "list"]).await;
    assert!(
        services.lines().next().unwrap_or("").contains("CONNECTOR")
            && services
                .lines()
                .any(|l| l.starts_with(DB) && l.ends_with("lab")),
        "{services}"
    );

    // Its certificate: the connector's URI, and nothing a user or a node could be.
    let dir = TempDir::new("pki-connector");
    let pki_dir = dir.path().to_str().expect("a UTF-8 temporary folder");
    control.ztpctl_ok(["pki", "init", pki_dir]).await;
    let out = control
        .ztpctl_ok(["pki", "connector", "lab", "--dir", pki_dir])
        .await;
    assert!(
        out.contains("connector-lab.pem") && out.contains("spiffe://ztp.internal/connector/lab"),
        "{out}"
    );
    let cert = CertificateDer::from_pem_file(dir.join("connector-lab.pem"))
        .expect("connector-lab.pem holds a certificate");
    assert_eq!(spiffe_uris(&cert), ["spiffe://ztp.internal/connector/lab"]);
    assert!(dir.join("connector-lab.key").is_file());
    let out = control
        .ztpctl([
            "pki",
            "issue",
            "spiffe://ztp.internal/connector/lab",
            "--dir",
            pki_dir,
        ])
        .await;
    assert_one_line_error(&out, "a connector's URI for a user", &["connector"]);

    // Taken off its connector, the service lets it go; the node follows.
    control
        .ztpctl_ok(["service", "update", DB, "--clear-connector"])
        .await;
    let out = control.ztpctl_ok(["connector", "rm", "lab"]).await;
    assert_eq!(out.trim(), "connector lab removed");
    assert_eq!(control.ztpctl_json(["connector", "list"]).await, json!([]));
    let version = control.config_version().await;
    assert_eq!(version, before + 4);
    wait_acked(&control, "n1", version).await;
    let admin = control.ztpctl_json(["audit", "--admin"]).await;
    let actions: Vec<&str> = admin
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|r| r["action"].as_str())
        .filter(|a| a.starts_with("connector."))
        .collect();
    assert_eq!(actions, ["connector.delete", "connector.create"]);
}
