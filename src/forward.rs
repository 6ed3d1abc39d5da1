//! The forward pass: one ggml graph per micro-batch, exactly as llama.cpp computes `phi3`. A
//! graph may hold tokens of several caches (segments: sessions decoding together); the weight
//! matrices then multiply all their tokens at once, and only attention runs per segment.
//!
//! ```text
//! x = token_embd[tokens]                                 (every segment's tokens)
//! for each layer:
//!     h   = rms_norm(x) * attn_norm
//!     qkv = attn_qkv · h ; Q, K, V = views of qkv (no copies)
//!     Q, K = rope_neox(Q, pos), rope_neox(K, pos) ; Q *= 1/sqrt(head_dim)
//!     per segment: cache[n_past .. n_past+n] = K, V (f16, or quantized as ggml quantizes)
//!                  a = softmax(Q Kᵀ + causal mask) V over cache[0 .. n_past+n]  (flash attention)
//!     x   = x + attn_output · a
//!     h   = rms_norm(x) * ffn_norm
//!     x   = x + ffn_down · swiglu(ffn_up · h)          (gate rows first, then up)
//! hidden = rms_norm(x) * output_norm                    (each segment's last position, or
//!                                                        each of its positions when verifying
//!                                                        drafts; every position for embeddings)
//! logits = output · hidden                               (those positions)
//! ```
//! Embeddings are the mean of `hidden` over a text's tokens (as llama.cpp's mean pooling).
//! Memory: the compute buffer is sized once for the worst graphs (`Engine::reserve`: a
//! micro-batch against a full cache, a decode step of every segment against full caches), so
//! decoding never allocates per token.

use std::sync::atomic::AtomicBool;

use crate::error::EvalError;
use crate::ggml::{self, Allocator, Compute, ComputeError, Context, Tensor, Type};
use crate::governor::Governor;
use crate::kv_cache::KvCache;
use crate::limits::{MAX_DRAFT, VERIFY_PER_STEP};
use crate::model::Model;

/// Tensors per layer in the graph, with headroom (the graph context's capacity is derived from
/// them): those of the layer's matrices (two per product with phi4's kernels: the quantized
/// tokens, the product), and those of each segment's attention (with a quantized cache, its
/// Q, K, V and output rotated: three tensors each).
const TENSORS_PER_LAYER: usize = 28;
const TENSORS_PER_SEGMENT: usize = 32;
/// A verified token attends alone: its views, the attention, its rotation, a concatenation.
const TENSORS_PER_VERIFIED_TOKEN: usize = 14;
const TENSORS_OUTSIDE_LAYERS: usize = 32;

/// Tokens of one KV cache evaluated in a graph: `tokens` at positions `n_past..`.
pub struct Segment<'a> {
    pub kv: &'a KvCache,
    pub tokens: &'a [u32],
    pub n_past: usize,
    /// The logits of every token are wanted, not only of the last: a decode step's token and
    /// the tokens drafted after it, verified together.
    pub every: bool,
}

impl Segment<'_> {
    /// Rows of logits the segment yields: its last token's, or every token's.
    pub fn n_out(&self) -> usize {
        if self.every {
            self.tokens.len()
        } else {
            1
        }
    }

    /// Whether it is a decode step's work (a token, or one with its drafts), not a prompt's.
    fn decoding(&self) -> bool {
        self.tokens.len() == 1 || self.every
    }

    /// Whether the segment can be evaluated: known tokens, room in its cache.
    pub fn check(&self, n_vocab: usize) -> Result<(), EvalError> {
        if let Some(&id) = self.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(EvalError::BadToken { id, n_vocab });
        }
        let needed = self.n_past + self.tokens.len();
        if needed > self.kv.n_ctx {
            return Err(EvalError::ContextFull {
                needed,
                n_ctx: self.kv.n_ctx,
            });
        }
        Ok(())
    }
}

/// Compute state: thread pool, compute buffer, graph context, and the inputs of a graph. One per
/// [`crate::Scheduler`], whose graphs take the tokens of up to `max_segments` caches.
pub struct Engine {
    compute: Compute,
    /// How many of the threads a decode step runs on (all of them unless cores are contended).
    governor: Governor,
    alloc: Allocator,
    graph_ctx: Context,
    graph_size: usize,
    max_segments: usize,
    /// Logits of the last graph: each segment's rows ([`Segment::n_out`]), one after the other.
    pub logits: Vec<f32>,
    /// The final hidden states (normed: `hidden` above) of every token of the last graph, one
    /// row after the other, when it was built `for_embeddings` (else left as it was).
    pub hidden: Vec<f32>,
    ids: Vec<i32>,
    pos: Vec<i32>,
    out_ids: Vec<i32>,
    mask_row: Vec<u16>,
}

impl Engine {
    /// An engine on `n_threads` threads for graphs of up to `max_segments` caches; its compute
    /// buffer is sized by [`Engine::reserve`].
    pub fn new(
        model: &Model,
        n_threads: usize,
        max_segments: usize,
    ) -> Result<Engine, ggml::AllocError> {
        assert!(
            n_threads >= 1 && max_segments >= 1,
            "validated by the caller"
        );
        let (capacity, graph_size) = graph_capacity(model, max_segments);
        Ok(Engine {
            compute: Compute::new(n_threads)?,
            governor: Governor::new(n_threads),
            alloc: Allocator::new(),
            graph_ctx: Context::new(capacity, graph_size),
            graph_size,
            max_segments,
            logits: Vec::with_capacity(model.config.n_vocab * max_segments),
            hidden: Vec::new(),
            ids: Vec::new(),
            pos: Vec::new(),
            out_ids: Vec::new(),
            mask_row: Vec::new(),
        })
    }

    /// Bytes of the compute buffer.
    pub fn compute_buffer_size(&self) -> usize {
        self.alloc.size()
    }

    /// Size the compute buffer and work buffer once for the worst graphs on `kv`
    /// ([`worst_graphs`]). Later graphs on caches no larger never allocate.
    pub fn reserve(
        &mut self,
        model: &Model,
        kv: &KvCache,
        n_batch: usize,
    ) -> Result<(), ggml::AllocError> {
        let (alloc, compute) = (&mut self.alloc, &mut self.compute);
        let sizes = (self.graph_size, self.max_segments);
        worst_graphs(&mut self.graph_ctx, sizes, model, kv, n_batch, |g| {
            alloc.reserve(g)?;
            compute.reserve(g)
        })?;
        let n_batch = n_batch.clamp(1, kv.n_ctx);
        let n_verify = (1 + MAX_DRAFT).min(kv.n_ctx);
        let n_out = self.max_segments + VERIFY_PER_STEP * n_verify;
        self.ids.reserve(n_batch + n_out);
        self.pos.reserve(n_batch + n_out);
        self.out_ids.reserve(n_out);
        self.mask_row.reserve(kv.n_ctx);
        Ok(())
    }

    /// Evaluate every segment in one graph (each checked by the caller); afterwards
    /// `self.logits` holds each segment's rows of logits, in order, and, if `for_embeddings`,
    /// `self.hidden` the final hidden states of every token. In a step of decoding segments
    /// only, a token's logits are the same whatever else the step carries (its drafts, other
    /// sessions' tokens).
    pub fn step(
        &mut self,
        model: &Model,
        segments: &[Segment<'_>],
        for_embeddings: bool,
        abort: &AtomicBool,
    ) -> Result<(), EvalError> {
        assert!(
            (1..=self.max_segments).contains(&segments.len())
                && segments.iter().all(|s| !s.tokens.is_empty())
                && segments.iter().filter(|s| s.every).count() <= VERIFY_PER_STEP
        );
        let built = build(
            &mut self.graph_ctx,
            self.graph_size,
            model,
            segments,
            for_embeddings,
        );
        self.alloc.alloc(built.graph)?;

        self.ids.clear();
        self.pos.clear();
        self.out_ids.clear();
        for s in segments {
            self.ids.extend(s.tokens.iter().map(|&t| t as i32));
            self.pos
                .extend((s.n_past..s.n_past + s.tokens.len()).map(|p| p as i32));
            let end = self.ids.len() as i32;
            self.out_ids.extend(end - s.n_out() as i32..end);
        }
        ggml::tensor_write(built.tokens, 0, &self.ids);
        ggml::tensor_write(built.pos, 0, &self.pos);
        ggml::tensor_write(built.out_ids, 0, &self.out_ids);
        // Causal masks, row by row: token i (at position n_past+i) sees positions 0..=n_past+i.
        let (zero, neg_inf) = (ggml::f32_to_f16(0.0), ggml::f32_to_f16(f32::NEG_INFINITY));
        for (s, &mask) in segments.iter().zip(&built.masks) {
            let (n, n_kv) = (s.tokens.len(), s.n_past + s.tokens.len());
            for i in 0..n {
                self.mask_row.clear();
                self.mask_row.resize(s.n_past + i + 1, zero);
                self.mask_row.resize(n_kv, neg_inf);
                ggml::tensor_write(mask, i * n_kv * 2, &self.mask_row);
            }
        }

        // Decode steps are governed (and timed for the governor when they take a token per
        // cache). Prompts run on every thread.
        let decode = segments.iter().all(Segment::decoding);
        let threads = if decode {
            self.governor.threads()
        } else {
            self.compute.n_threads()
        };
        let single = self.ids.len() == segments.len();
        let t = std::time::Instant::now();
        // A decode step computes each token's row alone, in one order, so that its logits are
        // the same whatever else the step carries: phi4's kernels always do; where ggml
        // multiplies a matrix, its reference paths must be asked for.
        let row_exact = decode && !model.weights.token_invariant();
        match self.compute.compute(built.graph, threads, abort, row_exact) {
            Ok(()) if single => self.governor.record(t.elapsed()),
            Ok(()) => {}
            Err(ComputeError::Aborted) => return Err(EvalError::Cancelled),
            Err(ComputeError::Alloc(e)) => return Err(e.into()),
        }
        ggml::tensor_read_f32(built.logits, &mut self.logits);
        if for_embeddings {
            ggml::tensor_read_f32(built.hidden, &mut self.hidden);
        }
        Ok(())
    }
}

/// Tensors of a graph context and nodes of a graph for graphs of up to `max_segments` caches.
fn graph_capacity(model: &Model, max_segments: usize) -> (usize, usize) {
    let c = &model.config;
    let verified = VERIFY_PER_STEP.min(max_segments) * (1 + MAX_DRAFT);
    let capacity = TENSORS_OUTSIDE_LAYERS
        + (TENSORS_PER_LAYER
            + TENSORS_PER_SEGMENT * max_segments
            + TENSORS_PER_VERIFIED_TOKEN * verified)
            * c.n_layer;
    // Every node or leaf is a tensor of the graph context, a weight, or a cache tensor.
    let graph_size = capacity + model.gguf.tensors.len() + 2 * c.n_layer * max_segments;
    (capacity, graph_size)
}

/// Build the worst graphs an engine of `(graph_size, max_segments)` runs for caches like `kv`,
/// handing each to `f`: a micro-batch of `n_batch` tokens against a full cache beside
/// `max_segments - 1` decoding caches that full, and `max_segments` decoding caches, each also
/// as built for embeddings; of the decoding caches, up to [`VERIFY_PER_STEP`] verify
/// [`MAX_DRAFT`] drafts.
fn worst_graphs(
    graph_ctx: &mut Context,
    (graph_size, max_segments): (usize, usize),
    model: &Model,
    kv: &KvCache,
    n_batch: usize,
    mut f: impl FnMut(ggml::GraphRef<'_>) -> Result<(), ggml::AllocError>,
) -> Result<(), ggml::AllocError> {
    let n_batch = n_batch.clamp(1, kv.n_ctx);
    let n_verify = (1 + MAX_DRAFT).min(kv.n_ctx);
    let worst = vec![0u32; n_batch.max(n_verify)];
    let prompt = Segment {
        kv,
        tokens: &worst[..n_batch],
        n_past: kv.n_ctx - n_batch,
        every: false,
    };
    // The i-th decoding cache of a step: the first ones verifying drafts.
    let decode = |i: usize| {
        let n = if i < VERIFY_PER_STEP { n_verify } else { 1 };
        Segment {
            kv,
            tokens: &worst[..n],
            n_past: kv.n_ctx - n,
            every: true,
        }
    };
    let mixed: Vec<_> = std::iter::once(prompt)
        .chain((1..max_segments).map(|i| decode(i - 1)))
        .collect();
    let step: Vec<_> = (0..max_segments).map(decode).collect();
    for (segments, all_rows) in [
        (&mixed, false),
        (&mixed, true),
        (&step, false),
        (&step, true),
    ] {
        f(build(graph_ctx, graph_size, model, segments, all_rows).graph)?;
    }
    Ok(())
}

/// Bytes of the compute buffer and of the work buffer that an engine on `n_threads` threads
/// for up to `max_segments` caches like `kv` needs: its worst graphs planned, nothing
/// allocated (`model` and `kv` may be declared only: [`Model::measure`]).
pub fn measure(
    model: &Model,
    kv: &KvCache,
    n_batch: usize,
    n_threads: usize,
    max_segments: usize,
) -> (usize, usize) {
    let (capacity, graph_size) = graph_capacity(model, max_segments);
    let mut ctx = Context::new(capacity, graph_size);
    let mut alloc = Allocator::new();
    let (mut compute, mut work) = (0, 0);
    let sizes = (graph_size, max_segments);
    let _ = worst_graphs(&mut ctx, sizes, model, kv, n_batch, |g| {
        compute = compute.max(alloc.measure(g));
        work = work.max(Compute::work_size(g, n_threads));
        Ok(())
    });
    (compute, work)
}

/// A built graph and the tensors to fill before computing it / read after.
struct Built<'g> {
    graph: ggml::GraphRef<'g>,
    tokens: Tensor<'g>,     // i32 [n]: every segment's tokens, one after the other
    pos: Tensor<'g>,        // i32 [n]
    out_ids: Tensor<'g>,    // i32 [n_out]: the rows whose logits are wanted
    masks: Vec<Tensor<'g>>, // per segment f16 [n_kv, n_tokens]
    hidden: Tensor<'g>,     // f32 [n_embd, n] with all rows (read only then)
    logits: Tensor<'g>,     // f32 [n_vocab, n_out]
}

/// Build the graph for `segments`: the weight matrices multiply every token at once, attention
/// runs per segment over its own cache. With `all_rows`, the final hidden state of every token
/// is kept (for embeddings), else only of each segment's rows of logits ([`Segment::n_out`]).
fn build<'g>(
    ctx: &'g mut Context,
    graph_size: usize,
    model: &'g Model,
    segments: &[Segment<'g>],
    all_rows: bool,
) -> Built<'g> {
    let c = &model.config;
    let w = &model.weights;
    let wt = |id| w.ctx.get(id);
    let (n_embd, n_embd_kv, hd) = (c.n_embd as i64, c.n_embd_kv() as i64, c.head_dim as i64);
    let (n_head, n_head_kv) = (c.n_head as i64, c.n_head_kv as i64);
    let n_t: i64 = segments.iter().map(|s| s.tokens.len() as i64).sum();
    let f32s = Type::F32.type_size() as usize;
    let f16s = Type::F16.type_size() as usize;

    ctx.reset();
    let mut g = ctx.graph(graph_size);
    let tokens = g.input(Type::I32, &[n_t], "inp_tokens");
    let pos = g.input(Type::I32, &[n_t], "inp_pos");
    let n_out: usize = segments.iter().map(Segment::n_out).sum();
    let out_ids = g.input(Type::I32, &[n_out as i64], "inp_out_ids");
    let masks: Vec<_> = segments
        .iter()
        .map(|s| {
            g.input(
                Type::F16,
                &[(s.n_past + s.tokens.len()) as i64, s.tokens.len() as i64],
                "inp_mask",
            )
        })
        .collect();

    let mut x = g.get_rows(wt(w.tok_embd), tokens); // [n_embd, n]
    for (il, l) in w.layers.iter().enumerate() {
        let residual = x;
        let h = g.rms_norm(x, c.rms_eps);
        let h = g.mul(h, wt(l.attn_norm));

        let qkv = w.mul(&mut g, l.attn_qkv, h); // [n_embd + 2*n_embd_kv, n]
        let row = qkv.nb()[1];
        let q = g.view(qkv, &[hd, n_head, n_t], &[hd as usize * f32s, row], 0);
        let k = g.view(
            qkv,
            &[hd, n_head_kv, n_t],
            &[hd as usize * f32s, row],
            n_embd as usize * f32s,
        );
        let v = g.view(
            qkv,
            &[hd, n_head_kv, n_t],
            &[hd as usize * f32s, row],
            (n_embd + n_embd_kv) as usize * f32s,
        );
        let q = g.rope_neox(q, pos, c.n_rot as i32, c.n_ctx_orig as i32, c.rope_theta);
        let k = g.rope_neox(k, pos, c.n_rot as i32, c.n_ctx_orig as i32, c.rope_theta);
        let q = g.scale(q, 1.0 / (hd as f32).sqrt());

        // Per segment: store its K and V into its cache, attend over its whole prefix.
        let mut a: Option<Tensor<'g>> = None;
        let mut first = 0usize;
        for (s, &mask) in segments.iter().zip(&masks) {
            let (n, n_kv) = (s.tokens.len(), s.n_past + s.tokens.len());
            let (kc, vc) = (s.kv.ctx.get(s.kv.k[il]), s.kv.ctx.get(s.kv.v[il]));
            // A cache row: every KV head's values, each head whole blocks of the cache's type.
            let kv_row = s.kv.row_bytes();
            let head_row = kv_row / n_head_kv as usize;
            let part = |g: &mut ggml::Graph<'g>, t: Tensor<'g>, heads: i64| {
                g.view(
                    t,
                    &[hd, heads, n as i64],
                    &[t.nb()[1], t.nb()[2]],
                    first * t.nb()[2],
                )
            };
            // A quantized cache keeps Q·Kᵀ's operands and V rotated (kv_cache.rs: ROT_MIN).
            let (rot_k, rot_v) = (s.kv.rot_k, s.kv.rot_v);
            let rotate = |g: &mut ggml::Graph<'g>, t, rot| match rot {
                Some(n) => g.hadamard(t, n),
                None => t,
            };
            let (ks, vs) = (part(&mut g, k, n_head_kv), part(&mut g, v, n_head_kv));
            let (ks, vs) = (rotate(&mut g, ks, rot_k), rotate(&mut g, vs, rot_v));
            let qs = part(&mut g, q, n_head);
            let qs = rotate(&mut g, qs, rot_k);
            let k_dst = g.view(kc, &[n_embd_kv, n as i64], &[kv_row], s.n_past * kv_row);
            let v_dst = g.view(vc, &[n_embd_kv, n as i64], &[kv_row], s.n_past * kv_row);
            let k_store = g.cpy(ks, k_dst);
            let v_store = g.cpy(vs, v_dst);
            g.expand(k_store);
            g.expand(v_store);

            // A segment verifying drafts attends one token at a time, each exactly as its own
            // decode step would (ggml attends for one query by another path than for several
            // once the cache is long); other segments attend all their tokens at once.
            let (groups, m) = if s.every { (n, 1) } else { (1, n) };
            for i in 0..groups {
                let n_kv_i = s.n_past + i + m;
                let kv_view = |g: &mut ggml::Graph<'g>, t: Tensor<'g>| {
                    let all = g.view(t, &[hd, n_head_kv, n_kv_i as i64], &[head_row, kv_row], 0);
                    g.permute(all, [0, 2, 1, 3]) // [hd, n_kv, n_head_kv]
                };
                let (k_all, v_all) = (kv_view(&mut g, kc), kv_view(&mut g, vc));
                let qi = g.view(
                    qs,
                    &[hd, n_head, m as i64],
                    &[qs.nb()[1], qs.nb()[2]],
                    i * qs.nb()[2],
                );
                let qi = g.permute(qi, [0, 2, 1, 3]); // [hd, m, n_head]
                let mask_i = match s.every {
                    false => mask,
                    true => g.view(mask, &[n_kv_i as i64, 1], &[n_kv * f16s], i * n_kv * f16s),
                };
                let att = g.flash_attn(qi, k_all, v_all, mask_i, 1.0); // [hd, n_head, m]
                let att = rotate(&mut g, att, rot_v);
                a = Some(match a {
                    None => att,
                    Some(prev) => g.concat(prev, att, 2),
                });
            }
            first += n;
        }
        let a = g.reshape_2d(a.expect("at least one segment"), n_embd, n_t);
        let mut cur = w.mul(&mut g, l.attn_output, a);

        let mut residual = residual;
        if il == c.n_layer - 1 && !all_rows {
            // Only the rows whose logits are wanted go on: drop the others here.
            cur = g.get_rows(cur, out_ids);
            residual = g.get_rows(residual, out_ids);
        }
        let x1 = g.add(cur, residual);

        let h = g.rms_norm(x1, c.rms_eps);
        let h = g.mul(h, wt(l.ffn_norm));
        let up = w.mul(&mut g, l.ffn_up, h); // [2*n_ff, n]
        let act = g.swiglu(up); // [n_ff, n]
        let down = w.mul(&mut g, l.ffn_down, act);
        x = g.add(x1, down);
    }
    let h = g.rms_norm(x, c.rms_eps);
    let hidden = g.mul(h, wt(w.output_norm)); // [n_embd, n_out] ([n_embd, n] with all rows)
    let last = match all_rows {
        true => {
            g.output(hidden);
            g.get_rows(hidden, out_ids)
        }
        false => hidden,
    };
    let logits = w.mul(&mut g, w.output, last); // [n_vocab, n_out]
    g.output(logits);
    Built {
        graph: g.raw_graph(),
        tokens,
        pos,
        out_ids,
        masks,
        hidden,
        logits,
    }
}
