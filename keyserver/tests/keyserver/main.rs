//! Tests of the key server: its keys (ids, formats, authorization files), the protocol
//! served over real TLS on loopback (in process), and the binary (flags, file modes,
//! SIGHUP) through the `ztp_tests::keyserver` harness. Every key and certificate is made
//! here, at test time.

mod binary;
mod keys;
mod serving;
mod support;
