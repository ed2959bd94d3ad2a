//! ZTP's fuzz targets, as plain functions.
//!
//! Each `fuzz_targets/NAME.rs` is one line that hands libFuzzer's input to a function
//! here. Keeping the checks in a library lets `tests/regressions.rs` replay every seed
//! and every saved crash on stable Rust, without libFuzzer or nightly features.
//!
//! Every function must never panic on any input; a panic is a finding. Besides "no
//! panic", each checks properties of what the code under test returns (see each module).

#![forbid(unsafe_code)]

pub mod framed;
pub mod identity;
pub mod keyless;
pub mod rest;
pub mod snapshot;
pub mod sni;

/// A fuzz target: its name (the `cargo fuzz` target and the folder under `seeds/` and
/// `regressions/`) and the function that checks one input.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, in the order `run.sh` runs them.
pub const TARGETS: &[Target] = &[
    ("snapshot_yaml", snapshot::yaml),
    ("snapshot_proto", snapshot::proto),
    ("framed", framed::run),
    ("sni", sni::run),
    ("identity", identity::run),
    ("rest_bodies", rest::run),
    ("keyless_frame", keyless::run),
];
