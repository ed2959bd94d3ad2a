//! Resumed TLS sessions are decided afresh (DESIGN.md): the restored client chain is
//! checked again for validity and revocation. A resumed connection has no handshake
//! refusal to give, so the refusal may be an alert on the first read or the 403 line;
//! either is accepted, but never a forwarded byte. Each test prints the handshake kind
//! (`Resumed` shows that the rule was really exercised).

use std::time::Duration;

use rustls::HandshakeKind;

use ztp_tests::client::{alert_of, read_to_end_or_alert};
use ztp_tests::{connect_with, new_session_store, ClientOptions, TestPki};

use crate::common::{echo_roundtrip, service_yaml, standard_snapshot, Extra, Fixture, STEP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_session_is_rechecked_against_the_new_snapshot() {
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let bob = pki.client_email("bob@example.com");
    let mut fx = Fixture::start_with(pki, Extra::default()).await;
    let store = new_session_store();
    let opts = fx
        .opts("echo.svc.internal", &alice)
        .session_store(store.clone());

    // A full handshake; reading to the end also takes in the session tickets.
    let s = connect_with(fx.dp.addr(), &opts)
        .await
        .expect("first connection");
    assert_eq!(echo_roundtrip(s, b"first").await, b"first");

    // Revoke alice's certificate; a canary service tells when the reload is in effect.
    let canary = service_yaml("reloaded.svc.internal", fx.echo.addr());
    let revoked = vec![alice.serial.clone()];
    let v2 = standard_snapshot(
        2,
        fx.echo.addr(),
        fx.wild.addr(),
        fx.admins.addr(),
        &Extra {
            services: &canary,
            revoked: &revoked,
            ..Extra::default()
        },
    );
    fx.dp.reload_snapshot(&v2);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        // Before the reload `reloaded.svc.internal` is served by the wildcard service;
        // afterwards by its own entry, which points at the echo backend.
        let before = fx.echo.connections();
        let s = match fx.connect("reloaded.svc.internal", &bob).await {
            Ok(s) => s,
            Err(e) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(status) = fx.dp.try_wait() {
                    panic!(
                        "ztp-dataplane exited ({status}) on SIGHUP; DESIGN.md: SIGHUP reloads \
                         the snapshot file"
                    );
                }
                panic!("canary connect after SIGHUP failed: {e}");
            }
        };
        let answer = echo_roundtrip(s, b"canary").await;
        // A session that began on the wildcard service is cut when the reload retargets
        // it ("service retargeted"): that ends it early, empty or (when nothing had been
        // forwarded yet) with the 403 line, and it is tried again.
        assert!(
            answer == b"canary" || answer.is_empty() || answer == b"ZTP-ERROR 403 forbidden\n",
            "the canary came back altered: {:?}",
            String::from_utf8_lossy(&answer)
        );
        if answer == b"canary" && fx.echo.connections() > before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reloaded snapshot (SIGHUP) did not take effect within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let echo_before = fx.echo.connections();
    match connect_with(fx.dp.addr(), &opts).await {
        Err(e) => panic!(
            "expected a resumed handshake, got a refusal in it: {e} (alert {:?})",
            alert_of(&e)
        ),
        Ok(mut s) => {
            let kind = s.get_ref().1.handshake_kind();
            assert_eq!(
                kind,
                Some(HandshakeKind::Resumed),
                "the session did not resume"
            );
            match read_to_end_or_alert(&mut s).await {
                Ok(data) => {
                    let text = String::from_utf8_lossy(&data);
                    assert_eq!(
                        text, "ZTP-ERROR 403 forbidden\n",
                        "a revoked certificate was let through on a {kind:?} handshake"
                    );
                    eprintln!("refused with the 403 line");
                }
                Err(e) => {
                    assert!(e.data().is_empty(), "data before refusal: {e}");
                    eprintln!("refused after the handshake: {e}");
                }
            }
        }
    }
    assert_eq!(
        fx.echo.connections(),
        echo_before,
        "the revoked client reached the backend"
    );
}

/// Issues alice a certificate that expires a few seconds from now and makes a full
/// handshake with it (reading the echo takes in the session ticket). A machine too slow
/// for that gets a longer validity, never a pass without the check: the attempt is made
/// again with more margin, and the test fails if even the longest is not enough.
async fn short_lived_session(fx: &Fixture) -> (ClientOptions, time::OffsetDateTime) {
    let mut last = String::new();
    for validity in [3, 5, 9] {
        let now = time::OffsetDateTime::now_utc();
        let expires = now + time::Duration::seconds(validity);
        let alice = fx
            .pki
            .builder()
            .email("alice@example.com")
            .validity(now - time::Duration::hours(1), expires)
            .issue();
        let opts = fx
            .opts("echo.svc.internal", &alice)
            .session_store(new_session_store());
        let first = async {
            let s = connect_with(fx.dp.addr(), &opts)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let kind = s.get_ref().1.handshake_kind();
            if kind != Some(HandshakeKind::Full) {
                return Err(format!("a {kind:?} handshake on a fresh session store"));
            }
            let back = echo_roundtrip_checked(s, b"first").await?;
            if back != b"first" {
                return Err(format!("echo {:?}", String::from_utf8_lossy(&back)));
            }
            Ok(())
        };
        // Accepted: the chain was valid when the session was made, whatever the clock
        // says now.
        match first.await {
            Ok(()) => return (opts, expires),
            // Refused or cut because the certificate had already expired: only too slow.
            Err(e) if time::OffsetDateTime::now_utc() >= expires - time::Duration::seconds(1) => {
                eprintln!(
                    "a {validity}s certificate expired before its session was set up ({e}); \
                     trying a longer one"
                );
                last = e;
            }
            Err(e) => panic!("alice's first connection (certificate valid for {validity}s): {e}"),
        }
    }
    panic!("even with a 9s certificate no session was set up before it expired: {last}");
}

/// [`echo_roundtrip`] that reports a failure instead of panicking.
async fn echo_roundtrip_checked(
    mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncWriteExt;
    tokio::time::timeout(STEP, async {
        s.write_all(payload).await?;
        s.shutdown().await
    })
    .await
    .map_err(|_| "write timed out".to_string())?
    .map_err(|e| format!("write: {e}"))?;
    read_to_end_or_alert(&mut s)
        .await
        .map_err(|e| format!("read: {e}"))
}

/// A resumed session whose certificate has expired since it was set up is refused: the
/// restored chain is checked against the clock again. A long-lived certificate's session,
/// resumed at the same moment, is let through: the refusal is the expiry's, not the
/// resumption's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_session_is_refused_once_the_certificate_has_expired() {
    let fx = Fixture::start().await;
    let control = fx
        .opts(
            "echo.svc.internal",
            &fx.pki.client_email("alice@example.com"),
        )
        .session_store(new_session_store());
    let s = connect_with(fx.dp.addr(), &control)
        .await
        .expect("the long-lived certificate's first connection");
    assert_eq!(echo_roundtrip(s, b"control").await, b"control");

    let (opts, expires) = short_lived_session(&fx).await;

    // Until the certificate has expired; webpki compares whole seconds, and the encoded
    // notAfter may be up to a second earlier than `expires`.
    let wait = (expires - time::OffsetDateTime::now_utc()).whole_milliseconds() + 1500;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    assert!(time::OffsetDateTime::now_utc() > expires + time::Duration::seconds(1));

    let s = connect_with(fx.dp.addr(), &control)
        .await
        .expect("the long-lived certificate's resumed connection");
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "the control session did not resume"
    );
    assert_eq!(echo_roundtrip(s, b"resumed").await, b"resumed");

    let before = fx.echo.connections();
    match connect_with(fx.dp.addr(), &opts).await {
        Err(e) => panic!(
            "expected a resumed handshake, got a refusal in it: {e} (alert {:?})",
            alert_of(&e)
        ),
        Ok(mut s) => {
            let kind = s.get_ref().1.handshake_kind();
            assert_eq!(
                kind,
                Some(HandshakeKind::Resumed),
                "the session did not resume"
            );
            match read_to_end_or_alert(&mut s).await {
                Ok(data) => {
                    let text = String::from_utf8_lossy(&data);
                    assert_eq!(
                        text, "ZTP-ERROR 403 forbidden\n",
                        "an expired certificate was let through on a {kind:?} handshake"
                    );
                    eprintln!("refused with the 403 line");
                }
                Err(e) => {
                    assert!(e.data().is_empty(), "data before refusal: {e}");
                    eprintln!("refused after the handshake: {e}");
                }
            }
        }
    }
    assert_eq!(
        fx.echo.connections(),
        before,
        "the expired client reached the backend"
    );
}
