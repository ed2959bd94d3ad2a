//! Protocol choice: how an authorized connection is carried.
//!
//! A declared protocol (`tcp`, `udp`, `quic`) is used as is, never detected. `auto` is
//! forwarded as tcp at once (every stream protocol goes to tcp forwarding, and waiting
//! for a server-speaks-first client's bytes would only add latency); the client's first
//! bytes, as the session saw them, name the detected kind in the connection's record.

use ztp_proto::Protocol;

/// What the first bytes look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Tls,
    Ssh,
    Http1,
    /// Bytes that match nothing known.
    Unknown,
    /// Nothing arrived before the deadline (a server-speaks-first protocol).
    Silent,
}

impl Detected {
    pub fn as_str(self) -> &'static str {
        match self {
            Detected::Tls => "tls",
            Detected::Ssh => "ssh",
            Detected::Http1 => "http1",
            Detected::Unknown => "unknown",
            Detected::Silent => "silent",
        }
    }

    /// The protocol a detected kind is carried with.
    pub fn protocol(self) -> Protocol {
        Protocol::Tcp
    }
}

/// How many bytes detection needs at most.
pub const PEEK_MAX: usize = 8;

const HTTP_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Classifies a prefix of the client's first bytes: `None` while more bytes could still
/// change the answer.
pub fn detect(prefix: &[u8]) -> Option<Detected> {
    let mut undecided = false;
    // A candidate matches if the prefix agrees with it on their common length.
    let mut check = |sig: &[u8], kind: Detected| -> Option<Detected> {
        let n = sig.len().min(prefix.len());
        if prefix[..n] != sig[..n] {
            return None;
        }
        if prefix.len() >= sig.len() {
            return Some(kind);
        }
        undecided = true;
        None
    };
    // TLS: handshake record, version 3.x.
    if let Some(d) = check(&[0x16, 0x03], Detected::Tls) {
        return Some(d);
    }
    if let Some(d) = check(b"SSH-", Detected::Ssh) {
        return Some(d);
    }
    for m in HTTP_METHODS {
        if let Some(d) = check(m, Detected::Http1) {
            return Some(d);
        }
    }
    if undecided && prefix.len() < PEEK_MAX {
        None
    } else {
        Some(Detected::Unknown)
    }
}

/// The declared protocol, or `None` when it must be detected.
pub fn declared(protocol: Protocol) -> Option<Protocol> {
    match protocol {
        Protocol::Auto => None,
        p => Some(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        let table: &[(&[u8], Option<Detected>)] = &[
            (b"\x16\x03\x01\x02\x00", Some(Detected::Tls)),
            (b"\x16", None),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Some(Detected::Ssh)),
            (b"SS", None),
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"OPTIONS * HTTP/1.1", Some(Detected::Http1)),
            (b"PO", None),
            (b"POST", None),
            (b"GETX", Some(Detected::Unknown)),
            (b"\x00\x01binary", Some(Detected::Unknown)),
            (b"*1\r\n$4\r\nPING\r\n", Some(Detected::Unknown)),
            (b"", None),
        ];
        for (bytes, want) in table {
            assert_eq!(detect(bytes), *want, "{bytes:?}");
        }
    }

    #[test]
    fn every_detected_kind_is_carried_as_tcp() {
        for d in [
            Detected::Tls,
            Detected::Ssh,
            Detected::Http1,
            Detected::Unknown,
            Detected::Silent,
        ] {
            assert_eq!(d.protocol(), Protocol::Tcp);
        }
    }

    #[test]
    fn declared_protocols_are_never_detected() {
        assert_eq!(declared(Protocol::Udp), Some(Protocol::Udp));
        assert_eq!(declared(Protocol::Tcp), Some(Protocol::Tcp));
        assert_eq!(declared(Protocol::Auto), None);
    }
}
