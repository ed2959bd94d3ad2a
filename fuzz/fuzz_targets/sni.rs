//! `cargo fuzz run sni`: see `ztp_fuzz::sni` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ztp_fuzz::sni::run(data));
