//! End-to-end tests of ZTP: the real `ztp-dataplane` binary on loopback, driven by the
//! `ztp_tests` harness. One module per area; every test builds its own PKI, backends and
//! data plane, and every wait is bounded.
//!
//! Build the data plane first (`cargo build -p ztp-dataplane`); if the binary is missing
//! the harness builds it.

mod admin;
mod authz;
mod auto_protocol;
mod common;
mod dgram;
mod drain;
mod forwarding;
mod handlers;
mod identity;
mod ipv6;
mod limits;
mod logging;
mod openssl;
mod reload;
mod resumption;
mod snapshot_check;
mod tls_gate;
mod udp_spec;
