//! HTTPS for the admin API when it is exposed beyond loopback (`--api-cert`,
//! `--api-key`): TLS 1.3 only. Handshakes run in each connection's own task, bounded in
//! time and in number by `ztp_infra::http`, so a slow client cannot stall the others.
//! The key enters as a rustls signer, so a remote one can replace it.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::sign::SingleCertAndKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use ztp_infra::http::Handshake;

/// Loads the API's certificate chain and key into a TLS 1.3 server config.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = ztp_infra::tls::provider();
    let certified = ztp_infra::tls::certified_key(cert, key, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The API's TLS handshake, for [`ztp_infra::http::serve`] (which bounds its time and
/// the connections waiting in it).
#[derive(Clone)]
pub struct Tls(pub TlsAcceptor);

impl Handshake for Tls {
    type Io = TlsStream<TcpStream>;
    async fn handshake(&self, tcp: TcpStream) -> io::Result<Self::Io> {
        self.0.accept(tcp).await
    }
}
