//! The ZTP end-to-end test harness.
//!
//! Everything here runs on loopback and is generated at test time: no private key is
//! checked in. The pieces:
//!
//! - [`pki`]: a throwaway ECDSA P-256 certificate authority, the proxy's server certificate,
//!   and client certificates of every shape the identity rules care about.
//! - [`client`]: an mTLS client (tokio-rustls) with the knobs the refusal tests need: no
//!   SNI, TLS 1.2 only, ALPN, session resumption, and a probe that tells whether the server
//!   ever presented its certificate.
//! - [`backend`]: loopback backends (echo, hash sink, byte source, a closed port, a
//!   listener that never completes a connect).
//! - [`dataplane`]: a guard around the real `ztp-dataplane` binary that starts it on
//!   ephemeral ports, collects its JSON logs and kills it on drop.
//! - [`tempdir`]: a self-removing temporary directory.
//!
//! The data plane's contract (refusal alerts, `ZTP-ERROR` lines, the snapshot schema,
//! flags) is DESIGN.md; the tests in `tests/e2e/` check it rule by rule.

#![warn(missing_docs)]

pub mod backend;
pub mod client;
pub mod dataplane;
pub mod pki;
pub mod tempdir;

#[cfg(test)]
mod selftest;

pub use backend::{closed_port, BlackholeListener, EchoBackend, HashSinkBackend, SourceBackend};
pub use client::{
    connect, connect_with, new_session_store, parse_ztp_error, read_to_end_or_alert, ClientOptions,
    ReadError,
};
pub use dataplane::Dataplane;
pub use pki::{CertBuilder, TestCert, TestPki};
pub use tempdir::TempDir;

/// Installs rustls' `ring` crypto provider as the process default.
///
/// Called by every constructor in this crate; safe to call any number of times (an
/// already installed provider is kept).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
