//! The listener's TLS: TLS 1.3 only, a client certificate required, chaining to
//! `--client-ca` and naming a data-plane node (`spiffe://DOMAIN/node/ID`). A user's
//! certificate from the same CA is refused in the handshake: the client sees the alert
//! on its first read, and the server logs the refusal.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::SingleCertAndKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The files of the listener's TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Why a client certificate that chains to the CA is refused: it names no node.
#[derive(Debug)]
pub struct NotANode;

impl fmt::Display for NotANode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a node certificate (its only URI SAN must be spiffe://DOMAIN/node/ID)")
    }
}

impl std::error::Error for NotANode {}

/// WebPKI verification against the client CA, then: the certificate must name a node.
struct NodeVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl fmt::Debug for NodeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl ClientCertVerifier for NodeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        if ztp_proto::names::node_id_of_cert(end_entity, &self.trust_domain).is_none() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotANode))),
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Whether a handshake error is the refusal of a certificate that names no node.
pub fn is_not_a_node(e: &std::io::Error) -> bool {
    let Some(inner) = e.get_ref() else {
        return false;
    };
    matches!(
        inner.downcast_ref::<rustls::Error>(),
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)))
            if o.0.downcast_ref::<NotANode>().is_some()
    )
}

/// Builds the listener's config from its files.
pub fn server_config(
    files: &TlsFiles,
    trust_domain: &str,
) -> Result<Arc<rustls::ServerConfig>, ztp_infra::tls::TlsError> {
    use ztp_infra::tls::TlsError;
    let provider = ztp_infra::tls::provider();
    let certified = ztp_infra::tls::certified_key(&files.cert, &files.key, &provider)?;
    let roots = ztp_infra::tls::read_roots(&files.client_ca)?;
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::BadCa {
            path: files.client_ca.clone(),
            reason: e.to_string(),
        })?;
    let verifier = Arc::new(NodeVerifier {
        webpki,
        trust_domain: trust_domain.to_owned(),
    });
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    Ok(Arc::new(config))
}

/// The node ID of a verified client certificate.
pub fn node_id(cert: &CertificateDer<'_>, trust_domain: &str) -> Option<String> {
    ztp_proto::names::node_id_of_cert(cert, trust_domain)
}
