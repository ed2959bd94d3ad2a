//! `framed`: the framed-datagram decoder (`ztp_proto::framing`).
//!
//! Input: one byte `n`, then `n % 8 + 1` chunk-size bytes, then the byte stream. The
//! stream is pushed into a `Decoder` in chunks of those sizes, cycled (a size byte `b`
//! below 128 is a chunk of `b + 1` bytes, from 128 on one of `(b - 127) * 256`), and
//! every complete frame is taken out after each push, as the data plane does.
//!
//! Properties: no panic; every frame yielded is at most `MAX_FRAME` and re-encodes
//! (`framing::encode`) to exactly the bytes it was read from; `pending()` is always the
//! bytes pushed less those consumed; `frame()` answers the same when asked twice and
//! `consume_frame()` without a frame consumes nothing; after the frames are drained no
//! complete frame is left and less than `2 + MAX_FRAME` bytes are pending (the buffer
//! is bounded); an over-long length is reported as `TooLong` with that length; and the
//! frames (and error) are those of a one-pass reference parser, whatever the chunking.

use ztp_proto::framing::{encode, Decoder, FrameError, MAX_FRAME};

/// The frames of `stream` and the first over-long length, parsed in one pass.
fn reference(stream: &[u8]) -> (Vec<Vec<u8>>, Option<usize>) {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        if rest.len() < 2 {
            return (frames, None);
        }
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        if len > MAX_FRAME {
            return (frames, Some(len));
        }
        let Some(payload) = rest.get(2..2 + len) else {
            return (frames, None);
        };
        frames.push(payload.to_vec());
        at += 2 + len;
    }
}

fn chunk_len(b: u8) -> usize {
    if b < 128 {
        b as usize + 1
    } else {
        (b as usize - 127) * 256
    }
}

type Answer = Result<Option<Vec<u8>>, FrameError>;

fn answer(dec: &Decoder) -> Answer {
    dec.frame().map(|f| f.map(<[u8]>::to_vec))
}

pub fn run(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n % 8) as usize + 1;
    let (sizes, stream) = rest.split_at(n.min(rest.len()));
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![usize::MAX]
    } else {
        sizes.iter().map(|&b| chunk_len(b)).collect()
    };

    let mut dec = Decoder::default();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut error = None;
    let (mut pushed, mut consumed) = (0usize, 0usize);
    let mut encoded = Vec::new();
    'stream: for &size in sizes.iter().cycle() {
        if pushed == stream.len() {
            break;
        }
        let len = size.min(stream.len() - pushed);
        dec.push(&stream[pushed..pushed + len]);
        pushed += len;
        assert_eq!(dec.pending(), pushed - consumed, "pending after a push");
        loop {
            let got = answer(&dec);
            assert_eq!(got, answer(&dec), "frame() answered twice differently");
            match got {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME, "a frame of {} bytes", frame.len());
                    encode(&frame, &mut encoded);
                    let source = &stream[consumed..];
                    assert!(
                        source.starts_with(&encoded),
                        "frame at offset {consumed} does not re-encode to its bytes"
                    );
                    dec.consume_frame();
                    consumed += encoded.len();
                    frames.push(frame);
                    assert_eq!(dec.pending(), pushed - consumed, "pending after a frame");
                }
                Ok(None) => {
                    dec.consume_frame();
                    assert_eq!(
                        dec.pending(),
                        pushed - consumed,
                        "consume_frame() without a frame consumed bytes"
                    );
                    let buffered = &stream[consumed..pushed];
                    if let [a, b, ..] = buffered {
                        let want = 2 + u16::from_be_bytes([*a, *b]) as usize;
                        assert!(
                            buffered.len() < want,
                            "a complete frame of {want} bytes is buffered but not yielded"
                        );
                    }
                    assert!(
                        dec.pending() < 2 + MAX_FRAME,
                        "{} bytes pending after the frames were drained",
                        dec.pending()
                    );
                    break;
                }
                Err(FrameError::TooLong(len)) => {
                    assert!(len > MAX_FRAME, "TooLong({len}) is within the maximum");
                    let header = &stream[consumed..consumed + 2];
                    assert_eq!(
                        len,
                        u16::from_be_bytes([header[0], header[1]]) as usize,
                        "TooLong names another length than the header's"
                    );
                    error = Some(len);
                    // A reader closes the stream here.
                    break 'stream;
                }
            }
        }
    }
    let got = (frames, error);
    assert!(
        got == reference(stream),
        "chunked decoding differs from the one-pass reference (chunk sizes {sizes:?})"
    );
}
