#![no_main]
//! libFuzzer's entry to `phi4_fuzz::constraint` (fuzz/src/constraint.rs, which says what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| phi4_fuzz::constraint::run(data));
