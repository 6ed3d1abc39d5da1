#![no_main]
//! libFuzzer's entry to `phi4_fuzz::tokenizer` (fuzz/src/tokenizer.rs, which says what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| phi4_fuzz::tokenizer::run(data));
