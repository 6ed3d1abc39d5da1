//! The fuzz targets' checks: a module per target, each `run` on one input of arbitrary bytes.
//! libFuzzer drives them through `fuzz_targets/` (cargo-fuzz, `fuzz/run`, outside CI); the
//! test suite runs every kept crash input (`regressions/`) and seed (`corpus/`) through them
//! (`tests/fuzz_inputs.rs`, which includes this file), so CI needs no fuzzing build.

use std::path::{Path, PathBuf};

pub mod c_api;
pub mod chat;
pub mod constraint;
mod demo_session;
pub mod detokenizer;
pub mod gguf_parse;
pub mod model_load;
pub mod requests;
pub mod state;
pub mod tokenizer;
pub mod tokenizer_cl100k;

/// The repository's root: this crate's parent, or the crate itself when the test suite
/// includes this file.
fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    match here.join("tests/fixtures").is_dir() {
        true => here.to_path_buf(),
        false => here.join(".."),
    }
}

/// A test fixture (tests/fixtures/NAME).
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// A seed input (fuzz/corpus/NAME).
pub fn corpus(name: &str) -> PathBuf {
    root().join("fuzz/corpus").join(name)
}
