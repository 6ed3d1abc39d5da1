//! Structured output's cost on one model file: decode time per token with and without a JSON
//! Schema constraint, and the time spent choosing each token (the constraint's mask and the
//! sampler), in alternating rounds, best of N.
//!
//!     cargo bench --bench constrain -- --model FILE [--threads 2] [--gen 16] [--rounds 3]
//!
//! The overhead is the extra choosing time per token over a decode step without a constraint.
//! The first constrained call also builds the model's token trie (once per model): its time is
//! shown apart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use phi4::chat::{Message, Role};
use phi4::{Constraint, GenerateParams, Model, SamplingParams, Session, SessionParams};

#[path = "common/options.rs"]
mod options;
use options::Options;

const SCHEMA: &str = r#"{"type": "object", "properties": {
    "state": {"enum": ["ok", "warning", "failed"]}, "alarm": {"type": "boolean"},
    "readings": {"type": "array", "items": {"type": "integer"}}, "note": {"type": "string"}},
  "required": ["state", "alarm", "readings", "note"]}"#;

fn main() {
    let o = Options::parse(
        "cargo bench --bench constrain -- --model FILE [--threads N] [--gen N] [--rounds N]",
    );
    let (model, threads, gen): (PathBuf, usize, usize) =
        (o.path("model"), o.get("threads", 2), o.get("gen", 16));
    let rounds = o.get("rounds", 3usize).max(1);
    let m = Arc::new(Model::load(&model, Default::default()).unwrap());
    let mut s = Session::new(
        m.clone(),
        &SessionParams {
            n_ctx: 512,
            n_threads: threads,
            ..Default::default()
        },
    )
    .unwrap();
    let msgs = [Message::new(
        Role::User,
        "Report the state of the sensor as JSON.",
    )];
    let params = |constraint: Option<Constraint>, max_tokens| GenerateParams {
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(1),
            ..Default::default()
        },
        max_tokens,
        constraint,
        draft: 0, // a decode step per token: the mask's cost against a step
        ..Default::default()
    };
    let schema = || Some(Constraint::JsonSchema(SCHEMA.into()));
    s.chat(&msgs, &params(None, 1), &mut |_, _| true).unwrap(); // the prompt in the cache
    let mut first = |what| {
        let t = Instant::now();
        s.chat(&msgs, &params(schema(), 1), &mut |_, _| true)
            .unwrap();
        println!("{what:<44} {:8.1} ms", t.elapsed().as_secs_f64() * 1e3);
    };
    first("first constrained token (builds the trie)");
    first("first constrained token (trie built)");

    // (decode ms/token, choosing µs/token), best of the rounds, free then constrained.
    let mut best = [(f64::MAX, f64::MAX); 2];
    for round in 0..rounds {
        for (i, c) in [None, schema()].into_iter().enumerate() {
            let out = s.chat(&msgs, &params(c, gen), &mut |_, _| true).unwrap();
            let t = &out.timings;
            let n = t.eval_count.max(1) as f64;
            let (step, choose) = (
                t.eval_duration as f64 / n / 1e6,
                t.sample_duration as f64 / n / 1e3,
            );
            println!("round {round} {:<12} {:3} tokens  {step:9.2} ms/token  choosing {choose:8.1} µs/token  {:?}", ["free", "constrained"][i], t.eval_count, out.reason.as_str());
            best[i] = (best[i].0.min(step), best[i].1.min(choose));
        }
    }
    let [(free_step, free_choose), (step, choose)] = best;
    println!(
        "model {} (vocabulary {}), {threads} threads, {gen} tokens, best of {rounds}",
        model.display(),
        m.config.n_vocab
    );
    println!("  free         {free_step:9.2} ms/token, choosing {free_choose:8.1} µs/token");
    println!("  constrained  {step:9.2} ms/token, choosing {choose:8.1} µs/token");
    println!(
        "  mask overhead {:.1} µs/token = {:.2} % of a decode step",
        choose - free_choose,
        (choose - free_choose) / 1e3 / free_step * 100.0
    );
}
