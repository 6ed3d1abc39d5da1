#![no_main]
//! libFuzzer's entry to `phi4_fuzz::c_api` (fuzz/src/c_api.rs, which says what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| phi4_fuzz::c_api::run(data));
