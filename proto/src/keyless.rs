//! The keyless signing protocol (DESIGN.md "Keyless"): what a data plane sends a key
//! server to have a handshake signed, and the answer. Clean-room from the description of
//! Cloudflare's Keyless SSL; carried over TLS 1.3 with client certificates.
//!
//! A message is an 8-byte header (major version 1, minor 0, body length u16, request id
//! u32, big endian) and a body of TLV items (tag u8, length u16, value). Requests are
//! pipelined; answers carry the request's id and may come in any order.
//!
//! Decoding never panics and never allocates more than the body it is given (at most
//! 65,535 bytes, the header's length field); a request that cannot be served decodes to
//! the error code its answer carries, so that a server answers it and keeps the
//! connection (the header told where the next message starts).

use std::net::IpAddr;

/// Header length, in bytes.
pub const HEADER_LEN: usize = 8;
/// The protocol version this build speaks.
pub const MAJOR: u8 = 1;
pub const MINOR: u8 = 0;

/// Item tags.
pub mod tag {
    pub const KEY_ID: u8 = 0x01;
    pub const SNI: u8 = 0x02;
    pub const CLIENT_IP: u8 = 0x03;
    pub const OPCODE: u8 = 0x11;
    pub const PAYLOAD: u8 = 0x12;
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// ECDSA over a SHA-256 digest (the payload is the digest).
    EcdsaSha256,
    EcdsaSha384,
    /// RSA-PSS over a SHA-256 digest, salt length = digest length.
    RsaPssSha256,
    RsaPssSha384,
    RsaPssSha512,
    /// Ed25519 over the message itself.
    Ed25519,
    /// Answered with the payload: a health check.
    Ping,
}

impl Op {
    pub fn code(self) -> u8 {
        match self {
            Op::EcdsaSha256 => 0x15,
            Op::EcdsaSha384 => 0x16,
            Op::RsaPssSha256 => 0x35,
            Op::RsaPssSha384 => 0x36,
            Op::RsaPssSha512 => 0x37,
            Op::Ed25519 => 0x18,
            Op::Ping => 0xF1,
        }
    }

    pub fn from_code(code: u8) -> Option<Op> {
        Some(match code {
            0x15 => Op::EcdsaSha256,
            0x16 => Op::EcdsaSha384,
            0x35 => Op::RsaPssSha256,
            0x36 => Op::RsaPssSha384,
            0x37 => Op::RsaPssSha512,
            0x18 => Op::Ed25519,
            0xF1 => Op::Ping,
            _ => return None,
        })
    }

    /// The digest length a signing request's payload must have; `None` when the payload
    /// is the message (Ed25519) or anything (ping).
    pub fn digest_len(self) -> Option<usize> {
        match self {
            Op::EcdsaSha256 | Op::RsaPssSha256 => Some(32),
            Op::EcdsaSha384 | Op::RsaPssSha384 => Some(48),
            Op::RsaPssSha512 => Some(64),
            Op::Ed25519 | Op::Ping => None,
        }
    }

    /// A name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::EcdsaSha256 => "ecdsa-sha256",
            Op::EcdsaSha384 => "ecdsa-sha384",
            Op::RsaPssSha256 => "rsa-pss-sha256",
            Op::RsaPssSha384 => "rsa-pss-sha384",
            Op::RsaPssSha512 => "rsa-pss-sha512",
            Op::Ed25519 => "ed25519",
            Op::Ping => "ping",
        }
    }
}

/// Opcodes of answers.
pub mod answer {
    pub const RESPONSE: u8 = 0xF0;
    pub const PONG: u8 = 0xF2;
    pub const ERROR: u8 = 0xFF;
}

/// Why a request was not served: the one-byte error of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ErrorCode {
    #[error("crypto failure")]
    CryptoFailure,
    #[error("key not found")]
    KeyNotFound,
    #[error("read error")]
    ReadError,
    #[error("version mismatch")]
    VersionMismatch,
    #[error("bad opcode")]
    BadOpcode,
    #[error("unexpected opcode")]
    UnexpectedOpcode,
    #[error("format error")]
    FormatError,
    #[error("internal error")]
    Internal,
}

impl ErrorCode {
    pub fn code(self) -> u8 {
        match self {
            ErrorCode::CryptoFailure => 0x01,
            ErrorCode::KeyNotFound => 0x02,
            ErrorCode::ReadError => 0x03,
            ErrorCode::VersionMismatch => 0x04,
            ErrorCode::BadOpcode => 0x05,
            ErrorCode::UnexpectedOpcode => 0x06,
            ErrorCode::FormatError => 0x07,
            ErrorCode::Internal => 0x08,
        }
    }

    /// An unknown code reads as an internal error.
    pub fn from_code(code: u8) -> ErrorCode {
        match code {
            0x01 => ErrorCode::CryptoFailure,
            0x02 => ErrorCode::KeyNotFound,
            0x03 => ErrorCode::ReadError,
            0x04 => ErrorCode::VersionMismatch,
            0x05 => ErrorCode::BadOpcode,
            0x06 => ErrorCode::UnexpectedOpcode,
            0x07 => ErrorCode::FormatError,
            _ => ErrorCode::Internal,
        }
    }

    /// A name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::CryptoFailure => "crypto_failure",
            ErrorCode::KeyNotFound => "key_not_found",
            ErrorCode::ReadError => "read_error",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::BadOpcode => "bad_opcode",
            ErrorCode::UnexpectedOpcode => "unexpected_opcode",
            ErrorCode::FormatError => "format_error",
            ErrorCode::Internal => "internal_error",
        }
    }
}

/// A message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub major: u8,
    pub minor: u8,
    /// The body's length: the next message starts this many bytes after the header.
    pub len: u16,
    pub id: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            major: b[0],
            minor: b[1],
            len: u16::from_be_bytes([b[2], b[3]]),
            id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    fn write(self, out: &mut Vec<u8>) {
        out.push(self.major);
        out.push(self.minor);
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
    }
}

/// A request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u32,
    pub op: Op,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo; required to sign.
    pub key_id: Option<[u8; 32]>,
    /// The handshake's SNI, for the key server's log.
    pub sni: Option<String>,
    /// The client's address, for the key server's log.
    pub client_ip: Option<IpAddr>,
    /// The digest (ECDSA, RSA-PSS), the message (Ed25519) or the ping's data.
    pub payload: Vec<u8>,
}

/// What an answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The signature (ECDSA as DER, as TLS carries it).
    Signature(Vec<u8>),
    Pong(Vec<u8>),
    Error(ErrorCode),
}

/// An answer, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u32,
    pub outcome: Outcome,
}

/// Why a message could not be encoded or an answer decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a message body of {0} bytes is over the protocol's 65,535")]
    TooLong(usize),
    #[error("version {0}.{1} where 1.x was expected")]
    Version(u8, u8),
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

fn item(out: &mut Vec<u8>, tag: u8, value: &[u8]) -> Result<(), FrameError> {
    let len = u16::try_from(value.len()).map_err(|_| FrameError::TooLong(value.len()))?;
    out.push(tag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
    Ok(())
}

fn frame(id: u32, body: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let len = u16::try_from(body.len()).map_err(|_| FrameError::TooLong(body.len()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    Header {
        major: MAJOR,
        minor: MINOR,
        len,
        id,
    }
    .write(&mut out);
    out.extend_from_slice(&body);
    Ok(out)
}

impl Request {
    /// The whole message: header and body.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut body = Vec::with_capacity(64 + self.payload.len());
        item(&mut body, tag::OPCODE, &[self.op.code()])?;
        if let Some(k) = &self.key_id {
            item(&mut body, tag::KEY_ID, k)?;
        }
        if let Some(s) = &self.sni {
            item(&mut body, tag::SNI, s.as_bytes())?;
        }
        match self.client_ip {
            Some(IpAddr::V4(a)) => item(&mut body, tag::CLIENT_IP, &a.octets())?,
            Some(IpAddr::V6(a)) => item(&mut body, tag::CLIENT_IP, &a.octets())?,
            None => {}
        }
        item(&mut body, tag::PAYLOAD, &self.payload)?;
        frame(self.id, body)
    }

    /// Decodes a request's body. `Err` is the error code to answer it with (the header's
    /// id is the answer's).
    pub fn decode(header: &Header, body: &[u8]) -> Result<Request, ErrorCode> {
        if header.major != MAJOR {
            return Err(ErrorCode::VersionMismatch);
        }
        let items = Items::parse(body).ok_or(ErrorCode::FormatError)?;
        let op = match items.opcode {
            Some([code]) => match Op::from_code(*code) {
                Some(op) => op,
                None if matches!(*code, answer::RESPONSE | answer::PONG | answer::ERROR) => {
                    return Err(ErrorCode::UnexpectedOpcode)
                }
                None => return Err(ErrorCode::BadOpcode),
            },
            _ => return Err(ErrorCode::FormatError),
        };
        let key_id = match items.key_id {
            None => None,
            Some(k) => Some(<[u8; 32]>::try_from(k).map_err(|_| ErrorCode::FormatError)?),
        };
        let client_ip = match items.client_ip {
            None => None,
            Some(b) => Some(match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(b).map_err(|_| ErrorCode::FormatError)?),
                16 => IpAddr::from(<[u8; 16]>::try_from(b).map_err(|_| ErrorCode::FormatError)?),
                _ => return Err(ErrorCode::FormatError),
            }),
        };
        let sni = match items.sni {
            None => None,
            Some(b) => Some(
                std::str::from_utf8(b)
                    .map_err(|_| ErrorCode::FormatError)?
                    .to_owned(),
            ),
        };
        let payload = items.payload.unwrap_or_default().to_vec();
        if op != Op::Ping {
            if key_id.is_none() || items.payload.is_none() {
                return Err(ErrorCode::FormatError);
            }
            if op.digest_len().is_some_and(|n| n != payload.len()) {
                return Err(ErrorCode::FormatError);
            }
        }
        Ok(Request {
            id: header.id,
            op,
            key_id,
            sni,
            client_ip,
            payload,
        })
    }
}

impl Response {
    /// The whole message. A signature or pong too long for a message is answered as an
    /// internal error instead.
    pub fn encode(&self) -> Vec<u8> {
        let body = |code: u8, payload: &[u8]| -> Result<Vec<u8>, FrameError> {
            let mut body = Vec::with_capacity(8 + payload.len());
            item(&mut body, tag::OPCODE, &[code])?;
            item(&mut body, tag::PAYLOAD, payload)?;
            Ok(body)
        };
        let encoded = match &self.outcome {
            Outcome::Signature(s) => body(answer::RESPONSE, s),
            Outcome::Pong(p) => body(answer::PONG, p),
            Outcome::Error(e) => body(answer::ERROR, &[e.code()]),
        }
        .and_then(|b| frame(self.id, b));
        encoded.unwrap_or_else(|_| {
            Response {
                id: self.id,
                outcome: Outcome::Error(ErrorCode::Internal),
            }
            .encode()
        })
    }

    /// Decodes an answer's body.
    pub fn decode(header: &Header, body: &[u8]) -> Result<Response, FrameError> {
        if header.major != MAJOR {
            return Err(FrameError::Version(header.major, header.minor));
        }
        let items = Items::parse(body).ok_or(FrameError::Malformed("items"))?;
        let payload = items.payload.unwrap_or_default();
        let outcome = match items.opcode {
            Some([answer::RESPONSE]) => Outcome::Signature(payload.to_vec()),
            Some([answer::PONG]) => Outcome::Pong(payload.to_vec()),
            Some([answer::ERROR]) => match payload {
                [code] => Outcome::Error(ErrorCode::from_code(*code)),
                _ => return Err(FrameError::Malformed("error payload")),
            },
            _ => return Err(FrameError::Malformed("opcode")),
        };
        Ok(Response {
            id: header.id,
            outcome,
        })
    }
}

/// The items of a body, each at most once; unknown tags are skipped.
#[derive(Default)]
struct Items<'a> {
    opcode: Option<&'a [u8]>,
    key_id: Option<&'a [u8]>,
    sni: Option<&'a [u8]>,
    client_ip: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
}

impl<'a> Items<'a> {
    /// `None` for a truncated item or a tag given twice.
    fn parse(mut body: &'a [u8]) -> Option<Items<'a>> {
        let mut items = Items::default();
        while !body.is_empty() {
            let (&t, rest) = body.split_first()?;
            let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
            let value = rest.get(2..2 + len)?;
            body = &rest[2 + len..];
            let slot = match t {
                tag::OPCODE => &mut items.opcode,
                tag::KEY_ID => &mut items.key_id,
                tag::SNI => &mut items.sni,
                tag::CLIENT_IP => &mut items.client_ip,
                tag::PAYLOAD => &mut items.payload,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return None;
            }
        }
        Some(items)
    }
}

/// Splits a message's header off `buf` when the whole message is there: the header and
/// the body's range in `buf`.
pub fn split(buf: &[u8]) -> Option<(Header, std::ops::Range<usize>)> {
    let head: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
    let h = Header::parse(head);
    let end = HEADER_LEN + h.len as usize;
    (buf.len() >= end).then_some((h, HEADER_LEN..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: Op, payload: Vec<u8>) -> Request {
        Request {
            id: 0x0102_0304,
            op,
            key_id: Some([7; 32]),
            sni: Some("a.svc.internal".into()),
            client_ip: Some("192.0.2.1".parse().unwrap()),
            payload,
        }
    }

    fn decode_req(bytes: &[u8]) -> Result<Request, ErrorCode> {
        let (h, body) = split(bytes).expect("a whole message");
        Request::decode(&h, &bytes[body])
    }

    #[test]
    fn requests_and_answers_round_trip() {
        for (op, len) in [
            (Op::EcdsaSha256, 32),
            (Op::EcdsaSha384, 48),
            (Op::RsaPssSha256, 32),
            (Op::RsaPssSha384, 48),
            (Op::RsaPssSha512, 64),
            (Op::Ed25519, 100),
        ] {
            let r = req(op, vec![9; len]);
            let bytes = r.encode().unwrap();
            assert_eq!(&bytes[..2], &[1, 0]);
            assert_eq!(decode_req(&bytes), Ok(r));
        }
        let mut ping = req(Op::Ping, b"hello".to_vec());
        ping.key_id = None;
        ping.client_ip = Some("2001:db8::1".parse().unwrap());
        assert_eq!(decode_req(&ping.encode().unwrap()), Ok(ping));
        for outcome in [
            Outcome::Signature(vec![1, 2, 3]),
            Outcome::Pong(b"hello".to_vec()),
            Outcome::Error(ErrorCode::KeyNotFound),
        ] {
            let a = Response { id: 42, outcome };
            let bytes = a.encode();
            let (h, body) = split(&bytes).unwrap();
            assert_eq!(Response::decode(&h, &bytes[body]), Ok(a));
        }
        // The documented codes.
        let codes: Vec<u8> = [
            ErrorCode::CryptoFailure,
            ErrorCode::KeyNotFound,
            ErrorCode::ReadError,
            ErrorCode::VersionMismatch,
            ErrorCode::BadOpcode,
            ErrorCode::UnexpectedOpcode,
            ErrorCode::FormatError,
            ErrorCode::Internal,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, (1..=8).collect::<Vec<u8>>());
    }

    #[test]
    fn the_wire_form_is_the_documented_one() {
        let r = Request {
            id: 5,
            op: Op::EcdsaSha256,
            key_id: Some([0xAA; 32]),
            sni: None,
            client_ip: Some("10.0.0.1".parse().unwrap()),
            payload: vec![0xBB; 32],
        };
        let b = r.encode().unwrap();
        let body_len = 4 + 35 + 7 + 35;
        assert_eq!(&b[..8], &[1, 0, 0, body_len as u8, 0, 0, 0, 5]);
        assert_eq!(&b[8..12], &[0x11, 0, 1, 0x15]);
        assert_eq!(&b[12..15], &[0x01, 0, 32]);
        assert_eq!(&b[47..54], &[0x03, 0, 4, 10, 0, 0, 1]);
        assert_eq!(&b[54..57], &[0x12, 0, 32]);
        assert_eq!(b.len(), 8 + body_len);
    }

    #[test]
    fn bad_requests_decode_to_the_error_they_are_answered_with() {
        let good = req(Op::EcdsaSha256, vec![1; 32]).encode().unwrap();
        let h = Header::parse(good[..8].try_into().unwrap());
        let with = |items: &[(u8, &[u8])]| -> Result<Request, ErrorCode> {
            let mut body = Vec::new();
            for (t, v) in items {
                item(&mut body, *t, v).unwrap();
            }
            Request::decode(&h, &body)
        };
        let key = [1u8; 32];
        let d32 = [2u8; 32];
        use ErrorCode::*;
        type Case<'a> = (&'a [(u8, &'a [u8])], ErrorCode);
        let cases: &[Case] = &[
            (&[(0x11, &[0x99]), (0x01, &key), (0x12, &d32)], BadOpcode),
            (
                &[(0x11, &[0xF0]), (0x01, &key), (0x12, &d32)],
                UnexpectedOpcode,
            ),
            (
                &[(0x11, &[0xFF]), (0x01, &key), (0x12, &d32)],
                UnexpectedOpcode,
            ),
            (&[(0x01, &key), (0x12, &d32)], FormatError),
            (
                &[(0x11, &[0x15, 0x15]), (0x01, &key), (0x12, &d32)],
                FormatError,
            ),
            (&[(0x11, &[0x15]), (0x12, &d32)], FormatError),
            (
                &[(0x11, &[0x15]), (0x01, &key[..31]), (0x12, &d32)],
                FormatError,
            ),
            (&[(0x11, &[0x15]), (0x01, &key)], FormatError),
            (
                &[(0x11, &[0x15]), (0x01, &key), (0x12, &d32[..31])],
                FormatError,
            ),
            (&[(0x11, &[0x16]), (0x01, &key), (0x12, &d32)], FormatError),
            (
                &[
                    (0x11, &[0x15]),
                    (0x01, &key),
                    (0x03, &[1, 2, 3]),
                    (0x12, &d32),
                ],
                FormatError,
            ),
            (
                &[(0x11, &[0x15]), (0x01, &key), (0x02, &[0xff]), (0x12, &d32)],
                FormatError,
            ),
            (
                &[(0x11, &[0x15]), (0x11, &[0x15]), (0x01, &key), (0x12, &d32)],
                FormatError,
            ),
        ];
        for (items, want) in cases {
            assert_eq!(with(items), Err(*want), "{items:?}");
        }
        // Unknown tags are skipped.
        assert!(with(&[(0x11, &[0x15]), (0x7e, b"x"), (0x01, &key), (0x12, &d32)]).is_ok());
        // Truncated items.
        assert_eq!(Request::decode(&h, &[0x11, 0, 5, 1]), Err(FormatError));
        assert_eq!(Request::decode(&h, &[0x11, 0]), Err(FormatError));
        // Another major version.
        let v2 = Header { major: 2, ..h };
        assert_eq!(
            Request::decode(&v2, &good[8..]),
            Err(ErrorCode::VersionMismatch)
        );
        // A payload too long for a message cannot be encoded.
        let e = req(Op::Ed25519, vec![0; 70_000]).encode().unwrap_err();
        assert!(matches!(e, FrameError::TooLong(_)), "{e}");
    }

    #[test]
    fn split_waits_for_the_whole_message() {
        let b = req(Op::EcdsaSha256, vec![1; 32]).encode().unwrap();
        for n in 0..b.len() {
            assert!(split(&b[..n]).is_none(), "{n}");
        }
        let (h, body) = split(&b).unwrap();
        assert_eq!(body, 8..b.len());
        assert_eq!(h.id, 0x0102_0304);
    }
}
