//! Revocation through the control plane (README "Walkthrough: the operator's day"):
//! `ztpctl pki revoke CERTFILE | SERIAL | --crl FILE` is `POST /v1/revoked`, one new
//! version; every replica refuses the certificate at the handshake (`certificate_revoked`)
//! and closes the live connections that use it; `DELETE /v1/revoked/SERIAL` lifts it.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use rustls::AlertDescription;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ztp_tests::client::read_to_end_or_alert_within;
use ztp_tests::process::{describe_output, run_bounded};
use ztp_tests::{connect_with, Bin, Dataplane, TempDir, TestCert, TestPki};

use crate::common::{assert_cert_refused, echo_step, Extra, Fixture, STEP};
use crate::plane::{assert_one_line_error, send_and_drain, wait_items, Plane, ECHO};

/// A live session must end within this of `ztpctl pki revoke` returning.
const REVOKE_BOUND: Duration = Duration::from_secs(2);

/// What a new connection with `cert` to [`ECHO`] through `dp` gets.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The echo came back.
    Served,
    /// The server's refusal: the `certificate_revoked` alert (in the handshake or on the
    /// first read, no data before it).
    Revoked,
    /// Anything else, described.
    Other(String),
}

async fn try_echo(p: &Plane, dp: &Dataplane, cert: &TestCert) -> Outcome {
    let opts = p.opts(ECHO, cert);
    let mut s = match connect_with(dp.addr(), &opts).await {
        Ok(s) => s,
        Err(e) => {
            return match ztp_tests::client::alert_of(&e) {
                Some(AlertDescription::CertificateRevoked) => Outcome::Revoked,
                _ => Outcome::Other(format!("handshake: {e}")),
            }
        }
    };
    let payload = b"still me?";
    let r = tokio::time::timeout(STEP, async {
        use tokio::io::AsyncWriteExt;
        // A refusal may already be waiting: tolerate write errors, then read.
        let _ = s.write_all(payload).await;
        let _ = s.shutdown().await;
        read_to_end_or_alert_within(&mut s, STEP).await
    })
    .await
    .expect("bounded");
    match r {
        Ok(b) if b == payload => Outcome::Served,
        Ok(b) => Outcome::Other(format!("clean end after {:?}", String::from_utf8_lossy(&b))),
        Err(e)
            if e.alert() == Some(AlertDescription::CertificateRevoked) && e.data().is_empty() =>
        {
            Outcome::Revoked
        }
        Err(e) => Outcome::Other(format!("read: {e}")),
    }
}

/// Polls (bounded by [`STEP`]) until a new connection with `cert` through every replica
/// gets `want`.
async fn wait_outcome(p: &Plane, cert: &TestCert, want: Outcome, what: &str) {
    for dp in &p.replicas {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let got = try_echo(p, dp, cert).await;
            if got == want {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: replica {:?} did not give {want:?} within {STEP:?}; last: {got:?}",
                dp.node_id()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The serials `GET /v1/revoked` lists.
async fn revoked_list(p: &Plane) -> Vec<String> {
    p.control.get_json("/v1/revoked?limit=1000").await["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|s| s.as_str().expect("a serial is a string").to_string())
        .collect()
}

/// Reads `s` to its end and returns how long after `since` a clean end came.
async fn clean_end_after(mut s: TlsStream<TcpStream>, since: Instant, what: String) -> Duration {
    match read_to_end_or_alert_within(&mut s, STEP).await {
        Ok(rest) => assert!(
            rest.is_empty(),
            "{what}: bytes before the end: {:?}",
            String::from_utf8_lossy(&rest)
        ),
        Err(e) => panic!("{what}: not a clean end (close_notify) after the revocation: {e}"),
    }
    since.elapsed()
}

/// Two replicas; alice has certificates A (revoked by file), B (kept), C (revoked by a
/// hex serial written `0x` + upper case with colons), D and E (revoked by a PEM CRL), F
/// (by a DER CRL).
///
/// - A live echo session with A through each replica ends cleanly (close_notify, no
///   byte more) within 2 s of `ztpctl pki revoke A.pem` returning, on both; a live
///   session with B on each goes on; new handshakes with A get `certificate_revoked` on
///   both, B's get through; the revocation is one new version, `GET /v1/revoked` lists
///   A's serial as lower-case hex.
/// - C: listed normalized, refused on both; then `DELETE /v1/revoked/` with C's serial
///   upper case and zero-padded lifts it (204), C works again on both and is no longer
///   listed.
/// - `--crl` with a PEM CRL signed by the CA (D, E) and with a DER one (F): one version
///   each, all listed, all refused on both replicas.
/// - Refusals: a serial that is not hex, a CRL file that is not a CRL, and a REST body
///   with a bad serial: one clear line (a 400 naming `serials[0]`), nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_through_the_control_plane_reaches_every_replica() {
    let p = Plane::start(&["rev-a", "rev-b"], &[]).await;
    let a = p.alice.clone();
    let b = p.pki.client_email("alice@example.com");
    let c = p.pki.client_email("alice@example.com");
    let d = p.pki.client_email("alice@example.com");
    let e = p.pki.client_email("alice@example.com");
    let f = p.pki.client_email("alice@example.com");
    let files = TempDir::new("revoke");
    std::fs::write(files.join("a.pem"), &a.cert_pem).expect("write a.pem");

    // Live sessions: A and B through each replica.
    let mut live_a = Vec::new();
    let mut live_b = Vec::new();
    let mut peers_a = Vec::new();
    for dp in &p.replicas {
        let mut s = connect_with(dp.addr(), &p.opts(ECHO, &a))
            .await
            .expect("A's handshake");
        echo_step(&mut s, b"A before").await;
        peers_a.push(s.get_ref().0.local_addr().expect("local address"));
        live_a.push(s);
        let mut s = connect_with(dp.addr(), &p.opts(ECHO, &b))
            .await
            .expect("B's handshake");
        echo_step(&mut s, b"B before").await;
        live_b.push(s);
    }
    let v0 = p.control.config_version().await;

    let out = p
        .control
        .ztpctl_json([
            OsStr::new("pki"),
            OsStr::new("revoke"),
            files.join("a.pem").as_os_str(),
        ])
        .await;
    let since = Instant::now();
    assert_eq!(
        out,
        json!({"version": v0 + 1}),
        "ztpctl -o json pki revoke a.pem"
    );
    let mut ends = Vec::new();
    for (i, s) in live_a.into_iter().enumerate() {
        ends.push(tokio::spawn(clean_end_after(
            s,
            since,
            format!("A's session on replica {i}"),
        )));
    }
    for (i, h) in ends.into_iter().enumerate() {
        let took = h.await.expect("the reader task");
        eprintln!("A's session on replica {i} ended {took:?} after `ztpctl pki revoke` returned");
        assert!(
            took <= REVOKE_BOUND,
            "A's session on replica {i} ended {took:?} after the revocation, later than \
             {REVOKE_BOUND:?}"
        );
    }
    assert_eq!(p.control.config_version().await, v0 + 1, "one new version");
    assert_eq!(revoked_list(&p).await, [a.serial.as_str()]);
    for s in &mut live_b {
        echo_step(s, b"B after A was revoked").await;
    }
    for dp in &p.replicas {
        let opts = p.opts(ECHO, &a);
        assert_cert_refused(dp.addr(), &opts, AlertDescription::CertificateRevoked).await;
        assert_eq!(
            try_echo(&p, dp, &b).await,
            Outcome::Served,
            "B on {:?}",
            dp.node_id()
        );
    }
    // The audit trail has each replica's record of A's session, ended by the revocation
    // after 8 bytes each way, and of the refused handshake.
    for (dp, peer) in p.replicas.iter().zip(&peers_a) {
        let want = peer.to_string();
        let items = wait_items(
            &p.control,
            "/v1/audit?limit=1000",
            "A's session's record",
            |items| items.iter().any(|r| r["peer"] == want.as_str()),
        )
        .await;
        let r = items
            .iter()
            .find(|r| r["peer"] == want.as_str())
            .expect("found");
        assert_eq!(r["node"].as_str(), dp.node_id(), "{r}");
        assert_eq!(r["identity"], "alice@example.com", "{r}");
        assert_eq!(r["service"], ECHO, "{r}");
        assert_eq!(r["reason"], "certificate revoked", "{r}");
        assert_eq!(r["code"], 0, "close_notify, not a refusal line: {r}");
        assert_eq!(
            (r["bytes_up"].as_u64(), r["bytes_down"].as_u64()),
            (Some(8), Some(8)),
            "{r}"
        );
        let node = dp.node_id().expect("a replica");
        let refused = wait_items(
            &p.control,
            "/v1/audit?decision=deny&limit=1000",
            "the refused handshake's record",
            |items| items.iter().any(|r| r["node"] == node && r["sni"] == ECHO),
        )
        .await;
        let r = refused
            .iter()
            .find(|r| r["node"] == node && r["sni"] == ECHO)
            .expect("found");
        assert_eq!(
            (r["bytes_up"].as_u64(), r["bytes_down"].as_u64()),
            (Some(0), Some(0)),
            "{r}"
        );
        assert_eq!(r["code"], 0, "{r}");
    }

    // C by a hex serial, as an operator might paste it.
    let pasted = format!(
        "0x{}",
        c.serial
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|ch| std::str::from_utf8(ch).expect("ascii"))
            .collect::<Vec<_>>()
            .join(":")
    );
    let out = p.control.ztpctl_json(["pki", "revoke", &pasted]).await;
    assert_eq!(
        out,
        json!({"version": v0 + 2}),
        "ztpctl pki revoke {pasted}"
    );
    let mut want = vec![a.serial.clone(), c.serial.clone()];
    want.sort();
    assert_eq!(revoked_list(&p).await, want, "normalized serials");
    wait_outcome(&p, &c, Outcome::Revoked, "C revoked by serial").await;

    // Lift C's revocation.
    let r = p
        .control
        .api(
            "DELETE",
            &format!("/v1/revoked/{}", c.serial_padded_upper(4)),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "DELETE /v1/revoked/C: {r}");
    assert_eq!(r.etag_version(), Some(v0 + 3), "{r}");
    assert_eq!(revoked_list(&p).await, [a.serial.as_str()]);
    wait_outcome(&p, &c, Outcome::Served, "C after the revocation was lifted").await;
    let r = p
        .control
        .api("DELETE", &format!("/v1/revoked/{}", c.serial), None)
        .await;
    assert_eq!(r.status, 404, "lifting it twice: {r}");

    // D and E by a PEM CRL, F by a DER one, all signed by the CA.
    let (crl_pem, _) = p.pki.crl(&[d.serial.as_str(), e.serial.as_str()]);
    std::fs::write(files.join("de.crl.pem"), crl_pem).expect("write the CRL");
    let (_, crl_der) = p.pki.crl(&[f.serial.to_uppercase().as_str()]);
    std::fs::write(files.join("f.crl"), crl_der).expect("write the CRL");
    let out = p
        .control
        .ztpctl_json([
            OsStr::new("pki"),
            OsStr::new("revoke"),
            OsStr::new("--crl"),
            files.join("de.crl.pem").as_os_str(),
        ])
        .await;
    assert_eq!(out, json!({"version": v0 + 4}), "pki revoke --crl (PEM)");
    let out = p
        .control
        .ztpctl_json([
            OsStr::new("pki"),
            OsStr::new("revoke"),
            OsStr::new("--crl"),
            files.join("f.crl").as_os_str(),
        ])
        .await;
    assert_eq!(out, json!({"version": v0 + 5}), "pki revoke --crl (DER)");
    let mut want = vec![
        a.serial.clone(),
        d.serial.clone(),
        e.serial.clone(),
        f.serial.clone(),
    ];
    want.sort();
    assert_eq!(revoked_list(&p).await, want, "after the CRLs");
    for (cert, what) in [
        (&d, "D (PEM CRL)"),
        (&e, "E (PEM CRL)"),
        (&f, "F (DER CRL)"),
    ] {
        wait_outcome(&p, cert, Outcome::Revoked, what).await;
    }
    wait_outcome(&p, &b, Outcome::Served, "B after the CRLs").await;

    // Refusals change nothing.
    let version = p.control.config_version().await;
    let out = p.control.ztpctl(["pki", "revoke", "not-a-serial"]).await;
    assert_one_line_error(&out, "pki revoke not-a-serial", &["not-a-serial"]);
    let out = p
        .control
        .ztpctl([
            OsStr::new("pki"),
            OsStr::new("revoke"),
            OsStr::new("--crl"),
            files.join("a.pem").as_os_str(),
        ])
        .await;
    assert_one_line_error(&out, "pki revoke --crl a.pem", &["CRL"]);
    let out = p.control.ztpctl(["pki", "revoke"]).await;
    assert_one_line_error(&out, "pki revoke with nothing", &["nothing to revoke"]);
    let r = p
        .control
        .api("POST", "/v1/revoked", Some(&json!({"serials": ["xyz"]})))
        .await;
    assert_eq!(r.status, 400, "{r}");
    let problem: Value = r.json();
    assert_eq!(problem["errors"][0]["field"], "serials[0]", "{problem}");
    let r = p.control.api("DELETE", "/v1/revoked/zz", None).await;
    assert_eq!(r.status, 400, "{r}");
    assert_eq!(r.json()["errors"][0]["field"], "serial", "{r}");
    assert_eq!(
        p.control.config_version().await,
        version,
        "a refusal changed the version"
    );
    assert_eq!(revoked_list(&p).await, want);

    // B's sessions lived through all of it.
    for s in &mut live_b {
        echo_step(s, b"B at the end").await;
    }
    for mut s in live_b {
        assert_eq!(
            send_and_drain(&mut s, b"bye", Duration::ZERO).await,
            b"bye",
            "B's last echo"
        );
    }
}

/// `ztpctl connect SERVICE` (standard input and output, as ssh's ProxyCommand runs it)
/// refused by the gateway ends with a non-zero exit, one line on stderr naming the cause
/// and nothing on stdout:
///
/// - a revoked certificate: the `certificate_revoked` alert at the handshake;
/// - a disabled user (dave): the `ZTP-ERROR 403 forbidden` line, nothing forwarded;
/// - an expired certificate: the `certificate_expired` alert at the handshake.
///
/// Alice, neither revoked nor disabled, gets the echo of her input and exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_connect_refused_exits_non_zero_with_one_line() {
    let pki = TestPki::new();
    let revoked = pki.client_email("bob@example.com");
    let serials = [revoked.serial.clone()];
    let fx = Fixture::start_with(
        pki,
        Extra {
            revoked: &serials,
            ..Extra::default()
        },
    )
    .await;
    let files = TempDir::new("connect-refused");
    std::fs::write(files.join("ca.pem"), &fx.pki.ca_pem).expect("write ca.pem");
    std::fs::create_dir_all(files.join("xdg")).expect("create the config home");
    revoked.write(files.path(), "revoked").expect("write");
    fx.pki
        .client_email("dave@example.com")
        .write(files.path(), "dave")
        .expect("write");
    fx.pki
        .builder()
        .email("alice@example.com")
        .expired()
        .issue()
        .write(files.path(), "expired")
        .expect("write");
    fx.pki
        .client_email("alice@example.com")
        .write(files.path(), "alice")
        .expect("write");

    let connect = |who: &str, input: &str| {
        let p = |name: String| files.join(name);
        let mut cmd = tokio::process::Command::new(Bin::Ztpctl.path());
        cmd.args(["connect", "echo.svc.internal", "--via"])
            .arg(fx.dp.addr().to_string())
            .arg("--cert")
            .arg(p(format!("{who}.pem")))
            .arg("--key")
            .arg(p(format!("{who}.key")))
            .arg("--ca")
            .arg(p("ca.pem".into()));
        for k in ["ZTP_VIA", "ZTP_CERT", "ZTP_KEY", "ZTP_CA", "RUST_LOG"] {
            cmd.env_remove(k);
        }
        cmd.env("XDG_CONFIG_HOME", files.join("xdg"));
        let input = input.as_bytes().to_vec();
        async move { run_bounded(cmd, Some(&input), STEP).await }
    };

    for (who, input, needles) in [
        ("revoked", "", &["certificate revoked"][..]),
        ("revoked", "some input", &["certificate revoked"][..]),
        ("dave", "", &["403 forbidden"][..]),
        ("dave", "some input", &["403 forbidden"][..]),
        ("expired", "", &["certificate expired"][..]),
    ] {
        let what = format!("ztpctl connect as {who}, input {input:?}");
        let out = connect(who, input).await;
        eprintln!("{what}: {}", describe_output(&out));
        assert_one_line_error(&out, &what, needles);
        assert!(out.stdout.is_empty(), "{what}: {}", describe_output(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("ztpctl: "),
            "{what}: {}",
            describe_output(&out)
        );
    }
    let out = connect("alice", "hello").await;
    assert!(out.status.success(), "alice: {}", describe_output(&out));
    assert_eq!(
        out.stdout,
        b"hello",
        "alice's echo: {}",
        describe_output(&out)
    );
}

/// A live `ztpctl connect --transport tcp` session (data forwarded both ways) whose
/// client certificate expires: the gateway ends it with close_notify, which alone reads
/// as a normal end; ztpctl checks its own certificate when the session ends and exits
/// non-zero with one line saying it expired. (Over TCP a revocation or group change after
/// data cannot be told apart from the service closing: the client sees the same
/// close_notify.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_connect_session_ended_by_expiry_says_so() {
    session_ended_by_expiry(
        "tcp",
        &[
            "ztpctl: ",
            "the session ended",
            "your certificate expired at",
        ],
    )
    .await;
}

/// The same over QUIC: the gateway closes the connection with the 403 line even after
/// data moved, and ztpctl names the expiry beside it, in one line, non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_connect_session_ended_by_expiry_says_so_over_quic() {
    session_ended_by_expiry(
        "quic",
        &["ztpctl: ", "403 forbidden", "your certificate expired at"],
    )
    .await;
}

async fn session_ended_by_expiry(transport: &str, needles: &[&str]) {
    use tokio::io::AsyncWriteExt;

    let fx = Fixture::start_with(TestPki::new(), Extra::default()).await;
    let files = TempDir::new("connect-expiry");
    std::fs::write(files.join("ca.pem"), &fx.pki.ca_pem).expect("write ca.pem");
    std::fs::create_dir_all(files.join("xdg")).expect("create the config home");
    let now = time::OffsetDateTime::now_utc();
    fx.pki
        .builder()
        .email("alice@example.com")
        .validity(
            now - time::Duration::days(1),
            now + time::Duration::seconds(3),
        )
        .issue()
        .write(files.path(), "short")
        .expect("write");

    let mut cmd = crate::common::ztpctl_connect(
        files.path(),
        fx.dp.addr(),
        "short",
        &["--transport", transport],
    );
    let mut child = cmd.spawn().expect("start ztpctl connect");
    // Standard input stays open: only the gateway can end the session.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"hello").await.expect("write to ztpctl");
    stdin.flush().await.expect("flush");
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .expect("the session ends within the bound (the certificate expires in 3 s)")
        .expect("ztpctl's output");
    drop(stdin);
    eprintln!("{}", describe_output(&out));
    assert_eq!(out.stdout, b"hello", "{}", describe_output(&out));
    assert_one_line_error(
        &out,
        &format!("a session ({transport}) ended by the certificate's expiry"),
        needles,
    );
}
