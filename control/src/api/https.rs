//! HTTPS for the admin API when it is exposed beyond loopback (`--api-cert`,
//! `--api-key`): TLS 1.3 only. Handshakes run in each connection's own task, bounded in
//! time and in number by `ztp_proto::http`, so a slow client cannot stall the others.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use ztp_proto::http::Handshake;

/// Loads the API's certificate chain and key into a TLS 1.3 server config.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read {}", cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate found",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the API certificate and key do not fit together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The API's TLS handshake, for [`ztp_proto::http::serve`] (which bounds its time and
/// the connections waiting in it).
#[derive(Clone)]
pub struct Tls(pub TlsAcceptor);

impl Handshake for Tls {
    type Io = TlsStream<TcpStream>;
    async fn handshake(&self, tcp: TcpStream) -> io::Result<Self::Io> {
        self.0.accept(tcp).await
    }
}
