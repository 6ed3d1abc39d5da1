//! One weight matrix times a step's tokens, alone: the product every layer of the forward pass
//! is made of, through phi4's kernels or ggml's, run as the model runs it (a ggml graph on a
//! thread pool). For benchmarks (`benches/kernels.rs`) and tests (`tests/kernels.rs`); the
//! model packs its weights itself.

use std::sync::atomic::AtomicBool;

use crate::ggml::{self, Allocator, Buffer, BufferType, Compute, Context, TensorId, Type};

pub use crate::ggml::{kernel_variants, PackedMatrix, KERNEL_TYPES};

/// Whose kernels multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// phi4's (the weights packed for them).
    Phi4,
    /// ggml's, on the weights as the file stores them.
    Ggml,
    /// ggml's, on the weights repacked by ggml where it has a faster layout for the type.
    GgmlRepacked,
}

/// A weight matrix placed for one kind of kernels, and the threads that multiply it.
pub struct Product {
    ty: Type,
    rows: usize,
    k: usize,
    kernels: Kernels,
    weights: Context,
    weight: TensorId,
    _buffer: Buffer,
    graph: Context,
    alloc: Allocator,
    compute: Compute,
}

impl Product {
    /// `rows` rows of `k` weights of GGUF type `ty` (as a file stores them), for `kernels`,
    /// multiplied on `threads` threads.
    pub fn new(
        ty: Type,
        rows: usize,
        k: usize,
        src: &[u8],
        kernels: Kernels,
        threads: usize,
    ) -> Result<Product, String> {
        ggml::check_rows(ty, rows, k, src)?;
        let mut weights = Context::new(1, 0);
        let (weight, buffer) = if kernels == Kernels::Phi4 {
            if !ggml::takes(ty, k) {
                return Err(format!("phi4's kernels do not take {ty:?} [{k}]"));
            }
            let shape = ggml::packed_shape(ty, rows, k);
            let id = weights.new_tensor(Type::I8, &shape, "w");
            let buf = Buffer::alloc_context(&weights, BufferType::cpu(), "weights")
                .map_err(|e| e.to_string())?;
            ggml::pack_into(weights.get(id), ty, src, rows, k, threads);
            (id, buf)
        } else {
            let id = weights.new_tensor(ty, &[k as i64, rows as i64], "w");
            let buft = BufferType::cpu_extra()
                .into_iter()
                .find(|b| b.accelerates_mul_mat(ty, k as i64, rows as i64))
                .filter(|_| kernels == Kernels::GgmlRepacked)
                .unwrap_or(BufferType::cpu());
            let size = Buffer::alloc_size_in(buft, weights.get(id));
            let buf = Buffer::alloc(buft, size, "weights").map_err(|e| e.to_string())?;
            buf.place(weights.get(id), 0);
            ggml::tensor_set(weights.get(id), src);
            (id, buf)
        };
        Ok(Product {
            ty,
            rows,
            k,
            kernels,
            weights,
            weight,
            _buffer: buffer,
            graph: Context::new(8, 8),
            alloc: Allocator::new(),
            compute: Compute::new(threads).map_err(|e| e.to_string())?,
        })
    }

    /// y [m × rows] = x [m × k] · Wᵀ.
    pub fn run(&mut self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(x.len() == m * self.k && m > 0);
        self.graph.reset();
        let mut g = self.graph.graph(8);
        let input = g.input(Type::F32, &[self.k as i64, m as i64], "x");
        let w = self.weights.get(self.weight);
        let y = if self.kernels == Kernels::Phi4 {
            g.packed_mul_mat(w, self.ty, self.rows, input)
        } else {
            g.mul_mat(w, input)
        };
        g.output(y);
        let graph = g.raw_graph();
        self.alloc.alloc(graph).expect("compute buffer");
        ggml::tensor_write(input, 0, x);
        let threads = self.compute.n_threads();
        self.compute
            .compute(graph, threads, &AtomicBool::new(false), false)
            .expect("a product runs");
        let mut out = Vec::new();
        ggml::tensor_read_f32(y, &mut out);
        out
    }
}
