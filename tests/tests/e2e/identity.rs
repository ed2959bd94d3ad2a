//! Identity extraction (DESIGN.md step 3): first SAN email, else first SAN URI, else the
//! subject CN; the subject `emailAddress` attribute is ignored; emails compare
//! case-insensitively. Checked through the `identity-echo` handler.

use tokio::net::TcpStream;
use ztp_tests::client::{handshake, read_to_end_or_alert};
use ztp_tests::dataplane::check;
use ztp_tests::pki::{node_uri, OID_SUBJECT_ALT_NAME, TRUST_DOMAIN};
use ztp_tests::{TempDir, TestCert};

use crate::common::{assert_denied, whoami, whoami_ok, Fixture, SPIFFE_X, STEP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_uri_is_the_identity() {
    let fx = Fixture::start().await;
    let cert = fx.pki.client_uri(SPIFFE_X);
    let who = whoami_ok(&fx, &cert).await;
    assert_eq!(
        who.get("identity").map(String::as_str),
        Some(SPIFFE_X),
        "{who:?}"
    );
    assert_eq!(
        who.get("user").map(String::as_str),
        Some("svc-x"),
        "{who:?}"
    );
    assert_eq!(
        who.get("service").map(String::as_str),
        Some("whoami.svc.internal"),
        "{who:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cn_is_the_identity_without_san() {
    let fx = Fixture::start().await;
    let cert = fx.pki.client_cn("carol");
    let who = whoami_ok(&fx, &cert).await;
    assert_eq!(
        who.get("identity").map(String::as_str),
        Some("carol"),
        "{who:?}"
    );
    assert_eq!(
        who.get("user").map(String::as_str),
        Some("carol"),
        "{who:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_identity_compares_case_insensitively() {
    let fx = Fixture::start().await;
    let cert = fx.pki.client_email("Alice@Example.COM");
    let who = whoami_ok(&fx, &cert).await;
    assert!(
        who.get("identity")
            .is_some_and(|i| i.eq_ignore_ascii_case("alice@example.com")),
        "{who:?}"
    );
    assert_eq!(
        who.get("user").map(String::as_str),
        Some("alice"),
        "{who:?}"
    );
    assert!(
        who.get("groups").is_some_and(|g| g.contains("admins")),
        "alice's groups are reported: {who:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_email_address_attribute_is_ignored() {
    let fx = Fixture::start().await;
    // emailAddress=alice@example.com in the subject, CN=nobody, no SAN: the identity is
    // "nobody", which no user claims.
    let cert = fx
        .pki
        .builder()
        .subject_email_attr("alice@example.com")
        .cn("nobody")
        .issue();
    match whoami(&fx, &cert).await {
        Err(text) => assert_eq!(text, "ZTP-ERROR 403 forbidden\n"),
        Ok(who) => panic!("the emailAddress attribute was used as an identity: {who:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_san_email_wins_over_uri_and_cn() {
    let fx = Fixture::start().await;
    let cert = fx
        .pki
        .builder()
        .cn("carol")
        .uri(SPIFFE_X)
        .email("bob@example.com")
        .email("alice@example.com")
        .issue();
    let who = whoami_ok(&fx, &cert).await;
    assert_eq!(
        who.get("identity").map(String::as_str),
        Some("bob@example.com"),
        "{who:?}"
    );
    assert_eq!(who.get("user").map(String::as_str), Some("bob"), "{who:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_uri_wins_over_cn() {
    let fx = Fixture::start().await;
    let cert = fx
        .pki
        .builder()
        .cn("carol")
        .dns("x.example.org")
        .uri(SPIFFE_X)
        .issue();
    let who = whoami_ok(&fx, &cert).await;
    assert_eq!(
        who.get("identity").map(String::as_str),
        Some(SPIFFE_X),
        "{who:?}"
    );
    assert_eq!(
        who.get("user").map(String::as_str),
        Some("svc-x"),
        "{who:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uri_identity_compares_exactly() {
    let fx = Fixture::start().await;
    let cert = fx.pki.client_uri("spiffe://example.org/ns/X");
    match whoami(&fx, &cert).await {
        Err(text) => assert_eq!(text, "ZTP-ERROR 403 forbidden\n"),
        Ok(who) => panic!("a URI differing in case matched a user: {who:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_without_identity_is_denied() {
    let fx = Fixture::start().await;
    // A DNS SAN only, no CN: no email, no URI, no CN.
    let cert = fx.pki.builder().dns("carol.example.org").issue();
    let how = assert_denied(&fx, "whoami.svc.internal", &cert).await;
    eprintln!("no-identity certificate: {how}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_san_is_denied_without_falling_back_to_cn() {
    let fx = Fixture::start().await;
    // A SAN extension whose content is truncated DER, and CN=carol (a real user).
    let cert = fx
        .pki
        .builder()
        .cn("carol")
        .raw_extension(OID_SUBJECT_ALT_NAME, &[0x30, 0x03, 0x82, 0x05, 0x61])
        .issue();
    let how = assert_denied(&fx, "whoami.svc.internal", &cert).await;
    eprintln!("unparsable SAN: {how}");
}

/// Presents `cert` to `whoami.svc.internal`: it must get the 403 line and nothing else,
/// and the data plane must record the refusal as one of identity (not, say, of a user
/// not found), reaching no backend.
async fn assert_no_identity(fx: &Fixture, cert: &TestCert, what: &str) {
    let before = fx.backend_connections();
    let tcp = TcpStream::connect(fx.dp.addr()).await.expect("tcp connect");
    let local = tcp.local_addr().expect("local address");
    let mut s = handshake(tcp, &fx.opts("whoami.svc.internal", cert))
        .await
        .unwrap_or_else(|e| panic!("{what}: the handshake (a valid chain) failed: {e}"));
    match read_to_end_or_alert(&mut s).await {
        Ok(data) => assert_eq!(
            String::from_utf8_lossy(&data),
            "ZTP-ERROR 403 forbidden\n",
            "{what} was taken for a user's"
        ),
        Err(e) => panic!("{what}: expected the 403 line, got {e}"),
    }
    let ev = fx
        .dp
        .wait_for_connection_event(local, STEP)
        .await
        .unwrap_or_else(|| panic!("{what}: no connection record"));
    assert_eq!(ev["reason"], "no identity", "{what}: {ev}");
    assert_eq!(
        fx.backend_connections(),
        before,
        "{what}: a backend was contacted"
    );
}

/// DESIGN.md "Identities of machines": a data-plane node's certificate (URI SAN
/// `spiffe://ztp.internal/node/ID`, issued by the client CA) is never a user's, even when
/// it also names a real user's email, which alone would be let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificate_is_never_a_user() {
    let fx = Fixture::start().await;
    // Control: the same email alone is alice.
    let alice = fx.pki.client_email("alice@example.com");
    let who = whoami_ok(&fx, &alice).await;
    assert_eq!(
        who.get("user").map(String::as_str),
        Some("alice"),
        "{who:?}"
    );

    assert_no_identity(&fx, &fx.pki.node("n1"), "a node's certificate").await;
    let with_email = fx
        .pki
        .builder()
        .cn("n1")
        .email("alice@example.com")
        .uri(&node_uri("n1"))
        .issue();
    assert_no_identity(
        &fx,
        &with_email,
        "a node's certificate naming alice's email",
    )
    .await;
}

/// DESIGN.md "Identities of machines": a connector's certificate (URI SAN
/// `spiffe://ztp.internal/connector/NAME`, from the client CA set) is never a user's,
/// whatever else it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_certificate_is_never_a_user() {
    let fx = Fixture::start().await;
    let connector = format!("spiffe://{TRUST_DOMAIN}/connector/c1");
    let plain = fx.pki.builder().cn("c1").uri(&connector).issue();
    assert_no_identity(&fx, &plain, "a connector's certificate").await;
    let with_email = fx
        .pki
        .builder()
        .email("alice@example.com")
        .uri(&connector)
        .issue();
    assert_no_identity(
        &fx,
        &with_email,
        "a connector's certificate naming alice's email",
    )
    .await;
}

/// The directory side of the rule: `ztp-dataplane --check` refuses a snapshot whose user
/// claims a node's URI, naming the field.
#[test]
fn snapshot_user_claiming_a_node_uri_is_invalid() {
    let dir = TempDir::new("node-claim");
    let path = dir.join("snapshot.yaml");
    let yaml = |id: &str| {
        format!(
            "version: 1\nusers:\n  - name: bob\n    identities: [\"bob@example.com\"]\n  \
             - name: mallory\n    identities: [\"{id}\"]\n"
        )
    };
    std::fs::write(&path, yaml(SPIFFE_X)).expect("write snapshot");
    let out = check(&path);
    assert_eq!(out.status.code(), Some(0), "control: {out:?}");
    std::fs::write(&path, yaml(&node_uri("n1"))).expect("write snapshot");
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a user claimed a node URI: {out:?}"
    );
    assert!(stderr.contains("users[1].identities[0]"), "{stderr}");
}
