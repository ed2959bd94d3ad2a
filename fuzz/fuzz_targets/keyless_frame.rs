//! `cargo fuzz run keyless_frame`: see `ztp_fuzz::keyless` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztp_fuzz::keyless::run(data));
