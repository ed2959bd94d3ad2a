//! The framed-datagram extension's framing (ALPN `ztp-dgram`): each datagram, both
//! ways, is a 2-byte big-endian length and that many bytes, at most 16,384. A reader
//! tells a `ZTP-ERROR` line from a frame because `ZT` reads as a length over the
//! maximum.
//!
//! The decoder is a pure function of the bytes pushed into it, used by the data plane
//! and by `ztpctl connect`. Its buffer is bounded: a frame longer than the maximum is an
//! error, never a reason to buffer more.

/// The largest datagram a frame carries.
pub const MAX_FRAME: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the maximum of 16384")]
    TooLong(usize),
}

/// Splits a byte stream into frames.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte.
    start: usize,
}

impl Decoder {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's payload, if one is buffered. Call
    /// [`Decoder::consume_frame`] once it has been used.
    pub fn frame(&self) -> Result<Option<&[u8]>, FrameError> {
        let pending = &self.buf[self.start..];
        let Some(header) = pending.get(..2) else {
            return Ok(None);
        };
        let len = u16::from_be_bytes([header[0], header[1]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        Ok(pending.get(2..2 + len))
    }

    /// Drops the frame [`Decoder::frame`] returned.
    pub fn consume_frame(&mut self) {
        if let Ok(Some(f)) = self.frame() {
            self.start += 2 + f.len();
        }
        // Keep the buffer from growing by moving the tail down once half is consumed.
        if self.start > MAX_FRAME {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// Bytes buffered but not consumed.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Encodes one datagram as a frame. The caller guarantees `payload.len() <= MAX_FRAME`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_FRAME);
    out.clear();
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(dec: &mut Decoder) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut out = vec![];
        while let Some(f) = dec.frame()? {
            out.push(f.to_vec());
            dec.consume_frame();
        }
        Ok(out)
    }

    #[test]
    fn decodes_frames_split_anywhere() {
        let payloads: Vec<Vec<u8>> = vec![vec![], vec![1], vec![7; 1200], vec![9; MAX_FRAME]];
        let mut stream = vec![];
        let mut f = vec![];
        for p in &payloads {
            encode(p, &mut f);
            stream.extend_from_slice(&f);
        }
        for chunk in [1, 2, 3, 1000, stream.len()] {
            let mut dec = Decoder::default();
            let mut got = vec![];
            for piece in stream.chunks(chunk) {
                dec.push(piece);
                got.extend(frames(&mut dec).unwrap());
            }
            assert_eq!(got, payloads, "chunks of {chunk}");
            assert_eq!(dec.pending(), 0);
        }
    }

    #[test]
    fn oversize_frame_is_an_error_not_a_buffer() {
        let mut dec = Decoder::default();
        dec.push(&[0x40, 0x01]); // 16385
        assert_eq!(dec.frame(), Err(FrameError::TooLong(16385)));
        let mut dec = Decoder::default();
        dec.push(b"ZTP-ERROR 403 forbidden\n");
        assert!(dec.frame().is_err(), "an error line never reads as a frame");
    }

    #[test]
    fn buffer_stays_bounded() {
        let mut dec = Decoder::default();
        let mut f = vec![];
        encode(&[5; 1000], &mut f);
        for _ in 0..1000 {
            dec.push(&f);
            assert_eq!(frames(&mut dec).unwrap().len(), 1);
        }
        assert!(dec.buf.capacity() < 4 * MAX_FRAME);
    }
}
