//! The control plane on etcd (DESIGN.md "Control plane on an existing distributed
//! store"): several real `ztp-control` instances on a real 3-member etcd cluster on
//! loopback. Any instance takes any write and every instance sees it; the first admin
//! token is written once, also when the instances start together; two instances writing
//! the same record concurrently never overwrite silently; writes go on when an etcd
//! member dies, and resume after the leader dies.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztp_tests::bins::Bin;
use ztp_tests::control::{Control, ControlOptions};
use ztp_tests::etcd::EtcdCluster;
use ztp_tests::process::{Process, Stream};
use ztp_tests::tempdir::TempDir;
use ztp_tests::{ClientOptions, Dataplane, EchoBackend, TestPki};

use crate::common::STEP;
use crate::control_failover::{
    config_yaml, echo_ok, import, logs_from, node_on, subscribed_to, wait_for, ECHO, LATER, NODE,
};

/// Starts `n` instances at once (API only, their own data folders) and waits until each
/// serves; returns them with their data folders and API addresses.
async fn start_together(
    cluster: &EtcdCluster,
    prefix: &str,
    n: usize,
    root: &TempDir,
) -> Vec<(Process, PathBuf, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let dir = root.join(format!("data{i}"));
        let mut cmd = Command::new(Bin::Control.path());
        cmd.arg("--data-dir")
            .arg(&dir)
            .arg("--api-listen")
            .arg("127.0.0.1:0")
            .arg("--log-format")
            .arg("json")
            .args(cluster.store_args(prefix))
            .env_remove("RUST_LOG");
        out.push((Process::spawn(&format!("ztp-control {i}"), cmd), dir));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = Vec::new();
    for (p, dir) in out {
        let addr = loop {
            let found = p
                .lines(Stream::Stderr)
                .into_iter()
                .chain(p.lines(Stream::Stdout))
                .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
                .find(|v| v["message"] == "api listening")
                .and_then(|v| v["addr"].as_str().map(str::to_owned));
            if let Some(a) = found {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "an instance did not start on etcd: {:?}",
                p.lines(Stream::Stderr)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ready.push((p, dir, addr));
    }
    ready
}

async fn call(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Authorization", auth.as_str())];
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    if bytes.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let r = ztp_tests::http::request(
        addr.parse().unwrap(),
        method,
        path,
        &headers,
        bytes.as_deref(),
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"));
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_one_etcd_share_every_write_and_write_the_first_token_once() {
    let Some(cluster) = EtcdCluster::start("instances on one etcd", 3).await else {
        return;
    };
    let root = TempDir::new("etcd-instances");
    let instances = start_together(&cluster, "/ztp-e2e/", 3, &root).await;
    let tokens: Vec<String> = instances
        .iter()
        .filter_map(|(_, dir, _)| std::fs::read_to_string(dir.join("admin-token")).ok())
        .collect();
    assert_eq!(
        tokens.len(),
        1,
        "exactly one of three instances started together writes the admin token"
    );
    let token = tokens[0].trim().to_owned();
    for (_, dir, _) in &instances {
        assert!(
            !dir.join("admin-token.tmp").exists(),
            "a losing instance left its unused token behind"
        );
    }

    // A write on any instance is read on every instance, with the same version.
    let (s, _) = call(
        &instances[0].2,
        &token,
        "POST",
        "/v1/groups",
        Some(&json!({"name": "ops"})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        &instances[1].2,
        &token,
        "POST",
        "/v1/services",
        Some(&json!({"name": "ssh.svc.internal", "address": "10.0.0.1:22", "groups": ["ops"]})),
    )
    .await;
    assert_eq!(s, 201);
    let deadline = Instant::now() + Duration::from_secs(5);
    for (_, _, addr) in &instances {
        loop {
            let (s, v) = call(addr, &token, "GET", "/v1/services/ssh.svc.internal", None).await;
            if s == 200 {
                assert_eq!(v["groups"], json!(["ops"]));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} never saw the service ({s} {v})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The group in use is refused on a third instance (the rules see every write).
    let (s, v) = call(&instances[2].2, &token, "DELETE", "/v1/groups/ops", None).await;
    assert_eq!(s, 409, "{v}");

    // The store's chores (trimming, compaction) go to exactly one instance at a time; when
    // it dies, another takes them over once its lease lapses.
    let chores = |p: &Process| {
        p.lines(Stream::Stderr)
            .iter()
            .chain(p.lines(Stream::Stdout).iter())
            .filter(|l| l.contains("this instance does the store's chores"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let holder = loop {
        let holding: Vec<usize> = (0..3).filter(|i| chores(&instances[*i].0) > 0).collect();
        if !holding.is_empty() {
            assert_eq!(holding.len(), 1, "two instances do the chores at once");
            break holding[0];
        }
        assert!(Instant::now() < deadline, "no instance took the chores");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Two instances creating the same record at once: one 201, the other 409.
    for round in 0..5 {
        let name = format!("race{round}");
        let body = json!({"name": name});
        let (a, b) = tokio::join!(
            call(&instances[0].2, &token, "POST", "/v1/groups", Some(&body)),
            call(&instances[1].2, &token, "POST", "/v1/groups", Some(&body)),
        );
        let mut codes = [a.0, b.0];
        codes.sort();
        assert_eq!(codes, [201, 409], "round {round}: {a:?} {b:?}");
    }
    // Two instances replacing a record on the same If-Match: one wins, the other 412.
    for round in 0..5 {
        let (_, list) = call(&instances[2].2, &token, "GET", "/v1/groups", None).await;
        let _ = list;
        let r = ztp_tests::http::request(
            instances[2].2.parse().unwrap(),
            "GET",
            "/v1/services/ssh.svc.internal",
            &[("Authorization", &format!("Bearer {token}"))],
            None,
        )
        .await
        .unwrap();
        let version = r.etag_version().expect("an ETag");
        let put = |addr: String, address: &'static str| {
            let token = token.clone();
            async move {
                let body = serde_json::to_vec(
                    &json!({"name": "ssh.svc.internal", "address": address, "groups": ["ops"]}),
                )
                .unwrap();
                let auth = format!("Bearer {token}");
                let etag = format!("\"{version}\"");
                ztp_tests::http::request(
                    addr.parse().unwrap(),
                    "PUT",
                    "/v1/services/ssh.svc.internal",
                    &[
                        ("Authorization", auth.as_str()),
                        ("Content-Type", "application/json"),
                        ("If-Match", etag.as_str()),
                    ],
                    Some(&body),
                )
                .await
                .unwrap()
                .status
            }
        };
        let (a, b) = tokio::join!(
            put(instances[0].2.clone(), "10.0.0.2:22"),
            put(instances[1].2.clone(), "10.0.0.3:22"),
        );
        let mut codes = [a, b];
        codes.sort();
        assert_eq!(codes, [200, 412], "round {round}: If-Match {version}");
    }

    let mut instances = instances;
    instances[holder].0.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let holding: Vec<usize> = (0..3)
            .filter(|i| *i != holder && chores(&instances[*i].0) > 0)
            .collect();
        if !holding.is_empty() {
            assert_eq!(holding.len(), 1, "two survivors do the chores at once");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no survivor took the chores over after the holder died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_when_an_etcd_member_dies_and_resume_after_the_leader_dies() {
    let Some(mut cluster) = EtcdCluster::start("etcd member loss", 3).await else {
        return;
    };
    let args = cluster.store_args("/ztp-e2e/");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pki = TestPki::new();
    let control = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            args: &args,
            ..Default::default()
        },
    )
    .await;
    let write = |i: u32| {
        let body = json!({"name": format!("g{i}")});
        let control = &control;
        async move { control.api("POST", "/v1/groups", Some(&body)).await.status }
    };
    assert_eq!(write(0).await, 201);

    // The leader dies: writes fail (503, never a silent loss) until etcd has a new
    // leader, then succeed again.
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let killed = Instant::now();
    let mut i = 1;
    let back = loop {
        let status = write(i).await;
        if status == 201 {
            break killed.elapsed();
        }
        assert_eq!(
            status, 503,
            "a write while etcd has no leader is refused as unavailable"
        );
        // A refused write may have landed after all: the next one is another record.
        i += 1;
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "writes did not resume"
        );
    };
    eprintln!("writes resumed {back:?} after the leader was killed");
    cluster.restart(leader).await;

    // One follower of three dies: every write still succeeds at once.
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    cluster.kill(follower);
    for _ in 0..10 {
        i += 1;
        assert_eq!(write(i).await, 201, "a write with one member of three down");
    }
    let groups = control.list_all("groups").await;
    assert!(
        groups.len() >= 12,
        "every acknowledged write is kept: {}",
        groups.len()
    );
}

/// A `ztp-control` instance killed -9 while a data plane is subscribed to it: the node
/// moves to another instance on the same etcd, resumes there at the version it applied
/// (no snapshot sent again), and keeps receiving versions written on any instance;
/// nothing acknowledged before the kill is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_hands_its_nodes_to_another_on_the_same_etcd() {
    let Some(cluster) = EtcdCluster::start("control instance loss", 3).await else {
        return;
    };
    let args = cluster.store_args("/ztp-e2e/");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let (mut a, b) = Control::start_pair(&pki, &args).await;
    let echo = EchoBackend::start().await;
    let later = EchoBackend::start().await;
    let v = import(&a, &config_yaml(echo.addr(), None, &[])).await;
    let opts = |sni: &str| {
        ClientOptions::new(&pki.ca_pem)
            .sni(sni)
            .cert(&alice)
            .timeout(Duration::from_secs(5))
    };

    let list = format!("{},{}", a.grpc_url(), b.grpc_url());
    let mut dp = Dataplane::start_control(&pki, &list, NODE, &[]).await;
    assert!(dp.wait_ready(STEP).await, "the node did not become ready");
    wait_for("the node acks on A", STEP, || async {
        node_on(&a)
            .await
            .filter(|n| n["connected"] == true && n["applied"].as_u64() == Some(v))
    })
    .await;
    assert!(
        echo_ok(dp.addr(), &opts(ECHO)).await,
        "{ECHO} is not served"
    );
    let snapshots = |dp: &Dataplane| {
        dp.logs()
            .iter()
            .filter(|l| l["message"] == "snapshot applied")
            .count()
    };
    let applied_on_a = snapshots(&dp);

    // B lists the node subscribed to A (DESIGN: every instance lists every node).
    wait_for("B lists A's node", STEP, || async {
        node_on(&b)
            .await
            .filter(|n| n["connected"] == true && n["applied"].as_u64() == Some(v))
    })
    .await;

    // A write acknowledged by A just before it dies is kept.
    let (s, _) = call(
        &a.api_addr().to_string(),
        a.token(),
        "POST",
        "/v1/groups",
        Some(&json!({"name": "acked-before-the-kill"})),
    )
    .await;
    assert_eq!(s, 201);
    let v = v + 1;
    let mark = dp.raw_logs().len();
    let killed = Instant::now();
    a.kill9();
    let b_url = b.grpc_url();
    wait_for("the node subscribes to B", STEP, || async {
        logs_from(&dp, mark)
            .iter()
            .any(|l| subscribed_to(l, &b_url))
            .then_some(())
    })
    .await;
    eprintln!(
        "measured: kill -9 of an instance -> its node on another in {:?}",
        killed.elapsed()
    );
    // On B at the version acknowledged before the kill (received from A, or from B
    // if A died before sending it).
    wait_for("the node on B at the newest version", STEP, || async {
        node_on(&b)
            .await
            .filter(|n| n["connected"] == true && n["applied"].as_u64() == Some(v))
    })
    .await;
    assert_eq!(
        snapshots(&dp),
        applied_on_a + 1,
        "no snapshot sent again on B: only the version before the kill"
    );
    let (s, _) = call(
        &b.api_addr().to_string(),
        b.token(),
        "GET",
        "/v1/groups/acked-before-the-kill",
        None,
    )
    .await;
    assert_eq!(s, 200, "a write acknowledged before the kill was lost");

    // The next version, written on B, reaches the node.
    let changed = Instant::now();
    import(&b, &config_yaml(echo.addr(), Some(later.addr()), &[])).await;
    wait_for(&format!("{LATER} served"), STEP, || async {
        echo_ok(dp.addr(), &opts(LATER)).await.then_some(())
    })
    .await;
    eprintln!(
        "measured: a version written on B served {:?} after the write",
        changed.elapsed()
    );
}

/// Connectors across instances: a replica subscribed to instance A and one subscribed to
/// instance B (same etcd) know each other as replicas and know where the connector's
/// tunnel is, so a session through either reaches the service behind the connector
/// (directly, or relayed to the replica holding the tunnel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_two_instances_share_the_connectors_tunnels() {
    use crate::tunnels::{lab_echoes_via, run_connector_to, LAB};
    use ztp_tests::process::Stream;

    let Some(cluster) = EtcdCluster::start("connectors across instances", 3).await else {
        return;
    };
    let args = cluster.store_args("/ztp-e2e/");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let (a, b) = Control::start_pair(&pki, &args).await;
    let backend = EchoBackend::start().await;
    let addr = backend.addr().to_string();
    a.ztpctl_ok(["group", "add", "admins"]).await;
    a.ztpctl_ok([
        "user",
        "add",
        "alice",
        "--identity",
        "alice@example.com",
        "--group",
        "admins",
    ])
    .await;
    a.ztpctl_ok(["connector", "add", "lab"]).await;
    a.ztpctl_ok([
        "service",
        "add",
        LAB,
        "--proto",
        "tcp",
        "--addr",
        &addr,
        "--connector",
        "lab",
        "--group",
        "admins",
    ])
    .await;
    let mut r1 = Dataplane::start_control(&pki, &a.grpc_url(), "r1", &[]).await;
    let mut r2 = Dataplane::start_control(&pki, &b.grpc_url(), "r2", &[]).await;
    assert!(
        r1.wait_ready(STEP).await && r2.wait_ready(STEP).await,
        "replicas not ready"
    );

    let files = TempDir::new("connector-two-instances");
    std::fs::write(files.join("ca.pem"), &pki.ca_pem).unwrap();
    let cert = pki
        .builder()
        .uri("spiffe://ztp.internal/connector/lab")
        .issue();
    let mut connector = run_connector_to(r1.addr().port(), &files, &cert, "lab");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("serving 1 service"), STEP)
        .await;
    let opts = ClientOptions::new(&pki.ca_pem)
        .sni(LAB)
        .cert(&alice)
        .timeout(Duration::from_secs(5));
    // One of the two holds the tunnel; through the other the session is relayed to it.
    lab_echoes_via(r1.addr(), &opts, b"via r1", &connector).await;
    lab_echoes_via(r2.addr(), &opts, b"via r2", &connector).await;
    // Both instances list both replicas, and the tunnel (once it has settled: the
    // connector may move it to the replica that ranks first, the new one up before the
    // old one closes).
    for c in [&a, &b] {
        wait_for("both replicas and one tunnel listed", STEP, || async {
            let ids: Vec<String> = c
                .nodes()
                .await
                .iter()
                .filter(|n| n["connected"] == true)
                .map(|n| n["id"].as_str().unwrap_or_default().to_owned())
                .collect();
            let lab = c.get_json("/v1/connectors/lab").await;
            let tunnels = lab["tunnels"].as_array().map(Vec::len);
            (ids == ["r1", "r2"] && tunnels == Some(1)).then_some(())
        })
        .await;
    }
}

/// TLS to etcd: with `--etcd-ca`, `--etcd-cert` and `--etcd-key` the control plane works
/// on a cluster that requires client certificates; without the client certificate it
/// does not start, and says which flags are missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_etcd_with_a_client_certificate() {
    let Some(cluster) = EtcdCluster::start_tls("etcd over TLS", 3).await else {
        return;
    };
    let tls = cluster.tls_files().expect("TLS files");
    let mut args = cluster.store_args("/ztp-tls/");
    assert!(args[3].starts_with("https://"), "{args:?}");
    let ca = tls.ca.to_string_lossy().into_owned();

    // Without a client certificate: refused at start, with the flags named.
    let root = TempDir::new("etcd-tls");
    let mut bare = vec![
        "--data-dir".to_owned(),
        root.join("bare").to_string_lossy().into_owned(),
        "--api-listen".into(),
        "127.0.0.1:0".into(),
        "--etcd-ca".into(),
        ca.clone(),
    ];
    bare.extend(args.iter().cloned());
    let out = ztp_tests::bins::run_bounded_with(Bin::Control, &bare, &[], Duration::from_secs(30));
    assert!(
        !out.status.success(),
        "started without a client certificate"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--etcd-cert") && err.contains("--etcd-key"),
        "the refusal does not name the flags: {err}"
    );
    assert!(
        !root.join("bare").join("admin-token").exists(),
        "a token was written by an instance that never reached the store"
    );

    // With it: the store works.
    args.extend([
        "--etcd-ca".into(),
        ca,
        "--etcd-cert".into(),
        tls.cert.to_string_lossy().into_owned(),
        "--etcd-key".into(),
        tls.key.to_string_lossy().into_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pki = TestPki::new();
    let control = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            args: &args,
            ..Default::default()
        },
    )
    .await;
    let r = control
        .api("POST", "/v1/groups", Some(&json!({"name": "over-tls"})))
        .await;
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(
        control.get_json("/v1/groups/over-tls").await["name"],
        "over-tls"
    );
}
