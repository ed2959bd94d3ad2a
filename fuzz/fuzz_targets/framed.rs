//! `cargo fuzz run framed`: see `ztp_fuzz::framed` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztp_fuzz::framed::run(data));
