//! The streams of a connector's tunnel (`ztp_proto::tunnel`), over either transport:
//! QUIC streams, or HTTP/2 streams over TCP + TLS 1.3 where UDP is blocked (DESIGN.md,
//! "Connectors"). Above this module a session's stream is bytes both ways, with a
//! half-close ([`tokio::io::AsyncWriteExt::shutdown`]) and a cut ([`SessionIo::abort`],
//! also what dropping an unfinished stream does): the tunnel's protocol is the same on
//! both.
//!
//! Over TCP the data plane is the HTTP/2 client (it opens a stream per session) and the
//! connector the server, whatever the TLS roles; the data plane's first stream (path
//! [`CONTROL_PATH`]) is the control stream, and every other one a session
//! ([`SESSION_PATH`]). HTTP/2 brings what a multiplexer must have: per-stream and
//! per-connection flow control, a cap on concurrent streams, and resets; TCP's own
//! keepalive finds a peer that went silent ([`tcp_liveness`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The path of the control stream over TCP.
pub const CONTROL_PATH: &str = "/control";
/// The path of a session's stream over TCP.
pub const SESSION_PATH: &str = "/session";
/// Flow-control windows: per stream and per connection (as the QUIC listener's).
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Sessions one tunnel carries at once.
pub const MAX_SESSIONS: u32 = 4096;
/// A peer silent this long is gone (QUIC's idle timeout on tunnels is the same); it is
/// probed every [`KEEPALIVE`].
pub const IDLE: Duration = Duration::from_secs(3);
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// The QUIC error code of a stream that was cut (`ztp_proto::quic::STREAM_ABORTED`).
const QUIC_ABORTED: u32 = 1;

/// One session's stream in a tunnel.
pub trait SessionIo: AsyncRead + AsyncWrite + Send + Unpin {
    /// Cuts the stream: the peer sees an error, not a clean end.
    fn abort(&mut self);
}

/// A session's stream, boxed: a tunnel's users need not know its transport.
pub type BoxSession = Box<dyn SessionIo>;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2"));
    }
    if matches!(
        e.reason(),
        Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED)
    ) {
        return io::Error::new(io::ErrorKind::ConnectionReset, e);
    }
    io::Error::other(e)
}

/// A bidirectional QUIC stream: reset when dropped unless shut down.
#[derive(Debug)]
pub struct QuicIo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    finished: bool,
}

impl QuicIo {
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        QuicIo {
            send,
            recv,
            finished: false,
        }
    }
}

impl Drop for QuicIo {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.send.reset(quinn::VarInt::from_u32(QUIC_ABORTED));
        }
    }
}

impl SessionIo for QuicIo {
    fn abort(&mut self) {
        if !self.finished {
            let _ = self.send.reset(quinn::VarInt::from_u32(QUIC_ABORTED));
            self.finished = true;
        }
    }
}

impl AsyncRead for QuicIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.finished = true;
        }
        r
    }
}

/// An HTTP/2 stream as a byte stream: the request body one way, the response body the
/// other. Reset (CANCEL) when dropped unless shut down.
pub struct H2Io {
    send: h2::SendStream<Bytes>,
    /// The client's side waits for the response's head before the body.
    response: Option<h2::client::ResponseFuture>,
    recv: Option<h2::RecvStream>,
    /// Received, not yet read (at most one DATA frame).
    pending: Bytes,
    finished: bool,
}

impl std::fmt::Debug for H2Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Io")
            .field("stream", &self.send.stream_id().as_u32())
            .finish_non_exhaustive()
    }
}

impl H2Io {
    fn new(
        send: h2::SendStream<Bytes>,
        response: Option<h2::client::ResponseFuture>,
        recv: Option<h2::RecvStream>,
    ) -> Self {
        H2Io {
            send,
            response,
            recv,
            pending: Bytes::new(),
            finished: false,
        }
    }
}

impl Drop for H2Io {
    fn drop(&mut self) {
        if !self.finished {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

impl SessionIo for H2Io {
    fn abort(&mut self) {
        if !self.finished {
            self.send.send_reset(Reason::CANCEL);
            self.finished = true;
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(response) = this.response.as_mut() {
                let head = ready!(Pin::new(response).poll(cx)).map_err(h2_io)?;
                this.response = None;
                if head.status() != http::StatusCode::OK {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "tunnel stream refused ({})",
                        head.status()
                    ))));
                }
                this.recv = Some(head.into_body());
            }
            let Some(recv) = this.recv.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    // The window is given back as data arrives: what is held here is at
                    // most one frame.
                    let _ = recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.finished {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What the peer's window allows now; the rest waits for it to grow. Capacity
        // left from an earlier reservation is used first: h2 wakes `poll_capacity` only
        // when capacity grows, so waiting on it while some is left would stall.
        self.send.reserve_capacity(buf.len());
        loop {
            let available = self.send.capacity();
            if available > 0 {
                let n = available.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what was sent.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.finished {
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
            self.finished = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// The data plane's side of a tunnel over TCP: opens streams.
#[derive(Clone)]
pub struct H2Opener {
    send: h2::client::SendRequest<Bytes>,
}

impl std::fmt::Debug for H2Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Opener").finish_non_exhaustive()
    }
}

impl H2Opener {
    /// Opens a stream at `path` ([`CONTROL_PATH`] or [`SESSION_PATH`]); it waits while
    /// the connector's cap on concurrent streams is reached.
    pub async fn open(&self, path: &str) -> io::Result<H2Io> {
        let mut send = self.send.clone().ready().await.map_err(h2_io)?;
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("https://tunnel{path}"))
            .body(())
            .map_err(io::Error::other)?;
        let (response, stream) = send.send_request(request, false).map_err(h2_io)?;
        Ok(H2Io::new(stream, Some(response), None))
    }
}

/// Starts the data plane's (client) side of HTTP/2 on a tunnel's TLS stream: the opener,
/// and the connection's future, which drives it (and pings the peer) until it ends, with
/// why.
pub async fn client<T>(
    io: T,
) -> io::Result<(
    H2Opener,
    impl Future<Output = &'static str> + Send + 'static,
)>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(256 * 1024)
        .max_header_list_size(16 * 1024)
        .max_concurrent_streams(0)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(h2_io)?;
    let drive = async move {
        match conn.await {
            Ok(()) => "closed",
            Err(_) => "connection error",
        }
    };
    Ok((H2Opener { send }, drive))
}

/// The connector's (server) side of HTTP/2 on a tunnel's TLS stream. The connection is
/// driven by a task of its own (as long as this lives), so that it moves whatever its
/// owner is doing: window updates, pings and resets are never held up.
pub struct H2Server {
    streams: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    /// Why the connection ended, once it has.
    ended: tokio::sync::watch::Receiver<Option<&'static str>>,
    close: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A stream the data plane opened: its path, and the stream.
pub struct Accepted {
    pub path: String,
    pub io: H2Io,
}

impl H2Server {
    pub async fn handshake<T>(io: T) -> io::Result<Self>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(256 * 1024)
            .max_header_list_size(16 * 1024)
            .max_concurrent_streams(MAX_SESSIONS)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(h2_io)?;
        // Unbounded, yet bounded: the data plane may have at most MAX_SESSIONS streams
        // open, and each waits here at most once.
        let (tx, streams) = tokio::sync::mpsc::unbounded_channel();
        let (ended_tx, ended) = tokio::sync::watch::channel(None);
        let (close, mut closing) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let why = loop {
                tokio::select! {
                    next = conn.accept() => match next {
                        None => break "closed",
                        Some(Err(_)) => break "connection error",
                        Some(Ok((request, mut respond))) => {
                            let path = request.uri().path().to_owned();
                            let recv = request.into_body();
                            let Ok(send) = respond.send_response(http::Response::new(()), false) else {
                                continue;
                            };
                            // The owner gone: the stream is dropped (reset).
                            let _ = tx.send(Accepted { path, io: H2Io::new(send, None, Some(recv)) });
                        }
                    },
                    _ = &mut closing => {
                        conn.abrupt_shutdown(Reason::NO_ERROR);
                        // GOAWAY goes out as the connection winds down.
                        let _ = tokio::time::timeout(Duration::from_secs(1), std::future::poll_fn(|cx| conn.poll_closed(cx))).await;
                        break "closed here";
                    }
                }
            };
            ended_tx.send_replace(Some(why));
        });
        Ok(H2Server {
            streams,
            ended,
            close: Some(close),
        })
    }

    /// The next stream, answered at once (the answer's head carries nothing: the
    /// session's status byte is in its body). `Err` with why once the tunnel ends.
    pub async fn accept(&mut self) -> Result<Accepted, &'static str> {
        match self.streams.recv().await {
            Some(a) => Ok(a),
            None => {
                let mut ended = self.ended.clone();
                let why = ended.wait_for(|w| w.is_some()).await.ok().and_then(|w| *w);
                Err(why.unwrap_or("closed"))
            }
        }
    }

    /// Ends the tunnel: GOAWAY, then the connection is dropped.
    pub fn close(&mut self) {
        if let Some(c) = self.close.take() {
            let _ = c.send(());
        }
    }
}

impl Drop for H2Server {
    fn drop(&mut self) {
        self.close();
    }
}

/// A peer that went silent ends a tunnel over TCP within about [`IDLE`]: TCP keepalive
/// probes after [`KEEPALIVE`] of quiet, every [`KEEPALIVE`], and a cap on how long sent
/// data may go unacknowledged. Not HTTP/2 PINGs from both ends: h2 stops reading while a
/// PONG waits to be written, so under bulk both ways two peers pinging each other could
/// each wait for the other to read.
pub fn tcp_liveness(tcp: &tokio::net::TcpStream) -> io::Result<()> {
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE)
            .with_interval(KEEPALIVE)
            .with_retries(2),
    )?;
    sock.set_tcp_user_timeout(Some(IDLE))
}

/// A QUIC client endpoint on a fresh UDP socket of `remote`'s family (any address, any
/// port), accepting packets up to `max_udp_payload` bytes (path-MTU discovery climbs to
/// it where the path carries them).
pub fn quic_client_endpoint(
    remote: std::net::SocketAddr,
    max_udp_payload: u16,
) -> io::Result<quinn::Endpoint> {
    let bind: std::net::SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(max_udp_payload)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open a UDP socket on {bind} for QUIC: {e}"),
        )
    })?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(config, None, socket, runtime)
}

/// The transport of a long-lived machine connection (a connector's tunnel, a relay):
/// a keepalive every [`KEEPALIVE`], given up after [`IDLE`] of silence on both ends (the
/// lower of the two sides' timeouts holds), the peer may open `peer_streams`
/// bidirectional streams and no unidirectional one, and packets grow to
/// `max_udp_payload` bytes where the path carries them (bulk pays per packet).
pub fn machine_transport(peer_streams: u32, max_udp_payload: u16) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE).ok())
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(peer_streams))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .initial_mtu(1452)
        .mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(max_udp_payload);
            m
        }));
    transport
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A data-plane side and a connector side over an in-memory pipe; the connector's
    /// accept loop hands streams to `streams`.
    async fn pair() -> (
        H2Opener,
        tokio::task::JoinHandle<&'static str>,
        tokio::sync::mpsc::Receiver<Accepted>,
        tokio::task::JoinHandle<&'static str>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let s = H2Server::handshake(b).await;
            s.map_err(|e| e.to_string())
        });
        let (opener, drive) = client(a).await.expect("client handshake");
        let drive = tokio::spawn(drive);
        let mut server = server.await.unwrap().expect("server handshake");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let accepting = tokio::spawn(async move {
            loop {
                match server.accept().await {
                    Ok(a) => {
                        if tx.send(a).await.is_err() {
                            return "receiver gone";
                        }
                    }
                    Err(e) => return e,
                }
            }
        });
        (opener, drive, rx, accepting)
    }

    #[tokio::test]
    async fn streams_carry_bytes_both_ways_with_half_close_and_flow_control() {
        let (opener, _drive, mut accepted, _acc) = pair().await;
        let mut control = opener.open(CONTROL_PATH).await.unwrap();
        control.write_all(b"assignments").await.unwrap();
        let mut c = accepted.recv().await.unwrap();
        assert_eq!(c.path, CONTROL_PATH);
        let mut got = [0u8; 11];
        c.io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"assignments");

        // A session: 8 MiB up (more than any window: flow control must let it
        // through), the half-close, then the answer down and its end.
        let mut s = opener.open(SESSION_PATH).await.unwrap();
        let up = vec![7u8; 8 << 20];
        let writer = {
            let up = up.clone();
            tokio::spawn(async move {
                s.write_all(&up).await.unwrap();
                s.shutdown().await.unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut peer = accepted.recv().await.unwrap();
        assert_eq!(peer.path, SESSION_PATH);
        let mut got = Vec::new();
        peer.io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), up.len());
        assert!(got == up);
        peer.io.write_all(b"done").await.unwrap();
        peer.io.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
    }

    #[tokio::test]
    async fn an_aborted_or_dropped_stream_is_an_error_for_the_peer_not_an_end() {
        let (opener, _drive, mut accepted, _acc) = pair().await;
        let mut s = opener.open(SESSION_PATH).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut peer = accepted.recv().await.unwrap();
        let mut one = [0u8; 1];
        peer.io.read_exact(&mut one).await.unwrap();
        s.abort();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), peer.io.read_to_end(&mut rest));
        assert!(read.await.expect("the abort reaches the peer").is_err());

        let mut s = opener.open(SESSION_PATH).await.unwrap();
        s.write_all(b"y").await.unwrap();
        let mut peer = accepted.recv().await.unwrap();
        peer.io.read_exact(&mut one).await.unwrap();
        drop(peer);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest));
        assert!(read.await.expect("the drop reaches the peer").is_err());
    }

    #[tokio::test]
    async fn a_tunnel_over_tcp_probes_a_silent_peer_and_caps_unacknowledged_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tcp_liveness(&tcp).unwrap();
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 2);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(IDLE));
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A write that waited for the window with a large buffer and is then retried with
    /// smaller ones (as AsyncWrite allows) leaves capacity over; later writes must use it
    /// rather than wait for the window to grow again (h2 wakes only on growth).
    #[tokio::test]
    async fn capacity_left_from_a_larger_write_is_used_not_waited_for() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut s = H2Server::handshake(b).await.unwrap();
            let acc = s.accept().await.map_err(|e| e.to_owned()).unwrap();
            (s, acc)
        });
        let (opener, drive) = client(a).await.unwrap();
        tokio::spawn(drive);
        let mut io = opener.open(SESSION_PATH).await.unwrap();
        // The stream's whole window, unread by the peer.
        let full = vec![1u8; STREAM_WINDOW as usize];
        tokio::io::AsyncWriteExt::write_all(&mut io, &full)
            .await
            .unwrap();
        let (mut s, mut acc) = server.await.unwrap();
        let keep = tokio::spawn(async move {
            let _ = s.accept().await;
        });
        // A 64 KiB write waits for the window...
        let big = vec![2u8; 64 * 1024];
        let waited = std::future::poll_fn(|cx| {
            Poll::Ready(Pin::new(&mut io).poll_write(cx, &big).is_pending())
        })
        .await;
        assert!(waited, "the window is full");
        // ... the peer reads everything (the window grows) ...
        let mut got = vec![0u8; full.len()];
        acc.io.read_exact(&mut got).await.unwrap();
        // ... and the write is retried with 1 byte, then again: each goes at once.
        for _ in 0..3 {
            let wrote = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncWriteExt::write(&mut io, b"x"),
            )
            .await
            .expect("a write with capacity left stalled")
            .unwrap();
            assert_eq!(wrote, 1);
        }
        keep.abort();
    }
}

#[cfg(test)]
mod echo_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both directions at once, as an echo through a tunnel: 16 MiB written while the
    /// echo comes back, through pipes smaller than the windows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrent_echo_of_16_mib_does_not_stall() {
        for round in 0..5 {
            let (a, b) = tokio::io::duplex(16 * 1024);
            let server = tokio::spawn(async move {
                let mut s = H2Server::handshake(b).await.unwrap();
                let mut acc = s.accept().await.map_err(|e| e.to_owned()).unwrap();
                let echo = tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(&mut acc.io);
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
                // Keep the connection moving.
                let _ = tokio::time::timeout(Duration::from_secs(60), s.accept()).await;
                echo.await.unwrap();
            });
            let (opener, drive) = client(a).await.unwrap();
            tokio::spawn(drive);
            let io = opener.open(SESSION_PATH).await.unwrap();
            let (mut r, mut w) = tokio::io::split(io);
            let payload: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
            let p2 = payload.clone();
            let writer = tokio::spawn(async move {
                // Uneven writes: a large one leaves capacity that smaller ones must use.
                let mut at = 0;
                let mut k = 0usize;
                while at < p2.len() {
                    let n = [65536, 1000, 7, 20000, 3][k % 5].min(p2.len() - at);
                    w.write_all(&p2[at..at + n]).await.unwrap();
                    at += n;
                    k += 1;
                }
                w.shutdown().await.unwrap();
                w
            });
            let mut back = Vec::new();
            tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
                .await
                .unwrap_or_else(|_| panic!("round {round}: stalled at {} bytes", back.len()))
                .unwrap();
            assert!(back == payload);
            let _ = writer.await;
            server.abort();
        }
    }
}
