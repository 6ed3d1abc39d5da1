#![no_main]
//! libFuzzer's entry to `phi4_fuzz::detokenizer` (fuzz/src/detokenizer.rs, which says what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| phi4_fuzz::detokenizer::run(data));
