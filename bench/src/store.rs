//! Store benchmark: the control plane's store, sled against a 3-member etcd cluster
//! (DESIGN.md, "Control plane on an existing distributed store").
//!
//! Starts the release binaries next to this one (`cargo build --release --workspace
//! --bins`) through the test harness (ztp-tests): `ztp-control` instances with the REST
//! API only, and real etcd clusters (Debian's `etcd`, default timings) on loopback. Three
//! parts, each printed in the summary at the end:
//!
//! 1. `writes`: WRITES writes (`POST /v1/groups`, distinct names, one connection per
//!    request) one after the other, then WRITES more from CLIENTS concurrent clients; on
//!    sled (`--data-dir` in $TMPDIR) and on etcd (3 members, data in $TMPDIR). Latency
//!    p50/p99/max of each write, throughput in acknowledged writes per second. 20 writes
//!    of warm-up before each are not counted.
//! 2. `failover`: a writer issues writes back to back on one instance on etcd; the etcd
//!    leader is killed with SIGKILL; the longest interval between two consecutive
//!    acknowledged writes that ends after the kill is the write gap. In parallel the
//!    surviving members' status is polled (every 5 ms) until one names a surviving
//!    leader: etcd's election, from the kill. ZTP's own part is gap minus election (the
//!    gap starts at the last acknowledgment before the kill, at most one write earlier).
//!    The killed member is restarted between rounds. Failed writes are counted by
//!    status, with the longest a refused (503) write took to be answered and the first
//!    503's body; anything but 503 is listed verbatim. The raft term after the round
//!    minus the term before counts etcd's elections.
//! 3. `startup`: USERS users (one identity, one of 10 groups each) imported with
//!    `POST /v1/import` on one instance on etcd; then, STARTS times, a new instance on
//!    the same prefix is spawned and timed until it logs `api listening` and until
//!    `GET /v1/users?limit=1` answers at the imported version. The same on sled (a new
//!    process on the data folder of the instance that imported) for reference.
//! 4. `instance`: two instances A and B (gRPC config stream on) on one etcd cluster and
//!    REPLICAS data planes with `--control A,B`. Each of INSTANCE_ROUNDS rounds: all
//!    replicas are subscribed to instance X; X is killed with SIGKILL and a new version
//!    is written at once through the other instance Y (`POST /v1/groups`); each replica's
//!    JSON log is polled every 5 ms for its subscription to Y and for `snapshot applied`
//!    at the written version, both timed from the kill. X is then restarted (same data
//!    folder and ports) and the next round kills Y (the replicas stay where they are).
//!    The target: a killed instance's replicas apply the next version from another
//!    instance within 1 s at p99.
//!
//! Usage: store [--writes 1000] [--clients 8] [--rounds 10] [--users 100000] [--starts 3]
//!              [--replicas 3] [--instance-rounds 20]
//!              [--parts writes,failover,startup,instance]
//!
//! Figures are measured on this machine, never asserted; the 1-minute load average at
//! start and end is printed because other work on the machine moves them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztp_tests::bins::Bin;
use ztp_tests::etcd::EtcdCluster;
use ztp_tests::process::{Process, Stream};
use ztp_tests::tempdir::TempDir;
use ztp_tests::{Control, ControlOptions, Dataplane, HttpResponse, TestPki};

mod common;
use common::*;

struct Opts {
    writes: usize,
    clients: usize,
    rounds: usize,
    users: usize,
    starts: usize,
    replicas: usize,
    instance_rounds: usize,
    parts: Vec<String>,
}

fn opts() -> Opts {
    let mut o = Opts {
        writes: 1000,
        clients: 8,
        rounds: 10,
        users: 100_000,
        starts: 3,
        replicas: 3,
        instance_rounds: 20,
        parts: vec![
            "writes".into(),
            "failover".into(),
            "startup".into(),
            "instance".into(),
        ],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--writes" => o.writes = v.parse().expect("--writes N"),
            "--clients" => o.clients = v.parse().expect("--clients C"),
            "--rounds" => o.rounds = v.parse().expect("--rounds R"),
            "--users" => o.users = v.parse().expect("--users N"),
            "--starts" => o.starts = v.parse().expect("--starts N"),
            "--replicas" => o.replicas = v.parse().expect("--replicas N"),
            "--instance-rounds" => o.instance_rounds = v.parse().expect("--instance-rounds R"),
            "--parts" => {
                o.parts = v.split(',').map(str::to_owned).collect();
                for p in &o.parts {
                    assert!(
                        ["writes", "failover", "startup", "instance"].contains(&p.as_str()),
                        "--parts takes writes,failover,startup,instance; not {p:?}"
                    );
                }
            }
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(o.writes > 0 && o.clients > 0, "--writes and --clients > 0");
    assert!(o.replicas > 0, "--replicas > 0");
    o
}

fn main() {
    let o = opts();
    if cfg!(debug_assertions) {
        eprintln!("run the release build: cargo run --release -p ztp-bench --bin store");
        std::process::exit(2);
    }
    // The release binaries beside this program, through the harness's guards (with all
    // three set, the harness builds nothing).
    let control_bin = bin("ztp-control");
    std::env::set_var("ZTP_CONTROL_BIN", &control_bin);
    std::env::set_var("ZTP_DATAPLANE_BIN", bin("ztp-dataplane"));
    std::env::set_var("ZTPCTL_BIN", bin("ztpctl"));
    ztp_tests::install_crypto_provider();

    let mut header = vec![
        format!("machine: {}", machine()),
        format!(
            "command: {}   (cargo run --release -p ztp-bench --bin store -- {})",
            std::env::args().collect::<Vec<_>>().join(" "),
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        format!("ztp-control: {}", describe_file(&control_bin)),
        format!("etcd: {}", etcd_version()),
        format!(
            "data (sled and etcd): {} on {}",
            std::env::temp_dir().display(),
            fs_type(&std::env::temp_dir())
        ),
        format!("load average at start: {}", loadavg()),
    ];
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut sections = Vec::new();
    let part = |p: &str| o.parts.iter().any(|q| q == p);
    if part("writes") {
        sections.push(rt.block_on(bench_writes(&o)));
    }
    if part("failover") {
        sections.push(rt.block_on(bench_failover(&o)));
    }
    if part("startup") {
        sections.push(rt.block_on(bench_startup(&o)));
    }
    if part("instance") {
        sections.push(rt.block_on(bench_instance(&o)));
    }
    header.push(format!(
        "load average at end: {}; total run time {:.0} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    ));
    println!();
    println!("==================== ZTP store benchmark (sled vs etcd) ====================");
    for l in &header {
        println!("{l}");
    }
    for s in &sections {
        println!();
        print!("{s}");
    }
}

// ---------------------------------------------------------------------------------------
// Part 1: write latency and throughput.

#[derive(Default)]
struct WriteRun {
    /// Latency of every acknowledged write.
    latencies: Vec<Duration>,
    /// Wall time of the whole run.
    wall: Duration,
    /// Answers other than 201 (and transport errors), verbatim.
    failures: Vec<String>,
}

async fn bench_writes(o: &Opts) -> String {
    let pki = TestPki::new();
    eprintln!("[writes] sled");
    let sled = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            ..Default::default()
        },
    )
    .await;
    let sled_runs = write_runs(sled.api_addr(), sled.token(), o).await;
    drop(sled);

    eprintln!("[writes] etcd: starting a 3-member cluster");
    let cluster = EtcdCluster::start("store bench writes", 3)
        .await
        .expect("etcd is needed (apt-get install etcd-server, or set ZTP_ETCD_BIN)");
    let args = cluster.store_args("/ztp-bench-writes/");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let etcd = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            args: &args,
            ..Default::default()
        },
    )
    .await;
    eprintln!("[writes] etcd");
    let etcd_runs = write_runs(etcd.api_addr(), etcd.token(), o).await;
    drop(etcd);
    drop(cluster);

    let mut s = format!(
        "1. Writes through the REST API: POST /v1/groups (distinct names, one connection per \
         request),\n   after 20 writes of warm-up; sequential: {} writes one after the other; \
         concurrent: {} writes by {} clients\n",
        o.writes, o.writes, o.clients
    );
    s += &format!(
        "   {:<22} {:>9} {:>9} {:>9} {:>10}   {:>9} {:>9} {:>9} {:>10}   {:>6}\n",
        "store",
        "seq p50",
        "seq p99",
        "seq max",
        "seq w/s",
        "conc p50",
        "conc p99",
        "conc max",
        "conc w/s",
        "failed"
    );
    for (name, (seq, conc)) in [
        ("sled (--data-dir)", &sled_runs),
        ("etcd (3 members)", &etcd_runs),
    ] {
        let (a, b) = (stats(&seq.latencies), stats(&conc.latencies));
        s += &format!(
            "   {:<22} {:>9} {:>9} {:>9} {:>10.0}   {:>9} {:>9} {:>9} {:>10.0}   {:>6}\n",
            name,
            ms(a.0),
            ms(a.1),
            ms(a.2),
            rate(seq),
            ms(b.0),
            ms(b.1),
            ms(b.2),
            rate(conc),
            seq.failures.len() + conc.failures.len()
        );
    }
    for (name, (seq, conc)) in [("sled", &sled_runs), ("etcd", &etcd_runs)] {
        for f in seq.failures.iter().chain(&conc.failures).take(5) {
            s += &format!("   FINDING: {name}: a write failed: {f}\n");
        }
    }
    s += "   (latencies in ms; w/s = acknowledged writes per second of wall time)\n";
    s
}

fn rate(r: &WriteRun) -> f64 {
    r.latencies.len() as f64 / r.wall.as_secs_f64().max(1e-9)
}

async fn write_runs(api: SocketAddr, token: &str, o: &Opts) -> (WriteRun, WriteRun) {
    for i in 0..20 {
        let _ = post_group(api, token, &format!("warm-{i}")).await;
    }
    let mut seq = WriteRun::default();
    let t0 = Instant::now();
    for i in 0..o.writes {
        let t = Instant::now();
        match post_group(api, token, &format!("seq-{i}")).await {
            Ok(()) => seq.latencies.push(t.elapsed()),
            Err(e) => seq.failures.push(e),
        }
    }
    seq.wall = t0.elapsed();

    let token = Arc::new(token.to_owned());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..o.clients {
        let token = token.clone();
        let writes = o.writes;
        let clients = o.clients;
        tasks.push(tokio::spawn(async move {
            let mut run = WriteRun::default();
            for i in (c..writes).step_by(clients) {
                let t = Instant::now();
                match post_group(api, &token, &format!("conc-{i}")).await {
                    Ok(()) => run.latencies.push(t.elapsed()),
                    Err(e) => run.failures.push(e),
                }
            }
            run
        }));
    }
    let mut conc = WriteRun::default();
    for t in tasks {
        let r = t.await.expect("a client task");
        conc.latencies.extend(r.latencies);
        conc.failures.extend(r.failures);
    }
    conc.wall = t0.elapsed();
    (seq, conc)
}

/// One `POST /v1/groups`; `Err` with the answer (or the transport error) unless 201.
async fn post_group(api: SocketAddr, token: &str, name: &str) -> Result<(), String> {
    let body = json!({ "name": name }).to_string();
    match call(api, token, "POST", "/v1/groups", Some(body.as_bytes())).await {
        Ok(r) if r.status == 201 => Ok(()),
        Ok(r) => Err(format!("HTTP {}: {}", r.status, r.text().trim())),
        Err(e) => Err(format!("no answer: {e}")),
    }
}

// ---------------------------------------------------------------------------------------
// Part 2: etcd leader loss.

enum Outcome {
    Ok,
    Status(u16, String),
    Failed(String),
}

struct Event {
    sent: Instant,
    done: Instant,
    outcome: Outcome,
}

struct Round {
    killed: usize,
    /// Kill → a survivor names a surviving leader; `None`: none within 30 s.
    election: Option<Duration>,
    /// Raft term after the election minus the term before the kill.
    terms: Option<u64>,
    /// Longest interval between consecutive acknowledged writes ending after the kill.
    gap: Option<Duration>,
    refused_503: usize,
    /// The longest time a refused (503) write took to be answered.
    slowest_503: Option<Duration>,
    /// The first 503's body, verbatim.
    first_503: Option<String>,
    other: Vec<String>,
    acked: usize,
    /// The instance's log lines at level ERROR during the round, verbatim.
    errors_logged: Vec<String>,
}

async fn bench_failover(o: &Opts) -> String {
    eprintln!("[failover] starting a 3-member etcd cluster");
    let mut cluster = EtcdCluster::start("store bench failover", 3)
        .await
        .expect("etcd is needed (apt-get install etcd-server, or set ZTP_ETCD_BIN)");
    let pki = TestPki::new();
    let args = cluster.store_args("/ztp-bench-failover/");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let control = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            args: &args,
            ..Default::default()
        },
    )
    .await;
    let api = control.api_addr();
    let token = Arc::new(control.token().to_owned());
    let mut rounds = Vec::new();
    let mut seen_lines = control.raw_logs().len();
    for round in 0..o.rounds {
        let leader = cluster.leader().await;
        let term_before = cluster
            .status(leader)
            .await
            .ok()
            .and_then(|s| json_u64(&s["raftTerm"]));
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writer =
            {
                let (events, stop, token) = (events.clone(), stop.clone(), token.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let body = json!({ "name": format!("f{round}-{i}") }).to_string();
                        i += 1;
                        let sent = Instant::now();
                        let outcome =
                            match call(api, &token, "POST", "/v1/groups", Some(body.as_bytes()))
                                .await
                            {
                                Ok(r) if r.status == 201 => Outcome::Ok,
                                Ok(r) => Outcome::Status(r.status, r.text().trim().to_owned()),
                                Err(e) => Outcome::Failed(e.to_string()),
                            };
                        events.lock().unwrap().push(Event {
                            sent,
                            done: Instant::now(),
                            outcome,
                        });
                    }
                })
            };
        // Warm: the writer has been acknowledged a few times.
        let acked = |events: &Mutex<Vec<Event>>, after: Instant| {
            events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.done > after && matches!(e.outcome, Outcome::Ok))
                .count()
        };
        let warm = Instant::now();
        while acked(&events, warm) < 10 && warm.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;

        let killed_id = cluster.member_id(leader);
        let survivors: Vec<usize> = (0..cluster.member_count())
            .filter(|&i| i != leader)
            .collect();
        let t_kill = Instant::now();
        cluster.kill(leader);
        // etcd's election: a survivor names a surviving member leader.
        let mut elected = None;
        'poll: while t_kill.elapsed() < Duration::from_secs(30) {
            for &i in &survivors {
                let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_millis(500), cluster.status(i)).await
                else {
                    continue;
                };
                let l = json_u64(&s["leader"]).unwrap_or(0);
                if l != 0 && l != killed_id && survivors.iter().any(|&j| cluster.member_id(j) == l)
                {
                    elected = Some(Instant::now());
                    break 'poll;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Writes resume: a few acknowledgments after the election (or the kill).
        let from = elected.unwrap_or(t_kill);
        while acked(&events, from) < 5 && t_kill.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        writer.await.expect("the writer task");
        // The term once writes go again (a member's status gives the term of its last
        // applied entry, which lags behind an election).
        let mut term_after = None;
        for &i in &survivors {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(500), cluster.status(i)).await
            {
                term_after = term_after.max(json_u64(&s["raftTerm"]));
            }
        }

        let events = std::mem::take(&mut *events.lock().unwrap());
        let oks: Vec<Instant> = events
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Ok))
            .map(|e| e.done)
            .collect();
        let gap = oks
            .windows(2)
            .filter(|w| w[1] > t_kill)
            .map(|w| w[1] - w[0])
            .max();
        let mut r = Round {
            killed: leader,
            election: elected.map(|e| e - t_kill),
            terms: term_after
                .zip(term_before)
                .map(|(a, b)| a.saturating_sub(b)),
            gap,
            refused_503: 0,
            slowest_503: None,
            first_503: None,
            other: Vec::new(),
            acked: oks.len(),
            errors_logged: error_lines(&control, &mut seen_lines),
        };
        for e in &events {
            match &e.outcome {
                Outcome::Ok => {}
                Outcome::Status(503, body) => {
                    r.refused_503 += 1;
                    r.slowest_503 = r.slowest_503.max(Some(e.done - e.sent));
                    r.first_503.get_or_insert_with(|| body.clone());
                }
                Outcome::Status(code, body) => r.other.push(format!("HTTP {code}: {body}")),
                Outcome::Failed(err) => r.other.push(format!("no answer: {err}")),
            }
        }
        eprintln!(
            "[failover] round {}: killed m{leader}, election {}, gap {}, {} × 503, {} other",
            round + 1,
            opt_ms(r.election),
            opt_ms(r.gap),
            r.refused_503,
            r.other.len()
        );
        rounds.push(r);
        cluster.restart(leader).await;
    }
    drop(control);
    drop(cluster);

    let mut s = format!(
        "2. etcd leader loss: a writer on one instance (POST /v1/groups back to back), \
         kill -9 of the etcd leader, {} rounds\n   (instance's --etcd-endpoints in the order \
         m0,m1,m2; election: kill → a survivor's status names a surviving leader, polled \
         every 5 ms;\n   gap: longest interval between consecutive acknowledged writes \
         ending after the kill; ZTP part = gap − election)\n",
        o.rounds
    );
    s += &format!(
        "   {:>5} {:>7} {:>10} {:>6} {:>10} {:>14} {:>6} {:>6} {:>12} {:>6}\n",
        "round",
        "killed",
        "election",
        "terms",
        "gap",
        "gap−election",
        "acked",
        "503s",
        "503 answered",
        "other"
    );
    for (i, r) in rounds.iter().enumerate() {
        let part = match (r.gap, r.election) {
            (Some(g), Some(e)) => signed_ms(g.as_secs_f64() - e.as_secs_f64()),
            _ => "-".into(),
        };
        s += &format!(
            "   {:>5} {:>7} {:>10} {:>6} {:>10} {:>14} {:>6} {:>6} {:>12} {:>6}\n",
            i + 1,
            format!("m{}", r.killed),
            opt_ms(r.election),
            r.terms.map_or("-".into(), |t| format!("+{t}")),
            opt_ms(r.gap),
            part,
            r.acked,
            r.refused_503,
            opt_ms(r.slowest_503),
            r.other.len()
        );
    }
    let gaps: Vec<f64> = rounds.iter().filter_map(|r| r.gap).map(secs).collect();
    let elections: Vec<f64> = rounds.iter().filter_map(|r| r.election).map(secs).collect();
    let parts: Vec<f64> = rounds
        .iter()
        .filter_map(|r| Some(secs(r.gap?) - secs(r.election?)))
        .collect();
    s += &format!(
        "   {:<26} {:>10} {:>10} {:>10}   (n)\n",
        "", "p50", "p99", "max"
    );
    for (name, v) in [
        ("write gap", &gaps),
        ("etcd election", &elections),
        ("ZTP part (gap − election)", &parts),
    ] {
        let (p50, p99, max) = fstats(v);
        s += &format!(
            "   {:<26} {:>10} {:>10} {:>10}   ({})\n",
            name,
            signed_ms(p50),
            signed_ms(p99),
            signed_ms(max),
            v.len()
        );
    }
    let refused: usize = rounds.iter().map(|r| r.refused_503).sum();
    s += &format!(
        "   failed writes: {refused} × 503 over {} rounds; other answers: {}\n",
        o.rounds,
        rounds.iter().map(|r| r.other.len()).sum::<usize>()
    );
    for (i, r) in rounds.iter().enumerate() {
        for f in r.other.iter().take(3) {
            s += &format!("   FINDING: round {}: a write failed with {f}\n", i + 1);
        }
        for l in r.errors_logged.iter().take(3) {
            s += &format!("   round {}: ztp-control logged: {l}\n", i + 1);
        }
        if r.election.is_none() {
            s += &format!(
                "   FINDING: round {}: no surviving leader seen within 30 s\n",
                i + 1
            );
        }
        if r.gap.is_none() {
            s += &format!(
                "   FINDING: round {}: no acknowledged write after the kill\n",
                i + 1
            );
        }
    }
    if let Some(body) = rounds.iter().find_map(|r| r.first_503.as_ref()) {
        s += &format!("   a 503's body (the first one): {body}\n");
    }
    s += "   (terms: raft term after minus before, i.e. elections held; 503 answered: the \
          longest a refused write took to be answered;\n    ms; with few rounds p99 is the \
          largest but one or the largest)\n";
    s
}

// ---------------------------------------------------------------------------------------
// Part 3: startup of a new instance with a large store.

struct Start {
    listening: Duration,
    serving: Duration,
    rss_mib: f64,
    version_seen: u64,
}

async fn bench_startup(o: &Opts) -> String {
    let snap = users_snapshot(o.users);
    let body = Arc::new(serde_json::to_vec(&snap).unwrap());
    drop(snap);
    let mut s = format!(
        "3. Startup with {} users (one identity, one of 10 groups each; {:.1} MiB of JSON \
         imported with POST /v1/import),\n   a new ztp-control process timed from spawn to \
         `api listening` and to GET /v1/users?limit=1 answering at the imported version\n",
        o.users,
        body.len() as f64 / (1 << 20) as f64
    );
    let pki = TestPki::new();

    // etcd
    eprintln!("[startup] starting a 3-member etcd cluster");
    let cluster = EtcdCluster::start("store bench startup", 3)
        .await
        .expect("etcd is needed (apt-get install etcd-server, or set ZTP_ETCD_BIN)");
    let prefix = "/ztp-bench-startup/";
    let args = cluster.store_args(prefix);
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            args: &args_ref,
            ..Default::default()
        },
    )
    .await;
    eprintln!("[startup] etcd: importing {} users", o.users);
    let (import, took) = post_import(first.api_addr(), first.token(), body.clone()).await;
    let db_size = cluster
        .status(cluster.leader().await)
        .await
        .ok()
        .and_then(|s| json_u64(&s["dbSize"]));
    match &import {
        Ok(version) => {
            s += &format!(
                "   etcd (3 members): import {:.2} s → version {version}; etcd dbSize after: {}\n",
                took.as_secs_f64(),
                db_size.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
            );
            let root = TempDir::new("store-bench-startup");
            let mut starts = Vec::new();
            for k in 0..o.starts {
                let dir = root.join(format!("data{k}"));
                let mut extra = vec!["--data-dir".to_owned(), dir.display().to_string()];
                extra.extend(args.iter().cloned());
                eprintln!("[startup] etcd: new instance {}", k + 1);
                starts.push(start_timed(&extra, first.token(), *version).await);
            }
            s += &starts_table(&starts, *version);
        }
        Err(e) => {
            s += &format!(
                "   etcd (3 members): FINDING: the import failed after {:.2} s: {e}\n   \
                 (no startup measured on etcd)\n",
                took.as_secs_f64()
            );
        }
    }
    drop(first);
    drop(cluster);

    // sled, for reference
    let mut sled = Control::start_with(
        &pki,
        ControlOptions {
            no_grpc: true,
            ..Default::default()
        },
    )
    .await;
    eprintln!("[startup] sled: importing {} users", o.users);
    let (import, took) = post_import(sled.api_addr(), sled.token(), body).await;
    match &import {
        Ok(version) => {
            s += &format!(
                "   sled (reference): import {:.2} s → version {version}; a new process on \
                 the same --data-dir (the importer stopped first)\n",
                took.as_secs_f64()
            );
            sled.kill9();
            let data = sled.data_dir().display().to_string();
            let mut starts = Vec::new();
            for k in 0..o.starts {
                eprintln!("[startup] sled: new process {}", k + 1);
                let extra = vec!["--data-dir".to_owned(), data.clone()];
                starts.push(start_timed(&extra, sled.token(), *version).await);
            }
            s += &starts_table(&starts, *version);
        }
        Err(e) => {
            s += &format!(
                "   sled: FINDING: the import failed after {:.2} s: {e}\n",
                took.as_secs_f64()
            );
        }
    }
    drop(sled);
    s
}

fn users_snapshot(users: usize) -> Value {
    let groups: Vec<Value> = (0..10)
        .map(|i| json!({ "name": format!("g{i}") }))
        .collect();
    let users: Vec<Value> = (0..users)
        .map(|i| {
            json!({
                "name": format!("u{i}"),
                "identities": [format!("u{i}@example.com")],
                "groups": [format!("g{}", i % 10)],
            })
        })
        .collect();
    json!({ "version": 1, "services": [], "users": users, "groups": groups, "revoked": [] })
}

/// `POST /v1/import` (not bounded: a large import may take long); the version it made,
/// or its answer verbatim.
async fn post_import(
    api: SocketAddr,
    token: &str,
    body: Arc<Vec<u8>>,
) -> (Result<u64, String>, Duration) {
    let token = token.to_owned();
    let t = Instant::now();
    let (status, etag, resp) =
        tokio::task::spawn_blocking(move || http(api, "POST", "/v1/import", &token, &body))
            .await
            .expect("the import thread");
    let took = t.elapsed();
    let version = (status == 200)
        .then(|| {
            serde_json::from_slice::<Value>(&resp)
                .ok()
                .and_then(|v| v["version"].as_u64())
                .or_else(|| etag.and_then(|e| e.parse().ok()))
        })
        .flatten();
    match version {
        Some(v) => (Ok(v), took),
        None => (
            Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&resp).trim()
            )),
            took,
        ),
    }
}

/// Spawns `ztp-control --api-listen 127.0.0.1:0 --log-format json EXTRA` and times it
/// until it logs `api listening` and until `GET /v1/users?limit=1` answers 200 at
/// `version` (or later: then the version seen says so); killed when done.
async fn start_timed(extra: &[String], token: &str, version: u64) -> Result<Start, String> {
    let mut cmd = Command::new(Bin::Control.path());
    cmd.args(["--api-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(extra)
        .env_remove("RUST_LOG");
    let t0 = Instant::now();
    let mut p = Process::spawn("ztp-control (startup)", cmd);
    let bound = Duration::from_secs(300);
    let addr: SocketAddr = loop {
        let found = p
            .lines(Stream::Stderr)
            .into_iter()
            .chain(p.lines(Stream::Stdout))
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .find(|v| v["message"] == "api listening")
            .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()));
        if let Some(a) = found {
            break a;
        }
        if let Some(status) = p.try_wait() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(format!(
                "exited ({status}) before `api listening`: {}",
                p.output_text()
            ));
        }
        if t0.elapsed() > bound {
            return Err(format!(
                "no `api listening` within {bound:?}: {}",
                p.output_text()
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let listening = t0.elapsed();
    loop {
        let last = match call(addr, token, "GET", "/v1/users?limit=1", None).await {
            Ok(r) if r.status == 200 => {
                let seen = r.etag_version().unwrap_or(0);
                if seen >= version {
                    let serving = t0.elapsed();
                    let rss_mib = rss_kib(p.pid()) as f64 / 1024.0;
                    return Ok(Start {
                        listening,
                        serving,
                        rss_mib,
                        version_seen: seen,
                    });
                }
                format!("version {seen}")
            }
            Ok(r) => format!("HTTP {}: {}", r.status, r.text().trim()),
            Err(e) => e.to_string(),
        };
        if t0.elapsed() > bound {
            return Err(format!(
                "GET /v1/users did not answer at version {version} within {bound:?} \
                 (last: {last})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn starts_table(starts: &[Result<Start, String>], version: u64) -> String {
    let mut s = format!(
        "   {:>8} {:>16} {:>18} {:>10}\n",
        "start", "api listening", "serving version", "RSS"
    );
    for (i, r) in starts.iter().enumerate() {
        match r {
            Ok(st) => {
                s += &format!(
                    "   {:>8} {:>14.0}ms {:>16.0}ms {:>7.0}MiB\n",
                    i + 1,
                    st.listening.as_secs_f64() * 1e3,
                    st.serving.as_secs_f64() * 1e3,
                    st.rss_mib
                );
                if st.version_seen != version {
                    s += &format!(
                        "   FINDING: start {}: the new instance served version {}, not the \
                         imported {version}\n",
                        i + 1,
                        st.version_seen
                    );
                }
            }
            Err(e) => s += &format!("   FINDING: start {} failed: {e}\n", i + 1),
        }
    }
    let mut l: Vec<Duration> = starts.iter().flatten().map(|s| s.listening).collect();
    let mut v: Vec<Duration> = starts.iter().flatten().map(|s| s.serving).collect();
    if !l.is_empty() {
        l.sort();
        v.sort();
        s += &format!(
            "   {:>8} {:>14.0}ms {:>16.0}ms\n",
            "median",
            percentile(&l, 0.5).as_secs_f64() * 1e3,
            percentile(&v, 0.5).as_secs_f64() * 1e3
        );
    }
    s
}

// ---------------------------------------------------------------------------------------
// Part 4: loss of a ztp-control instance, its replicas moving to another one.

/// One replica in one round, times from the kill (as seen by polling its log every 5 ms).
#[derive(Default)]
struct Move {
    /// → its log says it subscribed to the other instance.
    subscribed: Option<Duration>,
    /// The version it resumed at (the `applied` of that line, which its Hello carried).
    resumed_at: Option<u64>,
    /// Every `snapshot applied` after the kill: version, and when it was seen.
    snapshots: Vec<(u64, Duration)>,
    /// Its WARN and ERROR lines after the kill other than the expected "control plane
    /// lost; moving to …", verbatim.
    unexpected: Vec<String>,
}

impl Move {
    /// → a snapshot at `version` or later was applied.
    fn applied(&self, version: u64) -> Option<Duration> {
        self.snapshots
            .iter()
            .find(|(v, _)| *v >= version)
            .map(|&(_, t)| t)
    }

    /// Snapshots applied after the kill below `version` (the version it had, sent again).
    fn resent(&self, version: u64) -> usize {
        self.snapshots.iter().filter(|(v, _)| *v < version).count()
    }
}

struct InstanceRound {
    killed: &'static str,
    /// The version every replica had applied before the kill.
    before: u64,
    /// The write through the other instance: its version, or its answer verbatim.
    written: Result<u64, String>,
    /// Kill → the write acknowledged.
    write_took: Duration,
    /// `None`: the replica was not on the killed instance at the version before (left
    /// out of the figures).
    replicas: Vec<Option<Move>>,
    /// The other instance's ERROR lines during the round, verbatim.
    errors_logged: Vec<String>,
    /// The killed instance's restart, if it failed.
    restart: Option<String>,
}

async fn bench_instance(o: &Opts) -> String {
    const NAMES: [&str; 2] = ["A", "B"];
    eprintln!("[instance] starting a 3-member etcd cluster");
    let cluster = EtcdCluster::start("store bench instance", 3)
        .await
        .expect("etcd is needed (apt-get install etcd-server, or set ZTP_ETCD_BIN)");
    let pki = TestPki::new();
    let args = cluster.store_args("/ztp-bench-instance/");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (a, b) = Control::start_pair(&pki, &args).await;
    let mut inst = [a, b];
    let urls = [inst[0].grpc_url(), inst[1].grpc_url()];
    let list = urls.join(",");
    let _ = post_group(inst[0].api_addr(), inst[0].token(), "instance-setup").await;

    eprintln!("[instance] starting {} replicas on {list}", o.replicas);
    let mut replicas = Vec::new();
    for i in 0..o.replicas {
        let mut dp = Dataplane::start_control(&pki, &list, &format!("replica-{i}"), &[]).await;
        assert!(
            dp.wait_ready(Duration::from_secs(30)).await,
            "replica-{i} got no snapshot within 30 s"
        );
        replicas.push(dp);
    }

    let mut rounds = Vec::new();
    let mut seen_lines = [inst[0].raw_logs().len(), inst[1].raw_logs().len()];
    // The replicas start on A, the first of their list.
    let mut x = 0;
    for round in 0..o.instance_rounds {
        let y = 1 - x;
        // Every replica on X at X's version (bounded: a replica that is not is left out).
        let before = version_of(inst[x].api_addr(), inst[x].token())
            .await
            .unwrap_or(0);
        let mut on_x = vec![false; replicas.len()];
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(15) {
            for (i, dp) in replicas.iter().enumerate() {
                on_x[i] = replica_state(dp) == (Some(urls[x].clone()), Some(before));
            }
            if on_x.iter().all(|&b| b) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = error_lines(&inst[y], &mut seen_lines[y]);
        let marks: Vec<usize> = replicas.iter().map(|d| d.raw_logs().len()).collect();

        let t_kill = Instant::now();
        inst[x].kill9();
        let (api, token) = (inst[y].api_addr(), inst[y].token().to_owned());
        let name = format!("instance-round-{}", round + 1);
        let mut write = Some(tokio::spawn(async move {
            let body = json!({ "name": name }).to_string();
            let r = call(api, &token, "POST", "/v1/groups", Some(body.as_bytes())).await;
            (r, Instant::now())
        }));
        let mut written: Option<Result<u64, String>> = None;
        let mut write_took = Duration::ZERO;
        let mut moves: Vec<Move> = replicas.iter().map(|_| Move::default()).collect();
        let mut scanned = marks.clone();
        while t_kill.elapsed() < Duration::from_secs(30) {
            if write.as_ref().is_some_and(|w| w.is_finished()) {
                let (r, done) = write.take().unwrap().await.expect("the write task");
                write_took = done - t_kill;
                written = Some(match r {
                    Ok(r) if r.status == 201 => r
                        .etag_version()
                        .ok_or_else(|| format!("HTTP 201 without a numeric ETag: {r}")),
                    Ok(r) => Err(format!("HTTP {}: {}", r.status, r.text().trim())),
                    Err(e) => Err(format!("no answer: {e}")),
                });
            }
            let now = Instant::now();
            for (i, dp) in replicas.iter().enumerate() {
                let lines = dp.raw_logs();
                let m = &mut moves[i];
                for l in lines.get(scanned[i]..).unwrap_or_default() {
                    let Ok(v) = serde_json::from_str::<Value>(l) else {
                        continue;
                    };
                    let msg = v["message"].as_str().unwrap_or("");
                    if msg == "subscribed to the control plane" && v["url"] == urls[y] {
                        m.subscribed.get_or_insert(now - t_kill);
                        m.resumed_at = m.resumed_at.or(v["applied"].as_u64());
                    } else if msg == "snapshot applied" {
                        if let Some(version) = v["snapshot.version"].as_u64() {
                            m.snapshots.push((version, now - t_kill));
                        }
                    } else if matches!(v["level"].as_str(), Some("WARN" | "ERROR"))
                        && !msg.starts_with("control plane lost; moving to")
                    {
                        m.unexpected.push(l.clone());
                    }
                }
                scanned[i] = lines.len();
            }
            let done = match &written {
                None => false,
                Some(Ok(version)) => moves.iter().zip(&on_x).all(|(m, &on)| {
                    !on || (m.subscribed.is_some() && m.applied(*version).is_some())
                }),
                Some(Err(_)) => moves
                    .iter()
                    .zip(&on_x)
                    .all(|(m, &on)| !on || m.subscribed.is_some()),
            };
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(w) = write.take() {
            w.abort();
        }
        let written = written.unwrap_or_else(|| Err("no answer within 30 s".into()));
        let r = InstanceRound {
            killed: NAMES[x],
            before,
            written,
            write_took,
            replicas: moves
                .into_iter()
                .zip(&on_x)
                .map(|(m, &on)| on.then_some(m))
                .collect(),
            errors_logged: error_lines(&inst[y], &mut seen_lines[y]),
            restart: None,
        };
        let max_of = |f: &dyn Fn(&Move) -> Option<Duration>| {
            r.replicas
                .iter()
                .flatten()
                .map(f)
                .collect::<Option<Vec<_>>>()
                .and_then(|v| v.into_iter().max())
        };
        eprintln!(
            "[instance] round {}: killed {}, write {}, moved (max) {}, applied (max) {}",
            round + 1,
            r.killed,
            r.written
                .as_ref()
                .map_or_else(|e| e.clone(), |v| format!("v{v}")),
            opt_ms(max_of(&|m| m.subscribed)),
            opt_ms(
                r.written
                    .as_ref()
                    .ok()
                    .and_then(|&v| max_of(&|m| m.applied(v)))
            )
        );
        rounds.push(r);

        // X back on the same data folder and ports, at the current version; the replicas
        // stay on Y, which the next round kills.
        let restarted = async {
            inst[x].restart().await;
            let want = version_of(inst[y].api_addr(), inst[y].token())
                .await
                .unwrap_or(0);
            let t = Instant::now();
            loop {
                let v = version_of(inst[x].api_addr(), inst[x].token()).await;
                if v.is_some_and(|v| v >= want) {
                    return Ok(());
                }
                if t.elapsed() > Duration::from_secs(15) {
                    return Err(format!(
                        "restarted {} answered version {v:?}, not {want}, after 15 s",
                        NAMES[x]
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if let Err(e) = restarted.await {
            rounds.last_mut().unwrap().restart = Some(e);
        }
        seen_lines[x] = inst[x].raw_logs().len();
        x = y;
    }
    drop(replicas);
    drop(inst);
    drop(cluster);

    let mut s = format!(
        "4. ztp-control instance loss: instances A and B on one etcd cluster (3 members), {} \
         replicas with --control A,B, {} rounds.\n   Each round: all replicas on instance X; \
         kill -9 of X, at once POST /v1/groups through the other instance Y; each replica's \
         log polled\n   every 5 ms (times are from the kill to the poll that saw the line): \
         moved = `subscribed to the control plane` on Y;\n   applied = `snapshot applied` \
         at the version written on Y. X is then restarted; the next round kills Y.\n   \
         Target: the replicas apply the next version from another instance within 1 s at \
         p99.\n",
        o.replicas, o.instance_rounds
    );
    s += &format!(
        "   {:>5} {:>6} {:>9} {:>10} {:>12} {:>14} {:>20} {:>18}\n",
        "round",
        "killed",
        "versions",
        "write ack",
        "moved (max)",
        "applied (max)",
        "on the move",
        "new version as"
    );
    for (i, r) in rounds.iter().enumerate() {
        let on: Vec<&Move> = r.replicas.iter().flatten().collect();
        let moved = on
            .iter()
            .map(|m| m.subscribed)
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max());
        let applied = r.written.as_ref().ok().and_then(|&v| {
            on.iter()
                .map(|m| m.applied(v))
                .collect::<Option<Vec<_>>>()
                .and_then(|v| v.into_iter().max())
        });
        let version = r.written.as_ref().ok().copied().unwrap_or(u64::MAX);
        let resent = on.iter().filter(|m| m.resent(version) > 0).count();
        let full_new = on.iter().filter(|m| m.applied(version).is_some()).count();
        s += &format!(
            "   {:>5} {:>6} {:>9} {:>10} {:>12} {:>14} {:>20} {:>18}\n",
            i + 1,
            r.killed,
            match &r.written {
                Ok(v) => format!("{}→{v}", r.before),
                Err(_) => format!("{}→?", r.before),
            },
            opt_ms(Some(r.write_took)),
            opt_ms(moved),
            opt_ms(applied),
            format!("nothing ×{}, full ×{resent}", on.len() - resent),
            format!("full snapshot ×{full_new}"),
        );
    }
    let all = || rounds.iter().flat_map(|r| r.replicas.iter().flatten());
    let moved: Vec<f64> = all().filter_map(|m| m.subscribed).map(secs).collect();
    let applied: Vec<f64> = rounds
        .iter()
        .filter_map(|r| Some((r.written.as_ref().ok().copied()?, r)))
        .flat_map(|(v, r)| {
            r.replicas
                .iter()
                .flatten()
                .filter_map(move |m| m.applied(v))
        })
        .map(secs)
        .collect();
    let writes: Vec<f64> = rounds
        .iter()
        .filter(|r| r.written.is_ok())
        .map(|r| secs(r.write_took))
        .collect();
    let samples = all().count();
    s += &format!(
        "   {:<57} {:>8} {:>8} {:>8}   (n)\n",
        "", "p50", "p99", "max"
    );
    for (name, v) in [
        ("kill → subscribed to the other instance", &moved),
        (
            "kill → applied the version written on it after the kill",
            &applied,
        ),
        ("kill → that write acknowledged (per round)", &writes),
    ] {
        let (p50, p99, max) = fstats(v);
        s += &format!(
            "   {:<57} {:>8} {:>8} {:>8}   ({})\n",
            name,
            signed_ms(p50),
            signed_ms(p99),
            signed_ms(max),
            v.len()
        );
    }
    // Against the target, a sample that never applied counts as later than any other.
    let over = applied.iter().filter(|&&t| t > 1.0).count();
    let missing = samples - applied.len();
    let mut padded = applied.clone();
    padded.resize(samples, f64::INFINITY);
    let (_, p99, _) = fstats(&padded);
    s += &format!(
        "   target (applied within 1 s at p99): {} (p99 {} over {samples} replica×round \
         samples; {over} over 1 s, {missing} not applied within 30 s)\n",
        if p99 <= 1.0 { "met" } else { "NOT MET" },
        if p99.is_infinite() {
            "-".into()
        } else {
            signed_ms(p99)
        },
    );
    let resent: usize = rounds
        .iter()
        .map(|r| {
            let v = r.written.as_ref().ok().copied().unwrap_or(u64::MAX);
            r.replicas
                .iter()
                .flatten()
                .filter(|m| m.resent(v) > 0)
                .count()
        })
        .sum();
    let resumed = all().filter(|m| m.resumed_at.is_some()).count();
    s += &format!(
        "   on the move: {resent} of {samples} moves got the version they had sent again as a \
         full snapshot, the others nothing\n   (each resumed at its applied version: \
         {resumed} subscriptions carried it); the new version reached every replica as \
         one full snapshot\n   (deltas are not built yet: every version is sent whole)\n"
    );
    for (i, r) in rounds.iter().enumerate() {
        if let Err(e) = &r.written {
            s += &format!(
                "   FINDING: round {}: the write through the other instance failed: {e}\n",
                i + 1
            );
        }
        for (k, m) in r.replicas.iter().enumerate() {
            let Some(m) = m else {
                s += &format!(
                    "   FINDING: round {}: replica-{k} was not on {} at version {} before the \
                     kill (left out)\n",
                    i + 1,
                    r.killed,
                    r.before
                );
                continue;
            };
            if m.subscribed.is_none() {
                s += &format!(
                    "   FINDING: round {}: replica-{k} did not subscribe to the other \
                     instance within 30 s\n",
                    i + 1
                );
            }
            if let Ok(v) = &r.written {
                if m.applied(*v).is_none() {
                    s += &format!(
                        "   FINDING: round {}: replica-{k} did not apply version {v} within \
                         30 s\n",
                        i + 1
                    );
                }
            }
            if m.resumed_at.is_some_and(|a| a != r.before) {
                s += &format!(
                    "   FINDING: round {}: replica-{k} resumed at version {:?}, not {}\n",
                    i + 1,
                    m.resumed_at,
                    r.before
                );
            }
            for l in m.unexpected.iter().take(2) {
                s += &format!("   round {}: replica-{k} logged: {l}\n", i + 1);
            }
        }
        for l in r.errors_logged.iter().take(3) {
            s += &format!("   round {}: the other instance logged: {l}\n", i + 1);
        }
        if let Some(e) = &r.restart {
            s += &format!("   FINDING: round {}: {e}\n", i + 1);
        }
    }
    s += "   (ms; write ack: kill → the write acknowledged by the other instance; versions: \
          before → written;\n    on the move: what a replica was sent on subscribing to the \
          other instance besides the new version)\n";
    s
}

/// The config version `api` answers with (`GET /v1/groups?limit=1`'s ETag), if it does.
async fn version_of(api: SocketAddr, token: &str) -> Option<u64> {
    match call(api, token, "GET", "/v1/groups?limit=1", None).await {
        Ok(r) if r.status == 200 => r.etag_version(),
        _ => None,
    }
}

/// The URL of the replica's last subscription and the version of its last applied
/// snapshot, from its log.
fn replica_state(dp: &Dataplane) -> (Option<String>, Option<u64>) {
    let (mut url, mut version) = (None, None);
    for v in dp.logs() {
        if v["message"] == "subscribed to the control plane" {
            url = v["url"].as_str().map(str::to_owned);
        } else if v["message"] == "snapshot applied" {
            version = v["snapshot.version"].as_u64();
        }
    }
    (url, version)
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// The lines `control` logged at level ERROR after the first `seen` lines (which then
/// counts every line so far).
fn error_lines(control: &Control, seen: &mut usize) -> Vec<String> {
    let lines = control.raw_logs();
    let new = lines
        .get(*seen..)
        .unwrap_or_default()
        .iter()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["level"].as_str().map(|l| l.eq_ignore_ascii_case("error")))
                .unwrap_or_else(|| l.contains("ERROR"))
        })
        .cloned()
        .collect();
    *seen = lines.len();
    new
}

/// One request with the admin token (a body as JSON), bounded by the harness.
async fn call(
    api: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<HttpResponse> {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    ztp_tests::http::request(api, method, path, &headers, body).await
}

/// p50, p99 and max.
fn stats(d: &[Duration]) -> (Duration, Duration, Duration) {
    if d.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    let mut d = d.to_vec();
    d.sort();
    (
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        *d.last().unwrap(),
    )
}

/// p50, p99 and max of seconds (NaN when empty).
fn fstats(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
}

fn signed_ms(s: f64) -> String {
    if s.is_nan() {
        "-".into()
    } else {
        format!("{:.0} ms", s * 1e3)
    }
}

/// A uint64 of etcd's JSON gateway (a decimal string, or a number).
fn json_u64(v: &Value) -> Option<u64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn describe_file(p: &Path) -> String {
    let age = std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.elapsed().ok())
        .map_or("?".into(), |a| format!("{:.0} min", a.as_secs_f64() / 60.0));
    format!("{} (built {age} ago)", p.display())
}

fn etcd_version() -> String {
    let etcd: PathBuf = std::env::var_os(ztp_tests::etcd::ETCD_BIN_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| ztp_tests::process::find_tool("etcd"))
        .unwrap_or_else(|| PathBuf::from("etcd"));
    let version = Command::new(&etcd)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "{} ({}), 3 members on loopback, default timings (heartbeat 100 ms, election 1000 ms)",
        version,
        etcd.display()
    )
}

/// The file system type of `p` (the mount in /proc/self/mounts with the longest mount
/// point above it), for where the fsyncs land.
fn fs_type(p: &Path) -> String {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && p.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} ({})", f[2], f[0])))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "?".into(), |(_, t)| t)
}
