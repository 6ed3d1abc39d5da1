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

/// A test per target, replaying its inputs through `targets::TARGET::run`.
macro_rules! replay_tests {
    ($($target:ident),*) => {$(
        #[test]
        fn $target() {
            replay(stringify!($target), targets::$target::run);
        }
    )*};
}

replay_tests!(
    gguf_parse,
    model_load,
    tokenizer,
    tokenizer_cl100k,
    detokenizer,
    chat,
    c_api,
    constraint,
    state,
    requests
);
