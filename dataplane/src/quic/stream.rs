//! One bidirectional QUIC stream as a client byte stream ([`ClientIo`]): a session of a
//! tcp service.
//!
//! `shutdown` is FIN (the half-close is passed on). A stream dropped without it was cut
//! (the pipeline's `Close::Abort`, a backend that broke in the middle): it is reset with
//! [`STREAM_ABORTED`], because quinn would otherwise finish it cleanly on drop and tell
//! the client that everything arrived.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ztp_proto::quic::STREAM_ABORTED;

use crate::handler::{BoxIo, ClientIo};

#[derive(Debug)]
pub struct QuicStream {
    send: SendStream,
    recv: RecvStream,
    finished: bool,
}

impl QuicStream {
    pub fn new(send: SendStream, recv: RecvStream) -> Self {
        QuicStream {
            send,
            recv,
            finished: false,
        }
    }

    /// The stream's id, for logs.
    pub fn id(&self) -> u64 {
        self.send.id().index()
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.send.reset(VarInt::from_u32(STREAM_ABORTED));
        }
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf)
    }
}

impl AsyncWrite for QuicStream {
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

impl ClientIo for QuicStream {
    /// A stream has no messages: what arrived in one piece. Spec-mode datagram services
    /// are not served on streams (QUIC carries their datagrams as DATAGRAM frames).
    fn read_message(&mut self) -> BoxIo<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => Ok(Some(chunk.bytes.to_vec())),
                Ok(None) => Ok(None),
                Err(e) => Err(io::Error::other(e)),
            }
        })
    }
}
