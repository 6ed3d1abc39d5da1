//! Greedy tokens of this build against another build, or other kernels, of phi4 on the same
//! model. Under ports/qemu-test the other build is the x86_64 CLI (PHI4_OTHER_CLI) and this one
//! the aarch64 library running under qemu. Natively the other is this build's own CLI asked
//! for its baseline kernels (PHI4_CPU_VARIANT: AVX2 on x86_64) while this process runs the best
//! ones of this machine (tests/dispatch.rs checks that the baseline kernels on an emulated
//! AVX2-only CPU give what they give natively).
//!
//! Both read the same synthetic model (written natively); the other build decodes greedily;
//! this build then follows the same tokens (teacher forcing) and checks at every step that its own
//! best token is the other's, or that the other's token is a near tie: within `tolerance` of this
//! build's best logit, where either token counts.

mod common;

use std::path::Path;
use std::process::Command;

use std::sync::Arc;

use phi4::model::{LoadParams, Model};
use phi4::sample::argmax;
use phi4::session::{Session, SessionParams};

/// How far apart two logits may be for either token to count. Logits differ across architectures
/// by rounding, not only in the last bits: each architecture's kernels round activations
/// differently before the dot products (to q8 blocks for quantized weights, to f16 for f16
/// weights and the f16 KV cache; on ARMv8.2 some f16 arithmetic is done in half precision), and
/// one changed rounding step moves a quantized activation by 1/127 of its block's range. Measured
/// by teacher forcing on these models (logits of standard deviation ~1): largest difference
/// between x86_64 and emulated Cortex-A72/A76 1.0e-2 with f16 weights and on the demo model,
/// 8.9e-2 with Q8_0 and Q4_K_M (mean 1.6e-2). The tolerances are about twice those for f16 and
/// the same for quantized weights.
fn tolerance(ftype: &str) -> f32 {
    match ftype {
        "f16" | "demo" => 2e-2,
        _ => 1e-1,
    }
}

const N_CTX: usize = 256;
const N_BATCH: usize = 16;
const THREADS: usize = 2;

/// The other build's `phi4` command (see the module's doc).
fn other_cli() -> Command {
    if let Some(p) = std::env::var_os("PHI4_OTHER_CLI") {
        return Command::new(p);
    }
    let mut c = common::target_command(common::cli());
    c.env("PHI4_CPU_VARIANT", phi4::cpu_variants().last().unwrap().0);
    c
}

/// The other build's greedy continuation of `prompt`, and whether it ended with an
/// end-of-generation token (which is not printed) rather than after `n` tokens.
fn other_greedy(model: &Path, prompt: &[u32], n: usize) -> (Vec<u32>, bool) {
    let (threads, batch, ctx) = (THREADS.to_string(), N_BATCH.to_string(), N_CTX.to_string());
    let flags = ["--threads", &threads, "--batch", &batch, "--ctx-size", &ctx];
    let (tokens, stopped) = common::cli_greedy(other_cli(), model, prompt, n, &flags);
    assert!(
        tokens.len() == n || (stopped && tokens.len() >= 8),
        "{tokens:?}"
    );
    (tokens, stopped)
}

/// Compare up to `n` greedy steps after the prompt that `prompt` makes for the model.
fn agree(name: &str, model: &Path, prompt: impl FnOnce(&Model) -> Vec<u32>, n: usize) {
    // One at a time: ggml's worker threads spin while they wait, so parallel runs of
    // THREADS-thread decoders on a small machine slow each other down many times over.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let m = Arc::new(Model::load(model, LoadParams::default()).unwrap());
    let prompt = &prompt(&m);
    let (theirs, stopped) = other_greedy(model, prompt, n);
    let mut st = Session::new(
        m.clone(),
        &SessionParams {
            n_ctx: N_CTX,
            n_batch: N_BATCH,
            n_threads: THREADS,
            ..Default::default()
        },
    )
    .unwrap();
    let mut logits = st.evaluate(prompt).unwrap().to_vec();
    let tol = tolerance(name);
    let (mut same, mut ties, mut worst) = (0, 0, 0f32);
    for (step, &t) in theirs.iter().enumerate() {
        let ours = argmax(&logits);
        let gap = logits[ours as usize] - logits[t as usize];
        if ours == t {
            same += 1;
        } else {
            ties += 1;
            worst = worst.max(gap);
            assert!(gap <= tol, "{name}: step {step}: other build chose {t}, this one {ours}, {gap} apart (tolerance {tol})");
        }
        logits = st.evaluate(&[t]).unwrap().to_vec();
    }
    if stopped {
        // The other build chose an end token next: so must this one, ties aside.
        let ours = argmax(&logits);
        let best_end = m
            .tokenizer
            .end_of_generation
            .iter()
            .map(|&e| logits[e as usize])
            .fold(f32::MIN, f32::max);
        let gap = logits[ours as usize] - best_end;
        assert!(
            gap <= tol,
            "{name}: other build ended, this one continues with {ours}, {gap} above the end tokens"
        );
    }
    let n = theirs.len();
    eprintln!("{name}: {same}/{n} same greedy token, {ties} near ties (widest {worst:.4}, tolerance {tol}); cpu: {}", phi4::cpu_features().join(" "));
}

/// The synthetic model both builds read (under ports/qemu-test written by the other build).
fn synth(dir: &Path, ftype: &str, seed: u64) -> std::path::PathBuf {
    let spec = phi4_synth::Spec {
        n_head: 8,
        n_head_kv: 2,
        ..phi4_synth::Spec::small(3, common::ftype(ftype), seed)
    };
    common::synth_model(dir, &format!("{ftype}.gguf"), &spec)
}

/// A synthetic model written by the other build, and a fixed prompt of 24 ids.
fn synthetic(ftype: &str, model_seed: u64, prompt_seed: u32) {
    let dir = common::tmpdir();
    let prompt: Vec<u32> = (0..24)
        .map(|i| (i * 37 + prompt_seed * 101 + 11) % 1000)
        .collect();
    agree(ftype, &synth(dir.path(), ftype, model_seed), |_| prompt, 48);
}

#[test]
fn q4_k_m() {
    synthetic("q4_k_m", 21, 1)
}

#[test]
fn q8_0() {
    synthetic("q8_0", 22, 2)
}

#[test]
fn f16() {
    synthetic("f16", 23, 3)
}

#[test]
fn q4_0() {
    synthetic("q4_0", 24, 4)
}

#[test]
fn q2_k() {
    synthetic("q2_k", 25, 5)
}

#[test]
fn q3_k() {
    synthetic("q3_k", 26, 6)
}

#[test]
fn iq4_xs() {
    synthetic("iq4_xs", 27, 7)
}

#[test]
fn iq3_s() {
    synthetic("iq3_s", 28, 8)
}

#[test]
fn iq3_xxs() {
    synthetic("iq3_xxs", 29, 9)
}

#[test]
fn iq2_s() {
    synthetic("iq2_s", 30, 10)
}

#[test]
fn iq2_xs() {
    synthetic("iq2_xs", 31, 11)
}

#[test]
fn iq2_xxs() {
    synthetic("iq2_xxs", 32, 12)
}

/// The demo model: trained weights, so a peaked distribution instead of random logits.
#[test]
fn demo_model() {
    let text = "Python's open() function returns a file object. To read a file";
    agree(
        "demo",
        &common::fixture("phi4-tiny-docs.gguf"),
        |m| m.tokenizer.encode(text, false),
        48,
    );
}
