//! End-to-end tests of ZTP: the real `ztp-dataplane`, `ztp-control` and `ztpctl` binaries
//! on loopback, driven by the `ztp_tests` harness. One module per area; every test builds
//! its own PKI, backends, control plane (with its own store) and data planes, and every
//! wait is bounded.
//!
//! The harness builds the binaries once per run (`cargo build -p ztp-dataplane -p
//! ztp-control -p ztpctl -p ztp-tests --bins`; quick when they are fresh).

mod admin;
mod audit;
mod authz;
mod auto_protocol;
mod cli;
mod common;
mod connectors;
mod control_failover;
mod control_plane;
mod deltas;
mod dgram;
mod digests;
mod drain;
mod enforcement;
mod etcd_store;
mod faults;
mod forwarding;
mod handlers;
mod identity;
mod ipv6;
mod keyless;
mod leaks;
mod limits;
mod live;
mod logging;
mod metrics;
mod openssl;
mod pki_cli;
mod plane;
mod preauth;
mod quic;
mod real_clients;
mod reload;
mod replicas;
mod resumption;
mod revocation;
mod roles;
mod snapshot_check;
mod tls_gate;
mod tunnels;
mod udp_spec;
mod up;
