//! The etcd harness itself ([`ztp_tests::etcd`]): real etcd clusters on loopback, their
//! leader, and the faults the control-plane tests inject (kill, freeze / thaw, restart),
//! plain and with client-certificate TLS. Skipped with a `SKIPPED` line when etcd is
//! missing (failed under `ZTP_REQUIRE_TOOLS=1`).

use std::path::Path;
use std::time::{Duration, Instant};

use ztp_tests::etcd::{request_tls, EtcdCluster};
use ztp_tests::http;

/// Whether process `pid` is gone (not even a zombie).
fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Drops `cluster` and checks that none of its members' processes is left.
fn drop_and_check_gone(cluster: EtcdCluster) {
    let pids: Vec<u32> = (0..cluster.member_count())
        .map(|i| cluster.pid(i))
        .collect();
    drop(cluster);
    for pid in pids {
        assert!(gone(pid), "etcd pid {pid} is still there after the drop");
    }
}

/// A 3-member cluster starts; a key put through member 0 is read from member 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_replicates() {
    let t = Instant::now();
    let Some(c) = EtcdCluster::start("a_three_member_cluster_replicates", 3).await else {
        return;
    };
    eprintln!("3 members healthy in {:?}", t.elapsed());
    let endpoints = c.endpoints();
    assert_eq!(endpoints.len(), 3);
    for (i, e) in endpoints.iter().enumerate() {
        assert!(e.starts_with("http://127.0.0.1:"), "{e}");
        assert_eq!(*e, c.endpoint(i));
    }
    assert!(c.tls_files().is_none());
    let mut ids: Vec<u64> = (0..3).map(|i| c.member_id(i)).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct member ids: {ids:?}");
    let leader = c.leader().await;
    assert!(leader < 3);

    let rev = c.put(0, "/ztp-test/k", "v0").await.expect("put through m0");
    assert!(rev > 1, "revision {rev}");
    assert_eq!(
        c.get(2, "/ztp-test/k").await.expect("get through m2"),
        Some(b"v0".to_vec())
    );
    assert_eq!(c.get(1, "/ztp-test/none").await.expect("get"), None);
    drop_and_check_gone(c);
}

/// Killing the leader: the other two elect another one and take writes; the killed
/// member comes back on its data and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_restart_rejoins() {
    let Some(mut c) =
        EtcdCluster::start("killing_the_leader_elects_another_and_restart_rejoins", 3).await
    else {
        return;
    };
    c.put(0, "before", "1").await.expect("put before the kill");
    let old = c.leader().await;
    let old_pid = c.pid(old);
    c.kill(old);
    assert!(gone(old_pid), "the killed leader is reaped");
    assert!(!c.is_running(old));

    let t = Instant::now();
    let new = c.leader().await;
    eprintln!("new leader m{new} after {:?}", t.elapsed());
    assert_ne!(new, old);
    let other = (0..3)
        .find(|&i| i != old && i != new)
        .expect("a third member");
    c.put(other, "after", "2")
        .await
        .expect("put after the kill");
    assert_eq!(c.get(new, "after").await.expect("get"), Some(b"2".to_vec()));

    let t = Instant::now();
    c.restart(old).await;
    eprintln!("m{old} restarted healthy in {:?}", t.elapsed());
    assert!(c.is_running(old));
    assert_ne!(c.pid(old), old_pid);
    assert_eq!(
        c.get(old, "after")
            .await
            .expect("get through the restarted member"),
        Some(b"2".to_vec())
    );
    c.put(old, "restarted", "3")
        .await
        .expect("put through the restarted member");
    let leader = c.leader().await;
    assert!(c.is_running(leader));
    drop_and_check_gone(c);
}

/// A frozen follower: the other two keep taking writes; after the thaw it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_follower_does_not_stop_writes() {
    let Some(c) = EtcdCluster::start("a_frozen_follower_does_not_stop_writes", 3).await else {
        return;
    };
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    c.freeze(follower);
    assert!(!c.is_running(follower));
    let t = Instant::now();
    for n in 0..5 {
        c.put(leader, format!("frozen/{n}"), n.to_string())
            .await
            .expect("put while a follower is frozen");
    }
    eprintln!("5 puts with m{follower} frozen in {:?}", t.elapsed());
    assert!(
        !c.is_healthy(follower).await,
        "a frozen member answers nothing"
    );
    // The leader did not change, and wait_healthy ignores the frozen member.
    assert_eq!(c.leader().await, leader);
    c.wait_healthy().await;

    c.thaw(follower);
    assert!(c.is_running(follower));
    c.wait_healthy().await;
    assert_eq!(
        c.get(follower, "frozen/4")
            .await
            .expect("get after the thaw"),
        Some(b"4".to_vec())
    );
    drop_and_check_gone(c);
}

/// Dropping a cluster with a frozen member leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_cluster_with_a_frozen_member_leaves_nothing() {
    let Some(c) =
        EtcdCluster::start("dropping_a_cluster_with_a_frozen_member_leaves_nothing", 1).await
    else {
        return;
    };
    c.freeze(0);
    drop_and_check_gone(c);
}

/// TLS on the client URLs: plain HTTP and TLS without a client certificate are refused;
/// with the client certificate the gateway works on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_requires_the_client_certificate() {
    let Some(c) = EtcdCluster::start_tls("tls_requires_the_client_certificate", 3).await else {
        return;
    };
    for e in c.endpoints() {
        assert!(e.starts_with("https://127.0.0.1:"), "{e}");
    }
    let files = c.tls_files().expect("TLS files");
    for p in [&files.ca, &files.cert, &files.key] {
        assert!(p.is_file(), "{}", p.display());
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the client key is private: {mode:o}");
    }
    let addr = c.client_addr(0);

    // Plain HTTP to the TLS port: an error or a refusal, never an answer.
    let bound = Duration::from_secs(5);
    let plain = tokio::time::timeout(bound, http::request(addr, "GET", "/health", &[], None))
        .await
        .expect("plain HTTP is answered or closed within 5 s");
    match &plain {
        Ok(r) => eprintln!(
            "plain HTTP to the TLS port: HTTP {}: {}",
            r.status,
            r.text().trim()
        ),
        Err(e) => eprintln!("plain HTTP to the TLS port: {e}"),
    }
    if let Ok(r) = &plain {
        assert!(!r.is_success(), "plain HTTP was served: {r}");
        assert!(!r.text().contains("health"), "{r}");
    }

    // TLS without a client certificate: the handshake (or the first read) fails.
    let no_cert = tokio::time::timeout(
        bound,
        request_tls(
            addr,
            files.client_config_without_cert(),
            "GET",
            "/health",
            None,
        ),
    )
    .await
    .expect("no-certificate TLS is refused within 5 s");
    if let Err(e) = &no_cert {
        eprintln!("TLS without a client certificate: {e}");
    }
    assert!(
        no_cert.is_err(),
        "served without a client certificate: {no_cert:?}"
    );

    // With the certificate, from the files alone (what ztp-control gets).
    let r = tokio::time::timeout(
        bound,
        request_tls(addr, files.client_config(), "GET", "/health", None),
    )
    .await
    .expect("within 5 s")
    .expect("TLS with the client certificate");
    assert!(r.is_success() && r.text().contains("true"), "{r}");

    c.put(0, "tls", "yes").await.expect("put over TLS");
    assert_eq!(
        c.get(2, "tls").await.expect("get over TLS"),
        Some(b"yes".to_vec())
    );
    let leader = c.leader().await;
    assert!(leader < 3);
    drop_and_check_gone(c);
}
