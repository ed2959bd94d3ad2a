//! A throwaway PKI generated at test time with rcgen (ECDSA P-256).
//!
//! RSA is not offered here: rcgen on `ring` cannot generate RSA keys. The openssl interop
//! test builds an RSA PKI with the openssl CLI instead.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    CustomExtension, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// The OID of the subjectAltName extension (2.5.29.17).
pub const OID_SUBJECT_ALT_NAME: &[u64] = &[2, 5, 29, 17];

/// The OID of the PKCS #9 `emailAddress` subject attribute (1.2.840.113549.1.9.1).
pub const OID_EMAIL_ADDRESS: &[u64] = &[1, 2, 840, 113549, 1, 9, 1];

/// The default trust domain of node identities (`ztp-control --trust-domain`).
pub const TRUST_DOMAIN: &str = "ztp.internal";

/// The identity of data-plane node `id`: `spiffe://ztp.internal/node/ID`.
pub fn node_uri(id: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/node/{id}")
}

/// A certificate and its private key, in PEM and DER.
pub struct TestCert {
    /// The certificate, PEM (`CERTIFICATE`).
    pub cert_pem: String,
    /// The private key, PEM (PKCS #8 `PRIVATE KEY`).
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, DER (PKCS #8).
    pub key_der: PrivateKeyDer<'static>,
    /// The serial number as lower-case hex without leading zeros (e.g. `"3a9f..."`).
    pub serial: String,
}

impl TestCert {
    /// A certificate and key made elsewhere (e.g. by `ztpctl pki issue` or the openssl
    /// CLI), from their PEM text: the first `CERTIFICATE` block and the first private key
    /// (PKCS #8, PKCS #1 or SEC1). The serial is read from the certificate.
    ///
    /// # Errors
    /// If either does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<TestCert, String> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("not a PEM private key: {e}"))?;
        let serial = der_serial(&cert_der).ok_or("the certificate's serial does not parse")?;
        Ok(TestCert {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            cert_der,
            key_der,
            serial: hex_canonical(&serial),
        })
    }

    /// Reads `DIR/NAME.pem` and `DIR/NAME.key` (see [`TestCert::from_pem`]).
    ///
    /// # Panics
    /// If either is missing or does not parse.
    pub fn read(dir: &Path, name: &str) -> TestCert {
        let read = |ext: &str| {
            let p = dir.join(format!("{name}.{ext}"));
            std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
        };
        TestCert::from_pem(&read("pem"), &read("key"))
            .unwrap_or_else(|e| panic!("{}/{name}.pem and .key: {e}", dir.display()))
    }

    /// Writes `DIR/NAME.pem` (certificate) and `DIR/NAME.key` (key, mode 0600).
    pub fn write(&self, dir: &Path, name: &str) -> io::Result<()> {
        std::fs::write(dir.join(format!("{name}.pem")), &self.cert_pem)?;
        write_private(&dir.join(format!("{name}.key")), &self.key_pem)
    }

    /// The serial number in upper case, left-padded with `zeros` zeros: the same integer
    /// written differently (revocation lists compare serials as integers).
    pub fn serial_padded_upper(&self, zeros: usize) -> String {
        format!("{}{}", "0".repeat(zeros), self.serial.to_uppercase())
    }
}

impl Clone for TestCert {
    fn clone(&self) -> Self {
        TestCert {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
            serial: self.serial.clone(),
        }
    }
}

impl fmt::Debug for TestCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCert")
            .field("serial", &self.serial)
            .field("key", &"[elided]")
            .finish()
    }
}

/// A test certificate authority (ECDSA P-256) with a server certificate for the proxy.
///
/// The server certificate has the SANs `DNS:localhost` and `DNS:*.svc.internal` and the
/// serverAuth extended key usage.
pub struct TestPki {
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate, PEM: the data plane's `--client-ca` and the client's trust root.
    pub ca_pem: String,
    /// The CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// The proxy's server certificate and key.
    pub server: TestCert,
    counter: AtomicU64,
}

impl fmt::Debug for TestPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPki")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// Creates a CA named `ZTP Test CA` and the server certificate.
    pub fn new() -> TestPki {
        Self::with_ca_name("ZTP Test CA")
    }

    /// Creates a CA with the given common name and the server certificate.
    pub fn with_ca_name(ca_cn: &str) -> TestPki {
        crate::install_crypto_provider();
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ZTP tests");
        dn.push(DnType::CommonName, ca_cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(30);
        params.serial_number = Some(SerialNumber::from_slice(&[0x01, 0x23, 0x45, 0x67]));
        let key = KeyPair::generate().expect("generate CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        let ca_pem = ca.pem();
        let ca_der = ca.der().clone();
        let mut pki = TestPki {
            ca,
            ca_pem,
            ca_der,
            server: placeholder_cert(),
            counter: AtomicU64::new(1),
        };
        pki.server = pki
            .builder()
            .cn("ztp-dataplane")
            .dns("localhost")
            .dns("*.svc.internal")
            .server_auth()
            .issue();
        pki
    }

    /// A builder for a client certificate issued by this CA (clientAuth EKU, valid from one
    /// hour ago for seven days, no subject and no SAN until you add them).
    pub fn builder(&self) -> CertBuilder<'_> {
        let now = OffsetDateTime::now_utc();
        CertBuilder {
            pki: self,
            sans: Vec::new(),
            dn: DistinguishedName::new(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(7),
            serial: None,
            eku: ExtendedKeyUsagePurpose::ClientAuth,
            extensions: Vec::new(),
            key: None,
        }
    }

    /// A client certificate whose only SAN is the email `email`.
    pub fn client_email(&self, email: &str) -> TestCert {
        self.builder().email(email).issue()
    }

    /// A client certificate whose only SAN is the URI `uri` (e.g. a SPIFFE ID).
    pub fn client_uri(&self, uri: &str) -> TestCert {
        self.builder().uri(uri).issue()
    }

    /// A data-plane node's certificate: the only SAN is the URI
    /// `spiffe://ztp.internal/node/ID` ([`node_uri`]), subject `CN=ID`, clientAuth.
    pub fn node(&self, id: &str) -> TestCert {
        self.builder().cn(id).uri(&node_uri(id)).issue()
    }

    /// A client certificate with subject `CN=cn` and no SAN extension at all.
    pub fn client_cn(&self, cn: &str) -> TestCert {
        self.builder().cn(cn).issue()
    }

    /// A client certificate with the SAN email `email`, issued by a different CA that
    /// nobody trusts.
    pub fn rogue(&self, email: &str) -> TestCert {
        TestPki::with_ca_name("Rogue CA").client_email(email)
    }

    /// A CRL signed by this CA that lists `serials` (hex, any case, leading zeros
    /// allowed), issued an hour ago and due again in a day: PEM (`X509 CRL`) and DER.
    ///
    /// # Panics
    /// If a serial is not hex.
    pub fn crl(&self, serials: &[&str]) -> (String, Vec<u8>) {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&hex_bytes(s)),
                revocation_time: now - Duration::hours(1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from_slice(&[0x01]),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.ca).expect("sign the CRL");
        (crl.pem().expect("CRL PEM"), crl.der().to_vec())
    }

    /// Writes `ca.pem`, `server.pem` and `server.key` (mode 0600) into `dir`.
    pub fn write_files(&self, dir: &Path) -> io::Result<()> {
        std::fs::write(dir.join("ca.pem"), &self.ca_pem)?;
        self.server.write(dir, "server")
    }

    fn next_serial(&self, public_key_der: &[u8]) -> Vec<u8> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut h = Sha256::new();
        h.update(public_key_der);
        h.update(n.to_be_bytes());
        let mut serial = h.finalize()[..16].to_vec();
        // Positive, and no leading zero nibble so that the hex form is canonical.
        serial[0] = (serial[0] & 0x7f) | 0x10;
        serial
    }
}

/// Builds a certificate issued by a [`TestPki`]: any mix of SANs, subject attributes,
/// validity and serial number.
#[must_use = "call issue() to get the certificate"]
pub struct CertBuilder<'a> {
    pki: &'a TestPki,
    sans: Vec<SanType>,
    dn: DistinguishedName,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    serial: Option<Vec<u8>>,
    eku: ExtendedKeyUsagePurpose,
    extensions: Vec<CustomExtension>,
    key: Option<KeyPair>,
}

impl CertBuilder<'_> {
    /// Adds a SAN email (rfc822Name). SANs keep the order they are added in.
    pub fn email(mut self, email: &str) -> Self {
        self.sans.push(SanType::Rfc822Name(
            email.try_into().expect("email SAN must be ASCII"),
        ));
        self
    }

    /// Adds a SAN URI.
    pub fn uri(mut self, uri: &str) -> Self {
        self.sans
            .push(SanType::URI(uri.try_into().expect("URI SAN must be ASCII")));
        self
    }

    /// Adds a SAN DNS name.
    pub fn dns(mut self, name: &str) -> Self {
        self.sans.push(SanType::DnsName(
            name.try_into().expect("DNS SAN must be ASCII"),
        ));
        self
    }

    /// Sets the subject common name.
    pub fn cn(mut self, cn: &str) -> Self {
        self.dn.push(DnType::CommonName, cn);
        self
    }

    /// Sets the subject organization.
    pub fn org(mut self, o: &str) -> Self {
        self.dn.push(DnType::OrganizationName, o);
        self
    }

    /// Sets the PKCS #9 `emailAddress` attribute in the subject DN (an IA5String), which
    /// ZTP must ignore.
    pub fn subject_email_attr(mut self, email: &str) -> Self {
        self.dn.push(
            DnType::CustomDnType(OID_EMAIL_ADDRESS.to_vec()),
            DnValue::Ia5String(email.try_into().expect("emailAddress must be ASCII")),
        );
        self
    }

    /// Sets the validity window.
    pub fn validity(mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Makes the certificate expired: valid from ten days ago until yesterday.
    pub fn expired(self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.validity(now - Duration::days(10), now - Duration::days(1))
    }

    /// Makes the certificate not yet valid: valid from tomorrow on.
    pub fn not_yet_valid(self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.validity(now + Duration::days(1), now + Duration::days(10))
    }

    /// Sets the serial number (big-endian bytes; keep the first byte in 0x01..=0x7f so the
    /// encoding is the bytes as given).
    pub fn serial(mut self, serial: &[u8]) -> Self {
        self.serial = Some(serial.to_vec());
        self
    }

    /// Uses the serverAuth extended key usage instead of clientAuth.
    pub fn server_auth(mut self) -> Self {
        self.eku = ExtendedKeyUsagePurpose::ServerAuth;
        self
    }

    /// Adds a raw (non-critical) extension: `oid` and its DER content as given, unchecked.
    /// With [`OID_SUBJECT_ALT_NAME`] and no other SAN this makes a certificate whose SAN
    /// extension does not parse.
    pub fn raw_extension(mut self, oid: &[u64], content: &[u8]) -> Self {
        self.extensions
            .push(CustomExtension::from_oid_content(oid, content.to_vec()));
        self
    }

    /// Issues the certificate for this key (of any type rcgen reads: ECDSA P-256/P-384,
    /// Ed25519, RSA) instead of a fresh P-256 one.
    pub fn key(mut self, key: KeyPair) -> Self {
        self.key = Some(key);
        self
    }

    /// Issues the certificate (for a fresh P-256 key unless [`CertBuilder::key`] gave
    /// one).
    pub fn issue(self) -> TestCert {
        let key = match self.key {
            Some(k) => k,
            None => KeyPair::generate().expect("generate leaf key"),
        };
        let serial = self
            .serial
            .unwrap_or_else(|| self.pki.next_serial(key.public_key_raw()));
        let mut params = CertificateParams::default();
        params.distinguished_name = self.dn;
        params.subject_alt_names = self.sans;
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![self.eku];
        params.use_authority_key_identifier_extension = true;
        params.custom_extensions = self.extensions;
        let cert = params
            .signed_by(&key, &self.pki.ca)
            .expect("sign leaf certificate");
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der,
            serial: hex_canonical(&serial),
        }
    }
}

/// Lower-case hex of a big-endian integer without leading zeros (`"0"` for zero).
pub fn hex_canonical(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The bytes of a hex integer (leading zeros kept as given; an odd length is padded on
/// the left).
///
/// # Panics
/// If `hex` is not hex.
pub fn hex_bytes(hex: &str) -> Vec<u8> {
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex.to_string()
    };
    (0..padded.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&padded[i..i + 2], 16)
                .unwrap_or_else(|_| panic!("{hex:?} is not hex"))
        })
        .collect()
}

/// One DER TLV at the start of `der`: (tag, contents, rest).
fn der_tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The serial number (big-endian bytes as encoded) of a DER certificate.
pub fn der_serial(cert: &[u8]) -> Option<Vec<u8>> {
    let (0x30, cert, _) = der_tlv(cert)? else {
        return None;
    };
    let (0x30, mut tbs, _) = der_tlv(cert)? else {
        return None;
    };
    let (tag, contents, rest) = der_tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    } else if tag == 0x02 {
        return Some(contents.to_vec());
    }
    match der_tlv(tbs)? {
        (0x02, serial, _) => Some(serial.to_vec()),
        _ => None,
    }
}

fn placeholder_cert() -> TestCert {
    TestCert {
        cert_pem: String::new(),
        key_pem: String::new(),
        cert_der: CertificateDer::from(Vec::new()),
        key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(Vec::new())),
        serial: String::new(),
    }
}

/// Writes a secret file with mode 0600 (set before any byte is written).
pub(crate) fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())
}
