//! `ztpctl pki`: a CA and the certificates a gateway needs, without openssl.
//!
//! `init DIR` writes `ca.pem`, `ca.key`, `server.pem`, `server.key` (the names of the
//! original walkthrough); `issue` writes a client's `NAME.pem`/`NAME.key`; `sign` turns a
//! user's CSR into a certificate, so their key never leaves their machine; `node` writes a
//! data-plane node's `node-ID.pem`/`node-ID.key`, `connector` a connector's
//! `connector-NAME.pem`/`connector-NAME.key`. Keys are written 0600 and nothing is
//! overwritten without `--force`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use ztp_proto::names::{is_connector_uri, is_node_uri, uri_scheme};
use ztp_proto::parse_duration;

#[derive(Debug, Subcommand)]
pub enum PkiCmd {
    /// Create a CA and the data plane's server certificate in DIR.
    Init {
        /// The folder to write to (made if missing).
        dir: PathBuf,
        /// An RSA CA (4096 bits) and server key (2048) instead of ECDSA P-256.
        #[arg(long)]
        rsa: bool,
        /// DNS names of the server certificate (repeat).
        #[arg(long = "san", default_values_t = ["localhost".to_owned(), "*.svc.internal".to_owned()])]
        sans: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate for an identity: an email, a URI or a plain name (CN).
    Issue {
        /// An email (SAN email), a URI (SAN URI) or a plain name (CN).
        identity: String,
        /// Lifetime, e.g. 30m, 4h, 7d.
        #[arg(long, default_value = "12h", value_parser = parse_duration)]
        ttl: Duration,
        /// File name (NAME.pem, NAME.key); default: the email's local part, the URI's last
        /// segment, or the CN.
        #[arg(long)]
        name: Option<String>,
        /// The PKI folder (holding ca.pem and ca.key); files are written there.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Sign a certificate signing request (PEM): the user keeps their key.
    Sign {
        /// The request (PEM), e.g. from `openssl req -new`.
        csr: PathBuf,
        /// Lifetime, e.g. 30m, 4h, 7d.
        #[arg(long, default_value = "12h", value_parser = parse_duration)]
        ttl: Duration,
        /// The PKI folder (holding ca.pem and ca.key).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Where to write the certificate (default: DIR/NAME.pem).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing certificate.
        #[arg(long)]
        force: bool,
    },
    /// Revoke certificates through the control plane: by serial (hex), by certificate
    /// file, or every serial of a CRL. Data planes refuse them at the handshake and close
    /// live connections that use them.
    Revoke {
        /// Serials (hex) or certificate files (PEM).
        targets: Vec<String>,
        /// A CRL (PEM or DER) whose serials to revoke.
        #[arg(long, value_name = "FILE")]
        crl: Option<PathBuf>,
        #[command(flatten)]
        api: crate::Api,
    },
    /// Issue a data-plane node certificate (URI spiffe://DOMAIN/node/ID).
    Node {
        /// The node's id (letters, digits, `-`, `_`, `.`).
        id: String,
        /// Lifetime, e.g. 30d, 720h.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        ttl: Duration,
        /// The PKI folder (holding ca.pem and ca.key); files are written there.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The trust domain of the node's URI, spiffe://DOMAIN/node/ID.
        #[arg(long, default_value = ztp_proto::names::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a connector certificate (URI spiffe://DOMAIN/connector/NAME), for
    /// `ztpctl connector run`; register the name with `ztpctl connector add NAME`.
    Connector {
        /// The connector's name (letters, digits, `-`, `_`, `.`).
        name: String,
        /// Lifetime, e.g. 30d, 720h.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        ttl: Duration,
        /// The PKI folder (holding ca.pem and ca.key); files are written there.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The trust domain of the connector's URI, spiffe://DOMAIN/connector/NAME.
        #[arg(long, default_value = ztp_proto::names::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: PkiCmd) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init {
            dir,
            rsa,
            sans,
            force,
        } => {
            init(&dir, rsa, &sans, force)?;
            println!(
                "PKI in {}: ca.pem, ca.key, server.pem, server.key (server names: {})",
                dir.display(),
                sans.join(", ")
            );
            Ok(())
        }
        PkiCmd::Issue {
            identity,
            ttl,
            name,
            dir,
            force,
        } => {
            let name = name.unwrap_or_else(|| default_name(&identity));
            let (cert, key) = issue(&dir, &identity, ttl, &name, force)?;
            println!(
                "{} and {} for {identity}, valid {}",
                cert.display(),
                key.display(),
                human(ttl)
            );
            Ok(())
        }
        PkiCmd::Sign {
            csr,
            ttl,
            dir,
            out,
            force,
        } => {
            let (path, identity) = sign(&dir, &csr, ttl, out, force)?;
            println!("{} for {identity}, valid {}", path.display(), human(ttl));
            Ok(())
        }
        PkiCmd::Revoke { .. } => bail!("revoke talks to the control plane"),
        PkiCmd::Node {
            id,
            ttl,
            dir,
            trust_domain,
            force,
        } => {
            let (cert, key) = node(&dir, &id, &trust_domain, ttl, force)?;
            println!("{} and {} for node {id}", cert.display(), key.display());
            Ok(())
        }
        PkiCmd::Connector {
            name,
            ttl,
            dir,
            trust_domain,
            force,
        } => {
            let (cert, key, uri) = connector(&dir, &name, &trust_domain, ttl, force)?;
            println!(
                "{} and {} for connector {name} ({uri}), valid {}",
                cert.display(),
                key.display(),
                human(ttl)
            );
            Ok(())
        }
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The default file name for an identity.
pub fn default_name(identity: &str) -> String {
    let raw = if uri_scheme(identity).is_some() {
        identity
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(identity)
    } else if let Some((local, _)) = identity.split_once('@') {
        local
    } else {
        identity
    };
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() || clean.starts_with('.') {
        format!("client{clean}")
    } else {
        clean
    }
}

/// Writes a file whole, refusing to overwrite unless `force`; keys get mode 0600.
fn write_file(path: &Path, bytes: &[u8], private: bool, force: bool) -> anyhow::Result<()> {
    use ztp_infra::fs::{write_atomic, Existing};
    let mode = if private { 0o600 } else { 0o644 };
    let existing = if force {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    write_atomic(path, bytes, mode, existing).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!("{} exists; pass --force to overwrite it", path.display())
        } else {
            anyhow::anyhow!("cannot write {}: {e}", path.display())
        }
    })
}

fn refuse_existing(paths: &[&Path], force: bool) -> anyhow::Result<()> {
    if !force {
        for p in paths {
            if p.exists() {
                bail!("{} exists; pass --force to overwrite it", p.display());
            }
        }
    }
    Ok(())
}

fn rsa_key(bits: usize) -> anyhow::Result<KeyPair> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
        .context("RSA key generation failed")?;
    let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)?;
    Ok(KeyPair::from_pem_and_sign_algo(
        &pem,
        &rcgen::PKCS_RSA_SHA256,
    )?)
}

fn validity(p: &mut CertificateParams, ttl: Duration) -> anyhow::Result<()> {
    const MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    if ttl.is_zero() || ttl > MAX {
        bail!("--ttl must be more than zero and at most 100 years");
    }
    let now = OffsetDateTime::now_utc();
    // A minute of slack for clocks a little behind.
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::seconds(ttl.as_secs() as i64);
    Ok(())
}

fn random_serial(p: &mut CertificateParams) -> anyhow::Result<()> {
    use ring::rand::SecureRandom;
    let mut s = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    s[0] &= 0x7f; // positive
    p.serial_number = Some(rcgen::SerialNumber::from(s.to_vec()));
    Ok(())
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "ZTP CA");
    dn.push(DnType::OrganizationName, "ZTP");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Creates the CA and the server certificate.
pub fn init(dir: &Path, rsa: bool, sans: &[String], force: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = ["ca.pem", "ca.key", "server.pem", "server.key"].map(|f| dir.join(f));
    refuse_existing(
        &files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
        force,
    )?;
    let (ca_key, server_key) = if rsa {
        (rsa_key(4096)?, rsa_key(2048)?)
    } else {
        (KeyPair::generate()?, KeyPair::generate()?)
    };
    let mut ca = ca_params();
    validity(&mut ca, Duration::from_secs(10 * 365 * 24 * 3600))?;
    random_serial(&mut ca)?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let mut server = CertificateParams::new(sans.to_vec()).context("bad --san")?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        sans.first().map_or("ztp", String::as_str),
    );
    server.distinguished_name = dn;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    validity(&mut server, Duration::from_secs(365 * 24 * 3600))?;
    random_serial(&mut server)?;
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write_file(&files[0], ca_cert.pem().as_bytes(), false, force)?;
    write_file(&files[1], ca_key.serialize_pem().as_bytes(), true, force)?;
    write_file(&files[2], server_cert.pem().as_bytes(), false, force)?;
    write_file(
        &files[3],
        server_key.serialize_pem().as_bytes(),
        true,
        force,
    )?;
    Ok(())
}

/// The CA of a PKI folder, as an issuer.
fn load_ca(dir: &Path) -> anyhow::Result<(String, KeyPair)> {
    let cert = std::fs::read_to_string(dir.join("ca.pem")).with_context(|| {
        format!(
            "cannot read {}/ca.pem (run `ztpctl pki init {}` first)",
            dir.display(),
            dir.display()
        )
    })?;
    let key_pem = std::fs::read_to_string(dir.join("ca.key"))
        .with_context(|| format!("cannot read {}/ca.key", dir.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .or_else(|_| KeyPair::from_pem_and_sign_algo(&key_pem, &rcgen::PKCS_RSA_SHA256))
        .with_context(|| format!("{}/ca.key is not a usable key", dir.display()))?;
    Ok((cert, key))
}

/// The SAN (or CN) an identity becomes.
fn identity_params(identity: &str) -> anyhow::Result<CertificateParams> {
    if identity.trim().is_empty() || identity.chars().any(char::is_control) {
        bail!("{identity:?} is not an identity");
    }
    if is_node_uri(identity) {
        bail!("{identity:?} is a node identity; use `ztpctl pki node ID`");
    }
    if is_connector_uri(identity) {
        bail!(
            "{identity:?} is a connector identity, never a user's; use `ztpctl pki connector NAME`"
        );
    }
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if uri_scheme(identity).is_some() {
        p.subject_alt_names = vec![SanType::URI(identity.try_into().context("bad URI")?)];
        dn.push(DnType::CommonName, default_name(identity));
    } else if identity.contains('@') {
        p.subject_alt_names = vec![SanType::Rfc822Name(
            identity.try_into().context("bad email")?,
        )];
        dn.push(DnType::CommonName, default_name(identity));
    } else {
        dn.push(DnType::CommonName, identity);
    }
    p.distinguished_name = dn;
    Ok(p)
}

fn client_usage(p: &mut CertificateParams) {
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
}

/// Issues a client certificate and key: DIR/NAME.pem, DIR/NAME.key.
pub fn issue(
    dir: &Path,
    identity: &str,
    ttl: Duration,
    name: &str,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    refuse_existing(&[&cert_path, &key_path], force)?;
    let (ca_pem, ca_key) = load_ca(dir)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)
        .context("ca.pem is not a usable CA certificate")?;
    let mut p = identity_params(identity)?;
    client_usage(&mut p);
    validity(&mut p, ttl)?;
    random_serial(&mut p)?;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_file(&cert_path, cert.pem().as_bytes(), false, force)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true, force)?;
    Ok((cert_path, key_path))
}

/// Signs a CSR: the certificate carries the CSR's subject and names, checked like an
/// identity given to `issue`.
pub fn sign(
    dir: &Path,
    csr: &Path,
    ttl: Duration,
    out: Option<PathBuf>,
    force: bool,
) -> anyhow::Result<(PathBuf, String)> {
    let pem =
        std::fs::read_to_string(csr).with_context(|| format!("cannot read {}", csr.display()))?;
    let mut req = CertificateSigningRequestParams::from_pem(&pem).with_context(|| {
        format!(
            "{} is not a valid certificate signing request",
            csr.display()
        )
    })?;
    let identity = req
        .params
        .subject_alt_names
        .iter()
        .find_map(|s| match s {
            SanType::Rfc822Name(e) => Some(e.as_str().to_owned()),
            _ => None,
        })
        .or_else(|| {
            req.params.subject_alt_names.iter().find_map(|s| match s {
                SanType::URI(u) => Some(u.as_str().to_owned()),
                _ => None,
            })
        })
        .or_else(|| {
            req.params
                .distinguished_name
                .get(&DnType::CommonName)
                .map(dn_value)
        })
        .context("the request names no identity (SAN email, SAN URI or CN)")?;
    for s in &req.params.subject_alt_names {
        if let SanType::URI(u) = s {
            if is_node_uri(u.as_str()) {
                bail!(
                    "the request asks for a node identity ({}); use `ztpctl pki node`",
                    u.as_str()
                );
            }
            if is_connector_uri(u.as_str()) {
                bail!(
                    "the request asks for a connector identity ({}), never a user's; use \
                     `ztpctl pki connector`",
                    u.as_str()
                );
            }
        }
    }
    let path = out.unwrap_or_else(|| dir.join(format!("{}.pem", default_name(&identity))));
    refuse_existing(&[&path], force)?;
    let (ca_pem, ca_key) = load_ca(dir)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)
        .context("ca.pem is not a usable CA certificate")?;
    // The CA decides usage, validity and serial; the request only names the subject.
    req.params.is_ca = IsCa::NoCa;
    client_usage(&mut req.params);
    validity(&mut req.params, ttl)?;
    random_serial(&mut req.params)?;
    let cert = req.signed_by(&issuer)?;
    write_file(&path, cert.pem().as_bytes(), false, force)?;
    Ok((path, identity))
}

fn dn_value(v: &rcgen::DnValue) -> String {
    match v {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
        rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
        rcgen::DnValue::TeletexString(s) => s.as_str().to_owned(),
        rcgen::DnValue::BmpString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        rcgen::DnValue::UniversalString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => String::new(),
    }
}

/// Issues a node certificate: DIR/node-ID.pem, DIR/node-ID.key.
pub fn node(
    dir: &Path,
    id: &str,
    trust_domain: &str,
    ttl: Duration,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let uri = format!("spiffe://{trust_domain}/node/{id}");
    if ztp_proto::names::node_id(&uri, trust_domain) != Some(id) {
        bail!("{id:?} is not a node ID (letters, digits, '-', '_', '.')");
    }
    machine_cert(dir, "node", id, &uri, ttl, force)
}

/// A machine's client certificate (`kind` `node` or `connector`): `DIR/KIND-NAME.pem` and
/// its key, issued by the CA in `dir`, whose only SAN is `uri`.
fn machine_cert(
    dir: &Path,
    kind: &str,
    name: &str,
    uri: &str,
    ttl: Duration,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (
        dir.join(format!("{kind}-{name}.pem")),
        dir.join(format!("{kind}-{name}.key")),
    );
    refuse_existing(&[&cert_path, &key_path], force)?;
    let (ca_pem, ca_key) = load_ca(dir)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)
        .context("ca.pem is not a usable CA certificate")?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{kind} {name}"));
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    client_usage(&mut p);
    validity(&mut p, ttl)?;
    random_serial(&mut p)?;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_file(&cert_path, cert.pem().as_bytes(), false, force)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true, force)?;
    Ok((cert_path, key_path))
}

/// Issues a connector certificate: DIR/connector-NAME.pem, DIR/connector-NAME.key, with
/// the URI `spiffe://DOMAIN/connector/NAME` as its only name, for client authentication.
/// Returns the files and the URI.
pub fn connector(
    dir: &Path,
    name: &str,
    trust_domain: &str,
    ttl: Duration,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf, String)> {
    let uri = format!("spiffe://{trust_domain}/connector/{name}");
    // Read back as the data plane reads a connector's certificate.
    if trust_domain.is_empty() || ztp_proto::names::connector_name(&uri, trust_domain) != Some(name)
    {
        bail!(
            "{name:?} is not a connector name (letters, digits, '-', '_', '.'), or \
             {trust_domain:?} not a trust domain"
        );
    }
    let (cert_path, key_path) = machine_cert(dir, "connector", name, &uri, ttl, force)?;
    Ok((cert_path, key_path, uri))
}

/// The serials to revoke: hex serials as given, certificate files read, CRLs expanded.
pub fn revocation_serials(targets: &[String], crl: Option<&Path>) -> anyhow::Result<Vec<String>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::revocation_list::CertificateRevocationList;
    let hex = |b: &[u8]| ztp_proto::names::Serial::from_be_bytes(b).to_string();
    let mut out = Vec::new();
    for t in targets {
        let path = Path::new(t);
        if path.is_file() {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {t}"))?;
            let der = match x509_parser::pem::parse_x509_pem(&bytes) {
                Ok((_, pem)) => pem.contents,
                Err(_) => bytes,
            };
            let (_, cert) = X509Certificate::from_der(&der)
                .map_err(|e| anyhow::anyhow!("{t}: not a certificate: {e}"))?;
            out.push(hex(cert.raw_serial()));
        } else {
            ztp_proto::names::Serial::parse_hex(t)
                .map_err(|e| anyhow::anyhow!("{e} (nor a certificate file)"))?;
            out.push(t.clone());
        }
    }
    if let Some(crl) = crl {
        let bytes = std::fs::read(crl).with_context(|| format!("cannot read {}", crl.display()))?;
        let der = match x509_parser::pem::parse_x509_pem(&bytes) {
            Ok((_, pem)) => pem.contents,
            Err(_) => bytes,
        };
        let (_, list) = CertificateRevocationList::from_der(&der)
            .map_err(|e| anyhow::anyhow!("{}: not a CRL: {e}", crl.display()))?;
        out.extend(
            list.iter_revoked_certificates()
                .map(|r| hex(r.raw_serial())),
        );
    }
    if out.is_empty() {
        bail!("nothing to revoke: give serials, certificate files or --crl FILE");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_in_words() {
        assert_eq!(human(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(human(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(300)), "5m");
    }

    /// A connector's certificate: its URI as the only name, client authentication, the
    /// lifetime asked, a private key; a bad name or an existing file is refused.
    #[test]
    fn connector_certificates_carry_the_connector_uri() {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        use x509_parser::prelude::{FromDer, X509Certificate};

        let dir = std::env::temp_dir().join(format!("ztpctl-pki-connector-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir, false, &["localhost".into()], false).unwrap();
        let ttl = Duration::from_secs(7 * 86_400);
        let (cert, key, uri) = connector(&dir, "lab", "ztp.internal", ttl, false).unwrap();
        assert_eq!(uri, "spiffe://ztp.internal/connector/lab");
        assert_eq!(cert, dir.join("connector-lab.pem"));
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let pem = std::fs::read(&cert).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let (_, x) = X509Certificate::from_der(&pem.contents).unwrap();
        let mut names = vec![];
        let mut client_auth = false;
        for ext in x.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    names.extend(san.general_names.iter().map(|n| match n {
                        GeneralName::URI(u) => format!("uri {u}"),
                        other => format!("{other:?}"),
                    }))
                }
                ParsedExtension::ExtendedKeyUsage(eku) => client_auth = eku.client_auth,
                _ => {}
            }
        }
        assert_eq!(names, ["uri spiffe://ztp.internal/connector/lab"]);
        assert!(client_auth);
        assert!(!x.is_ca());
        let days =
            (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / 86_400;
        assert_eq!(days, 7, "a minute of slack is less than a day");
        assert_eq!(
            ztp_proto::names::node_id_of_cert(&pem.contents, "ztp.internal"),
            None,
            "a connector is not a node"
        );

        let e = connector(&dir, "lab", "ztp.internal", ttl, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        connector(&dir, "lab", "ztp.internal", ttl, true).unwrap();
        let (_, _, uri) = connector(&dir, "edge-1.b_c", "corp.example", ttl, false).unwrap();
        assert_eq!(uri, "spiffe://corp.example/connector/edge-1.b_c");
        for (name, domain) in [
            ("a b", "ztp.internal"),
            ("a/b", "ztp.internal"),
            ("a@b", "ztp.internal"),
            ("", "ztp.internal"),
            (&"x".repeat(129)[..], "ztp.internal"),
            ("lab", "a/b"),
            ("lab", ""),
        ] {
            let e = connector(&dir, name, domain, ttl, false).unwrap_err();
            assert!(
                e.to_string().contains("not a connector name"),
                "{name:?} {domain:?}: {e}"
            );
        }
        // Still never a user's.
        let e = issue(&dir, "spiffe://ztp.internal/connector/lab", ttl, "x", false).unwrap_err();
        assert!(e.to_string().contains("pki connector"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn default_names() {
        assert_eq!(default_name("alice@example.com"), "alice");
        assert_eq!(default_name("spiffe://example.org/ns/web"), "web");
        assert_eq!(default_name("Carol Smith"), "Carol_Smith");
        assert_eq!(default_name("../etc/passwd@x"), "client.._etc_passwd");
    }
}
