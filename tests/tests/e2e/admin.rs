//! The admin listener: `/healthz` and `/readyz` answer 200 without credentials.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Fixture, STEP};

/// A raw HTTP/1.1 GET; returns the status code and the whole response.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(STEP, async {
        let mut s = TcpStream::connect(addr).await.expect("connect to admin");
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send request");
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.expect("read response");
        let text = String::from_utf8_lossy(&resp).to_string();
        let code = text
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| text.strip_prefix("HTTP/1.0 "))
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
        (code, text)
    })
    .await
    .expect("admin request bounded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_return_200() {
    let fx = Fixture::start().await;
    for path in ["/healthz", "/readyz"] {
        let (code, text) = http_get(fx.dp.admin_addr(), path).await;
        assert_eq!(code, 200, "GET {path}: {text}");
    }
}
