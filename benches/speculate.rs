//! Speculative decoding: decode tok/s with drafts against plain decoding, in one run.
//!
//!     cargo bench --bench speculate -- --model FILE [--threads 2] [--prompt 32] [--gen 64]
//!         [--drafts 3,7,8] [--lookup-gen 200] [--text "Summarize: …"] [--rounds 2]
//!
//! 1. The mechanism against acceptance: a first run's greedy reply (the model's own tokens) is
//!    fed back as drafts of each of `--drafts` tokens, with 0, 25, 50, 75 or 100 % of the
//!    drafted tokens right (the others corrupted; which ones: a fixed hash of the position), and
//!    decode tok/s is compared with plain decoding. A corrupted token and every one after it in
//!    its draft are rejected, so the share of drafted tokens accepted is printed beside.
//! 2. Prompt lookup (the library's drafter, `draft` = each of `--drafts`) on a chat reply to
//!    `--text`, `--lookup-gen` tokens: tok/s against plain decoding, drafts accepted, and what
//!    drafting costs per step.
//!
//! Every run's tokens are checked against the plain run's (greedy: they must be the same).
//! The plain run and each configuration alternate for `--rounds` rounds; each figure is the
//! configuration's best round.

#[path = "common/options.rs"]
mod options;

use std::sync::Arc;

use options::Options;
use phi4::chat::{Message, Role};
use phi4::sample::SamplingParams;
use phi4::session::Timings;
use phi4::{Drafter, GenerateParams, Model, Session, SessionParams};

const USAGE: &str = "cargo bench --bench speculate -- --model FILE [--threads 2] [--prompt 32] [--gen 64] [--drafts 3,7,8] [--lookup-gen 200] [--text T] [--rounds 2]";

/// Drafts the known reply, a share of its tokens corrupted.
struct Oracle<'a> {
    truth: &'a [u32],
    /// Corrupted per 100 drafted tokens.
    corrupt: u64,
    n_vocab: u32,
}

impl Drafter for Oracle<'_> {
    fn draft(&mut self, tokens: &[u32], max: usize, out: &mut Vec<u32>) {
        let p = tokens.len();
        for (i, &t) in self.truth.iter().enumerate().skip(p).take(max) {
            // A fixed hash of the position decides, so every round corrupts the same tokens.
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
            let bad = h % 100 < self.corrupt;
            out.push(if bad { (t + 1) % self.n_vocab } else { t });
        }
    }
}

fn greedy(n: usize, draft: usize) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens: n,
        draft,
        ..Default::default()
    }
}

/// Ollama's default sampling (temperature 0.8, repeat penalty 1.1), seeded.
fn sampled(n: usize, draft: usize) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams {
            seed: Some(1),
            ..Default::default()
        },
        ..greedy(n, draft)
    }
}

/// One generation from `prompt` on a fresh cache: its tokens and timings.
fn run(
    s: &mut Session,
    prompt: &[u32],
    gp: &GenerateParams,
    drafter: Option<&mut dyn Drafter>,
) -> (Vec<u32>, Timings) {
    s.reset();
    let mut ids = Vec::new();
    let mut on = |t: Option<&phi4::Token>, _: &str| {
        ids.extend(t.map(|t| t.id));
        true
    };
    let out = match drafter {
        Some(d) => s.generate_drafted(prompt, gp, d, &mut on),
        None => s.generate(prompt, gp, &mut on),
    }
    .expect("generate");
    (ids, out.timings)
}

fn tok_s(t: &Timings) -> f64 {
    t.eval_count as f64 / (t.eval_duration as f64 / 1e9)
}

fn main() {
    let o = Options::parse(USAGE);
    let path = o.path("model");
    let threads: usize = o.get("threads", 2);
    let n_prompt: usize = o.get("prompt", 32);
    let gen: usize = o.get("gen", 64);
    let drafts: Vec<usize> = o
        .get("drafts", "3,7,8".to_string())
        .split(',')
        .map(|d| d.trim().parse().expect("--drafts: numbers"))
        .collect();
    let lookup_gen: usize = o.get("lookup-gen", 200);
    let text: String = o.get(
        "text",
        "Summarize: the cat sat on the mat. The cat sat on the mat.".to_string(),
    );
    let rounds: usize = o.get("rounds", 2);

    let model = Arc::new(Model::load(&path, Default::default()).expect("load"));
    let n_vocab = model.config.n_vocab as u32;
    let sp = SessionParams {
        n_ctx: n_prompt + gen.max(lookup_gen) + 32,
        n_threads: threads,
        ..Default::default()
    };
    let mut s = Session::new(model.clone(), &sp).expect("session");
    let prompt: Vec<u32> = (0..n_prompt)
        .map(|i| ((i * 7919 + 13) % (n_vocab as usize).min(100_000)) as u32)
        .collect();
    println!(
        "{} — {} threads, prompt {n_prompt}, {} CPU kernels",
        path.display(),
        threads,
        phi4::cpu_variant()
    );

    // 1. Against acceptance.
    let (reply, _) = run(&mut s, &prompt, &greedy(gen, 0), None);
    let truth: Vec<u32> = prompt.iter().chain(&reply).copied().collect();
    let shares = [0u64, 25, 50, 75, 100];
    let configs: Vec<(usize, u64)> = drafts
        .iter()
        .flat_map(|&d| shares.iter().map(move |&r| (d, r)))
        .collect();
    let mut plain: Option<Timings> = None;
    let mut best: Vec<Option<Timings>> = vec![None; configs.len()];
    let keep = |slot: &mut Option<Timings>, t: Timings| {
        if slot.as_ref().is_none_or(|b| tok_s(&t) > tok_s(b)) {
            *slot = Some(t);
        }
    };
    for _ in 0..rounds {
        let (ids, t) = run(&mut s, &prompt, &greedy(gen, 0), None);
        assert_eq!(ids, reply, "plain decoding is not deterministic");
        keep(&mut plain, t);
        for (i, &(draft, right)) in configs.iter().enumerate() {
            let mut oracle = Oracle {
                truth: &truth,
                corrupt: 100 - right,
                n_vocab,
            };
            let (ids, t) = run(&mut s, &prompt, &greedy(gen, draft), Some(&mut oracle));
            assert_eq!(ids, reply, "drafts changed the reply");
            keep(&mut best[i], t);
        }
    }
    let plain = plain.unwrap();
    println!("\n1. drafts from the model's own {gen}-token reply, a share of their tokens right");
    println!(
        "| draft | drafts right | drafted tokens accepted | steps | decode tok/s | vs plain |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| plain decoding | – | – | {} | {:.2} | 1.00 |",
        plain.eval_count,
        tok_s(&plain)
    );
    for (&(draft, right), t) in configs.iter().zip(&best) {
        let t = t.as_ref().unwrap();
        println!(
            "| {draft} | {right} % | {:.0} % ({} of {}) | {} | {:.2} | {:.2} |",
            100.0 * t.accepted as f64 / t.drafted.max(1) as f64,
            t.accepted,
            t.drafted,
            t.eval_count - t.accepted,
            tok_s(t),
            tok_s(t) / tok_s(&plain)
        );
    }

    // 2. Prompt lookup on chat replies: greedy (a model with random weights falls into loops)
    // and sampled (its loops broken up).
    let messages = [Message::new(Role::User, text.as_str())];
    let lookups: Vec<usize> = std::iter::once(0).chain(drafts.iter().copied()).collect();
    for (name, gp) in [
        ("greedy", greedy as fn(usize, usize) -> GenerateParams),
        ("sampled", sampled),
    ] {
        let mut chat = |draft: usize| {
            s.reset();
            let out = s
                .chat(&messages, &gp(lookup_gen, draft), &mut |_, _| true)
                .expect("chat");
            (out.text, out.timings)
        };
        let (want, _) = chat(0);
        let mut best: Vec<Option<Timings>> = vec![None; lookups.len()];
        for _ in 0..rounds {
            for (i, &draft) in lookups.iter().enumerate() {
                let (text, t) = chat(draft);
                assert_eq!(text, want, "prompt lookup changed the reply");
                keep(&mut best[i], t);
            }
        }
        let plain = best[0].unwrap();
        println!("\n2. prompt lookup on a {lookup_gen}-token {name} chat reply to {text:?}");
        println!("| draft | decode tok/s | vs plain | drafted | accepted | steps | drafting per step | a plain step |");
        println!("|---|---|---|---|---|---|---|---|");
        for (&draft, t) in lookups.iter().zip(&best) {
            let t = t.unwrap();
            let steps = t.eval_count - t.accepted;
            println!(
                "| {draft} | {:.2} | {:.2} | {} | {} ({:.0} %) | {steps} for {} tokens | {:.1} µs | {:.1} ms |",
                tok_s(&t),
                tok_s(&t) / tok_s(&plain),
                t.drafted,
                t.accepted,
                100.0 * t.accepted as f64 / t.drafted.max(1) as f64,
                t.eval_count,
                t.draft_duration as f64 / 1e3 / steps.max(1) as f64,
                plain.eval_duration as f64 / 1e6 / plain.eval_count as f64
            );
        }
    }
}
