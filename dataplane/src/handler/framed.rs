//! The framed-datagram extension (ALPN `ztp-dgram`): many datagrams both ways over one
//! byte stream, each a 2-byte big-endian length and that many bytes (at most 16,384).
//!
//! [`FramedChannel`] is a [`DatagramChannel`] over any [`ClientIo`], so the udp and quic
//! forwarders see whole datagrams whatever carries them. The framing itself (a pure
//! decoder, bounded) lives in `ztp_proto::framing`, shared with `ztpctl connect`.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_proto::framing::{encode, Decoder, MAX_FRAME};

use super::{BoxIo, ClientIo, DatagramChannel};

/// Datagrams framed over a client byte stream.
pub struct FramedChannel<'a> {
    io: &'a mut dyn ClientIo,
    dec: Decoder,
    /// Read buffer, allocated on first use.
    rbuf: Vec<u8>,
    out: Vec<u8>,
    /// Datagram payload bytes each way (framing not counted).
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl<'a> FramedChannel<'a> {
    pub fn new(io: &'a mut dyn ClientIo) -> Self {
        FramedChannel {
            io,
            dec: Decoder::default(),
            rbuf: Vec::new(),
            out: Vec::new(),
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    /// The stream under the frames, for the pipeline to end the session on.
    pub fn io(&mut self) -> &mut dyn ClientIo {
        self.io
    }
}

impl DatagramChannel for FramedChannel<'_> {
    fn recv<'b>(&'b mut self, buf: &'b mut Vec<u8>) -> BoxIo<'b, bool> {
        Box::pin(async move {
            loop {
                // A frame is taken whole or not at all: the decoder keeps partial input
                // across a cancelled read.
                match self.dec.frame() {
                    Ok(Some(frame)) => {
                        buf.clear();
                        buf.extend_from_slice(frame);
                        self.dec.consume_frame();
                        self.bytes_up += buf.len() as u64;
                        return Ok(true);
                    }
                    Ok(None) => {}
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                }
                if self.rbuf.is_empty() {
                    self.rbuf = vec![0u8; 16 * 1024];
                }
                let n = self.io.read(&mut self.rbuf).await?;
                if n == 0 {
                    return Ok(false);
                }
                self.dec.push(&self.rbuf[..n]);
            }
        })
    }

    fn send<'b>(&'b mut self, datagram: &'b [u8]) -> BoxIo<'b, ()> {
        Box::pin(async move {
            if datagram.len() > MAX_FRAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "datagram too large for a frame",
                ));
            }
            encode(datagram, &mut self.out);
            self.io.write_all(&self.out).await?;
            self.io.flush().await?;
            self.bytes_down += datagram.len() as u64;
            Ok(())
        })
    }
}
