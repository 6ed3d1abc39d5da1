#![no_main]
//! libFuzzer's entry to `phi4_fuzz::tokenizer_cl100k` (fuzz/src/tokenizer_cl100k.rs, which says what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| phi4_fuzz::tokenizer_cl100k::run(data));
