//! The ggml wrapper: every call into ggml goes through this module, and the rest of the crate is
//! safe Rust.
//!
//! ggml aborts the process on a bad shape or an exhausted pool. This module checks each
//! precondition of the ggml functions it calls *before* calling them and panics (a Rust panic,
//! caught at the C boundary) instead, so an `abort()` can only come from a bug in ggml itself.
//!
//! Ownership: a [`Context`] owns its metadata pool (a Rust `Vec`) and the tensors in it; tensors
//! are handed out as [`Tensor<'ctx>`] (borrowing the context) or as plain [`TensorId`]s to be
//! resolved against the context later. Data lives in [`Buffer`]s.

//!
//! By concern: `types.rs` (tensor types), `kernels.rs` (the CPU backend's variant this CPU
//! runs best), `context.rs` (metadata contexts and tensors), `graph.rs` (the ops, checked),
//! `buffer.rs` (where data lives; reading and writing it), `alloc.rs` (the compute buffer),
//! `compute.rs` (threads and graph runs), `quantize.rs`, `mmap.rs` (file mappings).

mod alloc;
mod buffer;
mod compute;
mod context;
mod graph;
mod kernels;
mod matmul;
mod mmap;
mod quantize;
mod rotate;
mod types;

pub use alloc::Allocator;
pub use buffer::{
    tensor_read_bytes, tensor_read_f32, tensor_set, tensor_write, AllocError, Buffer, BufferType,
};
pub use compute::{Compute, ComputeError};
pub use context::{Context, Tensor, TensorId};
pub use graph::{Graph, GraphRef};
pub use kernels::{cpu_features, cpu_variant, cpu_variants};
pub use matmul::{
    check_rows, kernel_variants, own_kernels_enabled, pack_into, packed_shape, takes, PackedMatrix,
    KERNEL_TYPES,
};
pub use mmap::{drop_pages, map_path, prefault};
pub use quantize::{dequantize, quantize};
pub use types::{f32_to_f16, Type};
