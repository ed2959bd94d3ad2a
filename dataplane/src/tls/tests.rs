//! The verified-chain cache: a returning client skips the CA's signature, never the
//! checks that can change (dates, revoked serials, CA set).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::UnixTime;
use time::{Duration, OffsetDateTime};

use super::*;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "cache test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// A client certificate for `email`, valid for the next `days` days.
    fn client(&self, email: &str, serial: u8, days: i64) -> CertificateDer<'static> {
        self.client_with_serial(email, &[serial], days)
    }

    fn client_with_serial(&self, email: &str, serial: &[u8], days: i64) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::Rfc822Name(email.try_into().unwrap())];
        p.serial_number = Some(SerialNumber::from_slice(serial));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::hours(1);
        p.not_after = now + Duration::days(days);
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &self.issuer).unwrap().der().clone()
    }

    /// The data plane's material with this CA as the client CA set.
    fn material(&self) -> TlsMaterial {
        let dir = std::env::temp_dir().join(format!(
            "ztp-tls-cache-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let server = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("s.pem"), server.cert.pem()).unwrap();
        std::fs::write(dir.join("s.key"), server.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), self.issuer.pem()).unwrap();
        let files = TlsFiles {
            cert: dir.join("s.pem"),
            key: dir.join("s.key"),
            client_ca: dir.join("ca.pem"),
        };
        let m = TlsMaterial::load(&files, &provider()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        m
    }
}

fn verifier(material: &TlsMaterial, revoked: &[&str]) -> Arc<ClientVerifier> {
    let revoked = revoked
        .iter()
        .map(|s| Serial::parse_hex(s).unwrap())
        .collect();
    TlsConfigs::build(material, Arc::new(revoked), session_cache(), provider())
        .unwrap()
        .verifier
}

fn at(days_from_now: i64) -> UnixTime {
    let t = OffsetDateTime::now_utc() + Duration::days(days_from_now);
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.unix_timestamp() as u64))
}

#[test]
fn returning_chain_is_served_from_the_cache() {
    let ca = Ca::new();
    let m = ca.material();
    let leaf = ca.client("alice@example.com", 0x11, 7);
    let v = verifier(&m, &[]);
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_ok());
    assert_eq!(m.chains.len(), 1, "a verified chain is remembered");
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_ok());
    assert_eq!(m.chains.len(), 1);
    // A new snapshot (new verifier, same CA set) shares the cache.
    let v2 = verifier(&m, &[]);
    assert!(v2.verify_client_cert(&leaf, &[], at(0)).is_ok());
    assert_eq!(m.chains.len(), 1);
}

#[test]
fn cached_chain_is_still_refused_once_revoked() {
    let ca = Ca::new();
    let m = ca.material();
    let leaf = ca.client("alice@example.com", 0x22, 7);
    assert!(verifier(&m, &[])
        .verify_client_cert(&leaf, &[], at(0))
        .is_ok());
    let err = verifier(&m, &["22"])
        .verify_client_cert(&leaf, &[], at(0))
        .unwrap_err();
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::Revoked)
    );
}

#[test]
fn cached_chain_is_still_refused_once_expired() {
    let ca = Ca::new();
    let m = ca.material();
    let leaf = ca.client("alice@example.com", 0x33, 2);
    let v = verifier(&m, &[]);
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_ok());
    assert!(
        matches!(
            v.verify_client_cert(&leaf, &[], at(3)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ))
        ),
        "the clock is checked on every handshake, cached or not"
    );
}

#[test]
fn another_ca_set_does_not_inherit_the_cache() {
    let ca = Ca::new();
    let other = Ca::new();
    let leaf = ca.client("alice@example.com", 0x44, 7);
    let m = ca.material();
    assert!(verifier(&m, &[])
        .verify_client_cert(&leaf, &[], at(0))
        .is_ok());
    // Reloaded with a CA set that does not include the issuer: refused, whatever was
    // verified before.
    let reloaded = other.material();
    assert!(matches!(
        verifier(&reloaded, &[]).verify_client_cert(&leaf, &[], at(0)),
        Err(rustls::Error::InvalidCertificate(_))
    ));
}

#[test]
fn a_chain_refused_once_is_not_remembered() {
    let ca = Ca::new();
    let rogue = Ca::new();
    let m = ca.material();
    let leaf = rogue.client("mallory@example.com", 0x55, 7);
    let v = verifier(&m, &[]);
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_err());
    assert!(v.verify_client_cert(&leaf, &[], at(0)).is_err());
    assert_eq!(m.chains.len(), 0);
}

#[test]
fn a_serial_too_long_to_revoke_is_refused() {
    let ca = Ca::new();
    let m = ca.material();
    let v = verifier(&m, &[]);
    // Found by fuzzing: 21 octets verify with webpki but cannot be named in `revoked`.
    let long = ca.client_with_serial("alice@example.com", &[0x5a; 21], 7);
    assert!(matches!(
        v.verify_client_cert(&long, &[], at(0)),
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            _
        )))
    ));
    assert_eq!(m.chains.len(), 0, "not remembered");
    let twenty = ca.client_with_serial("alice@example.com", &[0x5a; 20], 7);
    assert!(v.verify_client_cert(&twenty, &[], at(0)).is_ok());
}
