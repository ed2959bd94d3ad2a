//! `ztpctl`, the operator CLI.
//!
//! Owns: admin commands against the control plane's REST API, the built-in PKI, the
//! client-side `connect`, and `up`. Not built yet (issues 5 and 6).
