#![no_main]
//! libFuzzer's entry to `phi4_fuzz::model_load` (fuzz/src/model_load.rs, which says what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| phi4_fuzz::model_load::run(data));
