//! `cargo fuzz run snapshot_yaml`: see `ztp_fuzz::snapshot` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztp_fuzz::snapshot::yaml(data));
