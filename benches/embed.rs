//! The cost of an embedding against a prefill of the same tokens: both evaluate every token
//! through every layer; the embedding reads the final hidden states (mean-pooled) instead of the
//! last token's logits, so it skips the output projection. Alternating rounds, best of N.
//!
//!     cargo bench --bench embed -- --model FILE [--threads 2] [--tokens 512] [--rounds 3]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use phi4::{Model, Session, SessionParams};

#[path = "common/options.rs"]
mod options;
use options::Options;

fn main() {
    let o = Options::parse(
        "cargo bench --bench embed -- --model FILE [--threads N] [--tokens N] [--rounds N]",
    );
    let (model, threads, n, rounds): (PathBuf, usize, usize, usize) = (
        o.path("model"),
        o.get("threads", 2),
        o.get("tokens", 512),
        o.get("rounds", 3usize).max(1),
    );
    let m = Arc::new(Model::load(&model, Default::default()).unwrap());
    let text = "Lists are mutable sequences, typically used to store collections of items. ";
    let mut tokens = m.tokenizer.encode(&text.repeat(n / 8 + 1), false);
    tokens.truncate(n);
    let params = SessionParams {
        n_ctx: n + 16,
        n_threads: threads,
        ..Default::default()
    };
    let mut s = Session::new(m.clone(), &params).unwrap();
    let (mut embed, mut prefill) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        s.reset();
        let t = Instant::now();
        s.embed(&tokens).unwrap();
        embed = embed.min(t.elapsed().as_secs_f64());
        s.reset();
        let t = Instant::now();
        s.evaluate(&tokens).unwrap();
        prefill = prefill.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{} tokens, {threads} threads, best of {rounds}: embedding {:.1} ms, prefill {:.1} ms ({:.2}x)",
        tokens.len(),
        embed * 1e3,
        prefill * 1e3,
        embed / prefill
    );
}
