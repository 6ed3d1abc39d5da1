//! Model loading: hyper-parameters from GGUF metadata, validated against each other and against
//! every tensor; weights placed for ggml — zero-copy in the file's mmap, or repacked by ggml into
//! an interleaved layout where its CPU kernels have a faster path for that type.
//!
//! A [`Model`] is immutable once loaded and shared by every session on it.

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::constrain::Compiler;
use crate::ggml::{self, Buffer, BufferType, Context, Graph, Tensor, TensorId, Type};
use crate::gguf::{self, Gguf, GgufError, TensorInfo};
use crate::hash::Map;
use crate::tokenizer::{Tokenizer, VocabError};

pub use crate::ggml::AllocError;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Gguf(#[from] GgufError),
    #[error("not a Phi-4 model: {0}")]
    NotPhi4(String),
    #[error("{0}")]
    Alloc(#[from] ggml::AllocError),
    #[error("{0}")]
    Vocab(#[from] VocabError),
    #[error("loading cancelled")]
    Cancelled,
}

/// Hyper-parameters (the names of llama.cpp's `hparams`; values for Phi-4 14B in comments).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub n_vocab: usize,     // 100352
    pub n_embd: usize,      // 5120
    pub n_layer: usize,     // 40
    pub n_head: usize,      // 40
    pub n_head_kv: usize,   // 10
    pub head_dim: usize,    // 128 = n_embd / n_head
    pub n_ff: usize,        // 17920
    pub n_ctx_train: usize, // 16384
    pub n_rot: usize,       // 128 (full rotary)
    pub rope_theta: f32,    // 250000
    pub n_ctx_orig: usize,  // 16384 (rope.scaling.original_context_length)
    pub rms_eps: f32,       // 1e-5
}

impl Config {
    /// Width of K (and of V) for one token: all KV heads.
    pub fn n_embd_kv(&self) -> usize {
        self.head_dim * self.n_head_kv
    }

    /// Read and cross-check the hyper-parameters of a `phi3` GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<Config, LoadError> {
        let arch = g.str("general.architecture")?;
        if arch != "phi3" {
            return Err(LoadError::NotPhi4(format!(
                "general.architecture is {arch:?}; phi4 runs the Phi-4 family (\"phi3\")"
            )));
        }
        let u = |k: &str| g.u32(&format!("phi3.{k}")).map(|v| v as usize);
        let n_embd = u("embedding_length")?;
        let n_layer = u("block_count")?;
        let n_head = u("attention.head_count")?;
        let n_head_kv = g
            .opt_u32("phi3.attention.head_count_kv")?
            .map_or(n_head, |v| v as usize);
        let n_ff = u("feed_forward_length")?;
        let n_ctx_train = u("context_length")?;
        let rms_eps = g.f32("phi3.attention.layer_norm_rms_epsilon")?;
        let rope_theta = g.opt_f32("phi3.rope.freq_base")?.unwrap_or(10000.0);
        let n_ctx_orig = g
            .opt_u32("phi3.rope.scaling.original_context_length")?
            .map_or(n_ctx_train, |v| v as usize);

        let bad = |msg: String| Err(LoadError::NotPhi4(msg));
        // Bounds keep every later product far from overflow and reject nonsense early.
        for (name, v, max) in [
            ("phi3.embedding_length", n_embd, 1 << 16),
            ("phi3.block_count", n_layer, 1024),
            ("phi3.attention.head_count", n_head, 1024),
            ("phi3.attention.head_count_kv", n_head_kv, 1024),
            ("phi3.feed_forward_length", n_ff, 1 << 18),
            ("phi3.context_length", n_ctx_train, 1 << 24),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} is outside 1..={max}"));
            }
        }
        if n_embd % n_head != 0 {
            return bad(format!(
                "embedding_length {n_embd} is not a multiple of head_count {n_head}"
            ));
        }
        if n_head % n_head_kv != 0 {
            return bad(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"
            ));
        }
        let head_dim = n_embd / n_head;
        let n_rot = g
            .opt_u32("phi3.rope.dimension_count")?
            .map_or(head_dim, |v| v as usize);
        if n_rot != head_dim || n_rot % 2 != 0 {
            return bad(format!(
                "rope.dimension_count {n_rot} must equal the head size {head_dim} (full rotary) and be even"
            ));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return bad(format!(
                "attention.layer_norm_rms_epsilon {rms_eps} is not in (0, 1)"
            ));
        }
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return bad(format!(
                "rope.freq_base {rope_theta} is not a positive number"
            ));
        }
        if n_ctx_orig == 0 {
            return bad("rope.scaling.original_context_length is 0".into());
        }
        // The vocabulary size comes from the embedding tensor (checked against the tokenizer's
        // token list by the tokenizer).
        let n_vocab = match g.tensor("token_embd.weight") {
            Some(t) if t.n_dims == 2 => t.dims[1] as usize,
            Some(t) => {
                return bad(format!(
                    "token_embd.weight has shape {:?}, expected [{n_embd}, n_vocab]",
                    t.shape()
                ))
            }
            None => return bad("tensor token_embd.weight is missing".into()),
        };
        if n_vocab == 0 || n_vocab > 1 << 22 {
            return bad(format!(
                "vocabulary of {n_vocab} tokens is outside 1..={}",
                1 << 22
            ));
        }
        Ok(Config {
            n_vocab,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_ctx_train,
            n_rot,
            rope_theta,
            n_ctx_orig,
            rms_eps,
        })
    }
}

/// A weight matrix of the forward pass: a tensor as the file stores it (for ggml's kernels, in
/// the mapping or repacked by ggml), or packed for phi4's kernels.
#[derive(Clone, Copy)]
pub(crate) struct Matrix {
    pub id: TensorId,
    /// The file's type and the row count of a matrix packed for phi4's kernels.
    pub packed: Option<(Type, usize)>,
}

/// One transformer block's weights (ggml ne order: [row length, rows]).
pub(crate) struct Layer {
    pub attn_norm: TensorId, // [n_embd] f32
    pub attn_qkv: Matrix,    // [n_embd, n_embd + 2*n_embd_kv]: rows Q, then K, then V
    pub attn_output: Matrix, // [n_embd, n_embd]
    pub ffn_norm: TensorId,  // [n_embd] f32
    pub ffn_up: Matrix,      // [n_embd, 2*n_ff]: rows gate, then up
    pub ffn_down: Matrix,    // [n_ff, n_embd]
}

/// All weights, as tensors of one ggml context whose data lives in `buffers`.
pub(crate) struct Weights {
    pub ctx: Context,
    pub tok_embd: TensorId,    // [n_embd, n_vocab]
    pub output_norm: TensorId, // [n_embd] f32
    pub output: Matrix,        // [n_embd, n_vocab] (token_embd when the file ties them)
    pub layers: Vec<Layer>,
    // Data of the tensors above: the file mapping, and any repacked copies. Dropped after ctx.
    _buffers: Vec<Buffer>,
}

/// How a model is loaded.
pub struct LoadParams<'a> {
    /// Repack the weight matrices that faster kernels have a layout for: phi4's own (Q2_K to
    /// Q6_K, Q4_0, Q8_0, where the CPU has a vector path for them), else ggml's (depending on
    /// the CPU). Costs load time and anonymous memory for those tensors, which then leave
    /// the page cache mapping; `false` keeps every weight zero-copy in the mmap, for ggml's
    /// kernels.
    pub repack: bool,
    /// Read every page of the weights now (rather than on the first token).
    pub prefetch: bool,
    /// Called with the fraction loaded (0..=1); returning false cancels loading.
    pub progress: Option<&'a mut dyn FnMut(f32) -> bool>,
}

impl Default for LoadParams<'_> {
    fn default() -> Self {
        LoadParams {
            repack: true,
            prefetch: true,
            progress: None,
        }
    }
}

/// Two FNV-1a 64-bit hashes of the same bytes from different starting points: a stable,
/// platform-independent 128-bit fingerprint (not a cryptographic one).
struct Fnv2([u64; 2]);

impl Default for Fnv2 {
    fn default() -> Self {
        Fnv2([0xcbf2_9ce4_8422_2325, 0x6c62_272e_07bb_0142])
    }
}

impl Fnv2 {
    fn update(&mut self, bytes: &[u8]) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        for &b in bytes {
            for h in &mut self.0 {
                *h = (*h ^ b as u64).wrapping_mul(PRIME);
            }
        }
    }

    fn finish(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.0[0].to_le_bytes());
        out[8..].copy_from_slice(&self.0[1].to_le_bytes());
        out
    }
}

/// Bytes of a model's weights by where they are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resident {
    /// Used in place from the file mapping (page cache: shared, reclaimable, read back on use).
    pub mapped: u64,
    /// Copied into faster layouts (anonymous memory; the mapping's pages of those tensors are
    /// dropped after loading).
    pub repacked: u64,
}

impl Resident {
    pub fn total(&self) -> u64 {
        self.mapped + self.repacked
    }
}

/// A loaded Phi-4 model: configuration, metadata (for the tokenizer) and weights.
pub struct Model {
    pub config: Config,
    /// The file's header: metadata and tensor infos.
    pub gguf: Gguf,
    pub(crate) weights: Weights,
    /// Size of the model file in bytes.
    pub file_size: u64,
    /// `(tensor name, ggml layout)` of every weight ggml repacked.
    pub repacked: Vec<(String, String)>,
    /// Bytes of the weights as they are held: in place in the file mapping, and repacked into
    /// buffers of their own.
    pub resident: Resident,
    /// Whether the weights are in memory ([`Model::load`]) or only declared
    /// ([`Model::declare`]: described and planned for, never run).
    placed: bool,
    /// The tokenizer built from the file's vocabulary.
    pub tokenizer: Arc<Tokenizer>,
    /// Time `load` took, in nanoseconds.
    pub load_duration: u64,
    /// Compiles the constraints of generations on this model (built on first use).
    pub(crate) constraints: Compiler,
    /// The file's mapping (weights that were not repacked are used in place).
    map: Arc<memmap2::Mmap>,
    fingerprint: OnceLock<[u8; 16]>,
}

/// What a weight is for: the name of its tensor without the `blk.{i}.` prefix and `.weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    TokenEmbd,
    AttnNorm,
    AttnQkv,
    AttnOutput,
    FfnNorm,
    FfnUp,
    FfnDown,
    OutputNorm,
    Output,
}

impl Role {
    /// The weights of every block, in file order.
    pub const LAYER: [Role; 6] = [
        Role::AttnNorm,
        Role::AttnQkv,
        Role::AttnOutput,
        Role::FfnNorm,
        Role::FfnUp,
        Role::FfnDown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::TokenEmbd => "token_embd",
            Role::AttnNorm => "attn_norm",
            Role::AttnQkv => "attn_qkv",
            Role::AttnOutput => "attn_output",
            Role::FfnNorm => "ffn_norm",
            Role::FfnUp => "ffn_up",
            Role::FfnDown => "ffn_down",
            Role::OutputNorm => "output_norm",
            Role::Output => "output",
        }
    }

    /// Shape in ggml order ([row length, rows]) for a model of configuration `c`.
    pub fn shape(self, c: &Config) -> Vec<u64> {
        let (e, kv, ff, v) = (
            c.n_embd as u64,
            c.n_embd_kv() as u64,
            c.n_ff as u64,
            c.n_vocab as u64,
        );
        match self {
            Role::TokenEmbd | Role::Output => vec![e, v],
            Role::AttnNorm | Role::FfnNorm | Role::OutputNorm => vec![e],
            Role::AttnQkv => vec![e, e + 2 * kv], // rows Q, then K, then V
            Role::AttnOutput => vec![e, e],
            Role::FfnUp => vec![e, 2 * ff], // rows gate, then up
            Role::FfnDown => vec![ff, e],
        }
    }

    /// The name of this weight's tensor in block `layer` (None: outside the blocks).
    pub fn tensor_name(self, layer: Option<usize>) -> String {
        match layer {
            Some(i) => format!("blk.{i}.{}.weight", self.name()),
            None => format!("{}.weight", self.name()),
        }
    }

    /// Norms are vectors (kept f32); the rest are matrices.
    pub fn is_norm(self) -> bool {
        matches!(self, Role::AttnNorm | Role::FfnNorm | Role::OutputNorm)
    }
}

/// One tensor of a Phi-4 file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub role: Role,
    /// The block it belongs to (None for the embedding, the final norm and the output).
    pub layer: Option<usize>,
    pub shape: Vec<u64>,
}

impl Config {
    /// Every tensor a Phi-4 file of this configuration holds, in file order. `output.weight` may
    /// be absent from a file (then the embedding is used as the output matrix).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let spec = |role: Role, layer: Option<usize>| TensorSpec {
            name: role.tensor_name(layer),
            role,
            layer,
            shape: role.shape(self),
        };
        let mut t = vec![spec(Role::TokenEmbd, None)];
        for i in 0..self.n_layer {
            t.extend(Role::LAYER.iter().map(|&r| spec(r, Some(i))));
        }
        t.push(spec(Role::OutputNorm, None));
        t.push(spec(Role::Output, None));
        t
    }
}

/// Check that the file holds exactly Phi-4's tensors, each with its shape and a usable type.
fn check_tensors(g: &Gguf, c: &Config) -> Result<(), LoadError> {
    let expected = c.tensors();
    for t in &g.tensors {
        let Some(spec) = expected.iter().find(|s| s.name == t.name) else {
            let hint = if t.name.contains("rope_factors") {
                " (LongRoPE files are not Phi-4)"
            } else {
                ""
            };
            return Err(LoadError::NotPhi4(format!(
                "unexpected tensor {:?}{hint}",
                t.name
            )));
        };
        if t.shape() != spec.shape.as_slice() {
            return Err(LoadError::NotPhi4(format!(
                "tensor {:?} has shape {:?}, expected {:?}",
                t.name,
                t.shape(),
                spec.shape
            )));
        }
        if t.file_offset % 32 != 0 {
            return Err(LoadError::NotPhi4(format!(
                "tensor {:?} data is not 32-byte aligned (ggml's CPU kernels need it)",
                t.name
            )));
        }
        if spec.role.is_norm() && t.ggml_type != Type::F32 {
            return Err(LoadError::NotPhi4(format!(
                "tensor {:?} is {:?}; norms must be f32",
                t.name, t.ggml_type
            )));
        }
        if !t.ggml_type.cpu_supported() {
            return Err(LoadError::NotPhi4(format!(
                "tensor {:?} has type {:?}, which ggml's CPU backend cannot multiply",
                t.name, t.ggml_type
            )));
        }
    }
    for spec in &expected {
        if g.tensor(&spec.name).is_none() && spec.role != Role::Output {
            return Err(LoadError::NotPhi4(format!(
                "tensor {:?} is missing",
                spec.name
            )));
        }
    }
    Ok(())
}

/// Which weights go to a repacking buffer type: matrices used only by `mul_mat` (not the
/// embedding, which is read by `get_rows`) whose type and shape that buffer type accelerates.
fn plan_repack<'g>(
    g: &'g Gguf,
    extra: &[BufferType],
    packed: &Map<String, (Type, usize)>,
) -> Map<&'g str, BufferType> {
    g.tensors
        .iter()
        .filter(|t| t.n_dims == 2 && t.name != "token_embd.weight")
        .filter(|t| !packed.contains_key(&t.name))
        .filter_map(|t| {
            let b = extra
                .iter()
                .find(|b| b.accelerates_mul_mat(t.ggml_type, t.dims[0] as i64, t.dims[1] as i64))?;
            Some((t.name.as_str(), *b))
        })
        .collect()
}

/// Which weights phi4's kernels take (with `own`): matrices used only by `mul_mat` of the types
/// they multiply → (type, rows).
fn plan_packing(g: &Gguf, own: bool) -> Map<String, (Type, usize)> {
    g.tensors
        .iter()
        .filter(|_| own)
        .filter(|t| t.n_dims == 2 && t.name != "token_embd.weight")
        .filter(|t| ggml::takes(t.ggml_type, t.dims[0] as usize))
        .map(|t| (t.name.clone(), (t.ggml_type, t.dims[1] as usize)))
        .collect()
}

/// The layout phi4's kernels take (as `repacked` names it).
const PHI4_LAYOUT: &str = "phi4's 8-row groups";

/// Bytes of the weights where `packing` and `repack` put them: the file's bytes of those left
/// in the mapping, the packed or repacked tensors' own.
fn resident(
    g: &Gguf,
    ctx: &Context,
    ids: &Map<String, TensorId>,
    packing: &Map<String, (Type, usize)>,
    repack: &Map<&str, BufferType>,
) -> Resident {
    let mut r = Resident::default();
    for t in &g.tensors {
        let tensor = ctx.get(ids[&t.name]);
        match (packing.contains_key(&t.name), repack.get(t.name.as_str())) {
            (true, _) => r.repacked += tensor.nbytes() as u64,
            (false, Some(&b)) => r.repacked += Buffer::alloc_size_in(b, tensor) as u64,
            (false, None) => r.mapped += t.size,
        }
    }
    r
}

/// One buffer of `buft` holding `tensors` converted from the mapping: packed for phi4's kernels
/// (those in `packing`, into a CPU buffer), else into the buffer type's layout by ggml. The
/// mapping's pages of those tensors are dropped afterwards, so they are resident once.
fn repack_into(
    buft: BufferType,
    tensors: &[&TensorInfo],
    ctx: &Context,
    ids: &Map<String, TensorId>,
    packing: &Map<String, (Type, usize)>,
    map: &memmap2::Mmap,
    progress: &mut Progress<'_, '_>,
) -> Result<Buffer, LoadError> {
    let align = Buffer::alignment_of(buft);
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut size = 0usize;
    for t in tensors {
        offsets.push(size);
        size += Buffer::alloc_size_in(buft, ctx.get(ids[&t.name])).div_ceil(align) * align;
    }
    let buf = Buffer::alloc(buft, size, &format!("{} weights", buft.name()))?;
    for (t, off) in tensors.iter().zip(offsets) {
        let tensor = ctx.get(ids[&t.name]);
        buf.place(tensor, off);
        let (start, len) = (t.file_offset as usize, t.size as usize);
        ggml::prefault(map, start, len);
        let data = &map[start..start + len];
        match packing.get(&t.name) {
            Some(&(ty, rows)) => {
                let threads = crate::limits::cpu_count();
                ggml::pack_into(tensor, ty, data, rows, t.dims[0] as usize, threads);
            }
            None => ggml::tensor_set(tensor, data),
        }
        ggml::drop_pages(map, start, len);
        progress.advance(t.size)?;
    }
    Ok(buf)
}

impl Weights {
    /// Whether every matrix runs on phi4's kernels, which compute a token's product the same
    /// way whatever other tokens its step carries (ggml's take other paths for one token than
    /// for several).
    pub fn token_invariant(&self) -> bool {
        let layer = |l: &Layer| {
            [l.attn_qkv, l.attn_output, l.ffn_up, l.ffn_down]
                .iter()
                .all(|m| m.packed.is_some())
        };
        self.output.packed.is_some() && self.layers.iter().all(layer)
    }

    /// m · x in graph `g`, by the kernels `m` was placed for.
    pub fn mul<'g>(&'g self, g: &mut Graph<'g>, m: Matrix, x: Tensor<'g>) -> Tensor<'g> {
        let w = self.ctx.get(m.id);
        match m.packed {
            Some((ty, rows)) => g.packed_mul_mat(w, ty, rows, x),
            None => g.mul_mat(w, x),
        }
    }

    /// Name the placed tensors for the forward pass (`output` falls back to the embedding when
    /// the file ties them).
    fn assemble(
        c: &Config,
        ctx: Context,
        ids: &Map<String, TensorId>,
        packed: &Map<String, (Type, usize)>,
        buffers: Vec<Buffer>,
    ) -> Weights {
        let id = |role: Role, layer: Option<usize>| ids[&role.tensor_name(layer)];
        let matrix = |role: Role, layer: Option<usize>| {
            let name = role.tensor_name(layer);
            Matrix {
                id: ids[&name],
                packed: packed.get(&name).copied(),
            }
        };
        let layers = (0..c.n_layer)
            .map(|i| Layer {
                attn_norm: id(Role::AttnNorm, Some(i)),
                attn_qkv: matrix(Role::AttnQkv, Some(i)),
                attn_output: matrix(Role::AttnOutput, Some(i)),
                ffn_norm: id(Role::FfnNorm, Some(i)),
                ffn_up: matrix(Role::FfnUp, Some(i)),
                ffn_down: matrix(Role::FfnDown, Some(i)),
            })
            .collect();
        let tok_embd = id(Role::TokenEmbd, None);
        let output = if ids.contains_key(&Role::Output.tensor_name(None)) {
            matrix(Role::Output, None)
        } else {
            Matrix {
                id: tok_embd,
                packed: None,
            }
        };
        Weights {
            tok_embd,
            output_norm: id(Role::OutputNorm, None),
            output,
            layers,
            ctx,
            _buffers: buffers,
        }
    }
}

/// Reports load progress and turns a `false` from the callback into [`LoadError::Cancelled`].
struct Progress<'p, 'a> {
    callback: &'p mut Option<&'a mut dyn FnMut(f32) -> bool>,
    done: u64,
    total: u64,
}

impl Progress<'_, '_> {
    fn advance(&mut self, bytes: u64) -> Result<(), LoadError> {
        self.done += bytes;
        let fraction = self.done as f32 / self.total.max(1) as f32;
        let go_on = self.callback.as_mut().is_none_or(|f| f(fraction));
        if go_on {
            Ok(())
        } else {
            Err(LoadError::Cancelled)
        }
    }
}

impl Model {
    /// Load = map the file → parse and check it → declare the weights → place each one: in the
    /// mapping, or repacked into a buffer of a faster layout → name them for the forward pass.
    pub fn load(path: &Path, params: LoadParams<'_>) -> Result<Model, LoadError> {
        Model::open(path, params, true)
    }

    /// [`Model::load`] up to where each weight would go, without reading or copying any: a
    /// model to describe and plan memory for ([`crate::memory::plan`]) before anything is
    /// allocated. It cannot run: a scheduler or session on it is refused.
    pub fn declare(path: &Path, params: LoadParams<'_>) -> Result<Model, LoadError> {
        Model::open(path, params, false)
    }

    /// Whether the weights are in memory (a model from [`Model::load`]).
    pub fn is_loaded(&self) -> bool {
        self.placed
    }

    fn open(path: &Path, mut params: LoadParams<'_>, place: bool) -> Result<Model, LoadError> {
        let started = std::time::Instant::now();
        let io = |source| LoadError::Io {
            path: path.display().to_string(),
            source,
        };
        let map = Arc::new(ggml::map_path(path).map_err(io)?);
        let gguf = gguf::parse(&map[..])?;
        let config = Config::from_gguf(&gguf)?;
        check_tensors(&gguf, &config)?;
        let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf, config.n_vocab)?);

        let packing = plan_packing(&gguf, params.repack && ggml::own_kernels_enabled());
        let mut ctx = Context::new(gguf.tensors.len(), 0);
        let ids: Map<String, TensorId> = gguf
            .tensors
            .iter()
            .map(|t| {
                let id = match packing.get(&t.name) {
                    Some(&(ty, rows)) => {
                        let shape = ggml::packed_shape(ty, rows, t.dims[0] as usize);
                        ctx.new_tensor(Type::I8, &shape, &t.name)
                    }
                    None => {
                        let ne: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
                        ctx.new_tensor(t.ggml_type, &ne, &t.name)
                    }
                };
                (t.name.clone(), id)
            })
            .collect();
        let extra = if params.repack {
            BufferType::cpu_extra()
        } else {
            Vec::new()
        };
        let repack = plan_repack(&gguf, &extra, &packing);
        let resident = resident(&gguf, &ctx, &ids, &packing, &repack);
        if !place {
            let repacked = gguf
                .tensors
                .iter()
                .filter_map(|t| {
                    let layout = match (packing.contains_key(&t.name), repack.get(t.name.as_str()))
                    {
                        (true, _) => PHI4_LAYOUT.to_string(),
                        (false, Some(b)) => b.name(),
                        (false, None) => return None,
                    };
                    Some((t.name.clone(), layout))
                })
                .collect();
            let declared = Buffer::measure(&ctx, BufferType::cpu());
            return Ok(Model {
                weights: Weights::assemble(&config, ctx, &ids, &packing, vec![declared]),
                config,
                gguf,
                file_size: map.len() as u64,
                repacked,
                resident,
                placed: false,
                tokenizer,
                load_duration: started.elapsed().as_nanos() as u64,
                constraints: Compiler::default(),
                map,
                fingerprint: OnceLock::new(),
            });
        }
        let total = gguf.tensors.iter().map(|t| t.size).sum();
        let mut progress = Progress {
            callback: &mut params.progress,
            done: 0,
            total,
        };
        progress.advance(0)?;

        let mapped = Buffer::from_host_memory(map.clone());
        for t in gguf
            .tensors
            .iter()
            .filter(|t| !repack.contains_key(t.name.as_str()) && !packing.contains_key(&t.name))
        {
            mapped.place(ctx.get(ids[&t.name]), t.file_offset as usize);
            if params.prefetch {
                ggml::prefault(&map, t.file_offset as usize, t.size as usize);
            }
            progress.advance(t.size)?;
        }
        let mut buffers = vec![mapped];
        let mut repacked = Vec::new();
        // Each repacked layout's buffer: phi4's (a CPU buffer), then ggml's buffer types.
        let layouts = std::iter::once((BufferType::cpu(), PHI4_LAYOUT.to_string(), None))
            .chain(extra.iter().map(|b| (*b, b.name(), Some(*b))));
        for (buft, layout, ggml_buft) in layouts {
            let mine: Vec<&TensorInfo> = gguf
                .tensors
                .iter()
                .filter(|t| match ggml_buft {
                    None => packing.contains_key(&t.name),
                    Some(b) => repack.get(t.name.as_str()) == Some(&b),
                })
                .collect();
            if !mine.is_empty() {
                let buf = repack_into(buft, &mine, &ctx, &ids, &packing, &map, &mut progress)?;
                buffers.push(buf);
                repacked.extend(mine.iter().map(|t| (t.name.clone(), layout.clone())));
            }
        }

        let weights = Weights::assemble(&config, ctx, &ids, &packing, buffers);
        let load_duration = started.elapsed().as_nanos() as u64;
        Ok(Model {
            config,
            gguf,
            weights,
            file_size: map.len() as u64,
            repacked,
            resident,
            placed: true,
            tokenizer,
            load_duration,
            constraints: Compiler::default(),
            map,
            fingerprint: OnceLock::new(),
        })
    }

    /// 16 bytes that tell this model from others, for saved session states: a hash of the file's
    /// header (metadata and tensor table) and of a CRC-32 of every byte of every tensor's data —
    /// the same on every machine. Computed once per model, when first asked for (a state saved
    /// or loaded): it reads the whole file, on every CPU (about a second for a 9 GB file on two
    /// cores when the file is in the page cache); the pages of repacked weights, which live in
    /// ggml's buffer, leave the resident set again afterwards.
    pub fn fingerprint(&self) -> [u8; 16] {
        *self.fingerprint.get_or_init(|| {
            let file = &self.map[..];
            let tensors = &self.gguf.tensors;
            let data = |i: usize| {
                let t = &tensors[i];
                &file[t.file_offset as usize..(t.file_offset + t.size) as usize]
            };
            // Tensors are taken one at a time by this thread and helpers (as many as can be
            // made, up to the CPUs): whatever threads there are, every tensor is hashed.
            let crcs: Vec<AtomicU32> = tensors.iter().map(|_| AtomicU32::new(0)).collect();
            let next = AtomicUsize::new(0);
            let work = || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(crc) = crcs.get(i) else { break };
                // Its pages mapped in one call, not one fault each (those of repacked weights
                // were dropped at load).
                let t = &tensors[i];
                ggml::prefault(&self.map, t.file_offset as usize, t.size as usize);
                crc.store(crc32fast::hash(data(i)), Ordering::Relaxed);
            };
            std::thread::scope(|scope| {
                for _ in 1..crate::limits::cpu_count().min(8) {
                    let _ = std::thread::Builder::new().spawn_scoped(scope, work);
                }
                work();
            });
            for (name, _) in &self.repacked {
                if let Some(t) = self.gguf.tensor(name) {
                    ggml::drop_pages(&self.map, t.file_offset as usize, t.size as usize);
                }
            }
            let mut h = Fnv2::default();
            h.update(&file[..self.gguf.data_offset as usize]);
            for (t, crc) in tensors.iter().zip(&crcs) {
                h.update(&t.size.to_le_bytes());
                h.update(&crc.load(Ordering::Relaxed).to_le_bytes());
            }
            h.finish()
        })
    }

    /// Which weight types were repacked into which layouts, one line: "100 q4_K tensors into
    /// phi4's 8-row groups", "101 q4_K tensors into CPU_REPACK" (ggml's), several joined by
    /// "; ", or "none".
    pub fn repacked_summary(&self) -> String {
        let mut counts: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
        for (name, layout) in &self.repacked {
            let ty = self.gguf.tensor(name).map_or("?", |t| t.ggml_type.name());
            *counts.entry((layout.as_str(), ty)).or_default() += 1;
        }
        if counts.is_empty() {
            return "none".into();
        }
        counts
            .iter()
            .map(|((layout, ty), n)| format!("{n} {ty} tensors into {layout}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}
