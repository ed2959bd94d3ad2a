//! Identity extraction (DESIGN.md step 3): first SAN email, else first SAN URI, else the
//! subject CN; the subject `emailAddress` attribute is ignored; emails compare
//! case-insensitively. Checked through the `identity-echo` handler.

use ztp_tests::pki::OID_SUBJECT_ALT_NAME;

use crate::common::{assert_denied, whoami, whoami_ok, Fixture, SPIFFE_X};

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
