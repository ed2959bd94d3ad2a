//! `ztp-dataplane --control A,B`: a node subscribed to instance A moves to instance B when
//! A is lost (kill -9) or frozen (SIGSTOP), within seconds, resumes there from the version
//! it applied (B at that version sends nothing), and then follows B. A snapshot from B
//! older than the applied version is refused while B may still catch up, and taken only
//! once a whole round of the list found nothing newer.
//!
//! The two instances have stores of their own (sled) and one PKI: the same gRPC server
//! certificate and node CA. The same configuration is imported into both, so that their
//! versions line up as they would on one shared store.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::AlertDescription;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_tests::{connect_with, ClientOptions, Control, Dataplane, EchoBackend, TestCert, TestPki};

use crate::common::{assert_cert_refused, STEP};

pub(crate) const ECHO: &str = "echo.svc.internal";
pub(crate) const LATER: &str = "later.svc.internal";
pub(crate) const NODE: &str = "edge-1";

/// Bound on the move to B after A was killed (measured: well under a second).
const MOVE_AFTER_KILL: Duration = Duration::from_secs(5);

/// Bound on the move to B after A was frozen: HTTP/2 keepalive (1 s, 2 s for the answer)
/// notices it in about 3 s; the rest is slack for a loaded machine.
const MOVE_AFTER_FREEZE: Duration = Duration::from_secs(8);

/// Two control planes on one PKI, an echo backend and alice.
struct Pair {
    pki: TestPki,
    a: Control,
    b: Control,
    echo: EchoBackend,
    later: EchoBackend,
    alice: TestCert,
}

/// The configuration: [`ECHO`] (and [`LATER`] if `later`) open to every user, user
/// alice, the `revoked` serials.
pub(crate) fn config_yaml(echo: SocketAddr, later: Option<SocketAddr>, revoked: &[&str]) -> String {
    let mut services = format!("  - name: {ECHO}\n    protocol: tcp\n    address: \"{echo}\"\n");
    if let Some(addr) = later {
        services.push_str(&format!(
            "  - name: {LATER}\n    protocol: tcp\n    address: \"{addr}\"\n"
        ));
    }
    let revoked = revoked
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "version: 1\nservices:\n{services}users:\n  - name: alice\n    identities: \
         [\"alice@example.com\"]\ngroups: []\nrevoked: [{revoked}]\n"
    )
}

/// `POST /v1/import` of `yaml`: the new version.
pub(crate) async fn import(control: &Control, yaml: &str) -> u64 {
    let r = control
        .request(
            "POST",
            "/v1/import",
            &[("Content-Type", "application/yaml")],
            Some(yaml.as_bytes()),
        )
        .await
        .expect("POST /v1/import");
    assert!(r.is_success(), "import: {r}");
    r.json()["version"].as_u64().expect("the import's version")
}

/// The node's entry in `GET /v1/nodes` of `control`.
pub(crate) async fn node_on(control: &Control) -> Option<Value> {
    control.nodes().await.into_iter().find(|n| n["id"] == NODE)
}

/// Polls (every 20 ms, bounded by `bound`) until `check` gives `Some`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The data plane's log lines from index `from` on.
pub(crate) fn logs_from(dp: &Dataplane, from: usize) -> Vec<Value> {
    dp.logs().into_iter().skip(from).collect()
}

/// Whether the line says the node subscribed to `url`.
pub(crate) fn subscribed_to(v: &Value, url: &str) -> bool {
    v["message"] == "subscribed to the control plane" && v["url"] == url
}

/// `GET /readyz`'s body.
async fn readyz_body(dp: &Dataplane) -> String {
    ztp_tests::http::request(dp.admin_addr(), "GET", "/readyz", &[], None)
        .await
        .expect("GET /readyz")
        .text()
}

/// One echo round trip to `sni` as `cert` (2 s bound): whether it came back whole.
pub(crate) async fn echo_ok(addr: SocketAddr, opts: &ClientOptions) -> bool {
    let Ok(mut s) = connect_with(addr, opts).await else {
        return false;
    };
    let r = tokio::time::timeout(Duration::from_secs(2), async {
        s.write_all(b"probe").await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        std::io::Result::Ok(back)
    })
    .await;
    matches!(r, Ok(Ok(b)) if b == b"probe")
}

/// Sends `signal` to `pid` with `kill`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A process stopped with SIGSTOP, continued (SIGCONT) when this is dropped, also when
/// the test fails.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        signal(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .arg(self.0.to_string())
            .status();
    }
}

impl Pair {
    /// Both instances, each with the configuration `yaml` at the same version (an
    /// instance behind gets the import again until they line up): that version.
    async fn start() -> (Pair, u64) {
        let pki = TestPki::new();
        let alice = pki.client_email("alice@example.com");
        let (a, b) = (Control::start(&pki).await, Control::start(&pki).await);
        let echo = EchoBackend::start().await;
        let later = EchoBackend::start().await;
        let pair = Pair {
            pki,
            a,
            b,
            echo,
            later,
            alice,
        };
        let yaml = pair.yaml(false, &[]);
        let (mut va, mut vb) = (import(&pair.a, &yaml).await, import(&pair.b, &yaml).await);
        for _ in 0..20 {
            if va == vb {
                break;
            }
            if va < vb {
                va = import(&pair.a, &yaml).await;
            } else {
                vb = import(&pair.b, &yaml).await;
            }
        }
        assert_eq!(va, vb, "the instances' versions do not line up");
        (pair, va)
    }

    fn yaml(&self, later: bool, revoked: &[&str]) -> String {
        config_yaml(self.echo.addr(), later.then(|| self.later.addr()), revoked)
    }

    fn opts(&self, sni: &str) -> ClientOptions {
        ClientOptions::new(&self.pki.ca_pem)
            .sni(sni)
            .cert(&self.alice)
            .timeout(Duration::from_secs(5))
    }

    /// A data plane subscribed with `--control A,B`, ready, on A at `version`, serving
    /// [`ECHO`].
    async fn node(&self, version: u64) -> Dataplane {
        let list = format!("{},{}", self.a.grpc_url(), self.b.grpc_url());
        let mut dp = Dataplane::start_control(&self.pki, &list, NODE, &[]).await;
        assert!(dp.wait_ready(STEP).await, "the node did not become ready");
        wait_for("the node acks on A", STEP, || async {
            node_on(&self.a)
                .await
                .filter(|n| n["connected"] == true && n["applied"].as_u64() == Some(version))
        })
        .await;
        assert!(
            echo_ok(dp.addr(), &self.opts(ECHO)).await,
            "{ECHO} is not served"
        );
        let body = readyz_body(&dp).await;
        assert!(
            body.contains(&format!("control: {} (subscribed)", self.a.grpc_url())),
            "/readyz does not name A: {body:?}"
        );
        dp
    }

    /// Waits for the node's move to B after log line `mark`: the `moving to` line and the
    /// subscription. Returns the time from `since` to the subscription's line being seen.
    async fn wait_moved_to_b(&self, dp: &Dataplane, mark: usize, since: Instant) -> Duration {
        let b = self.b.grpc_url();
        let bound = MOVE_AFTER_FREEZE + STEP;
        wait_for("the node subscribes to B", bound, || async {
            logs_from(dp, mark)
                .iter()
                .any(|v| subscribed_to(v, &b))
                .then_some(())
        })
        .await;
        let took = since.elapsed();
        let logs = logs_from(dp, mark);
        let moving = logs
            .iter()
            .find(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m == format!("control plane lost; moving to {b}"))
            })
            .unwrap_or_else(|| panic!("no `control plane lost; moving to {b}` line: {logs:?}"));
        assert_eq!(
            moving["control.from"],
            self.a.grpc_url().as_str(),
            "{moving}"
        );
        assert_eq!(moving["level"], "WARN", "{moving}");
        took
    }
}

/// kill -9 A: the node moves to B at once, resumes there at the version it applied (B
/// sends no snapshot: it is at that version), keeps serving meanwhile, and applies the
/// next change made on B (a new service whose connections then work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_left_for_the_next_which_the_node_then_follows() {
    let (p, v) = Pair::start().await;
    let dp = p.node(v).await;
    let applied = |dp: &Dataplane| {
        dp.logs()
            .iter()
            .filter(|l| l["message"] == "snapshot applied")
            .count()
    };
    let applied_on_a = applied(&dp);

    let mark = dp.raw_logs().len();
    let mut p = p;
    let killed = Instant::now();
    p.a.kill9();
    let took = p.wait_moved_to_b(&dp, mark, killed).await;
    eprintln!("measured: kill -9 A -> subscribed to B in {took:?}");
    assert!(
        took <= MOVE_AFTER_KILL,
        "the move to B took {took:?} (bound {MOVE_AFTER_KILL:?})"
    );

    // Resumed from the version it applied: B shows the node at it, and sent nothing.
    let on_b = wait_for("the node on B", STEP, || async {
        node_on(&p.b).await.filter(|n| n["connected"] == true)
    })
    .await;
    assert_eq!(on_b["applied"].as_u64(), Some(v), "{on_b}");
    assert!(on_b["last_nack"].is_null(), "{on_b}");
    let body = readyz_body(&dp).await;
    assert!(
        body.starts_with("ready\n")
            && body.contains(&format!("control: {} (subscribed)", p.b.grpc_url())),
        "/readyz: {body:?}"
    );
    assert!(
        echo_ok(dp.addr(), &p.opts(ECHO)).await,
        "{ECHO} after the move"
    );
    assert_eq!(
        applied(&dp),
        applied_on_a,
        "B sent a snapshot at the node's version"
    );

    // A change on B reaches the node.
    let changed = Instant::now();
    let v2 = import(&p.b, &p.yaml(true, &[])).await;
    assert!(v2 > v);
    wait_for(&format!("{LATER} served"), STEP, || async {
        echo_ok(dp.addr(), &p.opts(LATER)).await.then_some(())
    })
    .await;
    eprintln!(
        "measured: a change on B served by the node {:?} after the write",
        changed.elapsed()
    );
    assert!(p.later.connections() > 0);
    wait_for("the node acks the change on B", STEP, || async {
        node_on(&p.b)
            .await
            .filter(|n| n["applied"].as_u64() == Some(v2))
    })
    .await;
}

/// SIGSTOP A: the node notices within seconds (HTTP/2 keepalive), moves to B and follows
/// it (a revocation made on B refuses the client). A continued (SIGCONT) does not draw
/// the node back: a healthy instance stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_is_left_within_seconds_and_not_returned_to() {
    let (p, v) = Pair::start().await;
    let dp = p.node(v).await;

    let mark = dp.raw_logs().len();
    let frozen_at = Instant::now();
    let frozen = Frozen::new(p.a.pid().expect("A runs"));
    let took = p.wait_moved_to_b(&dp, mark, frozen_at).await;
    eprintln!("measured: SIGSTOP A -> subscribed to B in {took:?}");
    assert!(
        took <= MOVE_AFTER_FREEZE,
        "the move away from a frozen A took {took:?} (bound {MOVE_AFTER_FREEZE:?})"
    );
    assert!(
        echo_ok(dp.addr(), &p.opts(ECHO)).await,
        "{ECHO} after the move"
    );

    // A revocation on B: the client is refused.
    let changed = Instant::now();
    let serial = p.alice.serial.clone();
    import(&p.b, &p.yaml(false, &[&serial])).await;
    wait_for("alice refused", STEP, || async {
        (!echo_ok(dp.addr(), &p.opts(ECHO)).await).then_some(())
    })
    .await;
    eprintln!(
        "measured: a revocation on B in effect {:?} after the write",
        changed.elapsed()
    );
    assert_cert_refused(
        dp.addr(),
        &p.opts(ECHO),
        AlertDescription::CertificateRevoked,
    )
    .await;

    // A comes back: the node stays on B.
    drop(frozen);
    let after_cont = dp.raw_logs().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = logs_from(&dp, after_cont);
    assert!(
        !later
            .iter()
            .any(|v| v["message"] == "subscribed to the control plane"),
        "the node moved again after A came back: {later:?}"
    );
    let body = readyz_body(&dp).await;
    assert!(
        body.contains(&format!("control: {} (subscribed)", p.b.grpc_url())),
        "/readyz: {body:?}"
    );
}

/// Applies `yaml` on A only (a revocation of alice), waits until the node applied it,
/// kills A and waits for the node's nack on B (which is one version behind): the version
/// the node applied, and the log mark and instant of the kill.
async fn node_ahead_of_b(p: &mut Pair, dp: &Dataplane) -> (u64, usize, Instant) {
    let serial = p.alice.serial.clone();
    let ahead = import(&p.a, &p.yaml(false, &[&serial])).await;
    wait_for("the node acks the revocation on A", STEP, || async {
        node_on(&p.a)
            .await
            .filter(|n| n["applied"].as_u64() == Some(ahead))
    })
    .await;
    assert_cert_refused(
        dp.addr(),
        &p.opts(ECHO),
        AlertDescription::CertificateRevoked,
    )
    .await;

    let mark = dp.raw_logs().len();
    let killed = Instant::now();
    p.a.kill9();
    p.wait_moved_to_b(dp, mark, killed).await;
    let nack = wait_for("the node refuses B's older snapshot", STEP, || async {
        node_on(&p.b)
            .await
            .and_then(|n| n["last_nack"].as_object().cloned())
    })
    .await;
    let reason = nack["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("older than the applied version {ahead}")),
        "{nack:?}"
    );
    (ahead, mark, killed)
}

/// B lags one version behind the node: its older snapshot is refused (nacked; the
/// revocation the node holds stays in effect), and when B catches up within the grace
/// (the same revocation made on B) the node applies it there, never having gone back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_behind_the_applied_version_is_waited_for_not_followed_back() {
    let (mut p, v) = Pair::start().await;
    let dp = p.node(v).await;
    let (ahead, mark, _) = node_ahead_of_b(&mut p, &dp).await;
    assert_cert_refused(
        dp.addr(),
        &p.opts(ECHO),
        AlertDescription::CertificateRevoked,
    )
    .await;

    // B catches up (to the same configuration at the same version).
    let serial = p.alice.serial.clone();
    assert_eq!(import(&p.b, &p.yaml(false, &[&serial])).await, ahead);
    wait_for("the node acks B's version", STEP, || async {
        logs_from(&dp, mark)
            .iter()
            .any(|l| l["message"] == "snapshot applied" && l["snapshot.version"] == ahead)
            .then_some(())
    })
    .await;
    assert_cert_refused(
        dp.addr(),
        &p.opts(ECHO),
        AlertDescription::CertificateRevoked,
    )
    .await;
    let logs = logs_from(&dp, mark);
    assert!(
        !logs.iter().any(|l| {
            l["message"] == "snapshot applied" && l["snapshot.version"].as_u64() < Some(ahead)
        }),
        "the node applied an older version: {logs:?}"
    );
    // Still on B: it caught up within the grace.
    assert_eq!(
        logs.iter()
            .filter(|l| l["message"] == "subscribed to the control plane")
            .count(),
        1,
        "{logs:?}"
    );
}

/// B lags one version behind the node and A is gone for good: the older version is
/// refused for the grace, then (a whole round of the list found nothing newer) taken from
/// B with a warning: B's configuration is the truth now, and the revocation it lacks is
/// lifted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_is_taken_only_after_a_whole_round_found_nothing_newer() {
    let (mut p, v) = Pair::start().await;
    let dp = p.node(v).await;
    let (_, mark, killed) = node_ahead_of_b(&mut p, &dp).await;

    // Well within the grace: the node holds what it had.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_cert_refused(
        dp.addr(),
        &p.opts(ECHO),
        AlertDescription::CertificateRevoked,
    )
    .await;

    let taken = wait_for("the node takes B's older version", STEP, || async {
        logs_from(&dp, mark).into_iter().find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("no control plane instance reached"))
        })
    })
    .await;
    eprintln!(
        "measured: kill -9 A -> B's older version taken after {:?}",
        killed.elapsed()
    );
    assert_eq!(taken["snapshot.version"].as_u64(), Some(v), "{taken}");
    assert_eq!(taken["level"], "WARN", "{taken}");
    wait_for("alice admitted again", STEP, || async {
        echo_ok(dp.addr(), &p.opts(ECHO)).await.then_some(())
    })
    .await;
}
