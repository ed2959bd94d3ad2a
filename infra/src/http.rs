//! The HTTP/1.1 server of both planes' admin ports (the control plane's REST API, the
//! data plane's health and metrics), with a limit on everything a peer can hold there.
//!
//! - connections: at most [`Limits::max_connections`] at once and
//!   [`Limits::max_per_source`] from one address, counted from the TCP accept (before a
//!   TLS handshake); more are closed at once, without a byte read;
//! - a TLS handshake (where the port speaks HTTPS) must finish within
//!   [`Limits::handshake_timeout`];
//! - a request's head must arrive within [`Limits::header_timeout`] of the server starting
//!   to wait for it, which also closes a keep-alive connection left idle that long;
//! - a request body must keep coming: a handler waiting [`Limits::read_timeout`] for its
//!   next part gets an error (and answers 400; the connection is then closed);
//! - a client must read what it asked for: a write that waits
//!   [`Limits::write_timeout`] for the client to read closes the connection (a client
//!   that sends requests and reads no answer would otherwise hold it for ever, as no
//!   next request head is waited for while an answer is pending);
//! - a request head is at most 16 KiB and the read buffer 64 KiB.
//!
//! A source is an IPv4 address (an IPv4-mapped IPv6 one counts as IPv4) or an IPv6 /64
//! ([`crate::source`]).
//!
//! Request bodies are bounded by the routers themselves (`DefaultBodyLimit`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::source::{Caps, Counter, Source};

/// Limits of an admin port. The defaults suit an operator's tools and a metrics scraper.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_source: usize,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub read_timeout: Duration,
    /// How long a write may wait for the client to read.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(20),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// What turns an accepted TCP connection into the stream HTTP is spoken on: [`Plain`], or
/// a TLS handshake.
pub trait Handshake: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Plain HTTP: the TCP stream itself.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;
    async fn handshake(&self, tcp: TcpStream) -> io::Result<TcpStream> {
        Ok(tcp)
    }
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets
/// requests in flight finish (up to 30 s) and closes idle connections. Handlers see the
/// peer's address as `ConnectInfo<SocketAddr>`.
pub async fn serve<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let counter = Counter::new(Caps {
        total: limits.max_connections,
        per_source: limits.max_per_source,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_warn: Option<Instant> = None;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, mostly: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(place) = counter.admit(Source::of(peer.ip())) else {
            drop(tcp);
            if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                last_warn = Some(Instant::now());
                tracing::warn!(
                    client.addr = %peer,
                    max_connections = limits.max_connections,
                    max_per_source = limits.max_per_source,
                    "connection refused: too many connections (logged at most every 10 s)"
                );
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (handshake, router, mut stop) = (handshake.clone(), router.clone(), stop_rx.clone());
        tasks.spawn(async move {
            let _place = place;
            let io = match tokio::time::timeout(limits.handshake_timeout, handshake.handshake(tcp))
                .await
            {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => {
                    tracing::debug!(client.addr = %peer, error = %e, "handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(client.addr = %peer, "handshake timed out");
                    return;
                }
            };
            let limit = limits.read_timeout;
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    let req = req.map(|inner| {
                        axum::body::Body::new(TimedBody {
                            inner,
                            stall: Stall::new(limit),
                        })
                    });
                    router.clone().oneshot(req)
                },
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(64 * 1024)
                .max_header_size(16 * 1024);
            let io = TokioIo::new(WriteTimeout {
                inner: io,
                stall: Stall::new(limits.write_timeout),
            });
            let conn = builder.serve_connection(io, service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(client.addr = %peer, error = %e, "connection ended");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection task holds a place until it ends.
    let end = Instant::now() + Duration::from_secs(30);
    while counter.total() > 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// A stream whose writes (and flushes) fail with `TimedOut` once one has waited `limit`
/// for the peer to make room.
struct WriteTimeout<S> {
    inner: S,
    stall: Stall,
}

impl<S> WriteTimeout<S> {
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match self.stall.check(cx, r) {
            Some(r) => r,
            None => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client does not read",
            ))),
        }
    }
}

/// How long one operation has been pending: started at its first `Pending`, cleared by
/// any progress.
struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    fn new(limit: Duration) -> Self {
        Stall { limit, timer: None }
    }

    /// `r` as it is, or `None` once it has been pending for the limit.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<T>) -> Option<Poll<T>> {
        if r.is_ready() {
            self.timer = None;
            return Some(r);
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer
            .as_mut()
            .poll(cx)
            .is_pending()
            .then_some(Poll::Pending)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

/// A request body whose next frame must arrive within `limit` of the handler asking for
/// it; else the body ends with an error (the handler answers 400 and the connection is
/// closed, its body unread).
struct TimedBody {
    inner: hyper::body::Incoming,
    stall: Stall,
}

impl http_body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.inner).poll_frame(cx);
        match me.stall.check(cx, r) {
            Some(r) => r.map(|f| f.map(|f| f.map_err(Into::into))),
            None => Poll::Ready(Some(Err("the request body stopped arriving".into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            max_per_source: 2,
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_millis(300),
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
        }
    }

    fn app() -> Router {
        Router::new()
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    peer.ip().to_string()
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            )
            .route("/echo", post(|body: String| async move { body }))
            .route("/big", get(|| async { vec![b'x'; 1 << 20] }))
    }

    /// A server on 127.0.0.1 with `limits`; the sender stops it.
    async fn start(
        limits: Limits,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(l, Plain, app(), limits, async {
            let _ = rx.await;
        }));
        (addr, tx, task)
    }

    async fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        sock.connect(addr).await.unwrap()
    }

    /// Reads until the peer closes (or 5 s pass): what it sent.
    async fn read_to_close(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "the server did not close the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get_once(s: &mut TcpStream, path: &str) -> String {
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        read_to_close(s).await
    }

    #[tokio::test]
    async fn serves_requests_with_the_peer_address() {
        let (addr, stop, task) = start(limits()).await;
        let mut s = connect_from("127.0.0.3", addr).await;
        let resp = get_once(&mut s, "/peer").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with("127.0.0.3"), "{resp}");
        stop.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn caps_connections_per_source_and_in_all() {
        let held_long = Limits {
            header_timeout: Duration::from_secs(10),
            ..limits()
        };
        let (addr, _stop, _task) = start(held_long).await;
        // Two held from 127.0.0.1 (its cap): a third is closed without an answer.
        let mut held = vec![
            connect_from("127.0.0.1", addr).await,
            connect_from("127.0.0.1", addr).await,
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = connect_from("127.0.0.1", addr).await;
        assert_eq!(
            get_once(&mut third, "/peer").await,
            "",
            "over the per-source cap"
        );
        // Another source still gets in, up to the total cap of 4.
        held.push(connect_from("127.0.0.2", addr).await);
        let mut s = connect_from("127.0.0.2", addr).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut fifth = connect_from("127.0.0.4", addr).await;
        assert_eq!(
            get_once(&mut fifth, "/peer").await,
            "",
            "over the total cap"
        );
        assert!(get_once(&mut s, "/peer").await.starts_with("HTTP/1.1 200"));
        // A place freed is a place for the next.
        drop(held.remove(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut again = connect_from("127.0.0.1", addr).await;
        assert!(get_once(&mut again, "/peer")
            .await
            .starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn silent_and_trickling_clients_are_closed_at_the_header_timeout() {
        let (addr, _stop, _task) = start(limits()).await;
        let t = Instant::now();
        let mut silent = connect_from("127.0.0.1", addr).await;
        let _ = read_to_close(&mut silent).await;
        assert!(t.elapsed() >= Duration::from_millis(250));

        // One byte of the head every 100 ms: never a whole head, closed all the same.
        let mut trickle = connect_from("127.0.0.1", addr).await;
        let t = Instant::now();
        let closed = async {
            for b in b"GET /peer HTTP/1.1\r\nHost: t\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaa" {
                if trickle.write_all(&[*b]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        };
        assert!(closed.await, "a trickled head was not cut off");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_keep_alive_connection_left_idle_is_closed() {
        let (addr, _stop, _task) = start(limits()).await;
        let mut s = connect_from("127.0.0.1", addr).await;
        s.write_all(b"GET /peer HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let resp = read_to_close(&mut s).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    #[tokio::test]
    async fn a_stalled_body_is_refused() {
        let (addr, _stop, _task) = start(limits()).await;
        let mut s = connect_from("127.0.0.1", addr).await;
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nhalf")
            .await
            .unwrap();
        let resp = read_to_close(&mut s).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        // A whole body is served.
        let mut s = connect_from("127.0.0.1", addr).await;
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .await
            .unwrap();
        let resp = read_to_close(&mut s).await;
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with("hello"),
            "{resp}"
        );
    }

    #[tokio::test]
    async fn shutdown_lets_a_request_in_flight_finish() {
        let (addr, stop, task) = start(limits()).await;
        let mut s = connect_from("127.0.0.1", addr).await;
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        let resp = read_to_close(&mut s).await;
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with("done"),
            "{resp}"
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns once its connections ended")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_closed() {
        let (addr, _stop, _task) = start(Limits {
            header_timeout: Duration::from_secs(10),
            ..limits()
        })
        .await;
        // Two connections (the per-source cap) ask for 1 MiB answers, many times over,
        // and read nothing.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = connect_from("127.0.0.1", addr).await;
            let reqs = "GET /big HTTP/1.1\r\nHost: t\r\n\r\n".repeat(20);
            let _ = s.write_all(reqs.as_bytes()).await;
            held.push(s);
        }
        // Their places come free once the writes have waited too long.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = connect_from("127.0.0.1", addr).await;
            let resp = get_once(&mut s, "/peer").await;
            if resp.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                Instant::now() < end,
                "the non-reading clients kept their places"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let (addr, _stop, _task) = start(limits()).await;
        let mut s = connect_from("127.0.0.1", addr).await;
        let pad = "a".repeat(20 * 1024);
        let req = format!("GET /peer HTTP/1.1\r\nHost: t\r\nX-Pad: {pad}\r\n\r\n");
        let _ = s.write_all(req.as_bytes()).await;
        let resp = read_to_close(&mut s).await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    }
}
