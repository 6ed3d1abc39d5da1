//! Loading a mutated model file: an error or a model whose every session works. The input is
//! written to a file (the loader maps files) and loaded without repacking or prefetching.

use std::sync::Arc;

use phi4::{LoadParams, Model, Session, SessionParams};

/// The check of one input.
pub fn run(data: &[u8]) {
    let path = std::env::temp_dir().join(format!("phi4-fuzz-model-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let loaded = Model::load(
        &path,
        LoadParams {
            repack: false,
            prefetch: false,
            progress: None,
        },
    );
    if let Ok(model) = loaded {
        // A model that loads runs: one short evaluation.
        let model = Arc::new(model);
        let sp = SessionParams {
            n_ctx: 16,
            n_batch: 4,
            n_threads: 1,
            ..Default::default()
        };
        if let Ok(mut s) = Session::new(model.clone(), &sp) {
            let _ = s.evaluate(&[0, (model.config.n_vocab - 1) as u32]);
        }
    }
}
