//! Graph construction: the ops the forward pass uses, each checking ggml's preconditions first.

use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::context::{Context, Tensor};
use super::types::Type;

// A macro of ggml.h that bindgen does not carry over.
const ROPE_TYPE_NEOX: i32 = 2; // GGML_ROPE_TYPE_NEOX

/// Graph construction: the ops the forward pass uses, each checking ggml's preconditions.
pub struct Graph<'ctx> {
    pub(super) ctx: &'ctx mut Context,
    graph: NonNull<sys::ggml_cgraph>,
    size: usize,
}

impl Context {
    /// A new graph-building scope over this context.
    pub fn graph(&mut self, size: usize) -> Graph<'_> {
        // SAFETY: the context was created with room for a graph of `size` (caller's contract,
        // checked by ggml_graph_overhead_custom sizing in `new`).
        let g = unsafe { sys::ggml_new_graph_custom(self.ctx.as_ptr(), size, false) };
        let g = NonNull::new(g).expect("ggml_new_graph_custom returned null");
        Graph {
            ctx: self,
            graph: g,
            size,
        }
    }
}

fn can_repeat(b: &Tensor<'_>, a: &Tensor<'_>) -> bool {
    (0..4).all(|i| a.ne()[i] % b.ne()[i] == 0)
}

impl<'ctx> Graph<'ctx> {
    pub(super) fn ctx(&self) -> *mut sys::ggml_context {
        self.ctx.ctx.as_ptr()
    }

    pub(super) fn op(&mut self, p: *mut sys::ggml_tensor) -> Tensor<'ctx> {
        let ptr = NonNull::new(p).expect("ggml returned a null tensor");
        self.ctx.tensors.push(ptr);
        Tensor {
            ptr,
            _ctx: PhantomData,
        }
    }

    /// A tensor made here (inputs of the graph: token ids, positions, the mask).
    pub fn input(&mut self, ty: Type, ne: &[i64], name: &str) -> Tensor<'ctx> {
        let id = self.ctx.new_tensor(ty, ne, name);
        let t = self.ctx.get(id);
        // SAFETY: valid tensor; marks it so the allocator gives it its own memory.
        unsafe { sys::ggml_set_input(t.ptr()) };
        Tensor {
            ptr: t.ptr,
            _ctx: PhantomData,
        }
    }

    pub fn get_rows(&mut self, a: Tensor<'ctx>, rows: Tensor<'ctx>) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(rows.ty() == Type::I32 && rows.ne()[1..] == [1, 1, 1] && a.ne()[2..] == [1, 1]);
        // SAFETY: valid tensors with the shapes ggml_get_rows asserts (checked above).
        self.op(unsafe { sys::ggml_get_rows(self.ctx(), a.ptr(), rows.ptr()) })
    }

    pub fn rms_norm(&mut self, a: Tensor<'ctx>, eps: f32) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(a.ty() == Type::F32);
        // SAFETY: valid f32 tensor; rms_norm accepts any shape.
        self.op(unsafe { sys::ggml_rms_norm(self.ctx(), a.ptr(), eps) })
    }

    /// Element-wise a * b, b broadcast over a.
    pub fn mul(&mut self, a: Tensor<'ctx>, b: Tensor<'ctx>) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(
            can_repeat(&b, &a),
            "mul: {:?} does not broadcast over {:?}",
            b.ne(),
            a.ne()
        );
        // SAFETY: valid tensors; ggml_can_repeat(b, a) checked above.
        self.op(unsafe { sys::ggml_mul(self.ctx(), a.ptr(), b.ptr()) })
    }

    /// Element-wise a + b, b broadcast over a.
    pub fn add(&mut self, a: Tensor<'ctx>, b: Tensor<'ctx>) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(
            can_repeat(&b, &a),
            "add: {:?} does not broadcast over {:?}",
            b.ne(),
            a.ne()
        );
        // SAFETY: valid tensors; ggml_can_repeat(b, a) checked above.
        self.op(unsafe { sys::ggml_add(self.ctx(), a.ptr(), b.ptr()) })
    }

    /// w [k, m] · x [k, n] → [m, n]
    pub fn mul_mat(&mut self, w: Tensor<'ctx>, x: Tensor<'ctx>) -> Tensor<'ctx> {
        self.ctx.room();
        let (a, b) = (w.ne(), x.ne());
        assert!(
            a[0] == b[0] && b[2] % a[2] == 0 && b[3] % a[3] == 0,
            "mul_mat: {a:?} · {b:?}"
        );
        assert!(w.nb()[0] <= w.nb()[1], "mul_mat: transposed weight");
        // SAFETY: valid tensors; ggml_can_mul_mat and !ggml_is_transposed checked above.
        self.op(unsafe { sys::ggml_mul_mat(self.ctx(), w.ptr(), x.ptr()) })
    }

    pub fn scale(&mut self, a: Tensor<'ctx>, s: f32) -> Tensor<'ctx> {
        self.ctx.room();
        // SAFETY: valid tensor; scale accepts any shape.
        self.op(unsafe { sys::ggml_scale(self.ctx(), a.ptr(), s) })
    }

    /// SwiGLU over a fused [2n, ...] tensor: silu(first half) * second half → [n, ...].
    pub fn swiglu(&mut self, a: Tensor<'ctx>) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(a.ne()[0] % 2 == 0 && a.nb()[0] == a.ty().type_size() as usize);
        // SAFETY: valid tensor with an even, contiguous first dimension (ggml_glu's asserts).
        self.op(unsafe { sys::ggml_swiglu(self.ctx(), a.ptr()) })
    }

    /// NEOX-style RoPE over the first `n_rot` dims of a [head_dim, n_head, n_tokens] tensor.
    pub fn rope_neox(
        &mut self,
        a: Tensor<'ctx>,
        pos: Tensor<'ctx>,
        n_rot: i32,
        n_ctx_orig: i32,
        theta: f32,
    ) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(pos.ty() == Type::I32 && pos.ne()[1..] == [1, 1, 1] && a.ne()[2] == pos.ne()[0]);
        assert!(n_rot > 0 && n_rot % 2 == 0 && i64::from(n_rot) <= a.ne()[0]);
        // SAFETY: valid tensors; positions are an I32 vector of length ne[2]; n_rot is even and
        // within the row. No frequency factors. ext_factor 0 disables YaRN; beta values are
        // ggml's defaults and unused then.
        self.op(unsafe {
            sys::ggml_rope_ext(
                self.ctx(),
                a.ptr(),
                pos.ptr(),
                std::ptr::null_mut(),
                n_rot,
                ROPE_TYPE_NEOX,
                n_ctx_orig,
                theta,
                1.0,
                0.0,
                1.0,
                32.0,
                1.0,
            )
        })
    }

    /// A strided view of `a`: shape `ne` (2 or 3 dims), strides `nb[1..]` in bytes, starting
    /// `offset` bytes in.
    pub fn view(
        &mut self,
        a: Tensor<'ctx>,
        ne: &[i64],
        nb: &[usize],
        offset: usize,
    ) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(
            ne.len() == nb.len() + 1 && (2..=3).contains(&ne.len()) && ne.iter().all(|&d| d >= 1)
        );
        let ty = a.ty();
        assert!((ne[0] as u64).is_multiple_of(ty.block_size()));
        // ggml's own check: the contiguous size from `offset` fits in a.
        let contiguous =
            ty.row_size(ne[0] as u64) as usize * ne[1..].iter().product::<i64>() as usize;
        // And the real extent: the last byte the strides reach.
        let extent = ty.row_size(ne[0] as u64) as usize
            + ne[1..]
                .iter()
                .zip(nb)
                .map(|(&n, &s)| (n as usize - 1) * s)
                .sum::<usize>();
        assert!(
            offset + contiguous.max(extent) <= a.nbytes(),
            "view out of bounds"
        );
        // SAFETY: valid tensor; the view lies inside it (checked above).
        let p = unsafe {
            match ne.len() {
                2 => sys::ggml_view_2d(self.ctx(), a.ptr(), ne[0], ne[1], nb[0], offset),
                _ => sys::ggml_view_3d(
                    self.ctx(),
                    a.ptr(),
                    ne[0],
                    ne[1],
                    ne[2],
                    nb[0],
                    nb[1],
                    offset,
                ),
            }
        };
        self.op(p)
    }

    pub fn permute(&mut self, a: Tensor<'ctx>, axes: [i32; 4]) -> Tensor<'ctx> {
        self.ctx.room();
        let mut seen = [false; 4];
        axes.iter().for_each(|&x| seen[x as usize] = true);
        assert!(
            seen.iter().all(|&s| s),
            "permute: {axes:?} is not a permutation"
        );
        // SAFETY: valid tensor; axes are a permutation of 0..4.
        self.op(unsafe {
            sys::ggml_permute(self.ctx(), a.ptr(), axes[0], axes[1], axes[2], axes[3])
        })
    }

    pub fn reshape_2d(&mut self, a: Tensor<'ctx>, ne0: i64, ne1: i64) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(a.is_contiguous() && ne0 * ne1 == a.n_elements());
        // SAFETY: contiguous tensor with the same element count.
        self.op(unsafe { sys::ggml_reshape_2d(self.ctx(), a.ptr(), ne0, ne1) })
    }

    /// `a`'s elements, in order, into a new contiguous [ne0, ne1] tensor of its type.
    pub fn cont_2d(&mut self, a: Tensor<'ctx>, ne0: i64, ne1: i64) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(ne0 >= 1 && ne1 >= 1 && ne0 * ne1 == a.n_elements());
        // SAFETY: valid tensor; the same element count (ggml_cont_4d's assert).
        self.op(unsafe { sys::ggml_cont_2d(self.ctx(), a.ptr(), ne0, ne1) })
    }

    pub fn reshape_4d(&mut self, a: Tensor<'ctx>, ne: [i64; 4]) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(a.is_contiguous() && ne.iter().product::<i64>() == a.n_elements());
        // SAFETY: contiguous tensor with the same element count.
        self.op(unsafe { sys::ggml_reshape_4d(self.ctx(), a.ptr(), ne[0], ne[1], ne[2], ne[3]) })
    }

    /// `a` and `b` joined along dimension `dim` (same type, every other dimension equal).
    pub fn concat(&mut self, a: Tensor<'ctx>, b: Tensor<'ctx>, dim: usize) -> Tensor<'ctx> {
        self.ctx.room();
        let (an, bn) = (a.ne(), b.ne());
        assert!(
            dim < 4 && a.ty() == b.ty() && (0..4).all(|i| i == dim || an[i] == bn[i]),
            "concat: {an:?} and {bn:?} along {dim}"
        );
        // SAFETY: valid tensors of one type whose other dimensions match (ggml_concat's asserts).
        self.op(unsafe { sys::ggml_concat(self.ctx(), a.ptr(), b.ptr(), dim as i32) })
    }

    /// Copy `a` into `dst` (same element count), converting the type.
    pub fn cpy(&mut self, a: Tensor<'ctx>, dst: Tensor<'ctx>) -> Tensor<'ctx> {
        self.ctx.room();
        assert!(a.n_elements() == dst.n_elements());
        // Into a quantized tensor: whole blocks of f32 rows, a contiguous destination (else
        // ggml aborts: "not implemented").
        assert!(
            !dst.ty().is_quantized()
                || (a.ty() == Type::F32
                    && a.nb()[0] == 4
                    && (a.ne()[0] as u64).is_multiple_of(dst.ty().block_size())
                    && dst.is_contiguous())
        );
        // SAFETY: same element count (ggml_cpy's assert); a quantized destination as above.
        self.op(unsafe { sys::ggml_cpy(self.ctx(), a.ptr(), dst.ptr()) })
    }

    /// softmax(q·kᵀ·scale + mask)·v with f32 accumulation.
    /// q [d, n_tokens, n_head], k/v [d, n_kv, n_head_kv] (f16, q8_0 or q4_0: a KV cache's
    /// types, rows of whole blocks), mask f16 [n_kv, n_tokens]
    /// → [d, n_head, n_tokens].
    pub fn flash_attn(
        &mut self,
        q: Tensor<'ctx>,
        k: Tensor<'ctx>,
        v: Tensor<'ctx>,
        mask: Tensor<'ctx>,
        scale: f32,
    ) -> Tensor<'ctx> {
        self.ctx.room();
        let (qn, kn, vn, mn) = (q.ne(), k.ne(), v.ne(), mask.ne());
        assert!(kn[0] == qn[0] && qn[2] % kn[2] == 0 && qn[3] == 1 && kn[3] == 1 && vn[3] == 1);
        let cache = |t: Tensor<'ctx>| {
            [Type::F16, Type::Q8_0, Type::Q4_0].contains(&t.ty())
                && (t.ne()[0] as u64).is_multiple_of(t.ty().block_size())
        };
        assert!(vn[1] == kn[1] && vn[2] == kn[2] && cache(k) && cache(v));
        assert!(
            mask.ty() == Type::F16
                && mask.is_contiguous()
                && mn[0] == kn[1]
                && mn[1] >= qn[1]
                && mn[2..] == [1, 1]
        );
        // SAFETY: shapes and types as ggml_flash_attn_ext asserts (checked above).
        let t = self.op(unsafe {
            sys::ggml_flash_attn_ext(
                self.ctx(),
                q.ptr(),
                k.ptr(),
                v.ptr(),
                mask.ptr(),
                scale,
                0.0,
                0.0,
            )
        });
        // SAFETY: t is a flash_attn_ext node.
        unsafe { sys::ggml_prec_set_acc(t.ptr(), sys::GGML_PREC_F32) };
        t
    }

    /// Mark `t` as an output of the graph (read after computing it: the allocator never reuses
    /// its memory) and add it ([`Graph::expand`]).
    pub fn output(&mut self, t: Tensor<'ctx>) {
        // SAFETY: valid tensor of this graph's context.
        unsafe { sys::ggml_set_output(t.ptr()) };
        self.expand(t);
    }

    /// Add `t` and everything it depends on to the graph (in dependency order, after what is
    /// already there).
    pub fn expand(&mut self, t: Tensor<'ctx>) {
        // SAFETY: valid graph and tensor. The graph was sized (by the caller) for every tensor
        // of its context plus every outside leaf (weights, cache), so it cannot overflow.
        unsafe { sys::ggml_build_forward_expand(self.graph.as_ptr(), t.ptr()) };
        // SAFETY: valid graph.
        let n = unsafe { sys::ggml_graph_n_nodes(self.graph.as_ptr()) } as usize;
        assert!(n <= self.size);
    }

    pub fn raw_graph(&self) -> GraphRef<'ctx> {
        GraphRef {
            graph: self.graph,
            _ctx: PhantomData,
        }
    }
}

/// A built graph, to allocate and compute.
#[derive(Clone, Copy)]
pub struct GraphRef<'ctx> {
    pub(super) graph: NonNull<sys::ggml_cgraph>,
    pub(super) _ctx: PhantomData<&'ctx Context>,
}
