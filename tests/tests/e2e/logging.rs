//! The per-connection `connection` log event, and what must never be logged (DESIGN.md
//! "Security notes": keys, tokens and payloads never appear in logs).

use std::net::SocketAddr;

use serde_json::Value;
use tokio::net::TcpStream;
use ztp_tests::client::handshake;
use ztp_tests::TestCert;

use crate::common::{assert_refusal_line, echo_roundtrip, Fixture, STEP};

const MARKER: &str = "ZTP-PAYLOAD-MARKER-9f2c41d7";

fn field<'a>(event: &'a Value, name: &str) -> &'a Value {
    &event[name]
}

async fn allowed_connection(fx: &Fixture, alice: &TestCert, payload: &[u8]) -> SocketAddr {
    let s = fx
        .connect("echo.svc.internal", alice)
        .await
        .expect("handshake");
    let local = s.get_ref().0.local_addr().expect("local addr");
    assert_eq!(echo_roundtrip(s, payload).await, payload);
    local
}

async fn denied_connection(fx: &Fixture, mallory: &TestCert) -> SocketAddr {
    let s = fx
        .connect("echo.svc.internal", mallory)
        .await
        .expect("handshake");
    let local = s.get_ref().0.local_addr().expect("local addr");
    assert_refusal_line(s, 0, 403, "forbidden").await;
    local
}

fn payload() -> Vec<u8> {
    MARKER.repeat(40).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_events_carry_identity_decision_and_byte_counts() {
    let fx = Fixture::start().await;
    let alice = fx.pki.client_email("alice@example.com");
    let mallory = fx.pki.client_email("mallory@example.com");
    let payload = payload();

    let allowed_addr = allowed_connection(&fx, &alice, &payload).await;
    let ev = fx
        .dp
        .wait_for_connection_event(allowed_addr, STEP)
        .await
        .unwrap_or_else(|| panic!("no `connection` event for {allowed_addr}"));
    assert_eq!(field(&ev, "decision"), "allow", "{ev}");
    assert_eq!(field(&ev, "tls.sni"), "echo.svc.internal", "{ev}");
    assert_eq!(field(&ev, "client.id"), "alice@example.com", "{ev}");
    assert_eq!(field(&ev, "user.name"), "alice", "{ev}");
    assert_eq!(field(&ev, "service.name"), "echo.svc.internal", "{ev}");
    assert_eq!(
        field(&ev, "bytes.up").as_u64(),
        Some(payload.len() as u64),
        "{ev}"
    );
    assert_eq!(
        field(&ev, "bytes.down").as_u64(),
        Some(payload.len() as u64),
        "{ev}"
    );
    assert!(
        field(&ev, "duration_ms").is_u64(),
        "duration_ms is a number: {ev}"
    );
    assert!(
        field(&ev, "refusal.code").is_null(),
        "no refusal code on an allow: {ev}"
    );

    let denied_addr = denied_connection(&fx, &mallory).await;
    let ev = fx
        .dp
        .wait_for_connection_event(denied_addr, STEP)
        .await
        .unwrap_or_else(|| panic!("no `connection` event for {denied_addr}"));
    assert_eq!(field(&ev, "decision"), "deny", "{ev}");
    assert_eq!(field(&ev, "refusal.code").as_u64(), Some(403), "{ev}");
    assert!(
        field(&ev, "reason").as_str().is_some_and(|r| !r.is_empty()),
        "a deny carries a reason: {ev}"
    );
    assert_eq!(field(&ev, "tls.sni"), "echo.svc.internal", "{ev}");
    assert_eq!(field(&ev, "client.id"), "mallory@example.com", "{ev}");
    assert!(
        field(&ev, "user.name").is_null(),
        "no user for mallory: {ev}"
    );
    // Nothing was forwarded.
    if let Some(up) = field(&ev, "bytes.up").as_u64() {
        assert_eq!(up, 0, "{ev}");
    }

    // Exactly one event per connection.
    let count = |addr: SocketAddr| {
        fx.dp
            .logs()
            .iter()
            .filter(|v| {
                v["message"] == "connection" && v["client.addr"] == addr.to_string().as_str()
            })
            .count()
    };
    assert_eq!(count(allowed_addr), 1);
    assert_eq!(count(denied_addr), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusal_is_logged_as_a_deny() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let tcp = TcpStream::connect(fx.dp.addr()).await.expect("tcp connect");
    let local = tcp.local_addr().expect("local addr");
    let r = handshake(tcp, &fx.opts("nothing.example.org", &bob)).await;
    assert!(r.is_err(), "unknown SNI must be refused");
    let ev = fx
        .dp
        .wait_for_connection_event(local, STEP)
        .await
        .unwrap_or_else(|| panic!("no `connection` event for the refused handshake from {local}"));
    assert_eq!(field(&ev, "decision"), "deny", "{ev}");
    assert!(field(&ev, "user.name").is_null(), "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_private_keys_or_payload() {
    let fx = Fixture::start().await;
    let alice = fx.pki.client_email("alice@example.com");
    let mallory = fx.pki.client_email("mallory@example.com");
    let payload = payload();
    let a = allowed_connection(&fx, &alice, &payload).await;
    let d = denied_connection(&fx, &mallory).await;
    for addr in [a, d] {
        fx.dp
            .wait_for_connection_event(addr, STEP)
            .await
            .unwrap_or_else(|| panic!("no `connection` event for {addr}"));
    }

    // The first base64 line of each private key.
    let key_lines: Vec<String> = [&fx.pki.server, &alice, &mallory]
        .iter()
        .map(|c| c.key_pem.lines().nth(1).expect("PEM body").to_string())
        .collect();
    let logs = fx.dp.raw_logs();
    assert!(!logs.is_empty());
    for line in &logs {
        assert!(
            !line.contains("PRIVATE KEY"),
            "a log line holds a PEM key: {line}"
        );
        for k in &key_lines {
            assert!(
                !line.contains(k.as_str()),
                "a log line holds key material: {line}"
            );
        }
        assert!(
            !line.contains(MARKER),
            "a log line holds payload bytes: {line}"
        );
    }
}

/// One span per connection (STYLE.md "Config, shutdown, tracing"): a line logged inside a
/// connection, not only its final `connection` event, carries the client's address and
/// identity and the service, so an operator can follow one connection through the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_a_connection_carries_its_client_and_identity() {
    let services =
        "  - name: whoami-udp.svc.internal\n    protocol: udp\n    handler: identity-echo\n";
    let fx = Fixture::start_with(
        ztp_tests::TestPki::new(),
        crate::common::Extra {
            services,
            ..crate::common::Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let s = fx
        .connect("whoami-udp.svc.internal", &bob)
        .await
        .expect("handshake");
    let local = s.get_ref().0.local_addr().expect("local addr").to_string();
    assert_refusal_line(s, 0, 501, "not implemented").await;

    // The handler's warning is logged in the middle of the connection's path.
    let warned = fx
        .dp
        .wait_for_log(
            |v| v["level"] == "WARN" && v["span"]["client.addr"] == local.as_str(),
            STEP,
        )
        .await
        .unwrap_or_else(|| {
            panic!(
                "no WARN line carries the connection's span (client.addr {local}): {:?}",
                fx.dp.raw_logs()
            )
        });
    let span = &warned["span"];
    assert_eq!(span["name"], "conn", "{warned}");
    assert_eq!(span["client.id"], "bob@example.com", "{warned}");
    assert_eq!(span["tls.sni"], "whoami-udp.svc.internal", "{warned}");
    assert_eq!(span["service.name"], "whoami-udp.svc.internal", "{warned}");
}

/// Text logs written to a pipe or a file carry no colour codes (colour is for a
/// terminal): an operator's `grep` and log shipper see plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_pipe_carry_no_colour_codes() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let pki = ztp_tests::TestPki::new();
    let dir = ztp_tests::TempDir::new("ztp-colour");
    pki.write_files(dir.path()).unwrap();
    let snapshot = dir.path().join("snapshot.yaml");
    std::fs::write(
        &snapshot,
        "version: 1\nservices: []\nusers: []\ngroups: []\n",
    )
    .unwrap();
    let mut child = Command::new(ztp_tests::dataplane::dataplane_bin())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(dir.path().join("server.pem"))
        .arg("--key")
        .arg(dir.path().join("server.key"))
        .arg("--client-ca")
        .arg(dir.path().join("ca.pem"))
        .arg("--snapshot")
        .arg(&snapshot)
        .args(["--log-format", "text"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ztp-dataplane");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + STEP;
    while std::time::Instant::now() < deadline {
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(line) => {
                let done = line.contains("listening");
                seen.push(line);
                if done {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("listening")),
        "no `listening` line: {seen:?}"
    );
    for line in &seen {
        assert!(
            !line.contains('\u{1b}'),
            "a log line to a pipe carries an escape code: {line:?}"
        );
    }
}
