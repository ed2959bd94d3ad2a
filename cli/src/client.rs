//! A small HTTP client for the admin API: one HTTP/1.1 request per connection (the CLI
//! makes a handful), over TCP or, for `https://` servers, TLS 1.3 with the CA given.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;

/// Where the control plane is and how to authenticate.
pub struct Client {
    scheme_https: bool,
    host: String,
    port: u16,
    token: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A response: status, ETag, and the body.
pub struct Reply {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).context("the server answered with invalid JSON")
    }
}

impl Client {
    pub fn new(server: &str, token: Option<String>, ca: Option<&Path>) -> anyhow::Result<Self> {
        let (https, rest) = if let Some(r) = server.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = server.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("server {server:?} must start with http:// or https://");
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse()
                    .with_context(|| format!("bad port in {server:?}"))?;
                (
                    h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                    port,
                )
            }
            _ => (authority.to_owned(), if https { 443 } else { 80 }),
        };
        let tls = if https {
            let ca = ca.context("an https:// server needs --api-ca FILE (or ZTP_API_CA)")?;
            let roots = ztp_infra::tls::read_roots(ca)?;
            let config = rustls::ClientConfig::builder_with_provider(ztp_infra::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(Client {
            scheme_https: https,
            host,
            port,
            token,
            tls,
        })
    }

    /// Sends a request; `body` is JSON unless `content_type` says otherwise.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &str)>,
        if_match: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| {
                format!(
                    "cannot reach the control plane at {}:{}",
                    self.host, self.port
                )
            })?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port));
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(tag) = if_match {
            req = req.header(hyper::header::IF_MATCH, tag);
        }
        let (bytes, ct) = body.unwrap_or((Vec::new(), "application/json"));
        let req = req
            .header(hyper::header::CONTENT_TYPE, ct)
            .body(Full::new(Bytes::from(bytes)))?;
        let resp = if self.scheme_https {
            let tls = self.tls.clone().context("no TLS config")?;
            let name = ServerName::try_from(self.host.clone())?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .context("TLS to the control plane failed")?;
            send(hyper_util::rt::TokioIo::new(stream), req).await?
        } else {
            send(hyper_util::rt::TokioIo::new(tcp), req).await?
        };
        Ok(resp)
    }
}

async fn send<IO>(io: IO, req: Request<Full<Bytes>>) -> anyhow::Result<Reply>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .context("the control plane closed the connection")?;
    let status = resp.status();
    let etag = resp
        .headers()
        .get(hyper::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply { status, etag, body })
}

/// Turns an error response into one clear line: `400 Bad Request: groups[0]: unknown
/// group "ops"`.
pub fn check(reply: Reply) -> anyhow::Result<Reply> {
    if reply.status.is_success() {
        return Ok(reply);
    }
    let status = reply.status;
    let detail = serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|v| {
            let errors: Vec<String> = v["errors"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            format!(
                                "{}: {}",
                                e["field"].as_str().unwrap_or(""),
                                e["message"].as_str().unwrap_or("")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            if errors.is_empty() {
                v["detail"].as_str().map(str::to_owned)
            } else {
                Some(errors.join("; "))
            }
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&reply.body).trim().to_owned());
    bail!("{status}: {detail}")
}
