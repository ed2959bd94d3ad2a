//! Shared infrastructure of ZTP's binaries: what is neither the contract between the
//! planes nor part of one plane, written once instead of once per binary.
//!
//! Owns:
//! - [`tls`]: loading TLS material from PEM files (certificate chains, private keys as
//!   rustls [`SigningKey`](rustls::sign::SigningKey)s, CA sets), with errors that name
//!   the file and never carry key bytes;
//! - [`source`]: what counts as one source (an IPv4 address or an IPv6 /64) and live
//!   connections counted in all and per source, within caps;
//! - [`signal`]: waiting for SIGTERM or SIGINT, and the stream of SIGHUPs;
//! - [`trace`]: the tracing subscriber of a binary (text or JSON lines on stderr);
//! - [`fs`]: writing files atomically with a chosen mode (0600 for secrets) without
//!   following symlinks;
//! - [`http`]: the bounded HTTP/1.1 server of both planes' admin ports;
//! - [`mux`]: the streams of a connector's tunnel over QUIC or over HTTP/2 on TCP + TLS,
//!   for the connector and the data plane alike.
//!
//! Does not own: the contract between the planes (`ztp-proto`), or any policy of a plane:
//! which TLS versions, verifiers and ALPN a port uses, what its routes serve and what a
//! signal makes a process do stay with the binary.

#![forbid(unsafe_code)]

pub mod fs;
pub mod http;
pub mod mux;
pub mod signal;
pub mod source;
pub mod tls;
pub mod trace;

#[cfg(test)]
mod test_dir;
