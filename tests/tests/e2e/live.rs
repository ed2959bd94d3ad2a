//! Live re-authorization (DESIGN.md "Refusals", README "Decisions": live connections):
//! every new snapshot decides each live connection again, and a connection ends when its
//! client certificate expires. One that fails gets the 403 line if nothing was forwarded
//! yet, close_notify otherwise. Through a file-snapshot data plane (SIGHUP reloads) and a
//! TCP echo; in every case another user's session on the same service stays up.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ztp_tests::client::read_to_end_or_alert_within;
use ztp_tests::{Dataplane, EchoBackend, TestCert, TestPki};

use crate::common::{assert_cert_refused, echo_step, STEP};

/// How soon after the SIGHUP (or after the certificate's not_after) the connection must
/// have ended: "within ~2 s".
const LIVE_BOUND: Duration = Duration::from_secs(2);

/// One user of the snapshot.
struct User {
    name: &'static str,
    in_ops: bool,
    disabled: bool,
}

const fn user(name: &'static str) -> User {
    User {
        name,
        in_ops: true,
        disabled: false,
    }
}

/// `echo.svc.internal` (tcp, group `ops`) to `echo`; each user's identity is
/// `NAME@example.com`.
fn snapshot(version: u64, echo: SocketAddr, users: &[User], revoked: &[&str]) -> String {
    let mut y = format!(
        "version: {version}\nservices:\n  - name: echo.svc.internal\n    protocol: tcp\n    \
         address: \"{echo}\"\n    groups: [ops]\nusers:\n"
    );
    for u in users {
        y.push_str(&format!(
            "  - name: {n}\n    identities: [\"{n}@example.com\"]\n    groups: [{g}]\n    \
             disabled: {d}\n",
            n = u.name,
            g = if u.in_ops { "ops" } else { "" },
            d = u.disabled
        ));
    }
    let revoked: Vec<String> = revoked.iter().map(|s| format!("\"{s}\"")).collect();
    y.push_str(&format!(
        "groups:\n  - name: ops\nrevoked: [{}]\n",
        revoked.join(", ")
    ));
    y
}

struct Live {
    pki: TestPki,
    echo: EchoBackend,
    dp: Dataplane,
}

impl Live {
    async fn start(users: &[User]) -> Live {
        let pki = TestPki::new();
        let echo = EchoBackend::start().await;
        let dp = Dataplane::start(&pki, &snapshot(1, echo.addr(), users, &[]), &[]).await;
        Live { pki, echo, dp }
    }

    async fn connect(&self, cert: &TestCert) -> TlsStream<TcpStream> {
        ztp_tests::connect(
            self.dp.addr(),
            Some("echo.svc.internal"),
            Some(cert),
            &self.pki.ca_pem,
        )
        .await
        .expect("handshake")
    }

    /// Waits until the echo backend has accepted `n` connections in all: the data plane
    /// connects to the backend only after it has authorized the client, so this tells
    /// that a session is live without sending anything on it.
    async fn wait_backend_connections(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.echo.connections() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the backend saw {} connections, not {n}, within {STEP:?}",
                self.echo.connections()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The data plane's `connection` event for the client at `local`.
    async fn event(&self, local: SocketAddr) -> Value {
        self.dp
            .wait_for_connection_event(local, STEP)
            .await
            .unwrap_or_else(|| panic!("no `connection` event for {local}"))
    }
}

fn local_addr(s: &TlsStream<TcpStream>) -> SocketAddr {
    s.get_ref().0.local_addr().expect("local addr")
}

/// Reads `s` to its end (bounded by [`STEP`]) and asserts a clean one: close_notify, no
/// byte more, within [`LIVE_BOUND`] of `since`. Returns how long it took.
async fn assert_closed_cleanly(s: &mut TlsStream<TcpStream>, since: Instant, what: &str) {
    match read_to_end_or_alert_within(s, STEP).await {
        Ok(rest) => assert!(
            rest.is_empty(),
            "{what}: bytes arrived before the end: {:?}",
            String::from_utf8_lossy(&rest)
        ),
        Err(e) => panic!("{what}: not a clean close_notify end: {e}"),
    }
    let took = since.elapsed();
    eprintln!("{what}: ended {took:?} after the change");
    assert!(
        took <= LIVE_BOUND,
        "{what}: the connection ended {took:?} after the change, later than {LIVE_BOUND:?}"
    );
}

/// (a) A live session that has echoed data is closed with close_notify within
/// [`LIVE_BOUND`] of the SIGHUP that revokes its certificate's serial; another user's
/// session goes on, and a new connection with the revoked certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_serial_ends_a_live_session_with_close_notify() {
    let users = [user("alice"), user("bob")];
    let fx = Live::start(&users).await;
    let alice = fx.pki.client_email("alice@example.com");
    let bob = fx.pki.client_email("bob@example.com");
    let mut a = fx.connect(&alice).await;
    let mut b = fx.connect(&bob).await;
    echo_step(&mut a, b"alice before").await;
    echo_step(&mut b, b"bob before").await;

    let t = Instant::now();
    fx.dp
        .reload_snapshot(&snapshot(2, fx.echo.addr(), &users, &[&alice.serial]));
    assert_closed_cleanly(&mut a, t, "alice's session, certificate revoked").await;
    echo_step(&mut b, b"bob after the reload").await;

    let ev = fx.event(local_addr(&a)).await;
    assert_eq!(ev["reason"], "certificate revoked", "{ev}");
    assert!(ev["refusal.code"].is_null(), "{ev}");
    assert_cert_refused(
        fx.dp.addr(),
        &ztp_tests::ClientOptions::new(&fx.pki.ca_pem)
            .sni("echo.svc.internal")
            .cert(&alice),
        rustls::AlertDescription::CertificateRevoked,
    )
    .await;
    echo_step(&mut b, b"bob still").await;
}

/// (b) The same when the user is disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_user_ends_a_live_session_with_close_notify() {
    let users = [user("alice"), user("bob")];
    let fx = Live::start(&users).await;
    let alice = fx.pki.client_email("alice@example.com");
    let bob = fx.pki.client_email("bob@example.com");
    let mut a = fx.connect(&alice).await;
    let mut b = fx.connect(&bob).await;
    echo_step(&mut a, b"alice before").await;
    echo_step(&mut b, b"bob before").await;

    let disabled = [
        User {
            disabled: true,
            ..user("alice")
        },
        user("bob"),
    ];
    let t = Instant::now();
    fx.dp
        .reload_snapshot(&snapshot(2, fx.echo.addr(), &disabled, &[]));
    assert_closed_cleanly(&mut a, t, "alice's session, user disabled").await;
    echo_step(&mut b, b"bob after the reload").await;

    let ev = fx.event(local_addr(&a)).await;
    assert_eq!(ev["reason"], "user disabled", "{ev}");
    assert!(ev["refusal.code"].is_null(), "{ev}");
}

/// (c) A live session that has sent nothing yet (admitted: the backend was connected)
/// gets exactly `ZTP-ERROR 403 forbidden` then close_notify when its user leaves the
/// service's group; another user's session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_from_the_group_sends_403_to_a_session_that_sent_nothing() {
    let users = [user("alice"), user("bob")];
    let fx = Live::start(&users).await;
    let alice = fx.pki.client_email("alice@example.com");
    let bob = fx.pki.client_email("bob@example.com");
    let mut b = fx.connect(&bob).await;
    echo_step(&mut b, b"bob before").await;
    let mut a = fx.connect(&alice).await;
    fx.wait_backend_connections(2).await;

    let left = [
        User {
            in_ops: false,
            ..user("alice")
        },
        user("bob"),
    ];
    let t = Instant::now();
    fx.dp
        .reload_snapshot(&snapshot(2, fx.echo.addr(), &left, &[]));
    match read_to_end_or_alert_within(&mut a, STEP).await {
        Ok(data) => assert_eq!(
            String::from_utf8_lossy(&data),
            "ZTP-ERROR 403 forbidden\n",
            "expected exactly the 403 line, then a clean end"
        ),
        Err(e) => panic!(
            "expected the 403 line then close_notify; got {e}; data: {:?}",
            String::from_utf8_lossy(e.data())
        ),
    }
    let took = t.elapsed();
    eprintln!("alice's silent session, out of the group: 403 after {took:?}");
    assert!(took <= LIVE_BOUND, "the 403 came {took:?} after the reload");
    echo_step(&mut b, b"bob after the reload").await;

    let ev = fx.event(local_addr(&a)).await;
    assert_eq!(ev["reason"], "not in group", "{ev}");
    assert_eq!(ev["refusal.code"], 403, "{ev}");
    assert_eq!(ev["bytes.up"], 0, "{ev}");
}

/// (d) A session whose client certificate expires (valid for about 3 s) ends at expiry
/// (close_notify, within [`LIVE_BOUND`] after not_after, not before it) while another
/// user's session on the same service stays up; a new connection with the certificate is
/// then refused as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ends_when_its_certificate_expires() {
    let users = [user("erin"), user("bob")];
    let fx = Live::start(&users).await;
    let now = time::OffsetDateTime::now_utc();
    // X.509 times have whole seconds: round down, then 3 to 4 s from now.
    let not_after = (now + time::Duration::seconds(4))
        .replace_nanosecond(0)
        .expect("whole seconds");
    let erin = fx
        .pki
        .builder()
        .email("erin@example.com")
        .validity(now - time::Duration::hours(1), not_after)
        .issue();
    let expiry = UNIX_EPOCH + Duration::from_secs(not_after.unix_timestamp() as u64);
    let bob = fx.pki.client_email("bob@example.com");
    let mut e = fx.connect(&erin).await;
    let mut b = fx.connect(&bob).await;
    echo_step(&mut e, b"erin before").await;
    echo_step(&mut b, b"bob before").await;

    // Still up shortly before expiry.
    let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        left > Duration::from_millis(500),
        "the test was too slow to get here before expiry ({left:?} left)"
    );
    if let Some(wait) = left.checked_sub(Duration::from_millis(1000)) {
        tokio::time::sleep(wait).await;
    }
    echo_step(&mut e, b"erin shortly before expiry").await;
    assert!(
        SystemTime::now() < expiry,
        "the echo before expiry finished after it"
    );

    match read_to_end_or_alert_within(&mut e, STEP).await {
        Ok(rest) => assert!(rest.is_empty(), "bytes arrived: {rest:?}"),
        Err(err) => panic!("erin's session did not end with close_notify: {err}"),
    }
    let ended = SystemTime::now();
    match ended.duration_since(expiry) {
        Ok(late) => {
            eprintln!("erin's session ended {late:?} after not_after");
            assert!(
                late <= LIVE_BOUND,
                "ended {late:?} after not_after, later than {LIVE_BOUND:?}"
            );
        }
        Err(early) => {
            // The data plane works in whole seconds too; a few ms of clock reading apart
            // is not "before expiry".
            let early = early.duration();
            assert!(
                early <= Duration::from_millis(50),
                "ended {early:?} before not_after"
            );
        }
    }
    echo_step(&mut b, b"bob after erin's expiry").await;

    let ev = fx.event(local_addr(&e)).await;
    assert_eq!(ev["reason"], "certificate expired", "{ev}");
    // The handshake's check takes not_after as the last valid second (RFC 5280: valid
    // through notAfter), while a live session is ended as that second starts; so a new
    // handshake is refused as expired only once that second is over.
    let refused_from = expiry + Duration::from_millis(1200);
    if let Ok(wait) = refused_from.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    assert_cert_refused(
        fx.dp.addr(),
        &ztp_tests::ClientOptions::new(&fx.pki.ca_pem)
            .sni("echo.svc.internal")
            .cert(&erin),
        rustls::AlertDescription::CertificateExpired,
    )
    .await;
    echo_step(&mut b, b"bob still").await;
}
