//! `phi4 synth`: a synthetic Phi-4-shaped model with random weights (see the phi4-synth crate).

use std::path::PathBuf;
use std::time::Instant;

use phi4_synth as synth;

use crate::Res;

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output file.
    #[arg(long, short)]
    out: PathBuf,
    /// Weight type: f32, f16, q8_0, q4_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs, iq3_s (the matrices of IQ3_XS files), iq3_xxs, iq2_s (IQ2_M files' main type), iq2_xs, iq2_xxs or q4_k_m.
    #[arg(long, default_value = "q4_k_m")]
    ftype: synth::Ftype,
    /// The full Phi-4 14B shape (40 x 5120, FFN 17920, 40/10 heads).
    #[arg(long)]
    full: bool,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 512)]
    embd: usize,
    #[arg(long, default_value_t = 1536)]
    ff: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 1)]
    kv_heads: usize,
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Size of a generated vocabulary (ignored with --vocab-from).
    #[arg(long, default_value_t = 1024)]
    vocab: usize,
    /// Copy the vocabulary from this GGUF file (e.g. a vocab-only Phi-4 file).
    #[arg(long)]
    vocab_from: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn synth(a: SynthArgs) -> Res {
    let vocab = match a.vocab_from {
        Some(p) => synth::Vocab::From(p),
        None => synth::Vocab::Tiny(a.vocab),
    };
    let spec = if a.full {
        synth::Spec {
            seed: a.seed,
            ..synth::Spec::phi4(a.ftype, vocab)
        }
    } else {
        synth::Spec {
            n_layer: a.layers,
            n_embd: a.embd,
            n_ff: a.ff,
            n_head: a.heads,
            n_head_kv: a.kv_heads,
            n_ctx: a.ctx,
            vocab,
            ..synth::Spec::small(a.layers, a.ftype, a.seed)
        }
    };
    let t = Instant::now();
    let size = synth::write(&spec, &a.out)?;
    eprintln!(
        "wrote {} ({size} bytes) in {:.1}s",
        a.out.display(),
        t.elapsed().as_secs_f32()
    );
    Ok(())
}
