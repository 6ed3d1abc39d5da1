//! Embeddings (`Session::embed`): the mean of the final hidden states over the text's tokens,
//! as llama.cpp's mean pooling computes it, whatever the micro-batch size, on a shared
//! scheduler beside decoding sessions too.

mod common;

use std::sync::Arc;

use common::{cosine, reference};
use phi4::model::{LoadParams, Model};
use phi4::session::{GenerateParams, Session, SessionParams};
use phi4::Scheduler;
use phi4_synth::Spec;

fn session(m: &Arc<Model>, n_batch: usize) -> Session {
    let p = SessionParams {
        n_ctx: 512,
        n_batch,
        n_threads: 2,
        ..Default::default()
    };
    Session::new(m.clone(), &p).unwrap()
}

/// Largest difference relative to the vector's largest magnitude.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn embeddings_equal_llama_cpp_mean_pooling() {
    common::reference_kernels();
    let dir = common::tmpdir();
    let quantized = common::synth_model(
        dir.path(),
        "q.gguf",
        &Spec::small(2, common::ftype("q4_k_m"), 5),
    );
    for path in [common::fixture("phi4-tiny-docs.gguf"), quantized] {
        let m = Arc::new(Model::load(&path, LoadParams::default()).unwrap());
        let text = "How do I read a file line by line in Python, and close it afterwards?";
        let tokens = m.tokenizer.encode(text, false);
        let want = reference::embed_mean(&path, &tokens, 2, true);
        // One micro-batch, and several (the mean is summed across them).
        for n_batch in [256, 5] {
            let got = session(&m, n_batch).embed(&tokens).unwrap();
            assert_eq!(got.len(), m.config.n_embd);
            let (cos, diff) = (cosine(&got, &want), rel_diff(&got, &want));
            eprintln!(
                "{} n_batch {n_batch}: cosine {cos:.7}, largest difference {diff:.2e}",
                path.file_name().unwrap().to_string_lossy()
            );
            // (Not bit-exact: llama.cpp pools with a matrix product and attends over a cache
            // padded to 256; on quantized weights those last-bit differences move the 8-bit
            // rounding of some activations. The mean of another pooling, or of other tokens,
            // is far off.)
            assert!(cos > 0.9999 && diff < 5e-3, "{cos} {diff}");
        }
    }
}

#[test]
fn embedding_beside_decoding_sessions() {
    let m = Arc::new(
        Model::load(
            &common::fixture("phi4-tiny-docs.gguf"),
            LoadParams::default(),
        )
        .unwrap(),
    );
    let tokens = m.tokenizer.encode("What is a tuple?", false);
    let alone = session(&m, 32).embed(&tokens).unwrap();
    let other = m.tokenizer.encode("def main():", false);
    let greedy = GenerateParams {
        sampling: phi4::sample::SamplingParams::greedy(),
        max_tokens: 24,
        ..Default::default()
    };
    let reply_alone = session(&m, 32)
        .generate(&other, &greedy, &mut |_, _| true)
        .unwrap()
        .text;
    let sched = Scheduler::new(m.clone(), 2, 4).unwrap();
    let p = SessionParams {
        n_ctx: 512,
        n_batch: 32,
        n_threads: 2,
        ..Default::default()
    };
    let (mut a, mut b) = (
        Session::with_scheduler(&sched, &p).unwrap(),
        Session::with_scheduler(&sched, &p).unwrap(),
    );
    std::thread::scope(|s| {
        let decoding = s.spawn(|| a.generate(&other, &greedy, &mut |_, _| true).unwrap().text);
        for _ in 0..4 {
            let together = b.embed(&tokens).unwrap();
            assert!(cosine(&together, &alone) > 0.99999);
        }
        assert_eq!(decoding.join().unwrap(), reply_alone);
    });
    // The session goes on as a session: the embedded text is its cache.
    assert_eq!(b.history(), &tokens[..]);
    assert!(b.embed(&[]).is_err());
}
