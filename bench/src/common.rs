//! What the benchmarks share: processes, ports, a tiny HTTP client.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe.parent().expect("bin dir").join(name);
    assert!(
        p.is_file(),
        "{} missing: run `cargo build --release --workspace --bins`",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request; returns status, ETag and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &[u8],
) -> (u16, Option<String>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect to the API");
    s.set_nodelay(true).ok();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head[9..12].parse().unwrap();
    let etag = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("etag:"))
        .map(|l| l[5..].trim().trim_matches('"').to_owned());
    (status, etag, resp[split + 4..].to_vec())
}

pub fn wait_until(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + bound;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The applied versions of the connected nodes.
pub fn applied(api: SocketAddr, token: &str) -> Vec<u64> {
    let (_, _, body) = http(api, "GET", "/v1/nodes", token, b"");
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["connected"].as_bool() == Some(true))
                .map(|n| n["applied"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// The flags every benchmark's data plane starts with: listen on `listen`, admin port
/// anywhere on loopback, `DIR/server.pem` and `DIR/server.key`, client CA `ca`.
pub fn dataplane_args<'c>(
    cmd: &'c mut Command,
    dir: &Path,
    listen: &str,
    ca: &Path,
) -> &'c mut Command {
    cmd.args(["--listen", listen])
        .args(["--admin-listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(dir.join("server.pem"))
        .arg("--key")
        .arg(dir.join("server.key"))
        .arg("--client-ca")
        .arg(ca)
}

pub fn start_node(dir: &Path, id: &str, ca: &Path, grpc: SocketAddr, listen: SocketAddr) -> Proc {
    let mut cmd = Command::new(bin("ztp-dataplane"));
    let child = dataplane_args(&mut cmd, dir, &listen.to_string(), ca)
        .arg("--control")
        .arg(format!("https://localhost:{}", grpc.port()))
        .arg("--node-cert")
        .arg(dir.join(format!("{id}.pem")))
        .arg("--node-key")
        .arg(dir.join(format!("{id}.key")))
        .arg("--control-ca")
        .arg(ca)
        .args(["--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ztp-dataplane");
    Proc(child)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A control plane on loopback with the PKI in `dir` (written by `setup_pki`).
pub struct ControlPlane {
    pub proc: Proc,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub token: String,
}

/// Writes the test PKI into `dir` with node certificates n0..n{nodes}.
pub fn setup_pki(dir: &Path, nodes: usize) -> ztp_tests::TestPki {
    std::fs::create_dir_all(dir).unwrap();
    let pki = ztp_tests::TestPki::new();
    pki.write_files(dir).unwrap();
    for i in 0..nodes {
        pki.builder()
            .uri(&format!("spiffe://ztp.internal/node/n{i}"))
            .issue()
            .write(dir, &format!("n{i}"))
            .unwrap();
    }
    pki
}

/// Starts `ztp-control` with its store in `dir/data` and waits for its admin token.
pub fn start_control(dir: &Path) -> ControlPlane {
    let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let grpc: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let proc = Proc(
        Command::new(bin("ztp-control"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--api-listen")
            .arg(api.to_string())
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .arg("--grpc-cert")
            .arg(dir.join("server.pem"))
            .arg("--grpc-key")
            .arg(dir.join("server.key"))
            .arg("--node-ca")
            .arg(dir.join("ca.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ztp-control"),
    );
    let token_path = dir.join("data").join("admin-token");
    wait_until("the admin token", Duration::from_secs(20), || {
        token_path.exists() && TcpStream::connect(api).is_ok()
    });
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_owned();
    ControlPlane {
        proc,
        api,
        grpc,
        token,
    }
}

/// Raises this process's open-file limit as far as it goes (children inherit it): to
/// 200,000 where allowed, else to the hard limit. Returns the limit now in force.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let hard = getrlimit(Resource::Nofile).maximum;
    for want in [Some(200_000), hard] {
        let set = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: want,
                maximum: want,
            },
        );
        if set.is_ok() {
            break;
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Resident memory of one process, KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A load client's TLS config: TLS 1.3, TLS_AES_128_GCM_SHA256, X25519, trusting
/// `ca_pem`, presenting `cert`, never resuming (every connection a full handshake).
pub fn client_config(
    ca_pem: &str,
    cert: &ztp_tests::TestCert,
) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::crypto::ring as provider;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let p = rustls::crypto::CryptoProvider {
        cipher_suites: vec![provider::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![provider::kx_group::X25519],
        ..provider::default_provider()
    };
    let mut c = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(p))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert.cert_der.clone()], cert.key_der.clone_key())
        .unwrap();
    c.resumption = rustls::client::Resumption::disabled();
    std::sync::Arc::new(c)
}

/// Runs a loopback server on 127.0.0.1:`port` on a one-thread runtime in this process
/// until it is killed: every accepted connection (TCP_NODELAY set) is served by `handle`
/// in a task of its own. For the benchmarks' backends and relay.
pub fn serve_loopback<F, Fut>(port: u16, what: &str, handle: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("bind the {what} on {port}: {e}"));
        loop {
            let Ok((s, _)) = l.accept().await else {
                // Out of descriptors, mostly: wait instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            s.set_nodelay(true).ok();
            tokio::spawn(handle(s));
        }
    });
}

/// Echoes every byte back until the peer closes, through a `buf`-byte buffer.
pub async fn echo(mut s: tokio::net::TcpStream, buf: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; buf];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Pins every thread of `pid` to `cpus` (threads started later inherit it).
pub fn pin(pid: u32, cpus: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "taskset (util-linux) is needed to pin processes to CPUs"
    );
}

pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("?")
        .to_owned();
    // Counted from /proc/cpuinfo: this process is pinned to one CPU by now.
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} × {model}, Linux {}", kernel.trim())
}

pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub fn stat_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let Some(close) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = stat[close + 2..].split(' ').collect();
    // utime and stime, fields 14 and 15 of proc_pid_stat(5) (all threads); USER_HZ 100
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// A release `ztp-keyserver` on `127.0.0.1` sized to one CPU (`--threads 1 --sign-threads
/// 1`) and pinned to `cpus`, holding the test PKI's server key (the one the data plane's
/// certificate names) in `dir/keys/`, its own certificate `dir/keyserver.pem` and the
/// node CA `dir/ca.pem`; logging at `rust_log` to `log`. Returns once its port accepts.
pub fn start_keyserver(
    dir: &Path,
    pki: &ztp_tests::TestPki,
    cpus: &str,
    rust_log: &str,
    log: Stdio,
) -> (Proc, SocketAddr) {
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    ztp_tests::keyserver::keyserver_cert(pki)
        .write(dir, "keyserver")
        .unwrap();
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    pki.server.write(&keys, "server").unwrap();
    std::fs::remove_file(keys.join("server.pem")).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let ks = Proc(
        Command::new(bin("ztp-keyserver"))
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(dir.join("keyserver.pem"))
            .arg("--key")
            .arg(dir.join("keyserver.key"))
            .arg("--client-ca")
            .arg(dir.join("ca.pem"))
            .arg("--keys")
            .arg(&keys)
            .args(["--threads", "1", "--sign-threads", "1"])
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ztp-keyserver"),
    );
    pin(ks.0.id(), cpus);
    wait_until("the key server's port", Duration::from_secs(20), || {
        TcpStream::connect(addr).is_ok()
    });
    (ks, addr)
}
