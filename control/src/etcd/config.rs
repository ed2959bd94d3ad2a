//! Settings, and the channels they make: one lazy HTTP/2 channel per endpoint, over
//! TCP or rustls.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::sign::SingleCertAndKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint};

use super::EtcdError;

/// How to reach an etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, `http://HOST:PORT` or `https://HOST:PORT`.
    pub endpoints: Vec<String>,
    /// The CA that signs the members' certificates; required for `https`.
    pub ca: Option<PathBuf>,
    /// The client certificate (chain) for etcd's `--client-cert-auth`; with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key; with `cert`.
    pub key: Option<PathBuf>,
    /// Bound on opening one connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Bound on one attempt on one endpoint. A write stuck on a member that lost its
    /// leader waits this long before the call moves on, so keep it short.
    pub attempt_timeout: Duration,
    /// Bound on a whole unary call: its attempts on every endpoint and the pauses while
    /// the cluster elects a leader (etcd's own election takes 1–2.8 s with its default
    /// timings).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Plain-HTTP settings with the default time bounds.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ca: None,
            cert: None,
            key: None,
            connect_timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(6),
        }
    }

    /// Adds TLS: the CA, and the client certificate and key if etcd asks for one.
    pub fn with_tls(mut self, ca: PathBuf, cert_and_key: Option<(PathBuf, PathBuf)>) -> Self {
        self.ca = Some(ca);
        if let Some((cert, key)) = cert_and_key {
            self.cert = Some(cert);
            self.key = Some(key);
        }
        self
    }
}

/// HTTP/2 keep-alive on TLS endpoints: a connection to a frozen member fails within
/// interval + timeout, busy or idle, so the next call to it fails to connect (certainly
/// not applied) instead of timing out (outcome unknown).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 keep-alive on plain-HTTP endpoints, where etcd 3.4 serves gRPC with grpc-go's
/// own HTTP/2 server and its keep-alive enforcement (5 s minimum between pings while it
/// sends nothing, no pings at all on a connection without streams: GOAWAY
/// "too_many_pings" after three). Only pings on busy connections, and rarely; watches
/// probe their streams themselves and calls have their attempt timeout. (On TLS
/// endpoints etcd serves gRPC through Go's net/http, which does not enforce this.)
const PLAIN_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A member's address as configured, and the channel to it.
pub(crate) struct Member {
    pub(crate) url: String,
    pub(crate) channel: Channel,
}

/// Checks the settings, loads the TLS material and makes one lazy channel per endpoint
/// (nothing is dialled yet). Needs a tokio runtime.
pub(crate) fn members(cfg: &EtcdConfig) -> Result<Vec<Member>, EtcdError> {
    if cfg.endpoints.is_empty() {
        return Err(EtcdError::Config("no etcd endpoint given".into()));
    }
    let parsed = cfg
        .endpoints
        .iter()
        .map(|url| parse_endpoint(url))
        .collect::<Result<Vec<_>, _>>()?;
    let wants_tls = cfg.ca.is_some() || cfg.cert.is_some() || cfg.key.is_some();
    let tls = if wants_tls {
        if let Some(plain) = parsed.iter().find(|e| !e.https) {
            return Err(EtcdError::Config(format!(
                "etcd endpoint {}: TLS files (--etcd-ca, --etcd-cert, --etcd-key) are given, \
                 so the endpoint must be https://",
                plain.url
            )));
        }
        Some(client_tls(cfg)?)
    } else {
        if let Some(secure) = parsed.iter().find(|e| e.https) {
            return Err(EtcdError::Config(format!(
                "etcd endpoint {}: https needs the CA that signs etcd's certificates (--etcd-ca)",
                secure.url
            )));
        }
        None
    };
    parsed
        .into_iter()
        .map(|e| {
            let connector = Connector {
                host: e.host.clone(),
                port: e.port,
                tls: tls.clone(),
                timeout: cfg.connect_timeout,
            };
            // The scheme is http because the connector does TLS itself.
            let endpoint = Endpoint::from_shared(format!("http://{}", e.authority))
                .map_err(|_| {
                    EtcdError::Config(format!("etcd endpoint {:?}: not a usable URL", e.url))
                })?
                .keep_alive_timeout(KEEPALIVE_TIMEOUT);
            let endpoint = if e.https {
                endpoint
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_while_idle(true)
            } else {
                endpoint
                    .http2_keep_alive_interval(PLAIN_KEEPALIVE_INTERVAL)
                    .keep_alive_while_idle(false)
            };
            let channel = endpoint.connect_with_connector_lazy(connector);
            Ok(Member {
                url: e.url,
                channel,
            })
        })
        .collect()
}

struct Parsed {
    url: String,
    https: bool,
    host: String,
    port: u16,
    authority: String,
}

fn parse_endpoint(url: &str) -> Result<Parsed, EtcdError> {
    let bad = || {
        EtcdError::Config(format!(
            "etcd endpoint {url:?}: expected http://HOST:PORT or https://HOST:PORT"
        ))
    };
    let uri: Uri = url.parse().map_err(|_| bad())?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some()
    {
        return Err(bad());
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(bad());
    }
    let port = authority.port_u16().ok_or_else(bad)?;
    Ok(Parsed {
        url: url.to_owned(),
        https,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        authority: authority.as_str().to_owned(),
    })
}

fn client_tls(cfg: &EtcdConfig) -> Result<TlsConnector, EtcdError> {
    let ca = cfg.ca.as_ref().ok_or_else(|| {
        EtcdError::Config(
            "--etcd-cert and --etcd-key need the CA that signs etcd's certificates (--etcd-ca)"
                .into(),
        )
    })?;
    let provider = ztp_infra::tls::provider();
    let roots =
        ztp_infra::tls::read_roots(ca).map_err(|e| EtcdError::Tls(format!("--etcd-ca: {e}")))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| EtcdError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let certified = ztp_infra::tls::certified_key(cert, key, &provider)
                .map_err(|e| EtcdError::Tls(format!("--etcd-cert/--etcd-key: {e}")))?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(EtcdError::Config(
                "--etcd-cert and --etcd-key go together".into(),
            ))
        }
    };
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector::from(Arc::new(tls)))
}

/// Any byte stream to a member.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Dials one member: TCP, then TLS when configured, within the connect timeout (done
/// here rather than by tonic so that a timeout is a connect error: nothing was sent).
#[derive(Clone)]
struct Connector {
    host: String,
    port: u16,
    tls: Option<TlsConnector>,
    timeout: Duration,
}

impl Service<Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let dial = async {
                let tcp = TcpStream::connect((this.host.as_str(), this.port)).await?;
                let _ = tcp.set_nodelay(true);
                let io: Box<dyn Io> = match &this.tls {
                    Some(tls) => {
                        let name = ServerName::try_from(this.host.clone())
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                        Box::new(tls.connect(name, tcp).await?)
                    }
                    None => Box::new(tcp),
                };
                Ok::<_, io::Error>(TokioIo::new(io))
            };
            tokio::time::timeout(this.timeout, dial)
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connecting took over {:?}", this.timeout),
                    )
                })?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(cfg: EtcdConfig) -> String {
        match members(&cfg) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted {cfg:?}"),
        }
    }

    #[tokio::test]
    async fn endpoints_are_checked() {
        assert!(members(&EtcdConfig::new([
            "http://127.0.0.1:2379",
            "http://[::1]:2379"
        ]))
        .is_ok());
        for url in [
            "127.0.0.1:2379",
            "unix:///tmp/etcd.sock",
            "http://127.0.0.1",
            "http://127.0.0.1:2379/v3",
            "http://user@127.0.0.1:2379",
            "http://:2379",
        ] {
            let e = err(EtcdConfig::new([url]));
            assert!(
                e.contains(url) && e.contains("expected http://HOST:PORT"),
                "{e}"
            );
        }
        assert!(err(EtcdConfig::new(Vec::<String>::new())).contains("no etcd endpoint"));
    }

    #[tokio::test]
    async fn tls_settings_are_checked() {
        let e = err(EtcdConfig::new(["https://127.0.0.1:2379"]));
        assert!(e.contains("--etcd-ca"), "{e}");
        let e =
            err(EtcdConfig::new(["http://127.0.0.1:2379"])
                .with_tls("/nonexistent/ca.pem".into(), None));
        assert!(e.contains("must be https://"), "{e}");
        let e = err(EtcdConfig::new(["https://127.0.0.1:2379"])
            .with_tls("/nonexistent/ca.pem".into(), None));
        assert!(
            e.contains("--etcd-ca") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let mut half = EtcdConfig::new(["https://127.0.0.1:2379"]);
        half.cert = Some("/nonexistent/cert.pem".into());
        let e = err(half);
        assert!(e.contains("--etcd-ca"), "{e}");
    }
}
