//! The etcd client against real etcd members on loopback (`ztp_tests::etcd`): KV and
//! transactions, watches, leases, failover, TLS. Skipped (with a visible line) when etcd
//! is not installed.

use std::time::{Duration, Instant};

use ztp_control::etcd::{
    prefix_end, Compare, CompareOp, Etcd, EtcdConfig, EtcdError, EventKind, Op, OpResponse, Range,
    Txn, WatchBatch, WatchOptions, Watcher, MAX_TXN_OPS,
};
use ztp_tests::etcd::EtcdCluster;

/// Bound on any single wait of these tests.
const WAIT: Duration = Duration::from_secs(15);

async fn client(endpoints: Vec<String>) -> Etcd {
    Etcd::connect(EtcdConfig::new(endpoints))
        .await
        .expect("connect")
}

async fn next(watcher: &mut Watcher) -> Result<WatchBatch, EtcdError> {
    tokio::time::timeout(WAIT, watcher.next())
        .await
        .expect("a watch answer in time")
}

/// Reads batches until `n` events have come.
async fn events(watcher: &mut Watcher, n: usize) -> Vec<(EventKind, String, String, i64)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let batch = next(watcher).await.expect("watch batch");
        for e in batch.events {
            seen.push((
                e.kind,
                String::from_utf8(e.kv.key).unwrap(),
                String::from_utf8(e.kv.value).unwrap(),
                e.kv.mod_revision,
            ));
        }
    }
    seen
}

#[tokio::test]
async fn put_get_range_delete() {
    let Some(cluster) = EtcdCluster::start("put_get_range_delete", 1).await else {
        return;
    };
    let etcd = client(cluster.endpoints()).await;

    assert_eq!(etcd.get("/t/missing").await.unwrap(), None);
    let r1 = etcd.put("/t/a", "1").await.unwrap();
    let r2 = etcd.put("/t/b", "2").await.unwrap();
    let r3 = etcd.put("/t/c", "3").await.unwrap();
    etcd.put(b"/t\xff".as_slice(), "outside").await.unwrap();
    assert!(r1 < r2 && r2 < r3);
    assert_eq!(etcd.get("/t/b").await.unwrap(), Some((b"2".to_vec(), r2)));

    let all = etcd.range_prefix("/t/").await.unwrap();
    assert_eq!(all.count, 3);
    assert!(!all.more);
    assert_eq!(all.revision, r3 + 1);
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, [b"/t/a".to_vec(), b"/t/b".to_vec(), b"/t/c".to_vec()]);
    assert_eq!(all.kvs[0].create_revision, r1);
    assert_eq!(all.kvs[0].version, 1);

    let page = etcd
        .range(Range::prefix("/t/").limit(2).descending())
        .await
        .unwrap();
    assert!(page.more);
    assert_eq!(page.count, 3);
    let keys: Vec<_> = page.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, [b"/t/c".to_vec(), b"/t/b".to_vec()]);

    let keys_only = etcd
        .range(Range::between("/t/a", "/t/c").keys_only())
        .await
        .unwrap();
    assert_eq!(keys_only.kvs.len(), 2);
    assert!(keys_only.kvs.iter().all(|kv| kv.value.is_empty()));
    let counted = etcd.range(Range::prefix("/t").count_only()).await.unwrap();
    assert_eq!((counted.count, counted.kvs.len()), (4, 0));

    // The store as it was: /t/c did not exist yet at r2.
    let old = etcd.range(Range::prefix("/t/").revision(r2)).await.unwrap();
    assert_eq!(old.count, 2);

    // A prefix of 0xff bytes ends at [0]: every key from it.
    assert_eq!(prefix_end(b"/t\xff"), b"/u");
    let tail = etcd
        .range(Range::between(b"/t\xff".as_slice(), prefix_end(b"\xff")))
        .await
        .unwrap();
    assert_eq!(tail.count, 1);

    let d = etcd.delete("/t/a").await.unwrap();
    assert_eq!(d.deleted, 1);
    let d = etcd.delete_range("/t/b", prefix_end(b"/t/")).await.unwrap();
    assert_eq!(d.deleted, 2);
    assert_eq!(etcd.range_prefix("/t/").await.unwrap().count, 0);
    assert_eq!(etcd.delete("/t/a").await.unwrap().deleted, 0);
}

#[tokio::test]
async fn txn_branches_and_limits() {
    let Some(cluster) = EtcdCluster::start("txn_branches_and_limits", 1).await else {
        return;
    };
    let etcd = client(cluster.endpoints()).await;

    // Create-if-absent, twice: the first wins, the second takes the other branch.
    let create = |value: &str| {
        Txn::new()
            .when([Compare::absent("/x/leader")])
            .and_then([Op::put("/x/leader", value), Op::put("/x/term", value)])
            .or_else([Op::range(Range::key("/x/leader"))])
    };
    let first = etcd.txn(create("a")).await.unwrap();
    assert!(first.succeeded);
    assert_eq!(first.responses, [OpResponse::Put, OpResponse::Put]);
    let (_, rev) = etcd.get("/x/leader").await.unwrap().unwrap();
    assert_eq!(rev, first.revision);

    let second = etcd.txn(create("b")).await.unwrap();
    assert!(!second.succeeded);
    match &second.responses[..] {
        [OpResponse::Range(r)] => assert_eq!(r.kvs[0].value, b"a"),
        other => panic!("unexpected responses {other:?}"),
    }

    // Guards on mod revision, version and value.
    let cas = |rev: i64| {
        Txn::new()
            .when([
                Compare::mod_revision("/x/leader", CompareOp::Equal, rev),
                Compare::version("/x/leader", CompareOp::Less, 5),
                Compare::value("/x/leader", CompareOp::NotEqual, "z"),
            ])
            .and_then([Op::put("/x/leader", "c"), Op::delete("/x/term")])
    };
    let stale = etcd.txn(cas(rev - 1)).await.unwrap();
    assert!(!stale.succeeded);
    assert!(stale.responses.is_empty());
    let fresh = etcd.txn(cas(rev)).await.unwrap();
    assert!(fresh.succeeded);
    assert_eq!(
        fresh.responses,
        [OpResponse::Put, OpResponse::Delete { deleted: 1 }]
    );
    assert_eq!(etcd.get("/x/leader").await.unwrap().unwrap().0, b"c");
    let greater = Txn::new().when([Compare::create_revision("/x/leader", CompareOp::Greater, 0)]);
    assert!(etcd.txn(greater).await.unwrap().succeeded);

    // etcd's limits come back as their own errors; nothing was applied.
    let ok: Vec<_> = (0..MAX_TXN_OPS)
        .map(|i| Op::put(format!("/x/many/{i}"), "v"))
        .collect();
    assert!(etcd.txn(Txn::new().and_then(ok)).await.unwrap().succeeded);
    let too_many: Vec<_> = (0..=MAX_TXN_OPS)
        .map(|i| Op::put(format!("/x/more/{i}"), "v"))
        .collect();
    let e = etcd.txn(Txn::new().and_then(too_many)).await.unwrap_err();
    assert!(matches!(e, EtcdError::TooManyOps), "{e:?}");
    let e = etcd
        .put("/x/big", vec![b'x'; 1600 * 1024])
        .await
        .unwrap_err();
    assert!(matches!(e, EtcdError::TooLarge), "{e:?}");
    let e = etcd.put("/x/huge", vec![b'x'; 3 << 20]).await.unwrap_err();
    assert!(matches!(e, EtcdError::TooLarge), "{e:?}");
    assert_eq!(etcd.range_prefix("/x/more/").await.unwrap().count, 0);
    // A key written twice in one branch is refused as it is.
    let twice = Txn::new().and_then([Op::put("/x/d", "1"), Op::put("/x/d", "2")]);
    let e = etcd.txn(twice).await.unwrap_err();
    assert!(matches!(e, EtcdError::Status(_)), "{e:?}");
    assert!(e.to_string().contains("duplicate key"), "{e}");
}

#[tokio::test]
async fn watch_from_a_revision_and_after_compaction() {
    let Some(cluster) = EtcdCluster::start("watch_from_a_revision", 1).await else {
        return;
    };
    let etcd = client(cluster.endpoints()).await;

    let start = etcd.put("/w/a", "1").await.unwrap();
    let r2 = etcd.put("/w/b", "2").await.unwrap();
    let r3 = etcd.delete("/w/a").await.unwrap().revision;
    etcd.put("/other", "x").await.unwrap();

    // Created after the writes, from the first of them: the history, in order.
    let options = WatchOptions {
        range_end: prefix_end(b"/w/"),
        start_revision: start,
        prev_kv: true,
        ..WatchOptions::default()
    };
    let mut w = etcd.watch("/w/", options.clone()).await.unwrap();
    assert_eq!(w.endpoint(), cluster.endpoint(0));
    let seen = events(&mut w, 3).await;
    assert_eq!(
        seen,
        [
            (EventKind::Put, "/w/a".into(), "1".into(), start),
            (EventKind::Put, "/w/b".into(), "2".into(), r2),
            (EventKind::Delete, "/w/a".into(), String::new(), r3),
        ]
    );
    // Then live changes.
    let r4 = etcd.put("/w/c", "4").await.unwrap();
    let batch = next(&mut w).await.unwrap();
    assert_eq!(batch.revision, r4);
    assert_eq!(batch.events.len(), 1);
    let e = &batch.events[0];
    assert_eq!(
        (e.kind, &e.kv.key[..], e.kv.mod_revision),
        (EventKind::Put, &b"/w/c"[..], r4)
    );
    assert_eq!(e.prev_kv, None);
    let r5 = etcd.put("/w/c", "5").await.unwrap();
    let batch = next(&mut w).await.unwrap();
    assert_eq!(batch.events[0].kv.mod_revision, r5);
    assert_eq!(batch.events[0].prev_kv.as_ref().unwrap().value, b"4");

    // A quiet watch stays up (probed, not dropped by etcd's ping policy).
    let quiet = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
    assert!(quiet.is_err(), "a quiet watch answered {quiet:?}");

    // Compacted history: the watch fails with the compaction's revision, and so does a
    // range at an old revision.
    etcd.compact(r4).await.unwrap();
    etcd.compact(r4).await.unwrap();
    let mut old = etcd.watch("/w/", options).await.unwrap();
    match next(&mut old).await {
        Err(EtcdError::Compacted { compact_revision }) => assert_eq!(compact_revision, r4),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(old.next().await.is_err());
    let e = etcd
        .range(Range::key("/w/b").revision(start))
        .await
        .unwrap_err();
    assert!(matches!(e, EtcdError::Compacted { .. }), "{e:?}");
    // At the compaction revision itself the watch is accepted.
    let mut at = etcd
        .watch(
            "/w/c",
            WatchOptions {
                start_revision: r4,
                ..WatchOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(events(&mut at, 2).await[1].3, r5);
}

#[tokio::test]
async fn leases_keep_alive_and_revoke() {
    let Some(cluster) = EtcdCluster::start("leases_keep_alive_and_revoke", 1).await else {
        return;
    };
    let etcd = client(cluster.endpoints()).await;

    let lease = etcd.grant(2).await.unwrap();
    etcd.put_with_lease("/l/held", "me", lease).await.unwrap();
    let mut kept = etcd.keep_alive(lease).await.unwrap();
    assert_eq!(kept.id(), lease);
    assert!(kept.is_alive());
    // Twice the TTL later the key is still there.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(kept.is_alive());
    let kv = etcd.range(Range::key("/l/held")).await.unwrap();
    assert_eq!(kv.kvs[0].lease, lease);

    etcd.revoke(lease).await.unwrap();
    assert_eq!(etcd.get("/l/held").await.unwrap(), None);
    // Revoking again is not an error; keeping a gone lease alive is.
    etcd.revoke(lease).await.unwrap();
    let e = etcd.keep_alive(lease).await.err().unwrap();
    assert!(matches!(e, EtcdError::LeaseNotFound), "{e:?}");
    // The keep-alive notices at its next renewal.
    let lost = tokio::time::timeout(WAIT, kept.lost()).await.unwrap();
    assert!(matches!(lost, EtcdError::LeaseNotFound), "{lost:?}");
    assert!(!kept.is_alive());

    // Without renewals a lease expires with its keys.
    let short = etcd.grant(1).await.unwrap();
    etcd.put_with_lease("/l/short", "x", short).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while etcd.get("/l/short").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the key of an expired lease stayed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = etcd
        .put_with_lease("/l/late", "x", short)
        .await
        .unwrap_err();
    assert!(matches!(e, EtcdError::LeaseNotFound), "{e:?}");
}

#[tokio::test]
async fn failover_when_the_leader_dies() {
    let Some(mut cluster) = EtcdCluster::start("failover_when_the_leader_dies", 3).await else {
        return;
    };
    // The leader first: the client starts there and must move on.
    let leader = cluster.leader().await;
    let mut order = vec![leader];
    order.extend((0..3).filter(|&i| i != leader));
    let endpoints: Vec<String> = order.iter().map(|&i| cluster.endpoint(i)).collect();
    let etcd = client(endpoints.clone()).await;

    for (k, &i) in order.iter().enumerate() {
        let status = etcd.status(&endpoints[k]).await.unwrap();
        assert_eq!(status.member_id, cluster.member_id(i));
        assert_eq!(status.leader, cluster.member_id(leader));
        assert!(status.raft_term > 0 && status.revision > 0);
    }
    let before = etcd.put("/f/k", "before").await.unwrap();
    assert_eq!(etcd.current_endpoint(), endpoints[0]);
    let mut w = etcd
        .watch(
            "/f/k",
            WatchOptions {
                start_revision: before + 1,
                ..WatchOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(w.endpoint(), endpoints[0]);

    cluster.kill(leader);
    let t0 = Instant::now();
    let after = etcd.put("/f/k", "after").await.unwrap();
    let took = t0.elapsed();
    eprintln!("failover_when_the_leader_dies: first write after the kill took {took:?}");
    assert_ne!(etcd.current_endpoint(), endpoints[0]);
    assert_eq!(
        etcd.get("/f/k").await.unwrap(),
        Some((b"after".to_vec(), after))
    );
    let e = etcd.status(&endpoints[0]).await.unwrap_err();
    assert!(matches!(e, EtcdError::Unavailable(_)), "{e:?}");

    // The watch on the dead member breaks; watching again from where it was goes to a
    // live one and misses nothing.
    let e = next(&mut w).await.unwrap_err();
    assert!(matches!(e, EtcdError::Unavailable(_)), "{e:?}");
    let mut w = etcd
        .watch(
            "/f/k",
            WatchOptions {
                start_revision: before + 1,
                ..WatchOptions::default()
            },
        )
        .await
        .unwrap();
    assert_ne!(w.endpoint(), endpoints[0]);
    assert_eq!(events(&mut w, 1).await[0].3, after);

    // Leases and guarded writes go on too.
    let lease = etcd.grant(5).await.unwrap();
    let _kept = etcd.keep_alive(lease).await.unwrap();
    let txn = Txn::new()
        .when([Compare::mod_revision("/f/k", CompareOp::Equal, after)])
        .and_then([Op::put_with_lease("/f/owned", "x", lease)]);
    assert!(etcd.txn(txn).await.unwrap().succeeded);

    // With the cluster down to one member there is no quorum: bounded, and said.
    let second = cluster.leader().await;
    cluster.kill(second);
    let t0 = Instant::now();
    let e = etcd.put("/f/k", "no quorum").await.unwrap_err();
    eprintln!(
        "failover_when_the_leader_dies: without quorum: {e} after {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(e, EtcdError::Unavailable(_) | EtcdError::Indeterminate(_)),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn frozen_member() {
    let Some(cluster) = EtcdCluster::start("frozen_member", 3).await else {
        return;
    };
    let leader = cluster.leader().await;
    let mut order = vec![leader];
    order.extend((0..3).filter(|&i| i != leader));
    let endpoints: Vec<String> = order.iter().map(|&i| cluster.endpoint(i)).collect();
    let etcd = client(endpoints.clone()).await;
    let only_leader = client(vec![endpoints[0].clone()]).await;
    let rev = etcd.put("/z/k", "1").await.unwrap();
    assert_eq!(only_leader.get("/z/k").await.unwrap().unwrap().1, rev);
    let mut w = etcd.watch("/z/k", WatchOptions::default()).await.unwrap();
    assert_eq!(w.endpoint(), endpoints[0]);

    cluster.freeze(leader);
    // A guarded write sent to the frozen member: its fate is unknown.
    let t0 = Instant::now();
    let guarded = Txn::new()
        .when([Compare::mod_revision("/z/k", CompareOp::Equal, rev)])
        .and_then([Op::put("/z/k", "guarded")]);
    let e = only_leader.txn(guarded.clone()).await.unwrap_err();
    assert!(matches!(e, EtcdError::Indeterminate(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // Writes that may be repeated move on to the others once they elect a leader.
    let t0 = Instant::now();
    let after = etcd.put("/z/k", "2").await.unwrap();
    eprintln!(
        "frozen_member: first write after the freeze took {:?}",
        t0.elapsed()
    );
    assert!(etcd.txn(guarded.resend_if_unknown()).await.is_ok());
    assert!(after > rev);

    // The watch on the frozen member notices the silence within seconds.
    let t0 = Instant::now();
    let e = next(&mut w).await.unwrap_err();
    eprintln!("frozen_member: watch failed after {:?}: {e}", t0.elapsed());
    assert!(matches!(e, EtcdError::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains("silent"), "{e}");
    cluster.thaw(leader);
}

#[tokio::test]
async fn tls_with_and_without_client_certificate() {
    let Some(cluster) = EtcdCluster::start_tls("tls_with_and_without_client_cert", 1).await else {
        return;
    };
    let files = cluster.tls_files().expect("TLS files");
    let endpoints = cluster.endpoints();
    assert!(endpoints[0].starts_with("https://"));

    let cfg = EtcdConfig::new(endpoints.clone()).with_tls(
        files.ca.clone(),
        Some((files.cert.clone(), files.key.clone())),
    );
    let etcd = Etcd::connect(cfg).await.unwrap();
    let rev = etcd.put("/tls/k", "v").await.unwrap();
    assert_eq!(
        etcd.get("/tls/k").await.unwrap(),
        Some((b"v".to_vec(), rev))
    );
    let mut w = etcd
        .watch(
            "/tls/k",
            WatchOptions {
                start_revision: rev,
                ..WatchOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(events(&mut w, 1).await[0].3, rev);
    // An idle TLS connection with HTTP/2 pings every second stays usable.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(etcd.get("/tls/k").await.unwrap().is_some());

    // No client certificate: refused, and said so, at once.
    let anonymous =
        Etcd::connect(EtcdConfig::new(endpoints.clone()).with_tls(files.ca.clone(), None))
            .await
            .unwrap();
    let t0 = Instant::now();
    let e = anonymous.get("/tls/k").await.unwrap_err();
    eprintln!("tls: without a client certificate: {e}");
    assert!(matches!(e, EtcdError::Tls(_)), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    // A CA that did not sign etcd's certificate: the handshake fails on our side.
    let e = Etcd::connect(EtcdConfig::new(endpoints.clone()).with_tls(files.cert.clone(), None))
        .await
        .unwrap()
        .get("/tls/k")
        .await
        .unwrap_err();
    assert!(matches!(e, EtcdError::Tls(_)), "{e:?}");

    // Unreadable files and half pairs are named.
    let missing = files.ca.with_file_name("nope.pem");
    let e = Etcd::connect(
        EtcdConfig::new(endpoints.clone())
            .with_tls(files.ca.clone(), Some((missing.clone(), files.key.clone()))),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, EtcdError::Tls(_)), "{e:?}");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );
    let mut half = EtcdConfig::new(endpoints).with_tls(files.ca, None);
    half.key = Some(files.key);
    let e = Etcd::connect(half).await.unwrap_err();
    assert!(e.to_string().contains("--etcd-cert and --etcd-key"), "{e}");
}
