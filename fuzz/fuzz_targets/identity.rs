//! `cargo fuzz run identity`: see `ztp_fuzz::identity` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztp_fuzz::identity::run(data));
