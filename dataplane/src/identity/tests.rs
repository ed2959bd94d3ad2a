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
