//! A small HTTP client for the admin API: one HTTP/1.1 request per connection (the CLI
//! makes a handful), over TCP or, for `https://` servers, TLS 1.3 with the CA given.
//!
//! The failures people meet first get one line that says what to do: no token and a
//! refused token are told apart, and a scheme that does not match what the port speaks
//! (`http://` to the HTTPS API, `https://` to a plain one) is named as such rather than
//! as a TLS or HTTP parse error.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What `ztpctl` says when the server wants a token and none was given.
pub const NO_TOKEN: &str = "no token: set --token, ZTP_TOKEN or token in ~/.config/ztp/config.toml";

/// What `ztpctl` says when the server refuses the token given.
pub const REFUSED_TOKEN: &str =
    "the server refused the token (401): it is wrong, revoked, or another control plane's";

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

/// A host that names this machine: `localhost` or a loopback address.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
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
        if !https && !is_loopback(&host) {
            // The bearer token would cross the network in clear text: the API is plain
            // HTTP only on loopback, HTTPS when exposed (`--api-cert`).
            bail!(
                "refusing to send the token in clear text to {authority}: plain http:// is for \
                 loopback only; use https://{authority} with --api-ca"
            );
        }
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
        let at = format!("{}:{}", self.host, self.port);
        let resp = if self.scheme_https {
            let tls = self.tls.clone().context("no TLS config")?;
            let name = ServerName::try_from(self.host.clone())?;
            let stream = match tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
            {
                Ok(s) => s,
                Err(e) if answered_in_plaintext(&e) => {
                    bail!("the control plane at {at} speaks plain HTTP, not HTTPS: use http://{at}")
                }
                Err(e) => return Err(e).context("TLS to the control plane failed"),
            };
            send(hyper_util::rt::TokioIo::new(stream), req).await?
        } else {
            let first = Arc::new(AtomicU16::new(NOTHING_READ));
            let sniffed = FirstByte {
                inner: tcp,
                first: first.clone(),
            };
            match send(hyper_util::rt::TokioIo::new(sniffed), req).await {
                Ok(r) => r,
                // A TLS record (alert or handshake) where an HTTP response should be.
                Err(_) if matches!(first.load(Ordering::Relaxed), 0x14..=0x17) => bail!(
                    "the control plane at {at} speaks HTTPS, not plain HTTP: use https://{at} \
                     (with --api-ca)"
                ),
                Err(e) => return Err(e),
            }
        };
        if resp.status == StatusCode::UNAUTHORIZED {
            bail!(if self.token.is_none() {
                NO_TOKEN
            } else {
                REFUSED_TOKEN
            });
        }
        Ok(resp)
    }
}

/// Whether a TLS handshake failed because the server answered with something that is no
/// TLS record (an HTTP response, say).
fn answered_in_plaintext(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            )
        })
}

/// No byte read yet (outside the `u8` range).
const NOTHING_READ: u16 = 0x100;

/// A stream that remembers the first byte the server sent, to tell a TLS server from a
/// broken HTTP one when the response does not parse.
struct FirstByte {
    inner: TcpStream,
    first: Arc<AtomicU16>,
}

impl AsyncRead for FirstByte {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Some(&b) = buf.filled().get(before) {
            let _ = self.first.compare_exchange(
                NOTHING_READ,
                u16::from(b),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        polled
    }
}

impl AsyncWrite for FirstByte {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// The token never goes in clear text over a network: plain http:// is for loopback.
    #[test]
    fn plain_http_is_for_loopback_only() {
        for ok in [
            "http://127.0.0.1:9780",
            "http://127.1.2.3:9780",
            "http://[::1]:9780",
            "http://localhost:9780",
            "http://LOCALHOST",
            "http://[::ffff:127.0.0.1]:9780",
        ] {
            assert!(
                Client::new(ok, Some("t".into()), None).is_ok(),
                "{ok} is refused"
            );
        }
        for refused in [
            "http://10.0.0.5:9780",
            "http://[2001:db8::1]:9780",
            "http://gw.example.com:9780",
            "http://0.0.0.0:9780",
        ] {
            let e = Client::new(refused, Some("t".into()), None)
                .err()
                .unwrap_or_else(|| panic!("{refused} is accepted"))
                .to_string();
            assert!(e.contains("clear text") && e.contains("https://"), "{e}");
        }
    }

    /// A server that answers one connection with `answer`, whatever it is sent.
    async fn answering(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
            let _ = s.shutdown().await;
        });
        format!("http://{addr}")
    }

    const REFUSED: &[u8] =
        b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

    async fn error_of(server: &str, token: Option<&str>) -> String {
        let c = Client::new(server, token.map(str::to_owned), None).unwrap();
        let e = c
            .request(Method::GET, "/v1/services", None, None)
            .await
            .err()
            .expect("an error");
        format!("{e:#}")
    }

    #[tokio::test]
    async fn no_token_and_a_refused_token_are_told_apart() {
        let none = error_of(&answering(REFUSED).await, None).await;
        assert_eq!(none, NO_TOKEN);
        let wrong = error_of(&answering(REFUSED).await, Some("ztp_wrong")).await;
        assert_eq!(wrong, REFUSED_TOKEN);
        assert!(!wrong.contains("ztp_wrong"));
    }

    #[tokio::test]
    async fn plain_http_to_a_tls_port_says_so() {
        // What a TLS server answers to plaintext: a fatal alert record.
        let server = answering(b"\x15\x03\x03\x00\x02\x02\x32").await;
        let e = error_of(&server, Some("t")).await;
        assert!(e.contains("speaks HTTPS") && e.contains("https://"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        // A broken HTTP server is not mistaken for one.
        let e = error_of(&answering(b"garbage\r\n\r\n").await, Some("t")).await;
        assert!(!e.contains("speaks HTTPS"), "{e}");
    }
}
