//! The forward pass against llama.cpp on the same synthetic files.

mod common;

use common::reference::{top2_gap, Reference};
use std::sync::Arc;

use phi4::model::{LoadParams, Model};
use phi4::sample::argmax;
use phi4::session::{Session, SessionParams};
use phi4::KvType;
use phi4_synth::Spec;

fn parity(ft: &str, seed: u64) {
    parity_kv(ft, KvType::F16, seed)
}

/// Teacher-forced logits of phi4 and llama.cpp on a synthetic model of weight type `ft`, both
/// keeping the KV cache as `kv`: within the weight type's tolerance (a quantized cache is
/// rotated as llama.cpp rotates it, written as ggml quantizes and read by the same flash
/// attention, so it adds no difference: f16 weights stay bit for bit).
fn parity_kv(ft: &str, kv: KvType, seed: u64) {
    common::reference_kernels();
    let dir = common::tmpdir();
    let spec = Spec::small(3, common::ftype(ft), seed);
    let path = common::synth_model(dir.path(), "m.gguf", &spec);
    let (n_ctx, n_batch, threads) = (256, 16, 2);
    let model = Arc::new(Model::load(&path, LoadParams::default()).unwrap());
    let mut s = Session::new(
        model,
        &SessionParams {
            n_ctx,
            n_batch,
            n_threads: threads,
            kv_type: kv,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rf = Reference::load_kv(&path, n_ctx, n_batch, threads, kv.name());

    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 1000).collect();
    let mut got = s.evaluate(&prompt).unwrap().to_vec();
    let mut want = rf.eval(&prompt);
    let mut max_diff = 0f32;
    // Fewer steps under an emulator (tens of times slower).
    let steps = if common::runner().is_some() { 16 } else { 32 };
    for step in 0..steps {
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        max_diff = max_diff.max(d);
        let (g, w) = (argmax(&got), argmax(&want));
        assert!(
            // Logits each within the tolerance can swap places only if they are within two.
            g == w || top2_gap(&want) < 2.0 * common::logit_tolerance(ft),
            "{ft} ({kv} cache): step {step}: phi4 {g}, llama.cpp {w}"
        );
        // Teacher-forced: both continue with llama.cpp's token.
        got = s.evaluate(&[w]).unwrap().to_vec();
        want = rf.eval(&[w]);
    }
    eprintln!("{ft} ({kv} cache): max |logit diff| {max_diff:e}");
    assert!(
        max_diff <= common::logit_tolerance(ft),
        "{ft} ({kv} cache): logits differ by {max_diff} (tolerance {})",
        common::logit_tolerance(ft)
    );
}

#[test]
fn f32() {
    parity("f32", 1)
}
#[test]
fn f16() {
    parity("f16", 2)
}
#[test]
fn q8_0() {
    native_only("q8_0", 3)
}
#[test]
fn q4_0() {
    native_only("q4_0", 4)
}
#[test]
fn q4_k_m() {
    parity("q4_k_m", 5)
}
#[test]
fn q2_k() {
    native_only("q2_k", 6)
}
#[test]
fn q3_k() {
    native_only("q3_k", 7)
}
#[test]
fn iq4_xs() {
    native_only("iq4_xs", 8)
}
#[test]
fn iq3_s() {
    native_only("iq3_s", 12)
}
#[test]
fn iq3_xxs() {
    native_only("iq3_xxs", 13)
}
#[test]
fn iq2_s() {
    native_only("iq2_s", 15)
}
#[test]
fn iq2_xs() {
    native_only("iq2_xs", 16)
}
#[test]
fn iq2_xxs() {
    native_only("iq2_xxs", 17)
}

/// One quantized weight type, natively. Under an emulator the comparison runs the baseline
/// kernels on both sides (ggml's: phi4's own need dotprod there, and are checked against ggml's
/// on the emulated CPUs by tests/kernels.rs, in whole steps by tests/speculate.rs and
/// tests/agreement.rs), so it is the graph's check again, which f32, f16, q4_k_m and the
/// quantized caches make.
fn native_only(ft: &str, seed: u64) {
    if common::runner().is_some() {
        eprintln!("{ft}: natively only");
        return;
    }
    parity(ft, seed)
}
#[test]
fn kv_q8_0() {
    parity_kv("f16", KvType::Q8_0, 10);
}
#[test]
fn kv_q4_0() {
    parity_kv("q4_k_m", KvType::Q4_0, 11);
}
