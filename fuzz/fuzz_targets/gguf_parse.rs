#![no_main]
//! libFuzzer's entry to `phi4_fuzz::gguf_parse` (fuzz/src/gguf_parse.rs, which says what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| phi4_fuzz::gguf_parse::run(data));
