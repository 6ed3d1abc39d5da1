//! Every fuzz target's kept crash inputs (fuzz/regressions/TARGET) and seeds
//! (fuzz/corpus/TARGET) through the target's checks (fuzz/src/), in the ordinary build: what CI
//! runs of the fuzzing. The coverage-guided runs themselves are `fuzz/run`, outside CI.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs: Vec<PathBuf> = ["regressions", "corpus"]
        .iter()
        .flat_map(|kind| {
            std::fs::read_dir(root.join(kind).join(target))
                .into_iter()
                .flatten()
        })
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no seed of {target}");
    for input in &inputs {
        let data = std::fs::read(input).unwrap();
        let r = std::panic::catch_unwind(|| run(&data));
        assert!(r.is_ok(), "{target}: {} fails", input.display());
    }
    eprintln!("{target}: {} inputs", inputs.len());
}

#[test]
fn gguf_parse() {
    replay("gguf_parse", targets::gguf_parse::run);
}

#[test]
fn model_load() {
    replay("model_load", targets::model_load::run);
}

#[test]
fn tokenizer() {
    replay("tokenizer", targets::tokenizer::run);
}

#[test]
fn tokenizer_cl100k() {
    replay("tokenizer_cl100k", targets::tokenizer_cl100k::run);
}

#[test]
fn detokenizer() {
    replay("detokenizer", targets::detokenizer::run);
}

#[test]
fn chat() {
    replay("chat", targets::chat::run);
}

#[test]
fn c_api() {
    replay("c_api", targets::c_api::run);
}

#[test]
fn constraint() {
    replay("constraint", targets::constraint::run);
}

#[test]
fn state() {
    replay("state", targets::state::run);
}

#[test]
fn requests() {
    replay("requests", targets::requests::run);
}
