//! `keyless_frame`: the keyless signing protocol's decoder (`ztp_proto::keyless`), as the
//! key server reads requests and the data plane reads answers.
//!
//! Input: a byte stream of messages, split one after another with `split` (a header, then
//! the body its length names), each body decoded both as a request and as an answer.
//!
//! Properties: no panic; `split` takes a message exactly when the header and the whole
//! body are there, and the next one starts right after it; a decoded request carries the
//! header's id, a major version other than 1 is `VersionMismatch`, a signing request has
//! a key id and a payload of its opcode's digest length, and a request re-encodes
//! (`Request::encode`) to bytes that decode to the same request; an answer re-encodes
//! (`Response::encode`) to bytes that decode to the same answer; an error code read from
//! an answer maps back to a one-byte code.

use ztp_proto::keyless::{
    split, ErrorCode, Header, Op, Outcome, Request, Response, HEADER_LEN, MAJOR,
};

fn redecode_request(bytes: &[u8]) -> Result<Request, ErrorCode> {
    let (h, body) = split(bytes).expect("an encoded request is one whole message");
    assert_eq!(
        body.end,
        bytes.len(),
        "an encoded request is exactly one message"
    );
    Request::decode(&h, &bytes[body])
}

fn check_request(h: &Header, body: &[u8]) {
    match Request::decode(h, body) {
        Ok(req) => {
            assert_eq!(h.major, MAJOR, "a request of version {} decoded", h.major);
            assert_eq!(req.id, h.id, "the request's id is the header's");
            if req.op != Op::Ping {
                assert!(req.key_id.is_some(), "a signing request without a key id");
                if let Some(n) = req.op.digest_len() {
                    assert_eq!(
                        req.payload.len(),
                        n,
                        "{:?} with a wrong digest length",
                        req.op
                    );
                }
            }
            let bytes = req.encode().expect("a decoded request re-encodes");
            assert_eq!(redecode_request(&bytes), Ok(req), "request round trip");
        }
        Err(code) => {
            if h.major != MAJOR {
                assert_eq!(code, ErrorCode::VersionMismatch, "another major version");
            }
            assert!(
                !matches!(code, ErrorCode::KeyNotFound | ErrorCode::CryptoFailure),
                "the decoder answered {code:?}, which only a key can"
            );
        }
    }
}

fn check_answer(h: &Header, body: &[u8]) {
    let Ok(resp) = Response::decode(h, body) else {
        return;
    };
    assert_eq!(resp.id, h.id, "the answer's id is the header's");
    if let Outcome::Error(code) = &resp.outcome {
        assert_eq!(
            ErrorCode::from_code(code.code()),
            *code,
            "error code round trip"
        );
    }
    let bytes = resp.encode();
    let (h2, range) = split(&bytes).expect("an encoded answer is one whole message");
    assert_eq!(
        range.end,
        bytes.len(),
        "an encoded answer is exactly one message"
    );
    assert_eq!(
        Response::decode(&h2, &bytes[range]),
        Ok(resp),
        "answer round trip"
    );
}

pub fn run(data: &[u8]) {
    let mut rest = data;
    while let Some((h, body)) = split(rest) {
        assert_eq!(body.start, HEADER_LEN);
        assert_eq!(
            body.end,
            HEADER_LEN + h.len as usize,
            "the body is the header's length"
        );
        let head: &[u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().unwrap();
        assert_eq!(Header::parse(head), h);
        check_request(&h, &rest[body.clone()]);
        check_answer(&h, &rest[body.clone()]);
        rest = &rest[body.end..];
    }
    // What is left is less than a whole message.
    if rest.len() >= HEADER_LEN {
        let head: &[u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().unwrap();
        let len = Header::parse(head).len as usize;
        assert!(
            rest.len() < HEADER_LEN + len,
            "a whole message was not split off"
        );
    }
}
