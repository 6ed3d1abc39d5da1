//! Synthetic Phi-4-shaped models: GGUF files with random weights, any size, any weight type, for
//! tests and benchmarks (no real Phi-4 weights are needed to check the engine against llama.cpp).
//!
//! Quantized tensors are built from a pool of blocks quantized by ggml from Gaussian values,
//! picked at random per block, so a full-scale 9 GB file is written at disk speed while every row
//! stays distinct.

use std::io;
use std::path::{Path, PathBuf};

use phi4::gguf::{self, quantize, Array, TensorType as Type, Value};
use phi4::model::{Config, Role};
use phi4::sample::Rng;
use phi4::tokenizer::byte_to_unicode;

/// Weight types of a synthetic model: one type for every matrix, or llama.cpp's Q4_K_M mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ftype {
    Uniform(Type),
    /// Q5_K attn_qkv, Q6_K output and the `use_more_bits` ffn_down layers, Q4_K the rest.
    Q4KM,
}

impl std::str::FromStr for Ftype {
    type Err = String;
    fn from_str(s: &str) -> Result<Ftype, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Ftype::Uniform(Type::F32),
            "f16" => Ftype::Uniform(Type::F16),
            "q8_0" => Ftype::Uniform(Type::Q8_0),
            "q4_0" => Ftype::Uniform(Type::Q4_0),
            "q2_k" => Ftype::Uniform(Type::Q2_K),
            "q3_k" => Ftype::Uniform(Type::Q3_K),
            "iq4_xs" => Ftype::Uniform(Type::IQ4_XS),
            "iq3_s" => Ftype::Uniform(Type::IQ3_S),
            "iq3_xxs" => Ftype::Uniform(Type::IQ3_XXS),
            "iq2_s" => Ftype::Uniform(Type::IQ2_S),
            "iq2_xs" => Ftype::Uniform(Type::IQ2_XS),
            "iq2_xxs" => Ftype::Uniform(Type::IQ2_XXS),
            "q4_k" => Ftype::Uniform(Type::Q4_K),
            "q5_k" => Ftype::Uniform(Type::Q5_K),
            "q6_k" => Ftype::Uniform(Type::Q6_K),
            "q4_k_m" => Ftype::Q4KM,
            _ => return Err(format!(
                "unknown type {s:?} (f32, f16, q8_0, q4_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_xs, iq3_s, iq3_xxs, iq2_s, iq2_xs, iq2_xxs, q4_k_m)"
            )),
        })
    }
}

/// The name `from_str` reads (`phi4 synth --ftype`).
impl std::fmt::Display for Ftype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ftype::Uniform(t) => f.write_str(&t.name().to_ascii_lowercase()),
            Ftype::Q4KM => f.write_str("q4_k_m"),
        }
    }
}

/// Where the vocabulary comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Vocab {
    /// Generated: 256 byte tokens, letter-pair merges, filler control tokens, then
    /// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|im_sep|>` as the last four ids.
    Tiny(usize),
    /// Copied (every `tokenizer.*` key) from a GGUF file, e.g. a vocab-only Phi-4 file.
    From(PathBuf),
}

/// The shape of a synthetic model. [`Spec::phi4`] is the real 14B shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ctx: usize,
    pub rope_theta: f32,
    pub ftype: Ftype,
    pub vocab: Vocab,
    pub seed: u64,
}

impl Spec {
    /// Phi-4 14B: 40 layers of 5120, FFN 17920, 40 heads over 10 KV heads, vocabulary 100352.
    pub fn phi4(ftype: Ftype, vocab: Vocab) -> Spec {
        Spec {
            n_layer: 40,
            n_embd: 5120,
            n_ff: 17920,
            n_head: 40,
            n_head_kv: 10,
            n_ctx: 16384,
            rope_theta: 250000.0,
            ftype,
            vocab,
            seed: 1,
        }
    }

    /// Phi-4's proportions at a small scale: head_dim 128, 4 query heads per KV head.
    pub fn small(n_layer: usize, ftype: Ftype, seed: u64) -> Spec {
        Spec {
            n_layer,
            n_embd: 512,
            n_ff: 1536,
            n_head: 4,
            n_head_kv: 1,
            n_ctx: 4096,
            rope_theta: 250000.0,
            ftype,
            vocab: Vocab::Tiny(1024),
            seed,
        }
    }
}

/// Approximately standard normal (sum of four uniforms, rescaled).
fn normal(rng: &mut Rng) -> f32 {
    let s: f32 = (0..4).map(|_| rng.uniform()).sum();
    (s - 2.0) * (3.0f32).sqrt()
}

struct TensorPlan {
    name: String,
    ne: Vec<u64>,
    ty: Type,
    /// Standard deviation of the values (norm weights: around 1 instead).
    std: f32,
    is_norm: bool,
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Phi-4's tensor table for this shape, each tensor with the type the spec gives it.
fn plan(s: &Spec, n_vocab: usize) -> Vec<TensorPlan> {
    let config = Config {
        n_vocab,
        n_embd: s.n_embd,
        n_layer: s.n_layer,
        n_head: s.n_head,
        n_head_kv: s.n_head_kv,
        head_dim: s.n_embd / s.n_head,
        n_ff: s.n_ff,
        n_ctx_train: s.n_ctx,
        n_rot: s.n_embd / s.n_head,
        rope_theta: s.rope_theta,
        n_ctx_orig: s.n_ctx,
        rms_eps: 1e-5,
    };
    let ty = |role: Role, layer: usize| match s.ftype {
        _ if role.is_norm() => Type::F32,
        Ftype::Uniform(t) => t,
        Ftype::Q4KM => match role {
            Role::AttnQkv => Type::Q5_K,
            Role::Output => Type::Q6_K,
            Role::FfnDown if use_more_bits(layer, s.n_layer) => Type::Q6_K,
            _ => Type::Q4_K,
        },
    };
    config
        .tensors()
        .into_iter()
        .map(|t| TensorPlan {
            std: match t.role {
                Role::TokenEmbd => 1.0,
                r if r.is_norm() => 0.1,
                _ => 1.0 / (t.shape[0] as f32).sqrt(),
            },
            is_norm: t.role.is_norm(),
            ty: ty(t.role, t.layer.unwrap_or(0)),
            name: t.name,
            ne: t.shape,
        })
        .collect()
}

fn tiny_vocab(n_vocab: usize) -> io::Result<Vec<(String, Value)>> {
    const SPECIAL: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"];
    if n_vocab < 256 + SPECIAL.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a tiny vocabulary needs at least 260 tokens, not {n_vocab}"),
        ));
    }
    let b2u = byte_to_unicode();
    let mut tokens: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1i32; 256];
    let mut merges = Vec::new();
    let letters: Vec<char> = ('a'..='z').collect();
    'outer: for &a in &letters {
        for &b in &letters {
            if tokens.len() == n_vocab - SPECIAL.len() {
                break 'outer;
            }
            merges.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
            types.push(1);
        }
    }
    while tokens.len() < n_vocab - SPECIAL.len() {
        tokens.push(format!("<|dummy_{}|>", tokens.len()));
        types.push(3);
    }
    for s in SPECIAL {
        tokens.push(s.into());
        types.push(3);
    }
    let eos = (n_vocab - 4) as u32;
    let strings = |v: Vec<String>| Value::Array(Array::String(v.iter().collect()));
    Ok(vec![
        (
            "tokenizer.ggml.model".into(),
            Value::String(b"gpt2".to_vec()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String(b"dbrx".to_vec())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(eos)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ])
}

fn vocab_from(path: &Path) -> io::Result<Vec<(String, Value)>> {
    let g = gguf::parse_file(path).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    Ok(g.metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect())
}

/// Write a synthetic model to `path`. Returns the file size.
pub fn write(spec: &Spec, path: &Path) -> io::Result<u64> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    if spec.n_head == 0
        || spec.n_head_kv == 0
        || !spec.n_embd.is_multiple_of(spec.n_head)
        || !spec.n_head.is_multiple_of(spec.n_head_kv)
    {
        return Err(invalid(format!(
            "heads {}/{} do not divide width {}",
            spec.n_head, spec.n_head_kv, spec.n_embd
        )));
    }
    let mut meta = match &spec.vocab {
        Vocab::Tiny(n) => tiny_vocab(*n)?,
        Vocab::From(p) => vocab_from(p)?,
    };
    let n_vocab = match meta.iter().find(|(k, _)| k == "tokenizer.ggml.tokens") {
        Some((_, Value::Array(Array::String(t)))) => t.len(),
        _ => {
            return Err(invalid(
                "the vocabulary has no tokenizer.ggml.tokens".into(),
            ))
        }
    };
    let tensors = plan(spec, n_vocab);
    for t in &tensors {
        if t.ne[0] % t.ty.block_size() != 0 {
            return Err(invalid(format!(
                "{}: row length {} is not a multiple of {:?}'s block of {}",
                t.name,
                t.ne[0],
                t.ty,
                t.ty.block_size()
            )));
        }
    }
    let file_type: u32 = match spec.ftype {
        Ftype::Q4KM => 15,
        Ftype::Uniform(t) => match t {
            Type::F32 => 0,
            Type::F16 => 1,
            Type::Q4_0 => 2,
            Type::Q8_0 => 7,
            Type::Q2_K => 10,
            Type::Q3_K => 11, // Q3_K_S: all Q3_K
            Type::IQ4_XS => 30,
            Type::IQ3_S => 26,
            Type::IQ3_XXS => 23,
            Type::IQ2_S => 28,
            Type::IQ2_XS => 20,
            Type::IQ2_XXS => 19,
            Type::Q4_K => 14, // Q4_K_S: all Q4_K
            Type::Q5_K => 16,
            _ => 18, // Q6_K
        },
    };
    let u32v = |v: usize| Value::U32(v as u32);
    let mut kv: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(b"phi3".to_vec()),
        ),
        (
            "general.name".into(),
            Value::String(b"phi4-synthetic".to_vec()),
        ),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("phi3.context_length".into(), u32v(spec.n_ctx)),
        (
            "phi3.rope.scaling.original_context_length".into(),
            u32v(spec.n_ctx),
        ),
        ("phi3.embedding_length".into(), u32v(spec.n_embd)),
        ("phi3.feed_forward_length".into(), u32v(spec.n_ff)),
        ("phi3.block_count".into(), u32v(spec.n_layer)),
        ("phi3.attention.head_count".into(), u32v(spec.n_head)),
        ("phi3.attention.head_count_kv".into(), u32v(spec.n_head_kv)),
        (
            "phi3.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        (
            "phi3.rope.dimension_count".into(),
            u32v(spec.n_embd / spec.n_head),
        ),
        ("phi3.rope.freq_base".into(), Value::F32(spec.rope_theta)),
        ("phi3.attention.sliding_window".into(), Value::U32(0)),
    ];
    kv.append(&mut meta);

    let mut w = gguf::Writer::create(path)?;
    w.header(
        &kv,
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.ne.as_slice(), t.ty)),
    )?;
    // (Rng::new mixes in a constant of its own: undone here, so files stay as they were.)
    let mut rng =
        Rng::new(spec.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED ^ 0x9E37_79B9_7F4A_7C15);
    for t in &tensors {
        let data = tensor_data(t, &mut rng).map_err(invalid)?;
        w.tensor_data(&data)?;
    }
    w.finish()
}

/// Random values for one tensor, encoded in its type.
fn tensor_data(t: &TensorPlan, rng: &mut Rng) -> Result<Vec<u8>, String> {
    let n_per_row = t.ne[0] as usize;
    let n: usize = t.ne.iter().product::<u64>() as usize;
    if t.is_norm {
        let v: Vec<f32> = (0..n).map(|_| 1.0 + t.std * normal(rng)).collect();
        return quantize(Type::F32, &v, n_per_row);
    }
    if t.ty == Type::F32 || t.ty == Type::F16 {
        let v: Vec<f32> = (0..n).map(|_| t.std * normal(rng)).collect();
        return quantize(t.ty, &v, n_per_row);
    }
    // Quantized: a pool of blocks from Gaussian values, then each block of the tensor drawn from it.
    const POOL_BLOCKS: usize = 8192;
    let blck = t.ty.block_size() as usize;
    let n_blocks = n / blck;
    let pool_blocks = n_blocks.min(POOL_BLOCKS);
    let v: Vec<f32> = (0..pool_blocks * blck)
        .map(|_| t.std * normal(rng))
        .collect();
    let pool = quantize(t.ty, &v, blck)?;
    if pool_blocks == n_blocks {
        return Ok(pool);
    }
    let bs = t.ty.type_size() as usize;
    let mut out = vec![0u8; n_blocks * bs];
    for chunk in out.chunks_exact_mut(bs) {
        let j = (rng.next_u64() % pool_blocks as u64) as usize;
        chunk.copy_from_slice(&pool[j * bs..(j + 1) * bs]);
    }
    Ok(out)
}
