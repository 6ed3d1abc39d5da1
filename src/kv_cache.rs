//! The KV cache: K and V of every past position, per layer, in f16, sized once per session.

use crate::ggml::{self, Buffer, BufferType, Context, TensorId, Type};
use crate::model::Config;

pub struct KvCache {
    pub ctx: Context,
    pub k: Vec<TensorId>, // per layer: f16 [n_embd_kv, n_ctx], row p = K of position p, heads side by side
    pub v: Vec<TensorId>, // per layer: f16 [n_embd_kv, n_ctx], same layout (not transposed)
    pub n_ctx: usize,
    _buf: Buffer,
}

impl KvCache {
    pub fn new(c: &Config, n_ctx: usize) -> Result<KvCache, ggml::AllocError> {
        let mut ctx = Context::new(2 * c.n_layer, 0);
        let shape = [c.n_embd_kv() as i64, n_ctx as i64];
        let mut k = Vec::with_capacity(c.n_layer);
        let mut v = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            k.push(ctx.new_tensor(Type::F16, &shape, &format!("cache_k_l{l}")));
            v.push(ctx.new_tensor(Type::F16, &shape, &format!("cache_v_l{l}")));
        }
        let buf = Buffer::alloc_context(
            &ctx,
            BufferType::cpu(),
            &format!("the KV cache ({n_ctx} positions)"),
        )?;
        Ok(KvCache {
            ctx,
            k,
            v,
            n_ctx,
            _buf: buf,
        })
    }
}
