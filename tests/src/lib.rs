//! The ZTP end-to-end test harness.
//!
//! Everything here runs on loopback and is generated at test time: no private key is
//! checked in. The pieces:
//!
//! - [`pki`]: a throwaway ECDSA P-256 certificate authority, the proxy's server certificate,
//!   and client certificates of every shape the identity rules care about.
//! - [`client`]: an mTLS client (tokio-rustls) with the knobs the refusal tests need: no
//!   SNI, TLS 1.2 only, ALPN, session resumption, and a probe that tells whether the server
//!   ever presented its certificate; spec-mode datagram exchanges and `ztp-dgram` framed
//!   sessions ([`DgramSession`]).
//! - [`backend`]: loopback backends (TCP: echo, hash sink, byte source, server-first
//!   banner, a closed port, a listener that never completes a connect; UDP: echo,
//!   SHA-256 answer, silent, a closed port).
//! - [`dataplane`]: a guard around the real `ztp-dataplane` binary that starts it on
//!   ephemeral ports (or the `--listen` address a test gives), from a snapshot file or
//!   subscribed to a control plane (`--control`, with a node certificate), collects its
//!   JSON logs, polls `/readyz`, sends it SIGHUP/SIGTERM, waits for its exit and kills it
//!   on drop.
//! - [`control`]: a guard around the real `ztp-control` binary (fresh or given store,
//!   gRPC stream with the test PKI, admin token, SIGKILL and restart on the same store and
//!   ports), a REST helper and the `ztpctl` runner.
//! - [`keyserver`]: a guard around the real `ztp-keyserver` binary: its certificate (for
//!   localhost, 127.0.0.1 and ::1), signing keys written mode 0600 with their `.nodes`
//!   files, SIGHUP reloads awaited, SIGKILL by PID; and the key id of a certificate.
//! - [`etcd`]: a real etcd cluster on loopback (plain or with client-certificate TLS),
//!   its leader, and faults by PID: kill, freeze / thaw, restart on the same data.
//! - [`http`]: a minimal HTTP/1.1 client for the admin APIs.
//! - [`process`]: outside programs (found on `PATH` or in sbin; skipped with a visible
//!   `SKIPPED` line, or failed under `ZTP_REQUIRE_TOOLS=1`, when missing), free loopback ports, a guard around a
//!   long-running process with its output lines, and bounded one-shot runs.
//! - [`quic`]: a quinn client for the QUIC transport, waiting for the server's
//!   confirmation of the handshake, and the datagram flows' varint framing.
//! - [`bins`]: locating the workspace's binaries, building them once per test process.
//! - [`tempdir`]: a self-removing temporary directory.
//!
//! The contract (refusal alerts, `ZTP-ERROR` lines, the snapshot schema, flags, REST
//! conventions, the planes' stream) is DESIGN.md; the tests in `tests/e2e/` check it rule
//! by rule.

#![warn(missing_docs)]

pub mod backend;
pub mod bins;
pub mod client;
pub mod control;
pub mod dataplane;
pub mod etcd;
pub mod http;
pub mod keyserver;
pub mod pki;
pub mod process;
pub mod quic;
pub mod tempdir;

#[cfg(test)]
mod selftest;

pub use backend::{
    closed_port, closed_udp_port, BannerBackend, BlackholeListener, EchoBackend, HashSinkBackend,
    SourceBackend, UdpBackend, UdpMode,
};
pub use bins::Bin;
pub use client::{
    connect, connect_with, datagram_exchange, encode_frame, new_session_store, parse_ztp_error,
    read_to_end_or_alert, ClientOptions, DgramEvent, DgramSession, ReadError, DGRAM_ALPN,
    MAX_DATAGRAM,
};
pub use control::{Control, ControlOptions};
pub use dataplane::Dataplane;
pub use http::HttpResponse;
pub use pki::{node_uri, CertBuilder, TestCert, TestPki};
pub use tempdir::TempDir;

/// Installs rustls' `ring` crypto provider as the process default.
///
/// Called by every constructor in this crate; safe to call any number of times (an
/// already installed provider is kept).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Lines of `lines` that carry secret material: a PEM private key, an admin token
/// (`ztp_<16 hex>_<64 hex>`), or a bearer credential. Every data plane and control plane a
/// test starts has its whole output checked with this when it is dropped: no secret may
/// reach a log line, whatever the test did.
pub fn secret_lines(lines: &[String]) -> Vec<String> {
    fn has_token(line: &str) -> bool {
        let b = line.as_bytes();
        let hex = |s: &[u8]| s.iter().all(u8::is_ascii_hexdigit);
        (0..b.len()).any(|i| {
            b[i..].starts_with(b"ztp_")
                && b.len() >= i + 4 + 16 + 1 + 64
                && hex(&b[i + 4..i + 20])
                && b[i + 20] == b'_'
                && hex(&b[i + 21..i + 85])
        })
    }
    lines
        .iter()
        .filter(|l| {
            l.contains("PRIVATE KEY-----")
                || has_token(l)
                || l.to_ascii_lowercase().contains("bearer ztp_")
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod secret_tests {
    #[test]
    fn secret_lines_finds_keys_and_tokens_only() {
        let token = format!("ztp_{}_{}", "a1".repeat(8), "0f".repeat(32));
        let lines: Vec<String> = vec![
            "connection ok".into(),
            format!("auth with {token}"),
            // A PEM header made here: the repository holds no key, not even a fake one.
            format!("-----BEGIN {} KEY-----", "PRIVATE"),
            "ztp_0123 is not a token".into(),
            "token id ztp_a1a1a1a1a1a1a1a1 named ci".into(),
        ];
        let found = super::secret_lines(&lines);
        assert_eq!(found, vec![lines[1].clone(), lines[2].clone()]);
    }
}
