//! The session stage: the pipeline serves an admitted client with its handler and ends
//! the session itself.
//!
//! [`run`] races the handler's future against [`Stop`]: a later decision that refuses
//! the session (revocation, group change, expiry: [`crate::reauth`]) or the drain
//! deadline. When one fires, the handler's future is dropped (and with it its backend
//! connection), then the client is told: the 403 line if nothing has moved either way,
//! close_notify otherwise (DESIGN.md "Refusals"). A handler that ends by itself is
//! followed by close_notify if it did not send one. No handler can forget either.
//!
//! The bytes each way are counted here, on the client's side ([`Metered`]), so the
//! record is right however the session ended.

use std::future::Future;
use std::io::{self, BufRead, Read};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::handler::framed::FramedChannel;
use crate::handler::{
    BoxIo, BoxOutcome, Caller, Client, ClientIo, Close, DatagramChannel, Handler, HandlerLimits,
    Outcome, Report, Session, Target,
};
use crate::protocol::PEEK_MAX;
use crate::refusal::{self, Refusal};

/// How long the pipeline waits to deliver its close (line or close_notify).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the pipeline ends a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A later decision refused it, for this reason.
    Revoked(&'static str),
    /// The node is draining and its deadline has come.
    Drain,
}

/// How a session ended, for its record.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub end: &'static str,
    /// The refusal line the client got, if any.
    pub refusal: Option<Refusal>,
    /// Client to data plane (datagram payload for datagram sessions).
    pub bytes_up: u64,
    /// Data plane to client.
    pub bytes_down: u64,
    pub backend_addr: Option<SocketAddr>,
}

/// What the pipeline hands a handler besides the client.
pub struct Setup<'a> {
    /// Serve datagrams framed over the stream (ALPN `ztp-dgram`).
    pub framed: bool,
    pub target: Target<'a>,
    pub caller: Caller<'a>,
    pub limits: HandlerLimits,
}

/// The handler's outcome, or the stop that came first (the handler's future dropped).
/// A macro, not a function: a future per layer would be kept in the session's state.
macro_rules! race {
    ($serve:expr, $stop:expr) => {
        tokio::select! {
            biased;
            s = $stop.as_mut() => Err(s),
            o = $serve => Ok::<Outcome, Stop>(o),
        }
    };
}

/// Serves the session with `handler` until it ends or `stop` fires, then ends it.
///
/// `setup` is boxed so that it is not kept in this future's state for the session's
/// life (it moves into the handler's future at once): an idle session holds only what
/// serving it needs.
pub async fn run<S: ClientIo>(
    client: &mut Metered<S>,
    handler: &dyn Handler,
    setup: Box<Setup<'_>>,
    mut stop: Pin<Box<dyn Future<Output = Stop> + Send + '_>>,
) -> Ended {
    let mut report = Report::default();
    let framed = setup.framed;
    let (result, payload) = if framed {
        let mut channel = Box::new(FramedChannel::new(client));
        let serve = start(
            handler,
            Client::Datagrams(&mut *channel),
            setup,
            &mut report,
        );
        let result = race!(serve, stop);
        (result, Some((channel.bytes_up, channel.bytes_down)))
    } else {
        let serve = start(handler, Client::Stream(client), setup, &mut report);
        (race!(serve, stop), None)
    };
    // What moved on the client's side, before the pipeline writes anything itself.
    let moved = client.up + client.down > 0;
    let (bytes_up, bytes_down) = payload.unwrap_or((client.up, client.down));
    let mut ended = Ended {
        end: "",
        refusal: None,
        bytes_up,
        bytes_down,
        backend_addr: report.backend_addr,
    };
    let close = match result {
        Ok(Outcome { end, close }) => {
            ended.end = end;
            close
        }
        Err(Stop::Revoked(reason)) => {
            ended.end = reason;
            // The line only where the client can still read it as the first thing.
            if moved || client.shut {
                Close::Clean
            } else {
                Close::Refuse(Refusal::Forbidden)
            }
        }
        Err(Stop::Drain) => {
            ended.end = "drained";
            Close::Clean
        }
    };
    // Boxed: the close's futures (timers, a drain buffer) are needed once, at the end,
    // and must not size the session's state for its whole life.
    ended.refusal = Box::pin(finish(client, close)).await;
    ended
}

/// Serves a datagram session whose transport carries whole datagrams itself (a QUIC
/// connection's flow): the handler races `stop` as in [`run`]. There is nothing to close
/// per session (a refusal or drain closes the whole connection, the transport's part),
/// so the pipeline only records the end. The byte counts are the channel's.
pub async fn run_datagrams(
    channel: &mut dyn DatagramChannel,
    handler: &dyn Handler,
    setup: Box<Setup<'_>>,
    mut stop: Pin<Box<dyn Future<Output = Stop> + Send + '_>>,
) -> (&'static str, Option<SocketAddr>) {
    let mut report = Report::default();
    let serve = start(handler, Client::Datagrams(channel), setup, &mut report);
    let end = match race!(serve, stop) {
        Ok(Outcome { end, .. }) => end,
        Err(Stop::Revoked(reason)) => reason,
        Err(Stop::Drain) => "drained",
    };
    (end, report.backend_addr)
}

/// Closes the client as `close` says; returns the refusal line it got, if any.
async fn finish<S: ClientIo>(client: &mut Metered<S>, close: Close) -> Option<Refusal> {
    match close {
        Close::Refuse(r) if !client.shut => {
            refusal::deliver(client, r).await;
            return Some(r);
        }
        Close::Abort => {}
        Close::Linger => refusal::send_and_close(client, &[]).await,
        Close::Clean | Close::Refuse(_) => {
            if !client.shut {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
            }
        }
    }
    None
}

/// The handler's future, built outside any async state: the session's pieces move into
/// it and are kept once.
#[allow(clippy::boxed_local)] // `run` takes the setup boxed (see there) and hands it on.
fn start<'a>(
    handler: &'a dyn Handler,
    client: Client<'a>,
    setup: Box<Setup<'a>>,
    report: &'a mut Report,
) -> BoxOutcome<'a> {
    let Setup {
        target,
        caller,
        limits,
        ..
    } = *setup;
    handler.serve(Session {
        client,
        target,
        caller,
        limits,
        report,
    })
}

/// A client stream that counts plaintext each way, keeps the client's first bytes (to
/// name the protocol of an `auto` service in the record, without waiting for them) and
/// notes its clean close.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    pub up: u64,
    pub down: u64,
    /// The stream's write side was shut down (close_notify sent).
    pub shut: bool,
    first: [u8; PEEK_MAX],
}

impl<S> Metered<S> {
    pub fn new(inner: S) -> Self {
        Metered {
            inner,
            up: 0,
            down: 0,
            shut: false,
            first: [0; PEEK_MAX],
        }
    }

    /// The client's first bytes (up to [`PEEK_MAX`]).
    pub fn first_bytes(&self) -> &[u8] {
        &self.first[..(self.up as usize).min(PEEK_MAX)]
    }

    fn keep_first(&mut self, read: &[u8]) {
        let at = self.up as usize;
        if at < PEEK_MAX {
            let n = read.len().min(PEEK_MAX - at);
            self.first[at..at + n].copy_from_slice(&read[..n]);
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            let this = &mut *self;
            this.keep_first(read);
            this.up += read.len() as u64;
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.down += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        if let Poll::Ready(Ok(())) = r {
            self.shut = true;
        }
        r
    }
}

impl<S: ClientIo> ClientIo for Metered<S> {
    fn read_message(&mut self) -> BoxIo<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let m = self.inner.read_message().await?;
            if let Some(m) = &m {
                self.keep_first(m);
                self.up += m.len() as u64;
            }
            Ok(m)
        })
    }
}

/// The TLS-over-TCP transport: a message is one TLS record's plaintext.
impl ClientIo for TlsStream<TcpStream> {
    fn read_message(&mut self) -> BoxIo<'_, Option<Vec<u8>>> {
        Box::pin(read_record(self))
    }
}

/// Reads the plaintext of exactly one TLS record from the client: `None` when the client
/// closed first. rustls keeps received plaintext as one chunk per record; reading through
/// `AsyncRead` would merge records that arrived together.
async fn read_record(client: &mut TlsStream<TcpStream>) -> io::Result<Option<Vec<u8>>> {
    loop {
        let (tcp, conn) = client.get_mut();
        let mut reader = conn.reader();
        match reader.fill_buf() {
            Ok([]) => return Ok(None),
            Ok(chunk) => {
                let record = chunk.to_vec();
                reader.consume(record.len());
                return Ok(Some(record));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        // More ciphertext is needed.
        tcp.readable().await?;
        match conn.read_tls(&mut TryRead(tcp)) {
            Ok(0) => {
                // End of stream: rustls now reports a clean or unclean close.
            }
            Ok(_) => {
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// `std::io::Read` over a tokio socket's non-blocking `try_read`.
struct TryRead<'a>(&'a TcpStream);

impl Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

#[cfg(test)]
mod tests;
