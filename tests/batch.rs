//! Batched decode: sessions on a shared scheduler reply as they would alone, and are stepped
//! together while they decode at the same time.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::reference::top2_gap;
use phi4::chat::{self, Markers, Message, Role};
use phi4::model::{LoadParams, Model};
use phi4::sample::{argmax, SamplingParams};
use phi4::session::{DoneReason, GenerateParams, Session, SessionParams};
use phi4::Scheduler;
use phi4::{KvType, SessionError};
use phi4_synth::Spec;

fn params(n_ctx: usize) -> SessionParams {
    SessionParams {
        n_ctx,
        n_batch: 16,
        n_threads: 2,
        ..Default::default()
    }
}

/// `params` with the KV cache of the `i`-th of `kvs` (f16 past their end).
fn params_kv(n_ctx: usize, kvs: &[KvType], i: usize) -> SessionParams {
    SessionParams {
        kv_type: kvs.get(i).copied().unwrap_or_default(),
        ..params(n_ctx)
    }
}

/// Greedy, without drafts (the steps are counted: a token each).
fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        draft: 0,
        ..Default::default()
    }
}

/// Greedy tokens of `prompt` on a session of its own (up to `n`, or to an end token, which is
/// included), with each step's top-2 logit gap.
fn alone(model: &Arc<Model>, prompt: &[u32], n: usize, sp: &SessionParams) -> Vec<(u32, f32)> {
    let mut s = Session::new(model.clone(), sp).unwrap();
    let mut logits = s.evaluate(prompt).unwrap().to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let tok = argmax(&logits);
        out.push((tok, top2_gap(&logits)));
        if model.tokenizer.end_of_generation.contains(&tok) {
            break;
        }
        logits = s.evaluate(&[tok]).unwrap().to_vec();
    }
    out
}

/// A generation's token ids, with the end token that stopped it (as `alone` has it).
fn generated(s: &mut Session, prompt: &[u32], n: usize) -> (Vec<u32>, DoneReason) {
    let mut ids = Vec::new();
    let out = s.generate(prompt, &greedy(n), &mut |id, _| {
        ids.extend(id.map(|t| t.id));
        true
    });
    let out = out.unwrap();
    if out.reason == DoneReason::Stop {
        ids.push(*s.model().tokenizer.end_of_generation.first().unwrap());
    }
    (ids, out.reason)
}

/// Greedy generations of every prompt at once, each from its own thread, on one scheduler (the
/// `i`-th session's cache of the `i`-th of `kvs`).
fn together(
    scheduler: &Scheduler,
    prompts: &[Vec<u32>],
    kvs: &[KvType],
    n: usize,
) -> Vec<Vec<u32>> {
    let start = Arc::new(Barrier::new(prompts.len()));
    let threads: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (scheduler, start, p) = (scheduler.clone(), start.clone(), p.clone());
            let sp = params_kv(256, kvs, i);
            std::thread::spawn(move || {
                let mut s = Session::with_scheduler(&scheduler, &sp).unwrap();
                start.wait();
                generated(&mut s, &p, n).0
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Each batched generation equals the lone one, up to the first step where the lone logits'
/// top two are closer than `tol` (a summation-order difference may pick either there). An end
/// token counts as any one (the generation reports which stopped it only by its reason).
fn same_as_alone(model: &Arc<Model>, prompts: &[Vec<u32>], got: &[Vec<u32>], n: usize, tol: f32) {
    same_as_alone_kv(model, prompts, &[], got, n, tol)
}

/// `same_as_alone`, the `i`-th session's cache of the `i`-th of `kvs` both times.
fn same_as_alone_kv(
    model: &Arc<Model>,
    prompts: &[Vec<u32>],
    kvs: &[KvType],
    got: &[Vec<u32>],
    n: usize,
    tol: f32,
) {
    let ends = &model.tokenizer.end_of_generation;
    for (i, (p, got)) in prompts.iter().zip(got).enumerate() {
        let want = alone(model, p, n, &params_kv(256, kvs, i));
        let same = |w: u32, g: u32| w == g || (ends.contains(&w) && ends.contains(&g));
        match want.iter().zip(got).position(|(&(w, _), &g)| !same(w, g)) {
            Some(i) => assert!(
                want[i].1 < tol,
                "step {i}: batched {} vs alone {} with a top-2 gap of {}",
                got[i],
                want[i].0,
                want[i].1
            ),
            None => assert_eq!(got.len(), want.len()),
        }
    }
}

/// Steps must have taken several sessions: `prompts` (their tokens counted) and `decoded`
/// tokens in fewer steps than `1 / at_least` of one per token. (Natively the mean is 2.5–3
/// sessions per step; under qemu-user, whose emulated sampling is slow next to a step, 1.6.)
fn assert_batched(s: &Scheduler, prompts: &[Vec<u32>], decoded: usize, at_least: f64) {
    let st = s.steps();
    let (prompt_tokens, decoded) = (
        prompts.iter().map(Vec::len).sum::<usize>() as u64,
        decoded as u64,
    );
    eprintln!("{st:?} for {prompt_tokens} prompt and {decoded} decoded tokens");
    assert_eq!(st.tokens, prompt_tokens + decoded);
    assert!(
        st.widest >= 2 && (decoded as f64) >= at_least * (st.steps as f64 - prompts.len() as f64),
        "{st:?}"
    );
}

/// Tokens evaluated by decode steps: each generated token but the last (and an end token, which
/// `generated` appends, is never evaluated either).
fn decoded(got: &[Vec<u32>]) -> usize {
    got.iter().map(|g| g.len().saturating_sub(1)).sum()
}

fn prompts(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n as u32)
        .map(|k| {
            (0..len as u32)
                .map(|i| (i * 37 + k * 101 + 11) % 1000)
                .collect()
        })
        .collect()
}

fn synthetic(ftype: &str, seed: u64, kvs: &[KvType]) {
    let dir = common::tmpdir();
    let path = common::synth_model(
        dir.path(),
        "m.gguf",
        &Spec::small(2, common::ftype(ftype), seed),
    );
    let model = Arc::new(Model::load(&path, LoadParams::default()).unwrap());
    let scheduler = Scheduler::new(model.clone(), 2, 4).unwrap();
    let ps = prompts(4, 20);
    let got = together(&scheduler, &ps, kvs, 24);
    // Batching changes summation order at most: the parity tests' tolerance for quantized
    // weights (tests/parity.rs); f16 products over several columns take another kernel on ARM
    // (differences up to 1.2e-4 measured under qemu), hence 1e-3.
    same_as_alone_kv(
        &model,
        &ps,
        kvs,
        &got,
        24,
        if ftype == "f16" { 1e-3 } else { 2e-2 },
    );
    assert_batched(&scheduler, &ps, decoded(&got), 1.25);
}

#[test]
fn q4_0_sessions_decode_together_as_alone() {
    synthetic("q4_0", 31, &[])
}

/// Sessions keeping their caches in every type share steps (a rotated, quantized cache beside
/// an f16 one), each replying as it does alone with its type.
#[test]
fn sessions_of_every_cache_type_decode_together_as_alone() {
    synthetic(
        "q4_k_m",
        34,
        &[KvType::Q8_0, KvType::Q4_0, KvType::F16, KvType::Q4_0],
    )
}

#[test]
fn q4_k_m_sessions_decode_together_as_alone() {
    synthetic("q4_k_m", 32, &[])
}

#[test]
fn f16_sessions_decode_together_as_alone() {
    synthetic("f16", 33, &[])
}

/// A user turn in Phi-4's chat format, ready for the reply.
fn chat_prompt(model: &Model, text: &str) -> Vec<u32> {
    let markers = Markers::of(&model.tokenizer).unwrap();
    chat::tokens(
        &model.tokenizer,
        markers,
        &[Message::new(Role::User, text)],
        true,
    )
}

#[test]
fn demo_chats_on_a_scheduler_are_the_lone_replies() {
    let model = common::demo();
    let texts = [
        "How do I open a file?",
        "What is a list comprehension?",
        "Explain the with statement.",
        "How do I sort a dictionary by value?",
        "What does yield do?",
    ];
    let ps: Vec<Vec<u32>> = texts.iter().map(|t| chat_prompt(&model, t)).collect();
    let scheduler = Scheduler::new(model.clone(), 2, 8).unwrap();
    let got = together(&scheduler, &ps, &[], 40);
    same_as_alone(&model, &ps, &got, 40, 1e-4);
    assert_batched(&scheduler, &ps, decoded(&got), 1.25);
}

#[test]
fn sessions_come_and_go_while_others_decode() {
    let model = common::demo();
    let scheduler = Scheduler::new(model.clone(), 2, 2).unwrap();
    let ps = prompts(5, 8);
    // Five sessions, steps of two at most, started at different times, asking for different
    // lengths: each still gets its lone reply.
    let threads: Vec<_> = ps
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let (scheduler, p) = (scheduler.clone(), p.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(7 * k as u64));
                let mut s = Session::with_scheduler(&scheduler, &params(128)).unwrap();
                generated(&mut s, &p, 10 + 6 * k).0
            })
        })
        .collect();
    for (k, t) in threads.into_iter().enumerate() {
        let got = t.join().unwrap();
        same_as_alone(&model, &ps[k..=k], &[got], 10 + 6 * k, 1e-4);
    }
    assert_eq!(
        scheduler.steps().widest,
        2,
        "steps take at most max_batch sessions, and took that many"
    );
}

#[test]
fn cancel_and_drop_mid_batch_leave_the_others_going() {
    let model = common::demo();
    let scheduler = Scheduler::new(model.clone(), 2, 4).unwrap();
    let p = chat_prompt(&model, "How do I open a file in Python?");
    let mut doomed = Session::with_scheduler(&scheduler, &params(512)).unwrap();
    let flag = doomed.cancel_flag();
    let other = {
        let (scheduler, p) = (scheduler.clone(), p.clone());
        std::thread::spawn(move || {
            let mut s = Session::with_scheduler(&scheduler, &params(512)).unwrap();
            generated(&mut s, &p, 60).0
        })
    };
    let t = Instant::now();
    let mut seen = 0;
    let out = doomed.generate(&p, &greedy(0), &mut |_, _| {
        seen += 1;
        if seen == 5 {
            flag.store(true, Ordering::Relaxed);
        }
        true
    });
    assert_eq!(out.unwrap().reason, DoneReason::Cancelled);
    assert!(
        seen <= 6,
        "cancel takes effect within a step ({seen} tokens)"
    );
    drop(doomed);
    drop(scheduler);
    // The other session still holds the scheduler and finishes its reply, as it would alone.
    let got = other.join().unwrap();
    same_as_alone(&model, &[p], &[got], 60, 1e-4);
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn bad_scheduler_parameters_are_errors() {
    let model = common::demo();
    for (threads, batch) in [
        (0, 4),
        (2, 0),
        (2, phi4::limits::MAX_BATCH + 1),
        (100_000, 4),
    ] {
        match Scheduler::new(model.clone(), threads, batch) {
            Err(SessionError::BadParams(m)) => assert!(m.contains("must be"), "{m}"),
            Err(e) => panic!("{threads}/{batch}: {e}"),
            Ok(_) => panic!("{threads}/{batch} accepted"),
        }
    }
    let s = Scheduler::new(model.clone(), 2, 4).unwrap();
    let bad = SessionParams {
        n_ctx: 1 << 20,
        ..params(0)
    };
    assert!(matches!(
        Session::with_scheduler(&s, &bad),
        Err(SessionError::BadParams(_))
    ));
    let ok = Session::with_scheduler(&s, &params(64)).unwrap();
    assert!(std::ptr::eq(
        ok.scheduler().model().as_ref(),
        model.as_ref()
    ));
    assert_eq!(ok.memory().1, 0, "the compute buffer is the scheduler's");
    assert!(s.compute_buffer_size() > 0);
}
