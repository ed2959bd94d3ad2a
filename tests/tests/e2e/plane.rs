//! Shared fixture of the audit, metrics and revocation tests: one `ztp-control`, data-plane
//! replicas subscribed to it, two services and two users made with `ztpctl`, and clients
//! that know their own local address (the `peer` of the connection's record).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ztp_tests::client::{handshake, read_to_end_or_alert_within};
use ztp_tests::{
    ClientOptions, Control, ControlOptions, Dataplane, EchoBackend, HashSinkBackend, TestCert,
    TestPki,
};

use crate::common::STEP;

/// Forwards to an echo backend; group `admins`.
pub const ECHO: &str = "echo.svc.internal";
/// Forwards to a hash sink (reads to EOF, answers the 32-byte SHA-256); group `admins`.
pub const HASH: &str = "hash.svc.internal";
/// Names no service.
pub const UNKNOWN: &str = "nope.svc.internal";

/// A control plane with group `admins`, services [`ECHO`] and [`HASH`] (tcp, group
/// `admins`), users `alice` (alice@example.com, in `admins`) and `bob` (bob@example.com,
/// in no group), all made with `ztpctl`; and replicas subscribed to it, each holding the
/// current version.
pub struct Plane {
    pub pki: TestPki,
    pub control: Control,
    pub echo: EchoBackend,
    pub hash: HashSinkBackend,
    /// alice@example.com: admitted to both services.
    pub alice: TestCert,
    /// bob@example.com: a directory user in no group, so refused with 403.
    pub bob: TestCert,
    pub replicas: Vec<Dataplane>,
}

impl Plane {
    /// Starts the control plane (with `control_args` added to its flags), makes the
    /// configuration, starts one replica per id and waits until every replica has acked
    /// the current version.
    pub async fn start(node_ids: &[&str], control_args: &[&str]) -> Plane {
        let pki = TestPki::new();
        let alice = pki.client_email("alice@example.com");
        let bob = pki.client_email("bob@example.com");
        let control = Control::start_with(
            &pki,
            ControlOptions {
                args: control_args,
                ..Default::default()
            },
        )
        .await;
        let echo = EchoBackend::start().await;
        let hash = HashSinkBackend::start().await;
        control.ztpctl_ok(["group", "add", "admins"]).await;
        for (name, addr) in [(ECHO, echo.addr()), (HASH, hash.addr())] {
            let addr = addr.to_string();
            control
                .ztpctl_ok([
                    "service", "add", name, "--proto", "tcp", "--addr", &addr, "--group", "admins",
                ])
                .await;
        }
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
        control
            .ztpctl_ok(["user", "add", "bob", "--identity", "bob@example.com"])
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
        let plane = Plane {
            pki,
            control,
            echo,
            hash,
            alice,
            bob,
            replicas,
        };
        plane.wait_current().await;
        plane
    }

    /// Client options for `sni` as `cert`, trusting the PKI's CA (5 s handshake bound).
    pub fn opts(&self, sni: &str, cert: &TestCert) -> ClientOptions {
        ClientOptions::new(&self.pki.ca_pem)
            .sni(sni)
            .cert(cert)
            .timeout(Duration::from_secs(5))
    }

    /// Polls `GET /v1/nodes` (bounded) until every replica is connected and has acked the
    /// current config version; returns that version.
    pub async fn wait_current(&self) -> u64 {
        let version = self.control.config_version().await;
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let nodes = self.control.nodes().await;
            let current = self.replicas.iter().all(|dp| {
                nodes.iter().any(|n| {
                    n["id"].as_str() == dp.node_id()
                        && n["connected"] == true
                        && n["applied"].as_u64() == Some(version)
                })
            });
            if current {
                return version;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replicas did not all ack version {version} within {STEP:?}: {nodes:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Opens a TCP connection to `addr` and runs the TLS handshake with `opts`: the client's
/// local address (what the data plane records as `peer`) and the handshake's outcome.
pub async fn dial(
    addr: SocketAddr,
    opts: &ClientOptions,
) -> (SocketAddr, io::Result<TlsStream<TcpStream>>) {
    let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("TCP connect to {addr} did not finish within {STEP:?}"))
        .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
    let local = tcp.local_addr().expect("local address");
    (local, handshake(tcp, opts).await)
}

/// Writes `payload`, waits `hold`, half-closes (close_notify) and reads to a clean end:
/// what came back.
///
/// # Panics
/// If any step fails or stalls (bounded by [`STEP`] each).
pub async fn send_and_drain(
    s: &mut TlsStream<TcpStream>,
    payload: &[u8],
    hold: Duration,
) -> Vec<u8> {
    tokio::time::timeout(STEP, async {
        s.write_all(payload).await?;
        s.flush().await
    })
    .await
    .expect("write bounded")
    .expect("write the payload");
    tokio::time::sleep(hold).await;
    tokio::time::timeout(STEP, s.shutdown())
        .await
        .expect("half-close bounded")
        .expect("half-close");
    read_to_end_or_alert_within(s, STEP)
        .await
        .unwrap_or_else(|e| panic!("no clean end after the payload: {e}"))
}

/// Polls `GET path` on the control plane (bounded by [`STEP`]) until `pred` holds for its
/// `items`; returns them.
pub async fn wait_items<F>(control: &Control, path: &str, what: &str, pred: F) -> Vec<Value>
where
    F: Fn(&[Value]) -> bool,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let v = control.get_json(path).await;
        let items = v["items"]
            .as_array()
            .unwrap_or_else(|| panic!("GET {path}: no `items` array: {v}"))
            .clone();
        if pred(&items) {
            return items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {STEP:?}; GET {path}: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Milliseconds since the Unix epoch, by this host's clock (the planes run on it too).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .expect("clock after 1970")
}

/// Asserts that `out` failed with exactly one line on stderr that mentions every one of
/// `needles`, and did not panic.
pub fn assert_one_line_error(out: &std::process::Output, what: &str, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: succeeded; stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ne!(out.status.code(), Some(101), "{what}: panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: panicked: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: not one line on stderr: {stderr:?}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "{what}: {stderr:?} does not mention {n:?}"
        );
    }
}
