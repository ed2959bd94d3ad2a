//! TLS material from PEM files: certificate chains, private keys and CA sets.
//!
//! A server's (or a client's) own certificate and key become one [`CertifiedKey`] whose
//! key is a rustls [`SigningKey`]: a config serves it through a resolver
//! ([`SingleCertAndKey`](rustls::sign::SingleCertAndKey)), never from raw key bytes, so
//! a remote signer can replace the local key without touching the config around it.
//!
//! Every error names the file it is about; none carries key bytes (a PEM parse error
//! reports a position or a kind, never the content).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::RootCertStore;

/// The crypto provider: ring, one choice for the whole process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why TLS material could not be loaded (or a config built from it).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read, or is not PEM.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: pem::Error },
    /// The file holds no certificate.
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    /// The file holds no private key, or one the provider cannot use.
    #[error("{path}: no usable private key: {reason}")]
    Key { path: PathBuf, reason: String },
    /// The key is not the one the certificate names.
    #[error("{cert} and {key} do not belong together: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    /// A CA certificate cannot serve as a trust anchor.
    #[error("{path}: bad CA certificate: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// A rustls config cannot be built from the material.
    #[error("cannot build the TLS config: {0}")]
    Config(String),
}

/// Reads every certificate of a PEM file, in order (a chain: leaf first); at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file: PKCS#8, PKCS#1 or SEC1.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Key {
            path: path.to_owned(),
            reason: "no PEM private key in the file".into(),
        },
        source => TlsError::Read {
            path: path.to_owned(),
            source,
        },
    })
}

/// Loads the private key of a PEM file as a signer of `provider`.
pub fn load_signing_key(
    provider: &CryptoProvider,
    path: &Path,
) -> Result<Arc<dyn SigningKey>, TlsError> {
    let key = read_private_key(path)?;
    provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Loads a certificate chain and its private key as one [`CertifiedKey`], checked to
/// belong together (the key's public half is the leaf's).
pub fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certs(cert)?;
    let signing = load_signing_key(provider, key)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(certified))
}

/// Reads a CA set (one or more PEM certificates) as trust anchors.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs(path)? {
        roots.add(ca).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A client verifier for machine ports (the control plane's gRPC port, the key server):
/// WebPKI against `roots`, then the certificate must name a node of `trust_domain`
/// (`spiffe://DOMAIN/node/ID`). Any other certificate from the CA (a user's, a
/// connector's) is refused with `ApplicationVerificationFailure` (the `access_denied`
/// alert): see [`is_not_a_node`].
pub fn node_verifier(
    roots: RootCertStore,
    provider: Arc<CryptoProvider>,
    trust_domain: &str,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, rustls::server::VerifierBuilderError>
{
    let webpki =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()?;
    Ok(Arc::new(NodeVerifier {
        webpki,
        trust_domain: trust_domain.to_owned(),
    }))
}

/// Whether a handshake error is [`node_verifier`]'s refusal of a certificate that names
/// no node.
pub fn is_not_a_node(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    )
}

struct NodeVerifier {
    webpki: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    trust_domain: String,
}

impl std::fmt::Debug for NodeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl rustls::server::danger::ClientCertVerifier for NodeVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        if ztp_proto::names::node_id_of_cert(end_entity, &self.trust_domain).is_none() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    use crate::test_dir::Dir;

    fn self_signed() -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key)
    }

    #[test]
    fn loads_a_certified_key_and_a_ca_set() {
        let dir = Dir::new("tls-ok");
        let (cert_pem, key) = self_signed();
        let cert = dir.file("c.pem", &cert_pem);
        let key = dir.file("c.key", &key.serialize_pem());
        let ck = certified_key(&cert, &key, &provider()).unwrap();
        assert_eq!(ck.cert.len(), 1);
        assert_eq!(read_roots(&cert).unwrap().len(), 1);
    }

    #[test]
    fn errors_name_the_file_and_never_the_key() {
        let dir = Dir::new("tls-err");
        let (cert_pem, key) = self_signed();
        let (_, other) = self_signed();
        let cert = dir.file("c.pem", &cert_pem);
        let key_pem = key.serialize_pem();
        let key = dir.file("c.key", &key_pem);
        let other = dir.file("o.key", &other.serialize_pem());
        let empty = dir.file("empty.pem", "");
        let missing = dir.0.join("missing.pem");
        let p = provider();

        let e = certified_key(&cert, &other, &p).unwrap_err().to_string();
        assert!(
            e.contains("c.pem") && e.contains("o.key") && e.contains("do not belong together"),
            "{e}"
        );
        let e = certified_key(&empty, &key, &p).unwrap_err().to_string();
        assert!(e.ends_with("empty.pem: no certificate found"), "{e}");
        let e = certified_key(&cert, &cert, &p).unwrap_err().to_string();
        assert!(
            e.ends_with("c.pem: no usable private key: no PEM private key in the file"),
            "{e}"
        );
        let e = read_roots(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot read ") && e.contains("missing.pem"),
            "{e}"
        );
        // A key given where certificates are expected: nothing of it in the error.
        let e = read_roots(&key).unwrap_err().to_string();
        assert!(e.contains("c.key: no certificate found"), "{e}");
        let body: String = key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(!e.contains(&body[..16]), "{e}");
    }
}
