//! The listener's TLS: TLS 1.3 only, a client certificate required, chaining to
//! `--client-ca` and naming a data-plane node (`spiffe://DOMAIN/node/ID`). A user's
//! certificate from the same CA is refused in the handshake: the client sees the alert
//! on its first read, and the server logs the refusal.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::sign::SingleCertAndKey;

/// The files of the listener's TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Whether a handshake error is the refusal of a certificate that names no node.
pub fn is_not_a_node(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_some_and(ztp_infra::tls::is_not_a_node)
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
    let verifier =
        ztp_infra::tls::node_verifier(roots, provider.clone(), trust_domain).map_err(|e| {
            TlsError::BadCa {
                path: files.client_ca.clone(),
                reason: e.to_string(),
            }
        })?;
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
