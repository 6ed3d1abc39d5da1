//! The forward pass: one ggml graph per micro-batch, exactly as llama.cpp computes `phi3`.
//!
//! ```text
//! x = token_embd[tokens]
//! for each layer:
//!     h   = rms_norm(x) * attn_norm
//!     qkv = attn_qkv · h ; Q, K, V = views of qkv (no copies)
//!     Q, K = rope_neox(Q, pos), rope_neox(K, pos) ; Q *= 1/sqrt(head_dim)
//!     cache[n_past .. n_past+n] = K, V (f16)
//!     a   = softmax(Q Kᵀ + causal mask) V  over cache[0 .. n_past+n]   (flash attention)
//!     x   = x + attn_output · a
//!     h   = rms_norm(x) * ffn_norm
//!     x   = x + ffn_down · swiglu(ffn_up · h)          (gate rows first, then up)
//! logits = output · (rms_norm(x) * output_norm)         (last position only)
//! ```
//! Memory: the compute buffer is sized once for the worst micro-batch (n_batch tokens against a
//! full cache) when the run state is made, so decoding never allocates per token.

use std::sync::atomic::AtomicBool;

use crate::ggml::{self, Allocator, Compute, ComputeError, Context, Tensor, Type};
use crate::governor::Governor;
use crate::kv_cache::KvCache;
use crate::model::Model;

/// Why an evaluation did not complete.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("context full: {needed} positions needed, the session holds {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error("token id {id} is outside the vocabulary (0..{n_vocab})")]
    BadToken { id: u32, n_vocab: usize },
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Alloc(#[from] ggml::AllocError),
}

/// Tensors per layer in the graph, with headroom (the graph context's capacity is derived from it).
const TENSORS_PER_LAYER: usize = 40;
const TENSORS_OUTSIDE_LAYERS: usize = 32;

/// Per-session compute state: thread pool, compute buffer, graph context, KV cache, and the
/// inputs of a micro-batch (sized once, like everything here).
pub struct RunState {
    compute: Compute,
    /// How many of the threads a decode step runs on (all of them unless cores are contended).
    governor: Governor,
    alloc: Allocator,
    graph_ctx: Context,
    graph_size: usize,
    pub kv: KvCache,
    pub n_batch: usize,
    /// Logits of the last evaluated position.
    pub logits: Vec<f32>,
    ids: Vec<i32>,
    pos: Vec<i32>,
    /// One row of the causal mask (f16, up to n_ctx positions).
    mask_row: Vec<u16>,
}

impl RunState {
    /// State for `n_ctx` positions, micro-batches of `n_batch` tokens, `n_threads` threads.
    pub fn new(model: &Model, n_ctx: usize, n_batch: usize, n_threads: usize) -> Result<RunState, ggml::AllocError> {
        let c = &model.config;
        assert!(n_ctx >= 1 && n_batch >= 1 && n_threads >= 1, "validated by the caller");
        let n_batch = n_batch.min(n_ctx);
        let capacity = TENSORS_OUTSIDE_LAYERS + TENSORS_PER_LAYER * c.n_layer;
        // Every node or leaf is a tensor of the graph context, a weight, or a cache tensor.
        let graph_size = capacity + model.gguf.tensors.len() + 2 * c.n_layer;
        // The largest allocation first: the KV cache, then the threads, then the compute buffer.
        let kv = KvCache::new(c, n_ctx)?;
        let mut st = RunState {
            compute: Compute::new(n_threads)?,
            governor: Governor::new(n_threads),
            alloc: Allocator::new(),
            graph_ctx: Context::new(capacity, graph_size),
            graph_size,
            kv,
            n_batch,
            logits: Vec::with_capacity(c.n_vocab),
            ids: Vec::with_capacity(n_batch),
            pos: Vec::with_capacity(n_batch),
            mask_row: Vec::with_capacity(n_ctx),
        };
        // Size the compute buffer for the worst case once.
        let (worst_past, worst_n) = (n_ctx - n_batch, n_batch);
        let st_ref = &mut st;
        let built = build(&mut st_ref.graph_ctx, st_ref.graph_size, model, &st_ref.kv, worst_past, worst_n);
        st_ref.alloc.reserve(built.graph)?;
        st_ref.compute.reserve(built.graph)?;
        Ok(st)
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx
    }

    pub fn n_threads(&self) -> usize {
        self.compute.n_threads()
    }

    /// Bytes of the compute buffer.
    pub fn compute_buffer_size(&self) -> usize {
        self.alloc.size()
    }

    /// Evaluate `tokens` at positions `n_past..`, in micro-batches; afterwards `self.logits`
    /// holds the logits of the last token. `abort` is checked by ggml between ops.
    pub fn eval(&mut self, model: &Model, tokens: &[u32], n_past: usize, abort: &AtomicBool) -> Result<(), EvalError> {
        let n_vocab = model.config.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(EvalError::BadToken { id, n_vocab });
        }
        let needed = n_past + tokens.len();
        if needed > self.kv.n_ctx {
            return Err(EvalError::ContextFull { needed, n_ctx: self.kv.n_ctx });
        }
        let mut past = n_past;
        for chunk in tokens.chunks(self.n_batch) {
            self.eval_batch(model, chunk, past, abort)?;
            past += chunk.len();
        }
        Ok(())
    }

    fn eval_batch(&mut self, model: &Model, tokens: &[u32], n_past: usize, abort: &AtomicBool) -> Result<(), EvalError> {
        let n = tokens.len();
        let built = build(&mut self.graph_ctx, self.graph_size, model, &self.kv, n_past, n);
        self.alloc.alloc(built.graph)?;

        self.ids.clear();
        self.ids.extend(tokens.iter().map(|&t| t as i32));
        ggml::tensor_write(built.tokens, 0, &self.ids);
        self.pos.clear();
        self.pos.extend((n_past..n_past + n).map(|p| p as i32));
        ggml::tensor_write(built.pos, 0, &self.pos);
        // Causal mask, row by row: token i (at position n_past+i) sees cache positions 0..=n_past+i.
        let n_kv = n_past + n;
        let (zero, neg_inf) = (ggml::f32_to_f16(0.0), ggml::f32_to_f16(f32::NEG_INFINITY));
        for i in 0..n {
            self.mask_row.clear();
            self.mask_row.resize(n_past + i + 1, zero);
            self.mask_row.resize(n_kv, neg_inf);
            ggml::tensor_write(built.mask, i * n_kv * 2, &self.mask_row);
        }

        // A single token is a decode step: governed. Prompts run on every thread.
        let threads = if n == 1 { self.governor.threads() } else { self.compute.n_threads() };
        let t = std::time::Instant::now();
        match self.compute.compute(built.graph, threads, abort) {
            Ok(()) if n == 1 => self.governor.record(t.elapsed()),
            Ok(()) => {}
            Err(ComputeError::Aborted) => return Err(EvalError::Cancelled),
            Err(ComputeError::Alloc(e)) => return Err(e.into()),
        }
        ggml::tensor_read_f32(built.logits, &mut self.logits);
        Ok(())
    }
}

/// A built graph and the tensors to fill before computing it / read after.
struct Built<'g> {
    graph: ggml::GraphRef<'g>,
    tokens: Tensor<'g>, // i32 [n]
    pos: Tensor<'g>,    // i32 [n]
    mask: Tensor<'g>,   // f16 [n_kv, n]
    logits: Tensor<'g>, // f32 [n_vocab, 1]
}

/// Build the graph for `n` tokens at positions `n_past..n_past+n`.
fn build<'g>(ctx: &'g mut Context, graph_size: usize, model: &'g Model, kv: &'g KvCache, n_past: usize, n: usize) -> Built<'g> {
    let c = &model.config;
    let w = &model.weights;
    let wt = |id| w.ctx.get(id);
    let (n_embd, n_embd_kv, hd) = (c.n_embd as i64, c.n_embd_kv() as i64, c.head_dim as i64);
    let (n_head, n_head_kv) = (c.n_head as i64, c.n_head_kv as i64);
    let (n_t, n_kv) = (n as i64, (n_past + n) as i64);
    let f32s = Type::F32.type_size() as usize;
    let f16s = Type::F16.type_size() as usize;

    ctx.reset();
    let mut g = ctx.graph(graph_size);
    let tokens = g.input(Type::I32, &[n_t], "inp_tokens");
    let pos = g.input(Type::I32, &[n_t], "inp_pos");
    let mask = g.input(Type::F16, &[n_kv, n_t], "inp_mask");

    let mut x = g.get_rows(wt(w.tok_embd), tokens); // [n_embd, n]
    for (il, l) in w.layers.iter().enumerate() {
        let residual = x;
        let h = g.rms_norm(x, c.rms_eps);
        let h = g.mul(h, wt(l.attn_norm));

        let qkv = g.mul_mat(wt(l.attn_qkv), h); // [n_embd + 2*n_embd_kv, n]
        let row = qkv.nb()[1];
        let q = g.view(qkv, &[hd, n_head, n_t], &[hd as usize * f32s, row], 0);
        let k = g.view(qkv, &[hd, n_head_kv, n_t], &[hd as usize * f32s, row], n_embd as usize * f32s);
        let v = g.view(qkv, &[hd, n_head_kv, n_t], &[hd as usize * f32s, row], (n_embd + n_embd_kv) as usize * f32s);
        let q = g.rope_neox(q, pos, c.n_rot as i32, c.n_ctx_orig as i32, c.rope_theta);
        let k = g.rope_neox(k, pos, c.n_rot as i32, c.n_ctx_orig as i32, c.rope_theta);
        let q = g.scale(q, 1.0 / (hd as f32).sqrt());

        // Store this batch's K and V into the cache, then attend over the whole prefix.
        let (kc, vc) = (kv.ctx.get(kv.k[il]), kv.ctx.get(kv.v[il]));
        let kv_row = n_embd_kv as usize * f16s;
        let k_dst = g.view(kc, &[n_embd_kv, n_t], &[kv_row], n_past * kv_row);
        let v_dst = g.view(vc, &[n_embd_kv, n_t], &[kv_row], n_past * kv_row);
        let k_store = g.cpy(k, k_dst);
        let v_store = g.cpy(v, v_dst);
        g.expand(k_store);
        g.expand(v_store);

        let k_all = g.view(kc, &[hd, n_head_kv, n_kv], &[hd as usize * f16s, kv_row], 0);
        let v_all = g.view(vc, &[hd, n_head_kv, n_kv], &[hd as usize * f16s, kv_row], 0);
        let k_all = g.permute(k_all, [0, 2, 1, 3]); // [hd, n_kv, n_head_kv]
        let v_all = g.permute(v_all, [0, 2, 1, 3]);
        let q = g.permute(q, [0, 2, 1, 3]); // [hd, n, n_head]
        let a = g.flash_attn(q, k_all, v_all, mask, 1.0); // [hd, n_head, n]
        let a = g.reshape_2d(a, n_embd, n_t);
        let mut cur = g.mul_mat(wt(l.attn_output), a);

        let mut residual = residual;
        if il == c.n_layer - 1 {
            // Only the last position's logits are wanted: drop the other rows here.
            let last = |g: &mut ggml::Graph<'g>, t: Tensor<'g>| g.view(t, &[n_embd, 1], &[t.nb()[1]], (n - 1) * t.nb()[1]);
            cur = last(&mut g, cur);
            residual = last(&mut g, residual);
        }
        let x1 = g.add(cur, residual);

        let h = g.rms_norm(x1, c.rms_eps);
        let h = g.mul(h, wt(l.ffn_norm));
        let up = g.mul_mat(wt(l.ffn_up), h); // [2*n_ff, n]
        let act = g.swiglu(up); // [n_ff, n]
        let down = g.mul_mat(wt(l.ffn_down), act);
        x = g.add(x1, down);
    }
    let h = g.rms_norm(x, c.rms_eps);
    let h = g.mul(h, wt(w.output_norm));
    let logits = g.mul_mat(wt(w.output), h); // [n_vocab, 1]
    g.expand(logits);
    Built { graph: g.raw_graph(), tokens, pos, mask, logits }
}
