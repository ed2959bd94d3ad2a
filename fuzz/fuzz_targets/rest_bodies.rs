//! `cargo fuzz run rest_bodies`: see `ztp_fuzz::rest` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztp_fuzz::rest::run(data));
