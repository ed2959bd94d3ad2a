//! Identity rules, table-driven over certificates made here with rcgen.

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, KeyPair, SanType, SerialNumber,
};

use super::*;

enum San {
    Email(&'static str),
    Uri(&'static str),
    Dns(&'static str),
}

fn cert(cn: Option<&str>, email_attr: Option<&str>, sans: &[San]) -> Vec<u8> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    if let Some(cn) = cn {
        p.distinguished_name.push(DnType::CommonName, cn);
    }
    if let Some(e) = email_attr {
        // PKCS#9 emailAddress, which must be ignored.
        p.distinguished_name
            .push(DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]), e);
    }
    for s in sans {
        p.subject_alt_names.push(match s {
            San::Email(e) => SanType::Rfc822Name((*e).try_into().unwrap()),
            San::Uri(u) => SanType::URI((*u).try_into().unwrap()),
            San::Dns(d) => SanType::DnsName((*d).try_into().unwrap()),
        });
    }
    p.serial_number = Some(SerialNumber::from(vec![0x00, 0x0a, 0x1b]));
    p.self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

/// A data-plane node's identity (DESIGN.md "Identities of machines").
const NODE: &str = "spiffe://ztp.internal/node/n1";
/// A connector's identity.
const CONNECTOR: &str = "spiffe://ztp.internal/connector/c1";

#[test]
fn identity_rules() {
    use IdentityKind::CommonName;
    type Want = Result<(&'static str, IdentityKind), IdentityError>;
    let table: Vec<(&str, Vec<u8>, Want)> = vec![
        (
            "email first, even after a URI",
            cert(
                Some("cn"),
                None,
                &[San::Uri("spiffe://x/a"), San::Email("alice@example.com")],
            ),
            Ok(("alice@example.com", IdentityKind::Email)),
        ),
        (
            "first of two emails",
            cert(None, None, &[San::Email("a@x"), San::Email("b@x")]),
            Ok(("a@x", IdentityKind::Email)),
        ),
        (
            "URI when no email",
            cert(
                Some("cn"),
                None,
                &[San::Dns("h.example"), San::Uri("spiffe://x/a")],
            ),
            Ok(("spiffe://x/a", IdentityKind::Uri)),
        ),
        (
            "CN when no email or URI SAN",
            cert(Some("carol"), None, &[San::Dns("h.example")]),
            Ok(("carol", CommonName)),
        ),
        (
            "CN without SANs",
            cert(Some("carol"), None, &[]),
            Ok(("carol", CommonName)),
        ),
        (
            "emailAddress attribute ignored",
            cert(Some("nobody"), Some("alice@example.com"), &[]),
            Ok(("nobody", CommonName)),
        ),
        (
            "emailAddress alone is no identity",
            cert(None, Some("alice@example.com"), &[]),
            Err(IdentityError::NoIdentity),
        ),
        (
            "nothing at all",
            cert(None, None, &[]),
            Err(IdentityError::NoIdentity),
        ),
        (
            "garbage",
            vec![0x30, 0x03, 0x02, 0x01],
            Err(IdentityError::Unparsable),
        ),
        (
            "a node's URI is never a user's",
            cert(Some("n1"), None, &[San::Uri(NODE)]),
            Err(IdentityError::NodeCertificate),
        ),
        (
            "a node's URI, whatever else the certificate names",
            cert(
                Some("alice"),
                None,
                &[San::Email("alice@example.com"), San::Uri(NODE)],
            ),
            Err(IdentityError::NodeCertificate),
        ),
        (
            "a node's URI in another trust domain",
            cert(None, None, &[San::Uri("spiffe://example.org/node/n1")]),
            Err(IdentityError::NodeCertificate),
        ),
        (
            "a connector's URI is never a user's",
            cert(Some("c1"), None, &[San::Uri(CONNECTOR)]),
            Err(IdentityError::ConnectorCertificate),
        ),
        (
            "a connector's URI, whatever else the certificate names",
            cert(
                None,
                None,
                &[San::Email("alice@example.com"), San::Uri(CONNECTOR)],
            ),
            Err(IdentityError::ConnectorCertificate),
        ),
        (
            "the path decides, not a look-alike",
            cert(None, None, &[San::Uri("spiffe://ztp.internal/nodes/n1")]),
            Ok(("spiffe://ztp.internal/nodes/n1", IdentityKind::Uri)),
        ),
        (
            "a node segment deeper in the path is a user's",
            cert(None, None, &[San::Uri("spiffe://ztp.internal/ns/node/x")]),
            Ok(("spiffe://ztp.internal/ns/node/x", IdentityKind::Uri)),
        ),
        (
            "a CN that reads like a node URI is only a CN",
            cert(Some(NODE), None, &[]),
            Ok((NODE, CommonName)),
        ),
    ];
    for (what, der, want) in table {
        let got = extract(&der).map(|i| (i.id, i.kind));
        let want = want.map(|(id, k)| (id.to_owned(), k));
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn serial_and_expiry_are_read() {
    let id = extract(&cert(Some("x"), None, &[])).unwrap();
    assert_eq!(id.serial.to_string(), "0a1b");
    assert!(id.not_after > 0);
}

#[test]
fn unparsable_san_denies_without_falling_back_to_cn() {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "alice");
    // A SAN extension whose content is not a GeneralNames sequence.
    p.custom_extensions.push(CustomExtension::from_oid_content(
        &[2, 5, 29, 17],
        vec![0x04, 0x01, 0xff],
    ));
    let der = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
    assert_eq!(extract(der.der()), Err(IdentityError::BadSan));
}

fn snapshot_with_user_identity(id: &str) -> String {
    format!(
        "version: 1\nservices: []\nusers:\n  - name: bob\n    identities: [\"bob@example.com\"]\n  \
         - name: mallory\n    identities: [\"{id}\"]\ngroups: []\nrevoked: []\n"
    )
}

/// The other half of the rule: no directory user may claim a node's identity, so no
/// snapshot the data plane accepts could let one in.
#[test]
fn a_snapshot_user_may_not_claim_a_node_uri() {
    let ok = ztp_proto::Snapshot::from_yaml(&snapshot_with_user_identity("spiffe://x/ns/y"));
    assert!(ok.is_ok(), "{ok:?}");
    let err = ztp_proto::Snapshot::from_yaml(&snapshot_with_user_identity(NODE)).unwrap_err();
    assert!(err.to_string().contains("users[1].identities[0]"), "{err}");
}

/// DESIGN.md: "A directory user may not claim a `/connector/` URI". `ztp_proto`'s
/// validation does not refuse it yet; certificates carrying one are refused by `extract`.
#[test]
fn a_snapshot_user_may_not_claim_a_connector_uri() {
    let err = ztp_proto::Snapshot::from_yaml(&snapshot_with_user_identity(CONNECTOR))
        .expect_err("a user claiming a connector's URI was accepted");
    assert!(err.to_string().contains("users[1].identities[0]"), "{err}");
}
