//! The snapshot stream (DESIGN.md "The two planes", "Identities of machines"): one
//! `ztp-control`, data-plane replicas subscribed to it over gRPC with node certificates,
//! changes made with `ztpctl`, a control plane killed and restarted on the same store, a
//! late replica and a large snapshot, the gRPC port's certificate gate, and a replica
//! that refuses a snapshot as too new.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_tests::client::{alert_of, read_to_end_or_alert, read_to_end_or_alert_within};
use ztp_tests::{connect_with, ClientOptions, Control, Dataplane, EchoBackend, TestCert, TestPki};

use crate::common::{echo_step, STEP};

/// Bound on a replica's catching up after the control plane comes back (its reconnect
/// backoff is capped at about 5 s once it has a snapshot).
const REJOIN: Duration = Duration::from_secs(25);

/// Bound on the late replica's receiving and applying the 10,000-service snapshot (debug
/// builds are slow at it).
const LARGE: Duration = Duration::from_secs(40);

/// A control plane with group `admins`, user `alice` (alice@example.com, in `admins`) and
/// service `echo.svc.internal` (tcp, group `admins`) forwarding to `echo`, all made with
/// `ztpctl`; and replicas subscribed to it.
struct Cluster {
    pki: TestPki,
    control: Control,
    echo: EchoBackend,
    alice: TestCert,
    replicas: Vec<Dataplane>,
}

impl Cluster {
    async fn start(node_ids: &[&str]) -> Cluster {
        let pki = TestPki::new();
        let alice = pki.client_email("alice@example.com");
        let control = Control::start(&pki).await;
        let echo = EchoBackend::start().await;
        control.ztpctl_ok(["group", "add", "admins"]).await;
        let addr = echo.addr().to_string();
        control
            .ztpctl_ok([
                "service",
                "add",
                "echo.svc.internal",
                "--proto",
                "tcp",
                "--addr",
                &addr,
                "--group",
                "admins",
            ])
            .await;
        control
            .ztpctl_ok([
                "user",
                "add",
                "alice",
                "--identity",
                "alice@example.com",
                "--group",
                "admins",
            ])
            .await;
        let mut replicas = Vec::new();
        for id in node_ids {
            replicas.push(Dataplane::start_control(&pki, &control.grpc_url(), id, &[]).await);
        }
        for dp in &mut replicas {
            assert!(
                dp.wait_ready(STEP).await,
                "replica {:?} did not become ready within {STEP:?}",
                dp.node_id()
            );
        }
        Cluster {
            pki,
            control,
            echo,
            alice,
            replicas,
        }
    }

    fn opts(&self, sni: &str, cert: &TestCert) -> ClientOptions {
        ClientOptions::new(&self.pki.ca_pem)
            .sni(sni)
            .cert(cert)
            .timeout(Duration::from_secs(5))
    }
}

/// What one connection through `dp` to `sni` as `cert` got: `Ok(bytes)` for a clean end
/// after sending `payload` and half-closing (the echo, or a refusal line), `Err` for a
/// handshake refusal, an alert or another error.
async fn exchange(dp: &Dataplane, opts: &ClientOptions, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut s = connect_with(dp.addr(), opts)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // A refusal line may arrive before (and make fail) the write: tolerate write errors.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        s.write_all(payload).await?;
        s.shutdown().await
    })
    .await;
    read_to_end_or_alert_within(&mut s, Duration::from_secs(5))
        .await
        .map_err(|e| format!("read: {e}"))
}

/// Polls (bounded by `bound`) until a new connection through `dp` to `sni` as `cert` is
/// echoed by `backend`.
async fn wait_routes(
    dp: &Dataplane,
    opts: &ClientOptions,
    backend: &EchoBackend,
    bound: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + bound;
    let mut last;
    loop {
        let before = backend.connections();
        let payload = b"ping through the replica";
        last = exchange(dp, opts, payload).await;
        if matches!(&last, Ok(b) if b == payload) && backend.connections() > before {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: replica {:?} did not route {:?} within {bound:?}; last attempt: {}",
            dp.node_id(),
            opts.sni_name(),
            describe(&last)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls (bounded by `bound`) until a new connection through `dp` gets exactly the 403
/// line, without reaching `backend`.
async fn wait_forbidden(
    dp: &Dataplane,
    opts: &ClientOptions,
    backend: &EchoBackend,
    bound: Duration,
) {
    let deadline = tokio::time::Instant::now() + bound;
    let mut last;
    loop {
        let before = backend.connections();
        last = exchange(dp, opts, b"should not pass").await;
        if matches!(&last, Ok(b) if b == b"ZTP-ERROR 403 forbidden\n") {
            assert_eq!(
                backend.connections(),
                before,
                "a refused connection reached the backend"
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica {:?} did not refuse {:?} with the 403 line within {bound:?}; last \
             attempt: {}",
            dp.node_id(),
            opts.sni_name(),
            describe(&last)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn describe(r: &Result<Vec<u8>, String>) -> String {
    match r {
        Ok(b) => format!("clean end after {:?}", String::from_utf8_lossy(b)),
        Err(e) => e.clone(),
    }
}

/// `ztpctl -o json node list`, polled (bounded) until `pred` holds for it.
async fn wait_node_list<F>(control: &Control, bound: Duration, what: &str, pred: F) -> Vec<Value>
where
    F: Fn(&[Value]) -> bool,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let list = control.ztpctl_json(["node", "list"]).await;
        let items = list
            .as_array()
            .unwrap_or_else(|| panic!("node list -o json is not an array: {list}"))
            .clone();
        if pred(&items) {
            return items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {bound:?}; `ztpctl -o json node list`: {list:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn node<'a>(items: &'a [Value], id: &str) -> Option<&'a Value> {
    items.iter().find(|n| n["id"] == id)
}

/// Whether every one of `ids` is listed connected, with `applied == version`, lag 0 and no
/// nack.
fn all_current(items: &[Value], ids: &[&str], version: u64) -> bool {
    ids.iter().all(|id| {
        node(items, id).is_some_and(|n| {
            n["connected"] == true
                && n["applied"].as_u64() == Some(version)
                && n["lag"].as_u64() == Some(0)
                && n["last_nack"].is_null()
        })
    })
}

const IDS: [&str; 2] = ["replica-a", "replica-b"];

/// (a) a service and a user made with `ztpctl` route on both replicas; (b) the user taken
/// out of the service's group (`--clear-groups`) gets the 403 line on both, for new
/// connections; (c) `ztpctl node list` shows both at the current version with lag 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_changes_reach_both_replicas() {
    let c = Cluster::start(&IDS).await;
    let opts = c.opts("echo.svc.internal", &c.alice);

    // (a)
    for dp in &c.replicas {
        wait_routes(dp, &opts, &c.echo, STEP, "service added with ztpctl").await;
    }
    let version = c.control.config_version().await;
    assert_eq!(
        version, 3,
        "three writes (group, service, user) on a fresh store"
    );
    wait_node_list(
        &c.control,
        STEP,
        "both replicas at the current version",
        |items| all_current(items, &IDS, version),
    )
    .await;

    // (b) New connections get the 403 line; live ones that already forwarded bytes are
    // ended with close_notify (DESIGN.md: live connections are re-checked against every
    // snapshot).
    let mut live = Vec::new();
    for dp in &c.replicas {
        let mut s = connect_with(dp.addr(), &opts).await.expect("connect");
        echo_step(&mut s, b"before the change").await;
        live.push(s);
    }
    c.control
        .ztpctl_ok(["user", "update", "alice", "--clear-groups"])
        .await;
    let user = c.control.ztpctl_json(["user", "get", "alice"]).await;
    assert!(
        user["groups"].as_array().is_none_or(|g| g.is_empty()),
        "--clear-groups left groups: {user}"
    );
    for dp in &c.replicas {
        wait_forbidden(dp, &opts, &c.echo, STEP).await;
    }
    for (i, mut s) in live.into_iter().enumerate() {
        match read_to_end_or_alert_within(&mut s, STEP).await {
            Ok(rest) => assert!(
                rest.is_empty(),
                "live connection {i}: more arrived after the change: {rest:?}"
            ),
            Err(e) => panic!(
                "live connection {i} was not ended with close_notify after the user left \
                 the service's group: {e}"
            ),
        }
    }

    // (c)
    let version = c.control.config_version().await;
    assert_eq!(version, 4);
    let items = wait_node_list(
        &c.control,
        STEP,
        "both replicas acked the change",
        |items| all_current(items, &IDS, version),
    )
    .await;
    assert_eq!(
        items.len(),
        2,
        "exactly the two replicas are listed: {items:?}"
    );
    for id in IDS {
        let n = node(&items, id).expect("listed");
        assert!(
            n["listen"].as_str().is_some_and(|l| !l.is_empty()),
            "node {id} reports no listener: {n}"
        );
        assert!(n["schema"].as_u64().is_some_and(|s| s >= 1), "{n}");
    }
    // The table form names both too.
    let table = c.control.ztpctl_ok(["node", "list"]).await;
    assert!(
        IDS.iter().all(|id| table.contains(id)),
        "`ztpctl node list` does not name both replicas:\n{table}"
    );
}

/// (d) with the control plane SIGKILLed, both replicas keep serving new connections from
/// their last snapshot and stay ready; (e) restarted on the same store and ports, every
/// record is still there, both replicas reconnect and a change made after the restart
/// routes on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_outlive_the_control_plane_and_catch_up_after_its_restart() {
    let mut c = Cluster::start(&IDS).await;
    let opts = c.opts("echo.svc.internal", &c.alice);
    for dp in &c.replicas {
        wait_routes(dp, &opts, &c.echo, STEP, "before the kill").await;
    }
    let version = c.control.config_version().await;
    wait_node_list(&c.control, STEP, "both replicas current", |items| {
        all_current(items, &IDS, version)
    })
    .await;

    // (d) A connection open across the kill goes on, too.
    let mut live = connect_with(c.replicas[0].addr(), &opts)
        .await
        .expect("connect before the kill");
    echo_step(&mut live, b"before the kill").await;
    let status = c.control.kill9().expect("the control plane was running");
    assert!(!status.success(), "SIGKILL: {status}");
    for round in 0..3 {
        for dp in &c.replicas {
            wait_routes(
                dp,
                &opts,
                &c.echo,
                Duration::from_secs(2),
                &format!("control plane down, round {round}"),
            )
            .await;
            assert_eq!(dp.readyz().await.ok(), Some(200), "a replica went unready");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    echo_step(&mut live, b"after the kill").await;
    for dp in &mut c.replicas {
        assert!(
            dp.try_wait().is_none(),
            "a replica exited without its control plane"
        );
    }

    // (e)
    c.control.restart().await;
    let services = c.control.ztpctl_json(["service", "list"]).await;
    let names: Vec<&str> = services
        .as_array()
        .expect("service list is an array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["echo.svc.internal"], "services after the restart");
    let users = c.control.ztpctl_json(["user", "list"]).await;
    assert_eq!(
        users[0]["name"], "alice",
        "users after the restart: {users}"
    );
    assert_eq!(users[0]["groups"], serde_json::json!(["admins"]));
    let groups = c.control.ztpctl_json(["group", "list"]).await;
    assert_eq!(
        groups[0]["name"], "admins",
        "groups after the restart: {groups}"
    );
    assert_eq!(c.control.config_version().await, version);

    wait_node_list(&c.control, REJOIN, "both replicas reconnected", |items| {
        all_current(items, &IDS, version)
    })
    .await;

    let echo2 = EchoBackend::start().await;
    let addr2 = echo2.addr().to_string();
    c.control
        .ztpctl_ok([
            "service",
            "add",
            "echo2.svc.internal",
            "--proto",
            "tcp",
            "--addr",
            &addr2,
        ])
        .await;
    let opts2 = c.opts("echo2.svc.internal", &c.alice);
    for dp in &c.replicas {
        wait_routes(dp, &opts2, &echo2, STEP, "service added after the restart").await;
    }
    let after = c.control.config_version().await;
    assert_eq!(after, version + 1);
    echo_step(&mut live, b"after the restart").await;
    for dp in &c.replicas {
        assert_eq!(dp.readyz().await.ok(), Some(200));
    }
    wait_node_list(
        &c.control,
        STEP,
        "both replicas acked the new version",
        |items| all_current(items, &IDS, after),
    )
    .await;
}

/// The YAML of a snapshot with `n` tcp services `sNNNNN.svc.internal` (no groups) to
/// `backend`, and user `alice`.
fn bulk_snapshot(n: usize, backend: &str) -> String {
    let mut y = String::with_capacity(n * 80 + 200);
    y.push_str("version: 1\nservices:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - name: s{i:05}.svc.internal\n    protocol: tcp\n    address: \"{backend}\"\n"
        ));
    }
    y.push_str(
        "users:\n  - name: alice\n    identities: [\"alice@example.com\"]\ngroups: []\nrevoked: []\n",
    );
    y
}

/// (f) a 10,000-service configuration imported with `ztpctl import` is one new version; a
/// replica started afterwards receives it whole and serves services from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_replica_receives_a_10k_service_snapshot() {
    const N: usize = 10_000;
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let control = Control::start(&pki).await;
    let echo = EchoBackend::start().await;
    control.ztpctl_ok(["group", "add", "old"]).await;
    let before = control.config_version().await;

    let file = ztp_tests::TempDir::new("bulk");
    let path = file.join("bulk.yaml");
    std::fs::write(&path, bulk_snapshot(N, &echo.addr().to_string())).expect("write YAML");
    let out = control
        .ztpctl_json([std::ffi::OsStr::new("import"), path.as_os_str()])
        .await;
    assert_eq!(
        out["services"].as_u64(),
        Some(N as u64),
        "import answer: {out}"
    );
    let version = control.config_version().await;
    assert_eq!(version, before + 1, "an import is one version");
    assert_eq!(
        control.list_all("services").await.len(),
        N,
        "services stored"
    );
    assert!(
        control.list_all("groups").await.is_empty(),
        "the import replaced the whole configuration (group `old` is gone)"
    );

    let mut dp = Dataplane::start_control(&pki, &control.grpc_url(), "late", &[]).await;
    assert!(
        dp.wait_ready(LARGE).await,
        "the late replica did not become ready within {LARGE:?}"
    );
    let applied = dp
        .wait_for_log(
            |v| v["message"] == "snapshot applied" && v["snapshot.version"] == version,
            STEP,
        )
        .await
        .expect("the replica logs the snapshot it applied");
    assert_eq!(applied["services"].as_u64(), Some(N as u64), "{applied}");
    for i in [0, 4_321, N - 1] {
        let sni = format!("s{i:05}.svc.internal");
        let opts = ClientOptions::new(&pki.ca_pem).sni(&sni).cert(&alice);
        wait_routes(&dp, &opts, &echo, STEP, "a service of the large snapshot").await;
    }
    wait_node_list(&control, STEP, "the late replica acked", |items| {
        all_current(items, &["late"], version)
    })
    .await;
}

/// Reads what the gRPC port says first to a TLS client that sent the HTTP/2 preface and
/// an empty SETTINGS frame: `Ok(bytes)` (at least one frame header), or `Err` with the
/// handshake or read failure.
async fn grpc_probe(control: &Control, opts: &ClientOptions) -> Result<Vec<u8>, std::io::Error> {
    let mut s = connect_with(control.grpc_addr(), opts).await?;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await?;
    s.flush().await?;
    let mut buf = vec![0u8; 9];
    tokio::time::timeout(STEP, s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(buf)
}

/// (g) the gRPC port takes node certificates only: a user's certificate from the same CA
/// (email SAN), a URI that is not a node's, a node URI of another trust domain, and a node
/// certificate from a CA nobody trusts are refused in the TLS handshake (a TLS 1.3 client
/// sees the alert on its first read); a node certificate gets through and is answered
/// with HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_port_admits_node_certificates_only() {
    let pki = TestPki::new();
    let control = Control::start(&pki).await;
    let opts = |cert: &TestCert| {
        ClientOptions::new(&pki.ca_pem)
            .sni("localhost")
            .cert(cert)
            .alpn(&[b"h2"])
            .timeout(STEP)
    };

    let node = pki.node("n1");
    let frame = grpc_probe(&control, &opts(&node))
        .await
        .unwrap_or_else(|e| panic!("a node certificate was refused on the gRPC port: {e}"));
    assert_eq!(
        frame[3], 0x04,
        "the server's first frame is SETTINGS: {frame:?}"
    );

    let rogue_node = TestPki::with_ca_name("Rogue CA").node("n1");
    let refused = [
        (
            "a user's certificate (email SAN)",
            pki.client_email("alice@example.com"),
        ),
        (
            "a non-node URI",
            pki.client_uri("spiffe://ztp.internal/user/alice"),
        ),
        (
            "a node of another trust domain",
            pki.client_uri("spiffe://elsewhere/node/n1"),
        ),
        ("a CN-only certificate", pki.client_cn("n1")),
        ("a node certificate from an untrusted CA", rogue_node),
    ];
    for (what, cert) in refused {
        let o = opts(&cert);
        let r = match connect_with(control.grpc_addr(), &o).await {
            Err(e) => Err(e.to_string()),
            Ok(mut s) => {
                // TLS 1.3: the client's handshake is over before the server has judged the
                // certificate; the refusal is the first thing read.
                let _ = s
                    .write_all(
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
                    )
                    .await;
                match read_to_end_or_alert(&mut s).await {
                    Ok(data) => Ok(data),
                    Err(e) => {
                        assert!(e.data().is_empty(), "{what}: data before the refusal: {e}");
                        Err(format!("{e}"))
                    }
                }
            }
        };
        match r {
            Ok(data) => panic!(
                "{what}: the gRPC port did not refuse the handshake; it sent {} bytes and \
                 closed cleanly",
                data.len()
            ),
            Err(how) => {
                assert!(
                    how.contains("alert") || how.contains("Alert"),
                    "{what}: expected a TLS alert, got {how}"
                );
            }
        }
    }
    // The node certificate still works afterwards, and the same check via a plain connect
    // shows the refusal is an alert.
    assert!(grpc_probe(&control, &opts(&node)).await.is_ok());
    let user = pki.client_email("bob@example.com");
    let mut s = connect_with(control.grpc_addr(), &opts(&user))
        .await
        .expect("a TLS 1.3 client finishes its side of the handshake");
    let mut b = [0u8; 1];
    let err = tokio::time::timeout(STEP, s.read(&mut b))
        .await
        .expect("bounded read")
        .expect_err("a user certificate must not get a session");
    assert!(alert_of(&err).is_some(), "expected an alert, got {err}");
}

/// (h) a replica that understands only schema 0 (`--snapshot-schema 0`) nacks every
/// snapshot: `node list` shows its last nack naming the schema, `/readyz` stays 503 and it
/// serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_nacks_a_snapshot_newer_than_it_understands() {
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let control = Control::start(&pki).await;
    let echo = EchoBackend::start().await;
    let addr = echo.addr().to_string();
    control
        .ztpctl_ok([
            "service",
            "add",
            "echo.svc.internal",
            "--proto",
            "tcp",
            "--addr",
            &addr,
        ])
        .await;
    control
        .ztpctl_ok(["user", "add", "alice", "--identity", "alice@example.com"])
        .await;
    let version = control.config_version().await;

    let mut dp = Dataplane::start_control(
        &pki,
        &control.grpc_url(),
        "old-node",
        &["--snapshot-schema", "0"],
    )
    .await;
    let items = wait_node_list(&control, STEP, "the old node's nack", |items| {
        node(items, "old-node").is_some_and(|n| !n["last_nack"].is_null())
    })
    .await;
    let n = node(&items, "old-node").expect("listed");
    assert_eq!(n["last_nack"]["version"].as_u64(), Some(version), "{n}");
    let reason = n["last_nack"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.to_lowercase().contains("schema"),
        "the nack reason does not mention the schema: {reason:?}"
    );
    assert_eq!(n["applied"].as_u64(), Some(0), "{n}");
    assert_eq!(n["lag"].as_u64(), Some(version), "{n}");
    assert_eq!(n["schema"].as_u64(), Some(0), "{n}");

    // Still unready, and serving nothing, a while after the nack.
    for _ in 0..5 {
        assert_eq!(dp.readyz().await.ok(), Some(503), "/readyz after a nack");
        let opts = ClientOptions::new(&pki.ca_pem)
            .sni("echo.svc.internal")
            .cert(&alice);
        let r = exchange(&dp, &opts, b"nothing to see").await;
        assert!(
            r.is_err(),
            "a node without a snapshot served: {}",
            describe(&r)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(echo.connections(), 0, "the backend was reached");
    assert!(dp.try_wait().is_none(), "the node exited on a nack");

    // A change is refused too (a new version, a new nack).
    control.ztpctl_ok(["group", "add", "later"]).await;
    let later = control.config_version().await;
    wait_node_list(&control, STEP, "the nack of the next version", |items| {
        node(items, "old-node").is_some_and(|n| n["last_nack"]["version"].as_u64() == Some(later))
    })
    .await;
    assert_eq!(dp.readyz().await.ok(), Some(503));
}
