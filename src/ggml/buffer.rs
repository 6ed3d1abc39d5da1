//! Where tensor data lives (backend buffers and their types), and reading and writing it.

use std::ffi::{c_void, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use super::context::{Context, Tensor};
use super::kernels::{kernels, silence_ggml_log};
use super::types::Type;

/// A ggml backend buffer type (where tensor data may live).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BufferType(pub(super) sys::ggml_backend_buffer_type_t);
// SAFETY: buffer types are static singletons in ggml.
unsafe impl Send for BufferType {}
// SAFETY: as above.
unsafe impl Sync for BufferType {}

impl BufferType {
    pub fn cpu() -> BufferType {
        silence_ggml_log();
        // SAFETY: returns a static buffer type.
        BufferType(unsafe { sys::ggml_backend_cpu_buffer_type() })
    }

    pub fn name(self) -> String {
        // SAFETY: static NUL-terminated name.
        unsafe { CStr::from_ptr(sys::ggml_backend_buft_name(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    /// The CPU device's extra buffer types: weight layouts ggml repacks for faster kernels
    /// (e.g. "CPU_REPACK"), in ggml's order of preference.
    pub fn cpu_extra() -> Vec<BufferType> {
        silence_ggml_log();
        type GetExtra =
            unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t;
        // SAFETY: the CPU registry and its device 0 are static; the proc name is NUL-terminated.
        unsafe {
            let reg = (kernels().reg)();
            let dev = sys::ggml_backend_reg_dev_get(reg, 0);
            let f = sys::ggml_backend_reg_get_proc_address(
                reg,
                c"ggml_backend_dev_get_extra_bufts".as_ptr(),
            );
            if f.is_null() {
                return Vec::new();
            }
            let f: GetExtra = std::mem::transmute(f);
            let mut p = f(dev);
            let mut out = Vec::new();
            while !p.is_null() && !(*p).is_null() {
                out.push(BufferType(*p));
                p = p.add(1);
            }
            out
        }
    }

    /// Whether a weight of type `ty` and shape [ne0, ne1] placed in this (extra) buffer type
    /// gets a faster kernel for `mul_mat` with f32 activations. Asked the way ggml's device
    /// answers it: a probe op whose weight claims to live in a buffer of this type.
    pub fn accelerates_mul_mat(self, ty: Type, ne0: i64, ne1: i64) -> bool {
        let mut ctx = Context::new(3, 0);
        let w = ctx.new_tensor(ty, &[ne0, ne1], "probe_w");
        let x = ctx.new_tensor(Type::F32, &[ne0, 8], "probe_x");
        // SAFETY: size-0 allocations return a dummy buffer (or null, handled); the probe
        // tensors are metadata only and never computed; the buffer is freed before returning.
        unsafe {
            let buf = sys::ggml_backend_buft_alloc_buffer(self.0, 0);
            if buf.is_null() {
                return false;
            }
            let (w, x) = (ctx.get(w).ptr(), ctx.get(x).ptr());
            ctx.room();
            let op = sys::ggml_mul_mat(ctx.ctx.as_ptr(), w, x);
            (*w).buffer = buf;
            let dev = sys::ggml_backend_buft_get_device(self.0);
            let ok = !dev.is_null() && sys::ggml_backend_dev_supports_op(dev, op);
            (*w).buffer = std::ptr::null_mut();
            sys::ggml_backend_buffer_free(buf);
            ok
        }
    }
}

/// An owned ggml backend buffer.
pub struct Buffer {
    buf: NonNull<sys::ggml_backend_buffer>,
    // Memory the buffer points into but does not own (an mmap), kept alive with it.
    _borrowed: Option<Arc<dyn AsRef<[u8]> + Send + Sync>>,
}
// SAFETY: buffers are plain memory; ggml buffer functions used here are not thread-affine.
unsafe impl Send for Buffer {}
// SAFETY: shared access is read-only (weights) or serialised by the owning session.
unsafe impl Sync for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated by ggml, freed once; borrowed memory is released after (field order).
        unsafe { sys::ggml_backend_buffer_free(self.buf.as_ptr()) }
    }
}

/// Out of memory (or address space, or threads) for `what`, of `bytes` bytes when known.
#[derive(Debug, Clone)]
pub struct AllocError {
    pub what: String,
    pub bytes: usize,
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.bytes {
            0 => write!(f, "could not allocate {}", self.what),
            n => write!(f, "could not allocate {n} bytes for {}", self.what),
        }
    }
}

impl std::error::Error for AllocError {}

impl Buffer {
    /// A CPU buffer over memory owned elsewhere (the model file's mmap), kept alive by `owner`.
    pub fn from_host_memory(owner: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Buffer {
        silence_ggml_log();
        let bytes = (*owner).as_ref();
        assert!(
            (bytes.as_ptr() as usize).is_multiple_of(64),
            "host memory must be 64-byte aligned"
        );
        // SAFETY: the memory is valid for bytes.len() and outlives the buffer (owner is kept in
        // it). ggml never writes to weights placed here; tensors are only read.
        let buf = unsafe {
            sys::ggml_backend_cpu_buffer_from_ptr(bytes.as_ptr() as *mut c_void, bytes.len())
        };
        Buffer {
            buf: NonNull::new(buf).expect("cpu_buffer_from_ptr cannot fail"),
            _borrowed: Some(owner),
        }
    }

    /// A new buffer of `size` bytes of `buft`.
    pub fn alloc(buft: BufferType, size: usize, what: &str) -> Result<Buffer, AllocError> {
        // SAFETY: buft is a valid buffer type; a null return is handled.
        let buf = unsafe { sys::ggml_backend_buft_alloc_buffer(buft.0, size.max(1)) };
        Buffer::allocated(buf, what, size)
    }

    /// The buffer ggml allocated for `what` (`bytes` long), or the error of its null.
    fn allocated(
        buf: sys::ggml_backend_buffer_t,
        what: &str,
        bytes: usize,
    ) -> Result<Buffer, AllocError> {
        let buf = NonNull::new(buf).ok_or(AllocError {
            what: what.into(),
            bytes,
        })?;
        let b = Buffer {
            buf,
            _borrowed: None,
        };
        b.advise_huge_pages();
        Ok(b)
    }

    /// Ask for transparent huge pages over a large buffer before it is first touched: one fault
    /// per 2 MiB instead of per 4 KiB (loading is several times faster on VMs), fewer TLB misses.
    fn advise_huge_pages(&self) {
        const HUGE: usize = 2 << 20;
        // Every buffer phi4 makes is CPU memory (the repacking types included, though they do
        // not call themselves "host").
        if self.size() < 16 * HUGE {
            return;
        }
        let start = self.base().div_ceil(HUGE) * HUGE;
        let end = (self.base() + self.size()) / HUGE * HUGE;
        if end > start {
            // SAFETY: advisory only, on memory this buffer owns; failure (no THP) is harmless.
            unsafe { libc::madvise(start as *mut c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }

    /// Give every tensor of `ctx` memory in one new buffer of `buft`.
    pub fn alloc_context(
        ctx: &Context,
        buft: BufferType,
        what: &str,
    ) -> Result<Buffer, AllocError> {
        // SAFETY: valid context and buffer type; null (allocation failure) is handled.
        let buf =
            unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.ctx.as_ptr(), buft.0) };
        let bytes = ctx
            .tensors
            .iter()
            .map(|t| {
                Tensor {
                    ptr: *t,
                    _ctx: PhantomData,
                }
                .nbytes()
            })
            .sum();
        Buffer::allocated(buf, what, bytes)
    }

    /// A buffer of no memory that every tensor of `ctx` names as its own, so that graphs over
    /// them can be sized ([`super::Allocator::measure`]) as if they were placed (llama.cpp's
    /// `no_alloc` does the same). Their data stays null: reading or writing them asserts.
    pub fn measure(ctx: &Context, buft: BufferType) -> Buffer {
        // SAFETY: a zero-size buffer is ggml's documented dummy (no memory, no base).
        let buf = unsafe { sys::ggml_backend_buft_alloc_buffer(buft.0, 0) };
        let buf = NonNull::new(buf).expect("a zero-size buffer holds no memory to fail on");
        for t in &ctx.tensors {
            // SAFETY: tensors of a live context, not placed (their buffer is only named, so
            // the graph allocator leaves them alone; the data pointer stays null).
            unsafe {
                let t = t.as_ptr();
                assert!(
                    (*t).buffer.is_null() && (*t).data.is_null(),
                    "tensor already placed"
                );
                (*t).buffer = buf.as_ptr();
            }
        }
        Buffer {
            buf,
            _borrowed: None,
        }
    }

    pub fn size(&self) -> usize {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_get_size(self.buf.as_ptr()) }
    }

    fn base(&self) -> usize {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_get_base(self.buf.as_ptr()) as usize }
    }

    fn alloc_size(&self, t: Tensor<'_>) -> usize {
        // SAFETY: valid buffer and tensor.
        unsafe { sys::ggml_backend_buffer_get_alloc_size(self.buf.as_ptr(), t.ptr()) }
    }

    /// Place tensor `t` (not yet placed) at `offset` bytes into this buffer.
    pub fn place(&self, t: Tensor<'_>, offset: usize) {
        assert!(
            t.raw().buffer.is_null() && t.raw().data.is_null(),
            "tensor already placed"
        );
        // SAFETY: valid buffer.
        let align = unsafe { sys::ggml_backend_buffer_get_alignment(self.buf.as_ptr()) };
        assert!(
            (self.base() + offset).is_multiple_of(align),
            "misaligned tensor data"
        );
        assert!(
            offset
                .checked_add(self.alloc_size(t))
                .is_some_and(|end| end <= self.size()),
            "tensor outside buffer"
        );
        // SAFETY: the tensor fits inside the buffer at an aligned address (checked above).
        let st = unsafe {
            sys::ggml_backend_tensor_alloc(
                self.buf.as_ptr(),
                t.ptr(),
                (self.base() + offset) as *mut c_void,
            )
        };
        assert!(
            st == sys::GGML_STATUS_SUCCESS,
            "ggml_backend_tensor_alloc failed"
        );
    }

    /// Bytes a tensor needs in this buffer type (repacked layouts may differ from ggml_nbytes).
    pub fn alloc_size_in(buft: BufferType, t: Tensor<'_>) -> usize {
        // SAFETY: valid buffer type and tensor.
        unsafe { sys::ggml_backend_buft_get_alloc_size(buft.0, t.ptr()) }
    }

    pub fn alignment_of(buft: BufferType) -> usize {
        // SAFETY: valid buffer type.
        unsafe { sys::ggml_backend_buft_get_alignment(buft.0) }
    }
}

/// Write `data` into a placed tensor's memory (whole tensor); for repacking buffer types this is
/// where the layout is converted.
pub fn tensor_set(t: Tensor<'_>, data: &[u8]) {
    assert!(t.has_data(), "tensor has no memory");
    assert!(
        data.len() == t.nbytes(),
        "tensor_set: {} bytes for a {}-byte tensor",
        data.len(),
        t.nbytes()
    );
    // SAFETY: the tensor has memory of nbytes; data has exactly that many bytes.
    unsafe { sys::ggml_backend_tensor_set(t.ptr(), data.as_ptr().cast(), 0, data.len()) }
}

/// Write f32 values at element offset `at` of a contiguous f32 tensor (or f16/i32 as bytes).
pub fn tensor_write<T: Copy>(t: Tensor<'_>, at_bytes: usize, data: &[T]) {
    let n = std::mem::size_of_val(data);
    assert!(t.has_data() && t.is_contiguous());
    assert!(
        at_bytes.checked_add(n).is_some_and(|end| end <= t.nbytes()),
        "tensor_write out of bounds"
    );
    // SAFETY: the range lies inside the tensor's memory (checked above); T is plain data.
    unsafe { sys::ggml_backend_tensor_set(t.ptr(), data.as_ptr().cast(), at_bytes, n) }
}

/// Read `out.len()` bytes of a contiguous tensor's data, from byte `at_bytes`.
pub fn tensor_read_bytes(t: Tensor<'_>, at_bytes: usize, out: &mut [u8]) {
    assert!(t.has_data() && t.is_contiguous());
    assert!(
        at_bytes
            .checked_add(out.len())
            .is_some_and(|end| end <= t.nbytes()),
        "tensor_read_bytes out of bounds"
    );
    // SAFETY: the range lies inside the tensor's memory (checked above); out has out.len() bytes.
    unsafe { sys::ggml_backend_tensor_get(t.ptr(), out.as_mut_ptr().cast(), at_bytes, out.len()) }
}

/// Read a contiguous f32 tensor.
pub fn tensor_read_f32(t: Tensor<'_>, out: &mut Vec<f32>) {
    assert!(t.has_data() && t.is_contiguous() && t.ty() == Type::F32);
    out.resize(t.n_elements() as usize, 0.0);
    // SAFETY: out holds exactly nbytes; the tensor has memory of nbytes.
    unsafe { sys::ggml_backend_tensor_get(t.ptr(), out.as_mut_ptr().cast(), 0, t.nbytes()) }
}
