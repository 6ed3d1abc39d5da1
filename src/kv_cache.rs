//! The KV cache: K and V of every past position, per layer, in one of [`KvType`]'s types, sized
//! once per session.

use crate::ggml::{self, Buffer, BufferType, Context, TensorId, Type};
use crate::model::Config;

/// What the KV cache keeps K and V in (llama.cpp's `--cache-type-k/v`, Ollama's
/// `OLLAMA_KV_CACHE_TYPE`): f16 (exact), or quantized in blocks of 32 values — q8_0 (8-bit,
/// about half the bytes) or q4_0 (4-bit, about a quarter). Quantized caches are written as
/// ggml quantizes and read by ggml's flash attention, as llama.cpp's are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvType {
    #[default]
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    /// Every type, the default first.
    pub const ALL: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Q4_0];

    /// Its name, as llama.cpp and Ollama spell it: "f16", "q8_0", "q4_0".
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// The type named `name` (case-insensitive), or a message listing the names.
    pub fn from_name(name: &str) -> Result<KvType, String> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| {
                let names: Vec<_> = KvType::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "unknown KV cache type {name:?} (one of: {})",
                    names.join(", ")
                )
            })
    }

    pub(crate) fn ggml(self) -> Type {
        match self {
            KvType::F16 => Type::F16,
            KvType::Q8_0 => Type::Q8_0,
            KvType::Q4_0 => Type::Q4_0,
        }
    }

    /// The type whose ggml type id is `raw` (as saved states record it).
    pub(crate) fn from_ggml(raw: u32) -> Option<KvType> {
        KvType::ALL.into_iter().find(|t| t.ggml().raw() == raw)
    }

    /// Bytes of one position's K (or V) in one layer of `c`.
    pub fn row_bytes(self, c: &Config) -> u64 {
        self.ggml().row_size(c.n_embd_kv() as u64)
    }

    /// Bytes one position costs: K and V of every layer.
    pub fn bytes_per_token(self, c: &Config) -> u64 {
        2 * c.n_layer as u64 * self.row_bytes(c)
    }

    /// Whether `c`'s heads split into this type's blocks (each head's K is quantized alone).
    pub fn check(self, c: &Config) -> Result<(), String> {
        let block = self.ggml().block_size() as usize;
        match c.head_dim % block {
            0 => Ok(()),
            _ => Err(format!(
                "a {} KV cache needs heads of a multiple of {block} values; this model's have {}",
                self.name(),
                c.head_dim
            )),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A quantized cache keeps K and V rotated (llama.cpp's attention rotation): Q and K by an
/// orthonormal Walsh–Hadamard matrix of the largest power-of-two multiple of 64 values that
/// divides a head (Q·Kᵀ is unchanged), V by one of 64 values (the attention's output rotated
/// back). A rotation spreads a few large values over many, so blocks of 32 quantize them with
/// less loss. Heads not a multiple of 64 are cached unrotated.
const ROT_MIN: usize = 64;

fn rotation_of(width: usize, widest: bool) -> Option<usize> {
    if !width.is_multiple_of(ROT_MIN) {
        return None;
    }
    let mut n = ROT_MIN;
    while widest && width.is_multiple_of(2 * n) {
        n *= 2;
    }
    Some(n)
}

pub struct KvCache {
    pub ctx: Context,
    pub k: Vec<TensorId>, // per layer: [n_embd_kv, n_ctx] of `ty`, row p = K of position p, heads side by side
    pub v: Vec<TensorId>, // per layer: [n_embd_kv, n_ctx] of `ty`, same layout (not transposed)
    /// Quantized caches: how many values of a head Q and K, and V, are rotated in runs of
    /// ([`ROT_MIN`]).
    pub rot_k: Option<usize>,
    pub rot_v: Option<usize>,
    pub n_ctx: usize,
    pub ty: KvType,
    _buf: Buffer,
}

impl KvCache {
    /// A cache of `n_ctx` positions of `ty` (checked against `c` by the caller:
    /// [`KvType::check`]); with `measure`, its tensors are declared but hold no memory (for
    /// sizing graphs only — never computed).
    pub fn new(
        c: &Config,
        n_ctx: usize,
        ty: KvType,
        measure: bool,
    ) -> Result<KvCache, ggml::AllocError> {
        debug_assert!(ty.check(c).is_ok());
        let mut ctx = Context::new(2 * c.n_layer, 0);
        let shape = [c.n_embd_kv() as i64, n_ctx as i64];
        let mut k = Vec::with_capacity(c.n_layer);
        let mut v = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            k.push(ctx.new_tensor(ty.ggml(), &shape, &format!("cache_k_l{l}")));
            v.push(ctx.new_tensor(ty.ggml(), &shape, &format!("cache_v_l{l}")));
        }
        let rotation = |widest| rotation_of(c.head_dim, widest).filter(|_| ty != KvType::F16);
        let buf = match measure {
            true => Buffer::measure(&ctx, BufferType::cpu()),
            false => Buffer::alloc_context(
                &ctx,
                BufferType::cpu(),
                &format!("the KV cache ({n_ctx} positions, {ty})"),
            )?,
        };
        Ok(KvCache {
            ctx,
            k,
            v,
            rot_k: rotation(true),
            rot_v: rotation(false),
            n_ctx,
            ty,
            _buf: buf,
        })
    }

    /// Bytes of one position's K (or V) in one layer.
    pub fn row_bytes(&self) -> usize {
        self.ty
            .ggml()
            .row_size(self.ctx.get(self.k[0]).ne()[0] as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_widths() {
        assert_eq!(rotation_of(128, true), Some(128));
        assert_eq!(rotation_of(128, false), Some(64));
        assert_eq!(rotation_of(192, true), Some(64));
        assert_eq!(rotation_of(256, true), Some(256));
        assert_eq!(rotation_of(96, true), None);
    }
}
