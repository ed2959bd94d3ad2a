//! Propagation benchmark: from a REST write returning to every data-plane replica having
//! acked the new version, with a large configuration in the store.
//!
//! Starts the release binaries next to this one (`cargo build --release --workspace
//! --bins`): one `ztp-control` and up to the largest replica count of `ztp-dataplane`
//! nodes on loopback, imports SERVICES services and USERS users, then for each replica
//! count makes WRITES writes of one record each (a new group and a user moved to another
//! group, in turn) and polls `/v1/nodes` every
//! millisecond until every node reports the version the write returned. Prints the
//! median, p90, p99 and max per replica count.
//!
//! Usage: propagation [--replicas 1,2,8] [--services 10000] [--users 100000] [--writes 15]

use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::*;

struct Opts {
    replicas: Vec<usize>,
    services: usize,
    users: usize,
    writes: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        replicas: vec![1, 2, 8],
        services: 10_000,
        users: 100_000,
        writes: 15,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--replicas" => {
                o.replicas = v
                    .split(',')
                    .map(|n| n.parse().expect("--replicas 1,2,8"))
                    .collect()
            }
            "--services" => o.services = v.parse().expect("--services N"),
            "--users" => o.users = v.parse().expect("--users N"),
            "--writes" => o.writes = v.parse().expect("--writes N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    o
}

fn main() {
    let o = opts();
    ztp_tests::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("ztp-bench-propagation-{}", std::process::id()));
    let max = o.replicas.iter().copied().max().unwrap_or(1);
    setup_pki(&dir, max);
    let ca = dir.join("ca.pem");
    let control = start_control(&dir);
    let (api, grpc, token) = (control.api, control.grpc, control.token.clone());

    // The configuration: SERVICES services over 10 groups, USERS users.
    let t = Instant::now();
    let mut services = Vec::with_capacity(o.services);
    for i in 0..o.services {
        services.push(serde_json::json!({"name": format!("s{i}.svc.internal"), "protocol": "tcp",
            "address": format!("127.0.0.1:{}", 1000 + i % 60000), "groups": [format!("g{}", i % 10)]}));
    }
    let mut users = Vec::with_capacity(o.users);
    for i in 0..o.users {
        users.push(
            serde_json::json!({"name": format!("u{i}"), "identities": [format!("u{i}@example.com")],
            "groups": [format!("g{}", i % 10)]}),
        );
    }
    let groups: Vec<Value> = (0..10)
        .map(|i| serde_json::json!({"name": format!("g{i}")}))
        .collect();
    let snap = serde_json::json!({"version": 1, "services": services, "users": users, "groups": groups, "revoked": []});
    let body = serde_json::to_vec(&snap).unwrap();
    let (status, _, resp) = http(api, "POST", "/v1/import", &token, &body);
    assert_eq!(status, 200, "import: {}", String::from_utf8_lossy(&resp));
    println!(
        "store: {} services, {} users ({} MiB of JSON), imported in {:.1} s",
        o.services,
        o.users,
        body.len() >> 20,
        t.elapsed().as_secs_f64()
    );

    let mut nodes: Vec<Proc> = Vec::new();
    let mut replicas = o.replicas.clone();
    replicas.sort_unstable();
    for n in replicas {
        while nodes.len() < n {
            let id = format!("n{}", nodes.len());
            nodes.push(start_node(&dir, &id, &ca, grpc, ([127, 0, 0, 1], 0).into()));
        }
        let (_, etag, _) = http(api, "GET", "/v1/snapshot?format=json", &token, b"");
        let current: u64 = etag.and_then(|e| e.parse().ok()).unwrap_or(0);
        wait_until("all nodes to sync", Duration::from_secs(120), || {
            let a = applied(api, &token);
            a.len() == n && a.iter().all(|v| *v >= current)
        });
        let mut times = Vec::new();
        for w in 0..o.writes {
            // One record each: a new group, then a user moved to another group.
            let (status, etag, resp) = if w % 2 == 0 {
                let body = format!("{{\"name\":\"bench-{n}-{w}\"}}");
                http(api, "POST", "/v1/groups", &token, body.as_bytes())
            } else {
                let body = format!(
                    "{{\"name\":\"u{w}\",\"identities\":[\"u{w}@example.com\"],\"groups\":[\"g{}\"]}}",
                    (w + n) % 10
                );
                http(
                    api,
                    "PUT",
                    &format!("/v1/users/u{w}"),
                    &token,
                    body.as_bytes(),
                )
            };
            let returned = Instant::now();
            assert!(
                status == 200 || status == 201,
                "{status}: {}",
                String::from_utf8_lossy(&resp)
            );
            let version: u64 = etag.and_then(|e| e.parse().ok()).expect("ETag");
            wait_until("every replica to ack", Duration::from_secs(120), || {
                let a = applied(api, &token);
                a.len() == n && a.iter().all(|v| *v >= version)
            });
            times.push(returned.elapsed());
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "replicas {n}: write -> all acked: median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} writes)",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.9)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().unwrap()),
            times.len()
        );
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
