//! Contexts of tensor metadata (`no_alloc`: data lives in buffers), and the tensors in them.

use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::kernels::silence_ggml_log;
use super::types::Type;

// A macro of ggml.h that bindgen does not carry over.
const MAX_NAME: usize = 64; // GGML_MAX_NAME, including the NUL

/// Handle to a tensor in a [`Context`], valid while the context lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorId(pub(super) usize);

/// A tensor borrowed from its context.
#[derive(Clone, Copy)]
pub struct Tensor<'ctx> {
    pub(super) ptr: NonNull<sys::ggml_tensor>,
    pub(super) _ctx: PhantomData<&'ctx Context>,
}

impl<'ctx> Tensor<'ctx> {
    pub(super) fn raw(&self) -> &sys::ggml_tensor {
        // SAFETY: the pointer came from ggml_new_tensor*/view/op on a live context ('ctx).
        unsafe { self.ptr.as_ref() }
    }
    pub(super) fn ptr(&self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }
    pub fn ne(&self) -> [i64; 4] {
        self.raw().ne
    }
    pub fn nb(&self) -> [usize; 4] {
        self.raw().nb
    }
    pub fn ty(&self) -> Type {
        Type(self.raw().type_)
    }
    pub fn n_elements(&self) -> i64 {
        self.ne().iter().product()
    }
    pub fn nbytes(&self) -> usize {
        // SAFETY: valid tensor pointer.
        unsafe { sys::ggml_nbytes(self.ptr()) }
    }
    pub(super) fn is_contiguous(&self) -> bool {
        // SAFETY: valid tensor pointer.
        unsafe { sys::ggml_is_contiguous(self.ptr()) }
    }
    pub(super) fn has_data(&self) -> bool {
        !self.raw().buffer.is_null() && !self.raw().data.is_null()
    }
}

/// A ggml context holding tensor metadata only (`no_alloc`): data lives in buffers.
pub struct Context {
    pub(super) ctx: NonNull<sys::ggml_context>,
    pub(super) tensors: Vec<NonNull<sys::ggml_tensor>>,
    capacity: usize,
    // The pool ggml carves tensor and graph headers from; owned here so that ggml never mallocs.
    _pool: Vec<u8>,
}

// SAFETY: a Context is only mutated through &mut self; ggml contexts have no thread affinity.
unsafe impl Send for Context {}
// SAFETY: shared access only reads tensor metadata (weights are immutable after loading).
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: ctx came from ggml_init and is freed once; the pool outlives this call.
        unsafe { sys::ggml_free(self.ctx.as_ptr()) }
    }
}

impl Context {
    /// A context with room for `max_tensors` tensors (ops and views count as one each) and, if
    /// `graph_size` > 0, one graph of that many nodes.
    pub fn new(max_tensors: usize, graph_size: usize) -> Context {
        silence_ggml_log();
        // SAFETY: pure size computations.
        let mut size = unsafe { sys::ggml_tensor_overhead() } * max_tensors;
        if graph_size > 0 {
            // SAFETY: pure size computation.
            size += unsafe { sys::ggml_graph_overhead_custom(graph_size, false) };
        }
        let mut pool = vec![0u8; size + 1024];
        let params = sys::ggml_init_params {
            mem_size: pool.len(),
            mem_buffer: pool.as_mut_ptr().cast(),
            no_alloc: true,
        };
        // SAFETY: the pool is ours, large enough, and outlives the context (dropped after it).
        let ctx = unsafe { sys::ggml_init(params) };
        let ctx = NonNull::new(ctx).expect("ggml_init with a caller-provided pool cannot fail");
        Context {
            ctx,
            tensors: Vec::new(),
            capacity: max_tensors,
            _pool: pool,
        }
    }

    pub(super) fn room(&self) {
        assert!(
            self.tensors.len() < self.capacity,
            "ggml context full ({} tensors)",
            self.capacity
        );
    }

    pub(super) fn push(&mut self, p: *mut sys::ggml_tensor) -> Tensor<'_> {
        let ptr = NonNull::new(p).expect("ggml returned a null tensor");
        self.tensors.push(ptr);
        Tensor {
            ptr,
            _ctx: PhantomData,
        }
    }

    /// Forget every tensor (and graph) made in this context, keeping its pool.
    pub fn reset(&mut self) {
        // SAFETY: valid context; &mut self proves no Tensor<'_> of it is alive.
        unsafe { sys::ggml_reset(self.ctx.as_ptr()) };
        self.tensors.clear();
    }

    pub fn get(&self, id: TensorId) -> Tensor<'_> {
        Tensor {
            ptr: self.tensors[id.0],
            _ctx: PhantomData,
        }
    }

    pub fn id_of_last(&self) -> TensorId {
        TensorId(self.tensors.len() - 1)
    }

    /// A new tensor of `ty` with shape `ne` (1 to 4 dims, each >= 1, ne[0] a multiple of the
    /// block size), named `name` (at most 63 bytes).
    pub fn new_tensor(&mut self, ty: Type, ne: &[i64], name: &str) -> TensorId {
        self.room();
        assert!(
            (1..=4).contains(&ne.len()) && ne.iter().all(|&d| d >= 1),
            "bad shape {ne:?}"
        );
        assert!(
            (ne[0] as u64).is_multiple_of(ty.block_size()),
            "row length {} not a multiple of {:?} blocks",
            ne[0],
            ty
        );
        assert!(name.len() < MAX_NAME, "tensor name too long");
        // SAFETY: valid context with room (checked); shape checked above; ne outlives the call.
        let p =
            unsafe { sys::ggml_new_tensor(self.ctx.as_ptr(), ty.0, ne.len() as i32, ne.as_ptr()) };
        let t = self.push(p);
        set_name(t, name);
        self.id_of_last()
    }
}

pub(super) fn set_name(t: Tensor<'_>, name: &str) {
    let mut buf = [0u8; 64];
    let n = name.len().min(63);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: buf is NUL-terminated and outlives the call; ggml copies it.
    unsafe { sys::ggml_set_name(t.ptr(), buf.as_ptr().cast()) };
}
