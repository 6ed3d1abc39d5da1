//! Speculative decoding: drafts change the number of steps, never the reply — greedy or
//! sampled with a seed, with stop strings, token limits, cancellation, structured output,
//! log-probabilities, a conversation's next turn, and sessions stepped together.

mod common;

use std::sync::{Arc, Barrier};

use phi4::chat::{Message, Role};
use phi4::sample::SamplingParams;
use phi4::session::{DoneReason, GenerateParams, Outcome, Session, SessionParams};
use phi4::{Constraint, Drafter, KvType, Model, PromptLookup, Scheduler, Token};
use phi4_synth::Spec;

fn params() -> SessionParams {
    SessionParams {
        n_ctx: 1024,
        n_batch: 16,
        n_threads: 2,
        ..Default::default()
    }
}

fn greedy(max_tokens: usize, draft: usize) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        draft,
        ..Default::default()
    }
}

/// Drafts the tokens of a known run (its prompt and reply), every `wrong`-th drafted position
/// corrupted (0: none).
struct Known {
    truth: Vec<u32>,
    wrong: usize,
    n_vocab: u32,
}

impl Drafter for Known {
    fn draft(&mut self, tokens: &[u32], max: usize, out: &mut Vec<u32>) {
        let p = tokens.len();
        for (i, &t) in self.truth.iter().enumerate().skip(p).take(max) {
            let bad = self.wrong > 0 && i % self.wrong == 0;
            out.push(if bad { (t + 1) % self.n_vocab } else { t });
        }
    }
}

/// A generation from `prompt`: the tokens streamed and the outcome. Every run starts alike: the
/// cache holds all of the prompt but its last token (evaluated once per session), which the
/// generation evaluates alone.
fn run(
    s: &mut Session,
    prompt: &[u32],
    gp: &GenerateParams,
    drafter: Option<&mut dyn Drafter>,
) -> (Vec<Token>, Outcome) {
    s.warm(&prompt[..prompt.len() - 1]).unwrap();
    let mut tokens = Vec::new();
    let mut on = |t: Option<&Token>, _: &str| {
        tokens.extend(t.cloned());
        true
    };
    let out = match drafter {
        Some(d) => s.generate_drafted(prompt, gp, d, &mut on),
        None => s.generate(prompt, gp, &mut on),
    }
    .unwrap();
    (tokens, out)
}

fn ids(tokens: &[Token]) -> Vec<u32> {
    tokens.iter().map(|t| t.id).collect()
}

fn known(prompt: &[u32], reply: &[Token], wrong: usize, model: &Model) -> Known {
    Known {
        truth: prompt.iter().copied().chain(ids(reply)).collect(),
        wrong,
        n_vocab: model.config.n_vocab as u32,
    }
}

/// `gp` with and without drafts (prompt lookup, the known reply, the known reply with every
/// third drafted token wrong) gives the same tokens and text; the known reply's drafts are all
/// taken. Returns the plain run.
fn same_with_drafts(model: &Arc<Model>, prompt: &[u32], gp: &GenerateParams) -> Outcome {
    same_with_drafts_kv(model, prompt, gp, KvType::F16)
}

/// `same_with_drafts` on a session whose cache keeps `kv`.
fn same_with_drafts_kv(
    model: &Arc<Model>,
    prompt: &[u32],
    gp: &GenerateParams,
    kv: KvType,
) -> Outcome {
    let sp = SessionParams {
        kv_type: kv,
        ..params()
    };
    let mut s = Session::new(model.clone(), &sp).unwrap();
    let plain_gp = GenerateParams {
        draft: 0,
        ..gp.clone()
    };
    let (want, plain) = run(&mut s, prompt, &plain_gp, None);
    assert_eq!(plain.timings.drafted, 0);
    let drafted_gp = GenerateParams {
        draft: 8,
        ..gp.clone()
    };
    let runs: [(&str, Box<dyn Drafter>); 3] = [
        ("prompt lookup", Box::new(PromptLookup::new())),
        ("known", Box::new(known(prompt, &want, 0, model))),
        (
            "known, every third wrong",
            Box::new(known(prompt, &want, 3, model)),
        ),
    ];
    for (name, mut drafter) in runs {
        let d: &mut dyn Drafter = &mut *drafter;
        let (got, out) = run(&mut s, prompt, &drafted_gp, Some(d));
        assert_eq!(ids(&got), ids(&want), "{name}: the tokens differ");
        assert_eq!(got, want, "{name}: the log-probabilities differ");
        assert_eq!(out.text, plain.text, "{name}");
        assert_eq!(out.reason, plain.reason, "{name}");
        assert_eq!(out.stop_string, plain.stop_string, "{name}");
        let t = &out.timings;
        assert_eq!(t.eval_count, plain.timings.eval_count, "{name}");
        assert!(t.accepted <= t.drafted, "{name}: {t:?}");
        eprintln!(
            "{name}: {} tokens, drafted {}, accepted {}",
            t.eval_count, t.drafted, t.accepted
        );
        match name {
            "known" => {
                assert_eq!(t.accepted, t.drafted, "{name}: a right draft was rejected");
                if want.len() > 4 {
                    assert!(t.accepted >= want.len() / 2, "{name}: {t:?}");
                }
            }
            "known, every third wrong" if want.len() > 4 => {
                assert!(t.accepted > 0 && t.accepted < t.drafted, "{name}: {t:?}")
            }
            _ => {}
        }
    }
    plain
}

fn prompt(len: u32, seed: u32) -> Vec<u32> {
    (0..len)
        .map(|i| (i * 37 + seed * 101 + 11) % 1000)
        .collect()
}

/// `same_with_drafts` on a one-layer synthetic model of type `ft`: `n` tokens from a prompt of
/// `len`, log-probabilities compared too.
fn synthetic_run(ft: &str, seed: u64, len: u32, n: usize) {
    synthetic_run_kv(ft, seed, len, n, KvType::F16)
}

fn synthetic_run_kv(ft: &str, seed: u64, len: u32, n: usize, kv: KvType) {
    let dir = common::tmpdir();
    let spec = Spec::small(1, common::ftype(ft), seed);
    let path = common::synth_model(dir.path(), "m.gguf", &spec);
    let model = Arc::new(Model::load(&path, Default::default()).unwrap());
    // Under an emulator, quantized weights only where phi4's kernels take them (the A76): on a
    // CPU without them (the A72) they run ggml's, whose drafted steps the f32 and f16 models
    // check there.
    let ggml_quantized = ft != "f32" && ft != "f16" && !model.repacked_summary().contains("phi4's");
    if common::runner().is_some() && ggml_quantized {
        eprintln!("{ft}: phi4's kernels do not take it on this CPU");
        return;
    }
    let gp = GenerateParams {
        logprobs: Some(2),
        ..greedy(n, 8)
    };
    let out = same_with_drafts_kv(&model, &prompt(len, seed as u32), &gp, kv);
    assert!(out.timings.eval_count > 8, "{out:?}");
}

fn synthetic(ft: &str, seed: u64) {
    synthetic_run(ft, seed, 24, reply_len())
}

/// Tokens of a synthetic model's reply: fewer under an emulator (tens of times slower), still
/// several drafts of every length.
fn reply_len() -> usize {
    if common::runner().is_some() {
        24
    } else {
        48
    }
}

/// Past 512 cached positions ggml attends for one query by another path than for several:
/// verified tokens must still match their own decode steps.
fn long_context(ft: &str, seed: u64) {
    synthetic_run(ft, seed, 520, 24)
}

#[test]
fn long_context_q4_k_m() {
    long_context("q4_k_m", 9)
}
/// Quantized caches: verified tokens match their own decode steps (f16 weights: decode steps on
/// ggml's reference paths; q4_k_m past 512 positions).
#[test]
fn q8_0_cache() {
    synthetic_run_kv("f16", 11, 24, reply_len(), KvType::Q8_0)
}

#[test]
fn q4_0_cache_long_context() {
    synthetic_run_kv("q4_k_m", 12, 520, 24, KvType::Q4_0)
}

#[test]
fn long_context_f16() {
    long_context("f16", 10)
}

#[test]
fn f32() {
    synthetic("f32", 1)
}
#[test]
fn f16() {
    synthetic("f16", 2)
}
#[test]
fn q8_0() {
    synthetic("q8_0", 3)
}
#[test]
fn q4_0() {
    synthetic("q4_0", 4)
}
#[test]
fn q4_k_m() {
    synthetic("q4_k_m", 5)
}
#[test]
fn q2_k() {
    synthetic("q2_k", 6)
}
#[test]
fn q3_k() {
    synthetic("q3_k", 7)
}
/// Grid-coded weights: a step of more than 8 tokens reads each superblock unpacked once, a
/// decode step unpacks it in registers; the same sums either way.
#[test]
fn iq3_s() {
    synthetic("iq3_s", 14)
}
/// ... and with a scale per 16 weights (the unpacked form's other kernel).
#[test]
fn iq2_s() {
    synthetic("iq2_s", 15)
}
#[test]
fn iq4_xs() {
    synthetic("iq4_xs", 8)
}

fn demo_prompt(model: &Model) -> Vec<u32> {
    model.tokenizer.encode(
        "The list type is mutable. The tuple type is immutable. The list type is mutable. The tuple",
        true,
    )
}

#[test]
fn demo_model_greedy_sampled_and_with_logprobs() {
    let model = common::demo();
    let p = demo_prompt(&model);
    same_with_drafts(&model, &p, &greedy(64, 8));
    // Sampled with a seed: the draw per token is the same, so are the tokens.
    let sampled = GenerateParams {
        sampling: SamplingParams {
            temperature: 0.9,
            seed: Some(7),
            ..Default::default()
        },
        max_tokens: 64,
        logprobs: Some(3),
        ..Default::default()
    };
    same_with_drafts(&model, &p, &sampled);
    // Prompt lookup finds the repeated phrase and drafts.
    let mut s = Session::new(model.clone(), &params()).unwrap();
    let (_, out) = run(&mut s, &p, &greedy(64, 8), Some(&mut PromptLookup::new()));
    assert!(out.timings.drafted > 0, "{:?}", out.timings);
}

#[test]
fn stop_strings_limits_and_cancel_with_drafts() {
    let model = common::demo();
    let p = demo_prompt(&model);
    let mut s = Session::new(model.clone(), &params()).unwrap();
    let (reply, full) = run(&mut s, &p, &greedy(48, 0), None);
    assert!(
        reply.len() > 12 && full.text.chars().count() > 12,
        "{full:?}"
    );
    // A stop string from the middle of the reply.
    let stop: String = full.text.chars().skip(8).take(4).collect();
    let gp = GenerateParams {
        stop: vec![stop.clone()],
        ..greedy(48, 8)
    };
    let out = same_with_drafts(&model, &p, &gp);
    assert_eq!(out.reason, DoneReason::Stop);
    assert_eq!(out.stop_string.as_deref(), Some(stop.as_str()));
    // A token limit inside a draft.
    for n in [1, 5, 9] {
        let mut d = known(&p, &reply, 0, &model);
        let (got, out) = run(&mut s, &p, &greedy(n, 8), Some(&mut d));
        assert_eq!(ids(&got), ids(&reply[..n]));
        assert_eq!(out.reason, DoneReason::Length);
        // No draft beyond the limit: the drafts of the last step end at the last token.
        assert!(out.timings.drafted < n, "{:?}", out.timings);
    }
    // Cancelled mid-draft by the callback: the tokens so far; the session goes on as one
    // that never drafted.
    let mut d = known(&p, &reply, 0, &model);
    let mut seen = Vec::new();
    s.warm(&p[..p.len() - 1]).unwrap();
    let out = s
        .generate_drafted(&p, &greedy(48, 8), &mut d, &mut |t, _| {
            seen.extend(t.map(|t| t.id));
            seen.len() < 6
        })
        .unwrap();
    assert_eq!(out.reason, DoneReason::Cancelled);
    assert_eq!(seen, ids(&reply[..6]));
    // The cache holds the prompt and the tokens before the cancelled one: continuing from
    // there gives the rest of the reply.
    let mut more = p.clone();
    more.extend(&seen);
    let mut rest = Vec::new();
    s.generate(&more, &greedy(48 - 6, 8), &mut |t, _| {
        rest.extend(t.map(|t| t.id));
        true
    })
    .unwrap();
    assert_eq!(rest, ids(&reply[6..]));
}

#[test]
fn structured_output_with_drafts() {
    let model = common::demo();
    let p = demo_prompt(&model);
    let schema = r#"{"type":"object","properties":{"name":{"type":"string"},"tags":{"type":"array","items":{"type":"string"}}},"required":["name","tags"]}"#;
    let gp = GenerateParams {
        constraint: Some(Constraint::JsonSchema(schema.into())),
        ..greedy(80, 8)
    };
    let out = same_with_drafts(&model, &p, &gp);
    let v: serde_json::Value = serde_json::from_str(&out.text).expect("valid JSON");
    assert!(v["name"].is_string(), "{v}");
}

#[test]
fn next_turn_after_drafted_reply() {
    // Rejected drafts' rows stay in the cache past the history: the next turn must not see them.
    let model = common::demo();
    let turn1 = vec![Message::new(
        Role::User,
        "Repeat after me: the list is mutable, the list is mutable, the list is mutable.",
    )];
    let mut replies = Vec::new();
    for draft in [0, 8] {
        let mut s = Session::new(model.clone(), &params()).unwrap();
        let a = s
            .chat(&turn1, &greedy(40, draft), &mut |_, _| true)
            .unwrap();
        let mut turn2 = turn1.clone();
        turn2.push(Message::new(Role::Assistant, a.text.clone()));
        turn2.push(Message::new(Role::User, "And the tuple?"));
        let b = s
            .chat(&turn2, &greedy(40, draft), &mut |_, _| true)
            .unwrap();
        assert!(b.timings.cached_tokens() > 0, "{:?}", b.timings);
        replies.push((a.text, b.text, a.timings.drafted + b.timings.drafted));
    }
    assert_eq!(replies[0].0, replies[1].0);
    assert_eq!(replies[0].1, replies[1].1);
    assert!(replies[1].2 > 0, "nothing was drafted: {replies:?}");
}

#[test]
fn sessions_stepped_together_verify_their_drafts() {
    let dir = common::tmpdir();
    let path = common::synth_model(
        dir.path(),
        "m.gguf",
        &Spec::small(1, common::ftype("q4_k_m"), 31),
    );
    let model = Arc::new(Model::load(&path, Default::default()).unwrap());
    let prompts: Vec<Vec<u32>> = (0..3).map(|k| prompt(20, k)).collect();
    // Alone, without drafts.
    let want: Vec<Vec<Token>> = prompts
        .iter()
        .map(|p| {
            let mut s = Session::new(model.clone(), &params()).unwrap();
            run(&mut s, p, &greedy(32, 0), None).0
        })
        .collect();
    // Together on one scheduler, each with drafts of its known reply (the second stream's
    // every fourth wrong), a step taking more than one stream's drafts.
    let scheduler = Scheduler::new(model.clone(), 2, 3).unwrap();
    let start = Arc::new(Barrier::new(prompts.len()));
    let threads: Vec<_> = prompts
        .iter()
        .zip(&want)
        .enumerate()
        .map(|(k, (p, w))| {
            let (scheduler, start, p) = (scheduler.clone(), start.clone(), p.clone());
            let mut d = known(&p, w, if k == 1 { 4 } else { 0 }, &model);
            std::thread::spawn(move || {
                let mut s = Session::with_scheduler(&scheduler, &params()).unwrap();
                start.wait();
                run(&mut s, &p, &greedy(32, 8), Some(&mut d))
            })
        })
        .collect();
    let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut accepted = 0;
    for ((tokens, out), want) in got.iter().zip(&want) {
        assert_eq!(ids(tokens), ids(want));
        accepted += out.timings.accepted;
    }
    let st = scheduler.steps();
    let generated: usize = want.iter().map(Vec::len).sum();
    eprintln!("{st:?}, {generated} generated, {accepted} accepted");
    assert!(accepted > generated / 2, "{accepted} of {generated}");
    assert!((st.steps as usize) < generated, "{st:?}");
}

#[test]
fn draft_out_of_range_is_refused() {
    let model = common::demo();
    let mut s = Session::new(model.clone(), &params()).unwrap();
    let gp = greedy(4, phi4::limits::MAX_DRAFT + 1);
    let e = s.generate(&[1, 2, 3], &gp, &mut |_, _| true).unwrap_err();
    assert!(e.to_string().contains("draft"), "{e}");
    let mut gp = GenerateParams::default();
    assert!(gp.set("draft", "17").is_err() && gp.set("draft", "-1").is_err());
    gp.set("draft", "16").unwrap();
    assert_eq!(gp.draft, 16);
    // The session is intact.
    let (_, out) = run(&mut s, &[1, 2, 3], &greedy(4, 4), None);
    assert!(out.timings.eval_count >= 1, "{out:?}");
}
