//! ZTP beside haproxy, nginx, hitch and stunnel, measured in one run.
//!
//! Every proxy terminates mutual TLS 1.3 (TLS_AES_128_GCM_SHA256, X25519, ECDSA P-256
//! certificates, a full handshake on every connection) and forwards plain TCP to one
//! loopback backend. Each proxy is pinned to CPU 0 with one worker; this program (the load
//! client) and the backend share CPU 1. Per round, each test runs against every proxy in
//! turn (interleaved), and the medians over the rounds are reported with the ratio of ZTP
//! to the best peer. The proxy's own CPU time (all its processes and threads, from
//! /proc) is measured over each test, so the cost per GB and per connection is known even
//! when the load client is the bottleneck; the client's and backend's CPU use is printed
//! beside each rate to show whether they were.
//!
//! Tests: `up`, `down` (bulk MB/s one stream each way), `conn` (new mTLS connections per
//! second: connect, full handshake, one byte through the backend and back, close),
//! `latency` (64-byte ping-pong on one connection, added to the direct-to-backend round
//! trip), `idle` (proxy memory per idle established connection). ZTP only: `flat`
//! (conn/s and latency with 100,000 services and users), `stall` (latency while a snapshot
//! of 100,000 users is applied every second), `threads` (conn/s with `--threads 2`),
//! `banner` (handshake to a server-speaks-first backend's first byte, `tcp` against
//! `auto`).
//!
//! `--proxies relay` adds the floor: a plaintext TCP relay (no TLS) in this program, for
//! `up` and `down` only; it is not a peer and is never the "best peer".
//!
//! Usage: peers [--proxies ztp,haproxy,nginx,hitch,stunnel,relay] [--tests up,down,conn,latency,idle]
//!              [--rounds 5] [--secs 5] [--idle 2000] [--conc 32] [--pings 20000] [--json FILE]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

mod common;
use common::{
    bin, client_config, dataplane_args, echo, free_port, percentile, raise_nofile, rss_kib,
    serve_loopback, Proc,
};

const SNI: &str = "bench.svc.internal";
/// The same backend as a `protocol: auto` service (the field left out).
const AUTO_SNI: &str = "auto.svc.internal";
const PEERS: [&str; 4] = ["haproxy", "nginx", "hitch", "stunnel"];
const CHUNK: usize = 64 * 1024;

struct Opts {
    proxies: Vec<String>,
    tests: Vec<String>,
    rounds: usize,
    secs: f64,
    idle: usize,
    conc: usize,
    pings: usize,
    json: Option<PathBuf>,
    big: usize,
    certs: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        proxies: ["ztp", "haproxy", "nginx", "hitch", "stunnel"]
            .map(String::from)
            .to_vec(),
        tests: ["up", "down", "conn", "latency", "idle"]
            .map(String::from)
            .to_vec(),
        rounds: 5,
        secs: 5.0,
        idle: 2000,
        conc: 32,
        pings: 20_000,
        json: None,
        big: 100_000,
        certs: 1,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let list = |v: &str| v.split(',').map(String::from).collect::<Vec<_>>();
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--proxies" => o.proxies = list(&v),
            "--tests" => o.tests = list(&v),
            "--rounds" => o.rounds = v.parse().expect("--rounds N"),
            "--secs" => o.secs = v.parse().expect("--secs SECONDS"),
            "--idle" => o.idle = v.parse().expect("--idle N"),
            "--conc" => o.conc = v.parse().expect("--conc N"),
            "--pings" => o.pings = v.parse().expect("--pings N"),
            "--big" => o.big = v.parse().expect("--big N"),
            "--certs" => o.certs = v.parse().expect("--certs N"),
            "--json" => o.json = Some(PathBuf::from(v)),
            other => panic!("unknown argument {other} (see the comment at the top of peers.rs)"),
        }
        i += 2;
    }
    o
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("backend") {
        let port: u16 = args[2].parse().expect("backend PORT");
        backend(port);
        return;
    }
    if args.get(1).map(String::as_str) == Some("relay") {
        let port: u16 = args[2].parse().expect("relay PORT BACKEND");
        let backend: u16 = args[3].parse().expect("relay PORT BACKEND");
        relay(port, backend);
        return;
    }
    let o = opts();
    raise_nofile();
    // The load client runs on CPU 1; every proxy is started on CPU 0.
    pin_self("1");
    ztp_tests::install_crypto_provider();

    let dir = std::env::temp_dir().join(format!("ztp-bench-peers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = ztp_tests::TestPki::new();
    pki.write_files(&dir).unwrap();
    std::fs::write(
        dir.join("bundle.pem"),
        format!("{}{}", pki.server.cert_pem, pki.server.key_pem),
    )
    .unwrap();
    // Client certificates, used in turn: with more than a proxy caches, every handshake
    // verifies the whole chain.
    let clients: Vec<_> = (0..o.certs.max(1))
        .map(|i| pki.client_email(&format!("c{i}@example.com")))
        .collect();
    std::fs::write(
        dir.join("identities"),
        (0..clients.len())
            .map(|i| format!("\"c{i}@example.com\""))
            .collect::<Vec<_>>()
            .join(", "),
    )
    .unwrap();

    let backend_port = free_port();
    let backend = Proc(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(std::env::current_exe().unwrap())
            .args(["backend", &backend_port.to_string()])
            .spawn()
            .expect("start the backend"),
    );
    wait_port(backend_port);

    let tls = Arc::new(
        clients
            .iter()
            .map(|c| client_config(&pki.ca_pem, c))
            .collect::<Vec<_>>(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut proxies = Vec::new();
    for name in &o.proxies {
        match start_proxy(name, &dir, backend_port, 0, "0", 1) {
            Ok(p) => proxies.push(p),
            Err(e) => eprintln!("skipping {name}: {e}"),
        }
    }
    let env = Env {
        tls,
        next: Arc::new(AtomicU64::new(0)),
        backend_pid: backend.0.id(),
        backend_port,
    };

    // results[test][proxy] = one Sample per round
    let mut results: BTreeMap<String, BTreeMap<String, Vec<Sample>>> = BTreeMap::new();
    for round in 1..=o.rounds {
        for test in &o.tests {
            for p in &proxies {
                if !matches!(test.as_str(), "up" | "down" | "conn" | "latency" | "idle") {
                    continue;
                }
                if p.name == "relay" && !matches!(test.as_str(), "up" | "down") {
                    continue;
                }
                let s = if test == "idle" {
                    // A fresh instance: memory freed by earlier tests stays resident
                    // and would be reused, hiding what a connection costs.
                    let fresh = start_proxy(&p.name, &dir, backend_port, 0, "0", 1)
                        .expect("restart the proxy");
                    let s = rt.block_on(run_test(test, &fresh, &env, &o));
                    fresh.stop();
                    s
                } else {
                    rt.block_on(run_test(test, p, &env, &o))
                };
                eprintln!("round {round} {test:8} {:8} {}", p.name, s.line(test));
                results
                    .entry(test.clone())
                    .or_default()
                    .entry(p.name.clone())
                    .or_default()
                    .push(s);
            }
        }
    }
    for p in proxies {
        p.stop();
    }

    let mut extra: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for test in &o.tests {
        match test.as_str() {
            "flat" => flat(&rt, &dir, &env, &o, &mut extra),
            "stall" => stall(&rt, &dir, &env, &o, &mut extra),
            "threads" => threads(&rt, &dir, &env, &o, &mut extra),
            "banner" => banner(&rt, &dir, &env, &o, &mut extra),
            _ => {}
        }
    }

    report(&results, &extra, &o);
    drop(backend);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Proxies

struct Proxy {
    name: String,
    port: u16,
    proc: Proc,
}

impl Proxy {
    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// SIGINT to the process and its descendants (a profiler in front writes its output
    /// and waits for ZTP to exit), up to 30 s to exit, then SIGKILL to what is left.
    fn stop(mut self) {
        let pids = tree(self.pid());
        let signal = |sig: &str| {
            let _ = Command::new("kill")
                .arg(sig)
                .args(pids.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
        };
        signal("-INT");
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.proc.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal("-KILL");
    }
}

fn fill(template: &str, dir: &Path, listen: u16, backend: u16) -> String {
    template
        .replace("@LISTEN@", &listen.to_string())
        .replace("@BACKEND@", &backend.to_string())
        .replace("@CERT@", &dir.join("server.pem").display().to_string())
        .replace("@KEY@", &dir.join("server.key").display().to_string())
        .replace("@PEMBUNDLE@", &dir.join("bundle.pem").display().to_string())
        .replace("@CA@", &dir.join("ca.pem").display().to_string())
        .replace("@DIR@", &dir.display().to_string())
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

fn ztp_snapshot(
    backend: u16,
    extra_services: usize,
    extra_users: usize,
    identities: &str,
) -> String {
    let mut y = format!(
        "version: 1\nservices:\n  - name: {SNI}\n    protocol: tcp\n    address: \"127.0.0.1:{backend}\"\n    groups: [bench]\n  - name: {AUTO_SNI}\n    address: \"127.0.0.1:{backend}\"\n    groups: [bench]\n"
    );
    for i in 0..extra_services {
        y.push_str(&format!(
            "  - name: s{i}.svc.internal\n    protocol: tcp\n    address: \"127.0.0.1:{backend}\"\n    groups: [bench]\n"
        ));
    }
    y.push_str(&format!(
        "users:\n  - name: bench\n    identities: [{identities}]\n    groups: [bench]\n"
    ));
    for i in 0..extra_users {
        y.push_str(&format!(
            "  - name: u{i}\n    identities: [\"u{i}@example.com\"]\n    groups: [bench]\n"
        ));
    }
    y.push_str("groups:\n  - name: bench\n");
    y
}

/// Starts `name` on 127.0.0.1, pinned to `cpus`, and waits for its port.
fn start_proxy(
    name: &str,
    dir: &Path,
    backend: u16,
    big: usize,
    cpus: &str,
    threads: usize,
) -> Result<Proxy, String> {
    let port = free_port();
    let run = dir.join(format!("{name}-{port}"));
    std::fs::create_dir_all(&run).unwrap();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpus]);
    match name {
        "ztp" => {
            let snap = run.join("snapshot.yaml");
            let ids = std::fs::read_to_string(dir.join("identities")).unwrap();
            std::fs::write(&snap, ztp_snapshot(backend, big, big, &ids)).unwrap();
            // A profiler in front of ZTP: `ZTP_BENCH_WRAP="perf record -g -o FILE"`.
            if let Ok(wrap) = std::env::var("ZTP_BENCH_WRAP") {
                cmd.args(wrap.split_whitespace());
            }
            cmd.arg(bin("ztp-dataplane"));
            dataplane_args(
                &mut cmd,
                dir,
                &format!("127.0.0.1:{port}"),
                &dir.join("ca.pem"),
            )
            .arg("--snapshot")
            .arg(&snap)
            .args(["--threads", &threads.to_string()])
            .args(["--max-connections", "100000"])
            // The load comes from one address: no per-source limits (the peers
            // have none either).
            .args(["--max-connections-per-source", "0"])
            .args(["--handshake-rate-per-source", "0"]);
        }
        "relay" => {
            cmd.arg(std::env::current_exe().unwrap()).args([
                "relay",
                &port.to_string(),
                &backend.to_string(),
            ]);
        }
        peer => {
            let (file, exe, args): (&str, &str, Vec<String>) = match peer {
                "haproxy" => ("haproxy.cfg", "haproxy", vec!["-db".into(), "-f".into()]),
                "nginx" => (
                    "nginx.conf",
                    "nginx",
                    vec![
                        "-e".into(),
                        run.join("error.log").display().to_string(),
                        "-p".into(),
                        run.display().to_string(),
                        "-g".into(),
                        "daemon off;".into(),
                        "-c".into(),
                    ],
                ),
                "hitch" => ("hitch.conf", "hitch", vec!["--config".into()]),
                "stunnel" => ("stunnel.conf", "stunnel4", vec![]),
                other => return Err(format!("unknown proxy {other}")),
            };
            let template = std::fs::read_to_string(peers_dir().join(file))
                .map_err(|e| format!("{}: {e}", peers_dir().join(file).display()))?;
            if which(exe).is_none() {
                return Err(format!("{exe} not installed (run bench/peers/install.sh)"));
            }
            let conf = run.join(file);
            std::fs::write(&conf, fill(&template, &run, port, backend)).unwrap();
            // the templates name the PKI files in the run folder
            for f in ["server.pem", "server.key", "bundle.pem", "ca.pem"] {
                std::fs::copy(dir.join(f), run.join(f)).unwrap();
            }
            cmd.arg(exe).args(args).arg(&conf);
        }
    }
    let log = std::fs::File::create(run.join("stderr.log")).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let proc = Proc(child);
    let end = Instant::now() + Duration::from_secs(if big > 0 { 120 } else { 20 });
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > end {
            let log = std::fs::read_to_string(run.join("stderr.log")).unwrap_or_default();
            return Err(format!("did not listen on {port}: {log}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Proxy {
        name: name.to_owned(),
        port,
        proc,
    })
}

fn which(exe: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|d| d.join(exe))
            .find(|p| p.is_file())
    })
}

fn wait_port(port: u16) {
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "port {port} never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pin_self(cpus: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-cp", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "taskset (util-linux) is needed to pin processes to CPUs"
    );
}

// ---------------------------------------------------------------------------------------
// /proc accounting

/// CPU time (user + system) of `pid` and all its descendants, threads included.
fn tree_cpu(pid: u32) -> Duration {
    tree(pid).into_iter().filter_map(proc_cpu).sum()
}

/// Resident memory of `pid` and its descendants, bytes.
fn tree_rss(pid: u32) -> u64 {
    tree(pid).into_iter().map(|p| rss_kib(p) * 1024).sum()
}

fn tree(root: u32) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let ppid = stat[close + 2..]
                .split(' ')
                .nth(1)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0);
            parent.insert(pid, ppid);
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, &pp)| pp == p).map(|(&c, _)| c));
        i += 1;
    }
    out
}

/// CPU time of this process alone (its children are the backend and the proxies).
fn self_cpu() -> Duration {
    proc_cpu(std::process::id()).unwrap_or_default()
}

fn proc_cpu(pid: u32) -> Option<Duration> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU time of each tokio worker thread of `pid`.
fn worker_cpu(pid: u32) -> Vec<Duration> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, Duration)> = tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("tokio-rt-worker") || c.starts_with("tokio-runtime-w"))
        })
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            Some((tid, stat_cpu(&t.path().join("stat").display().to_string())?))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, d)| d).collect()
}

fn stat_cpu(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // fields 14 and 15 of proc_pid_stat(5); `rest` starts at field 3; USER_HZ is 100
    let ticks: u64 = f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

// ---------------------------------------------------------------------------------------
// The backend: one byte picks the mode. U: sink, D: source, E: echo.

fn backend(port: u16) {
    serve_loopback(port, "backend", |mut s| async move {
        let mut mode = [0u8; 1];
        if s.read_exact(&mut mode).await.is_err() {
            return;
        }
        match mode[0] {
            b'U' => {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
            b'D' => {
                let buf = vec![0x5au8; 256 * 1024];
                while s.write_all(&buf).await.is_ok() {}
            }
            _ => echo(s, 16 * 1024).await,
        }
    });
}

/// The floor: a plaintext TCP relay, no TLS, with 64 KiB buffers each way. What it costs
/// per GB is what the kernel's loopback TCP path costs any user-space proxy here, before
/// a byte is decrypted or encrypted (`--proxies relay`, tests `up` and `down` only).
fn relay(port: u16, backend: u16) {
    serve_loopback(port, "relay", move |mut a| async move {
        let Ok(mut b) = TcpStream::connect(("127.0.0.1", backend)).await else {
            return;
        };
        b.set_nodelay(true).ok();
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, CHUNK, CHUNK).await;
    });
}

// ---------------------------------------------------------------------------------------
// The client

#[derive(Clone)]
struct Env {
    tls: Arc<Vec<Arc<rustls::ClientConfig>>>,
    next: Arc<AtomicU64>,
    backend_pid: u32,
    backend_port: u16,
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(env: &Env, port: u16) -> std::io::Result<Tls> {
    connect_sni(env, port, SNI).await
}

async fn connect_sni(env: &Env, port: u16, sni: &'static str) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(sni).unwrap();
    let i = env.next.fetch_add(1, Ordering::Relaxed) as usize % env.tls.len();
    tokio_rustls::TlsConnector::from(env.tls[i].clone())
        .connect(name, tcp)
        .await
}

/// One measurement of one test against one proxy.
#[derive(Default, Clone, Copy)]
struct Sample {
    /// MB/s (up, down) or connections/s (conn).
    rate: f64,
    /// Proxy CPU: s per GB (up, down) or ms per connection (conn).
    cost: f64,
    /// Share of one core used by the client and by the backend during the test.
    client_cpu: f64,
    backend_cpu: f64,
    /// Added round-trip latency, µs (latency).
    p50: f64,
    p99: f64,
    max: f64,
    /// Proxy memory per idle connection, KiB (idle).
    kib: f64,
    /// Share of the busiest worker thread in the workers' CPU time (threads).
    busiest: f64,
}

impl Sample {
    fn line(&self, test: &str) -> String {
        match test {
            "up" | "down" => format!(
                "{:8.1} MB/s  {:5.3} CPU s/GB  (client {:.0}%, backend {:.0}%)",
                self.rate,
                self.cost,
                self.client_cpu * 100.0,
                self.backend_cpu * 100.0
            ),
            "conn" => format!(
                "{:8.1} conn/s  {:5.3} CPU ms/conn  (client {:.0}%, backend {:.0}%)",
                self.rate,
                self.cost,
                self.client_cpu * 100.0,
                self.backend_cpu * 100.0
            ),
            "idle" => format!("{:8.1} KiB per idle connection", self.kib),
            _ => format!(
                "p50 {:+.1} µs  p99 {:+.1} µs  max {:.0} µs",
                self.p50, self.p99, self.max
            ),
        }
    }
}

struct Meter {
    t: Instant,
    proxy: Duration,
    client: Duration,
    backend: Duration,
    pid: u32,
    backend_pid: u32,
}

impl Meter {
    fn start(pid: u32, env: &Env) -> Meter {
        Meter {
            t: Instant::now(),
            proxy: tree_cpu(pid),
            client: self_cpu(),
            backend: tree_cpu(env.backend_pid),
            pid,
            backend_pid: env.backend_pid,
        }
    }

    /// (elapsed s, proxy CPU s, client share, backend share)
    fn stop(&self) -> (f64, f64, f64, f64) {
        let el = self.t.elapsed().as_secs_f64();
        let proxy = (tree_cpu(self.pid) - self.proxy).as_secs_f64();
        let client = (self_cpu() - self.client).as_secs_f64() / el;
        let backend = (tree_cpu(self.backend_pid) - self.backend).as_secs_f64() / el;
        (el, proxy, client, backend)
    }
}

async fn run_test(test: &str, p: &Proxy, env: &Env, o: &Opts) -> Sample {
    let secs = Duration::from_secs_f64(o.secs);
    match test {
        "up" | "down" if p.name == "relay" => {
            let s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
            s.set_nodelay(true).unwrap();
            bulk(s, env, p.pid(), secs, test == "up").await
        }
        "up" | "down" => {
            let s = connect(env, p.port).await.expect("connect");
            bulk(s, env, p.pid(), secs, test == "up").await
        }
        "conn" => conn_rate(env, p.port, p.pid(), secs, o.conc).await,
        "latency" => latency(env, p.port, o.pings).await,
        "idle" => idle(env, p.port, p.pid(), o.idle).await,
        _ => unreachable!(),
    }
}

async fn bulk<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    env: &Env,
    pid: u32,
    secs: Duration,
    up: bool,
) -> Sample {
    s.write_all(if up { b"U" } else { b"D" }).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = vec![0x33u8; CHUNK];
    // warm up: let the stream reach its pace before measuring
    let warm = Instant::now() + Duration::from_millis(300);
    while Instant::now() < warm {
        if up {
            s.write_all(&buf).await.unwrap();
        } else {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy ended the download");
        }
    }
    let m = Meter::start(pid, env);
    let end = m.t + secs;
    let mut bytes = 0u64;
    while Instant::now() < end {
        if up {
            s.write_all(&buf).await.expect("write");
            bytes += CHUNK as u64;
        } else {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "the proxy ended the download");
            bytes += n as u64;
        }
    }
    let (el, proxy, client_cpu, backend_cpu) = m.stop();
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gb = bytes as f64 / 1e9;
    Sample {
        rate: bytes as f64 / 1e6 / el,
        cost: proxy / gb,
        client_cpu,
        backend_cpu,
        ..Sample::default()
    }
}

async fn one_conn(env: &Env, port: u16) -> std::io::Result<()> {
    let mut s = connect(env, port).await?;
    s.write_all(b"Ex").await?;
    s.flush().await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    if b[0] != b'x' {
        // a refusal line, not the backend's echo
        return Err(std::io::Error::other("refused by the proxy"));
    }
    s.shutdown().await?;
    Ok(())
}

async fn conn_rate(env: &Env, port: u16, pid: u32, secs: Duration, conc: usize) -> Sample {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let m = Meter::start(pid, env);
    let end = m.t + secs;
    let mut tasks = Vec::with_capacity(conc);
    for _ in 0..conc {
        let (done, failed) = (done.clone(), failed.clone());
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                match one_conn(&env, port).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (el, proxy, client_cpu, backend_cpu) = m.stop();
    let n = done.load(Ordering::Relaxed);
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        eprintln!("  {f} connections failed");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Sample {
        rate: n as f64 / el,
        cost: proxy * 1e3 / n.max(1) as f64,
        client_cpu,
        backend_cpu,
        ..Sample::default()
    }
}

async fn rtts<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    n: usize,
) -> Vec<f64> {
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 1000 {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.flush().await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        if i >= 1000 {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    out.sort_by(|a, b| a.total_cmp(b));
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn latency(env: &Env, port: u16, pings: usize) -> Sample {
    let mut direct = TcpStream::connect(("127.0.0.1", env.backend_port))
        .await
        .unwrap();
    direct.set_nodelay(true).unwrap();
    direct.write_all(b"E").await.unwrap();
    let base = rtts(&mut direct, pings).await;
    let mut s = connect(env, port).await.expect("connect");
    s.write_all(b"E").await.unwrap();
    let via = rtts(&mut s, pings).await;
    Sample {
        p50: pct(&via, 0.5) - pct(&base, 0.5),
        p99: pct(&via, 0.99) - pct(&base, 0.99),
        max: via[via.len() - 1],
        ..Sample::default()
    }
}

async fn idle(env: &Env, port: u16, pid: u32, n: usize) -> Sample {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = tree_rss(pid);
    let mut held = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch = (n - i).min(64);
        let mut set = Vec::with_capacity(batch);
        for _ in 0..batch {
            let env = env.clone();
            set.push(tokio::spawn(async move {
                let mut s = connect(&env, port).await?;
                s.write_all(b"Ex").await?;
                s.flush().await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(s)
            }));
        }
        for h in set {
            held.push(h.await.unwrap().expect("idle connection"));
        }
        i += batch;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = tree_rss(pid);
    drop(held);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    Sample {
        kib: (after.saturating_sub(before)) as f64 / 1024.0 / n as f64,
        ..Sample::default()
    }
}

// ---------------------------------------------------------------------------------------
// ZTP only: flat cost, stall, threads

fn flat(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    env: &Env,
    o: &Opts,
    extra: &mut BTreeMap<String, Vec<Sample>>,
) {
    let small = start_proxy("ztp", dir, env.backend_port, 0, "0", 1).expect("ztp");
    let big = start_proxy("ztp", dir, env.backend_port, o.big, "0", 1).expect("ztp big");
    let secs = Duration::from_secs_f64(o.secs);
    for round in 1..=o.rounds {
        for (label, p) in [("small", &small), ("big", &big)] {
            let mut s = rt.block_on(conn_rate(env, p.port, p.pid(), secs, o.conc));
            let l = rt.block_on(latency(env, p.port, o.pings));
            s.p50 = l.p50;
            s.p99 = l.p99;
            s.max = l.max;
            eprintln!(
                "round {round} flat {label:5} {}  {}",
                s.line("conn"),
                s.line("latency")
            );
            extra.entry(format!("flat-{label}")).or_default().push(s);
        }
    }
}

fn stall(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    env: &Env,
    o: &Opts,
    extra: &mut BTreeMap<String, Vec<Sample>>,
) {
    let p = start_proxy("ztp", dir, env.backend_port, o.big, "0", 1).expect("ztp big");
    for round in 1..=o.rounds {
        for reload in [false, true] {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reloader = reload.then(|| {
                let stop = stop.clone();
                let pid = p.pid();
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let _ = Command::new("kill")
                            .args(["-HUP", &pid.to_string()])
                            .status();
                        n += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    n
                })
            });
            let s = rt.block_on(latency(env, p.port, o.pings * 5));
            stop.store(true, Ordering::Relaxed);
            let n = reloader.map(|h| h.join().unwrap()).unwrap_or(0);
            let label = if reload { "reloading" } else { "quiet" };
            eprintln!(
                "round {round} stall {label:9} {} ({n} reloads of {} users)",
                s.line("latency"),
                o.big
            );
            extra.entry(format!("stall-{label}")).or_default().push(s);
        }
    }
}

/// `banner` (ZTP only): a server-speaks-first backend (it writes a banner on accept, as
/// SSH, SMTP or MySQL do) behind a `protocol: tcp` and a `protocol: auto` service. Time
/// from the client's handshake to the banner's first byte, `--pings / 10` connections
/// per service and round, alternating: `auto` must add nothing to `tcp`.
fn banner(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    env: &Env,
    o: &Opts,
    extra: &mut BTreeMap<String, Vec<Sample>>,
) {
    let port = free_port();
    std::thread::spawn(move || {
        serve_loopback(port, "banner backend", |mut s| async move {
            let _ = s.write_all(b"220 bench ready\r\n").await;
            let mut buf = [0u8; 256];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        })
    });
    let p = start_proxy("ztp", dir, port, 0, "0", 1).expect("ztp");
    let n = (o.pings / 10).max(10);
    for round in 1..=o.rounds {
        let (tcp, auto) = rt.block_on(async {
            let mut tcp = Vec::with_capacity(n);
            let mut auto = Vec::with_capacity(n);
            for _ in 0..n {
                for (sni, out) in [(SNI, &mut tcp), (AUTO_SNI, &mut auto)] {
                    let mut s = connect_sni(env, p.port, sni).await.expect("handshake");
                    let t = Instant::now();
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.expect("the banner");
                    out.push(t.elapsed());
                }
            }
            (tcp, auto)
        });
        for (label, mut v) in [("tcp", tcp), ("auto", auto)] {
            v.sort_unstable();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            let s = Sample {
                p50: us(percentile(&v, 0.5)),
                p99: us(percentile(&v, 0.99)),
                max: us(*v.last().unwrap()),
                ..Sample::default()
            };
            eprintln!(
                "round {round} banner {label:4} handshake to first banner byte p50 {:.0} µs p99 {:.0} µs max {:.0} µs",
                s.p50, s.p99, s.max
            );
            extra.entry(format!("banner-{label}")).or_default().push(s);
        }
    }
    p.stop();
}

fn threads(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    env: &Env,
    o: &Opts,
    extra: &mut BTreeMap<String, Vec<Sample>>,
) {
    let one = start_proxy("ztp", dir, env.backend_port, 0, "0", 1).expect("ztp");
    let two = start_proxy("ztp", dir, env.backend_port, 0, "0,1", 2).expect("ztp");
    let secs = Duration::from_secs_f64(o.secs);
    for round in 1..=o.rounds {
        for (label, p) in [("1", &one), ("2", &two)] {
            let before = worker_cpu(p.pid());
            let mut s = rt.block_on(conn_rate(env, p.port, p.pid(), secs, o.conc * 2));
            let used: Vec<f64> = worker_cpu(p.pid())
                .iter()
                .zip(&before)
                .map(|(a, b)| (*a - *b).as_secs_f64())
                .collect();
            let total: f64 = used.iter().sum();
            s.busiest = used.iter().fold(0.0, |m, u| f64::max(m, *u)) / total.max(1e-9);
            eprintln!(
                "round {round} threads {label} {}  (busiest worker: {:.0}% of the workers' CPU)",
                s.line("conn"),
                s.busiest * 100.0
            );
            extra.entry(format!("threads-{label}")).or_default().push(s);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn med(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(samples.iter().map(f).collect())
}

fn report(
    results: &BTreeMap<String, BTreeMap<String, Vec<Sample>>>,
    extra: &BTreeMap<String, Vec<Sample>>,
    o: &Opts,
) {
    let mut out = String::new();
    let mut json = serde_json::Map::new();
    // (test, column title, field, higher is better)
    type Col = (&'static str, &'static str, fn(&Sample) -> f64, bool);
    let cols: [Col; 10] = [
        ("up", "up MB/s", |s| s.rate, true),
        ("up", "up CPU s/GB", |s| s.cost, false),
        ("down", "down MB/s", |s| s.rate, true),
        ("down", "down CPU s/GB", |s| s.cost, false),
        ("conn", "conn/s", |s| s.rate, true),
        ("conn", "CPU ms/conn", |s| s.cost, false),
        ("latency", "added p50 µs", |s| s.p50, false),
        ("latency", "added p99 µs", |s| s.p99, false),
        ("idle", "KiB/idle conn", |s| s.kib, false),
        ("conn", "client CPU %", |s| s.client_cpu * 100.0, false),
    ];
    let cols: Vec<&Col> = cols.iter().filter(|c| results.contains_key(c.0)).collect();
    let proxies: Vec<&String> = o
        .proxies
        .iter()
        .filter(|p| results.values().any(|m| m.contains_key(*p)))
        .collect();
    out.push_str(&format!(
        "\nMedians of {} rounds, {} s per rate test, proxies pinned to CPU 0 with one worker:\n\n| proxy |",
        o.rounds, o.secs
    ));
    for c in &cols {
        out.push_str(&format!(" {} |", c.1));
    }
    out.push_str("\n| --- |");
    for _ in &cols {
        out.push_str(" ---: |");
    }
    out.push('\n');
    let value = |p: &str, c: &Col| -> Option<f64> {
        results.get(c.0).and_then(|m| m.get(p)).map(|v| med(v, c.2))
    };
    for p in &proxies {
        out.push_str(&format!("| {p} |"));
        let mut row = serde_json::Map::new();
        for c in &cols {
            match value(p, c) {
                Some(v) => {
                    out.push_str(&format!(" {} |", fmt(v)));
                    row.insert(c.1.to_string(), v.into());
                }
                None => out.push_str(" – |"),
            }
        }
        json.insert(p.to_string(), row.into());
        out.push('\n');
    }
    if proxies.iter().any(|p| *p == "ztp") && proxies.len() > 1 {
        out.push_str("| **ztp ÷ best peer** |");
        for c in &cols {
            let best = proxies
                .iter()
                .filter(|p| **p != "ztp" && PEERS.contains(&p.as_str()))
                .filter_map(|p| value(p, c))
                .reduce(|a, b| if (a > b) == c.3 { a } else { b });
            match (value("ztp", c), best) {
                (Some(z), Some(b)) if c.1 != "client CPU %" => {
                    out.push_str(&format!(" {:.2}x |", z / b))
                }
                _ => out.push_str(" |"),
            }
        }
        out.push('\n');
    }
    for (label, v) in extra {
        let (rate, cost) = (med(v, |s| s.rate), med(v, |s| s.cost));
        if label.starts_with("threads") {
            let busiest = med(v, |s| s.busiest);
            out.push_str(&format!(
                "\nztp {label}: {rate:.0} conn/s, {cost:.3} CPU ms/conn, busiest worker thread {:.0}% of the workers' CPU",
                busiest * 100.0
            ));
            json.insert(
                format!("ztp-{label}"),
                serde_json::json!({"conn/s": rate, "CPU ms/conn": cost, "busiest worker share": busiest}),
            );
            continue;
        }
        let (p50, p99, max) = (med(v, |s| s.p50), med(v, |s| s.p99), med(v, |s| s.max));
        out.push_str(&format!(
            "\nztp {label}: {rate:.0} conn/s, {cost:.3} CPU ms/conn, latency p50 {p50:+.1} µs p99 {p99:+.1} µs max {max:.0} µs",
        ));
        json.insert(
            format!("ztp-{label}"),
            serde_json::json!({"conn/s": rate, "CPU ms/conn": cost, "p50": p50, "p99": p99, "max": max}),
        );
    }
    println!("{out}");
    std::io::stdout().flush().ok();
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
