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

use std::ffi::{c_char, c_int, c_void, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use llama_cpp_sys_2 as sys;

// Macros of ggml.h that bindgen does not carry over.
const ROPE_TYPE_NEOX: i32 = 2; // GGML_ROPE_TYPE_NEOX
const MAX_NAME: usize = 64; // GGML_MAX_NAME, including the NUL

/// A ggml tensor type that this build of ggml knows.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Type(sys::ggml_type);

impl std::fmt::Debug for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Type {
    pub const F32: Type = Type(sys::GGML_TYPE_F32);
    pub const F16: Type = Type(sys::GGML_TYPE_F16);
    pub const Q4_0: Type = Type(sys::GGML_TYPE_Q4_0);
    pub const Q8_0: Type = Type(sys::GGML_TYPE_Q8_0);
    pub const Q4_K: Type = Type(sys::GGML_TYPE_Q4_K);
    pub const Q5_K: Type = Type(sys::GGML_TYPE_Q5_K);
    pub const Q6_K: Type = Type(sys::GGML_TYPE_Q6_K);
    pub const I32: Type = Type(sys::GGML_TYPE_I32);

    /// The type with this id, if ggml has it (ids of removed types answer `None`).
    pub fn from_raw(id: u32) -> Option<Type> {
        if id >= sys::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: id < GGML_TYPE_COUNT, the bound ggml_get_type_traits asserts; it returns a
        // pointer into a static table.
        let traits = unsafe { &*sys::ggml_get_type_traits(id) };
        (traits.blck_size > 0 && traits.type_size > 0 && !traits.type_name.is_null())
            .then_some(Type(id))
    }

    pub fn raw(self) -> u32 {
        self.0
    }

    fn traits(self) -> &'static sys::ggml_type_traits {
        // SAFETY: a Type only exists for ids that from_raw accepted (or the constants above).
        unsafe { &*sys::ggml_get_type_traits(self.0) }
    }

    pub fn name(self) -> &'static str {
        // SAFETY: type_name is a static NUL-terminated string (checked non-null in from_raw).
        unsafe { CStr::from_ptr(self.traits().type_name) }
            .to_str()
            .unwrap_or("?")
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        self.traits().blck_size as u64
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.traits().type_size as u64
    }

    /// Bytes of one row of `n` elements (`n` a multiple of the block size).
    pub fn row_size(self, n: u64) -> u64 {
        n / self.block_size() * self.type_size()
    }

    /// Whether ggml's CPU backend can multiply with this type and convert it to f32 (what a
    /// weight needs for `mul_mat` and `get_rows`).
    pub fn cpu_supported(self) -> bool {
        // SAFETY: valid type id; ggml_get_type_traits_cpu returns a pointer into a static table.
        let cpu = unsafe { &*(kernels().type_traits)(self.0) };
        cpu.vec_dot.is_some() && (self == Type::F32 || self.traits().to_float.is_some())
    }
}

/// The functions phi4 calls of ggml's CPU backend, in one of its builds (variants): the
/// baseline llama-cpp-sys-2 builds, or one that build.rs compiled for a wider ISA (every symbol
/// of it prefixed `phi4_<variant>_`).
struct Kernels {
    name: &'static str,
    init: unsafe extern "C" fn(),
    reg: unsafe extern "C" fn() -> sys::ggml_backend_reg_t,
    type_traits: unsafe extern "C" fn(sys::ggml_type) -> *const sys::ggml_type_traits_cpu,
    graph_plan: unsafe extern "C" fn(
        *const sys::ggml_cgraph,
        c_int,
        *mut sys::ggml_threadpool,
    ) -> sys::ggml_cplan,
    graph_compute:
        unsafe extern "C" fn(*mut sys::ggml_cgraph, *mut sys::ggml_cplan) -> sys::ggml_status,
    threadpool_new:
        unsafe extern "C" fn(*mut sys::ggml_threadpool_params) -> *mut sys::ggml_threadpool,
    threadpool_free: unsafe extern "C" fn(*mut sys::ggml_threadpool),
    /// ggml's feature names, and whether this build uses each.
    has: [(&'static str, unsafe extern "C" fn() -> c_int); 13],
}

/// The table of a module that has ggml-cpu's functions under their own names.
macro_rules! kernels {
    ($name:expr, $m:ident) => {
        Kernels {
            name: $name,
            init: $m::ggml_cpu_init,
            reg: $m::ggml_backend_cpu_reg,
            type_traits: $m::ggml_get_type_traits_cpu,
            graph_plan: $m::ggml_graph_plan,
            graph_compute: $m::ggml_graph_compute,
            threadpool_new: $m::ggml_threadpool_new,
            threadpool_free: $m::ggml_threadpool_free,
            has: [
                ("NEON", $m::ggml_cpu_has_neon),
                ("ARM_FMA", $m::ggml_cpu_has_arm_fma),
                ("FP16_VA", $m::ggml_cpu_has_fp16_va),
                ("DOTPROD", $m::ggml_cpu_has_dotprod),
                ("MATMUL_INT8", $m::ggml_cpu_has_matmul_int8),
                ("SVE", $m::ggml_cpu_has_sve),
                ("SSE3", $m::ggml_cpu_has_sse3),
                ("AVX", $m::ggml_cpu_has_avx),
                ("AVX2", $m::ggml_cpu_has_avx2),
                ("F16C", $m::ggml_cpu_has_f16c),
                ("FMA", $m::ggml_cpu_has_fma),
                ("AVX512", $m::ggml_cpu_has_avx512),
                ("AVX_VNNI", $m::ggml_cpu_has_avx_vnni),
            ],
        }
    };
}

/// Whether this CPU, and the OS (which must save the registers), support every feature named.
/// (Unused in a build without variants.)
#[cfg(target_arch = "x86_64")]
#[allow(unused_macros)]
macro_rules! detected {
    ($($f:tt),*) => { true $(&& std::arch::is_x86_feature_detected!($f))* };
}
#[cfg(target_arch = "aarch64")]
#[allow(unused_macros)]
macro_rules! detected {
    ($($f:tt),*) => { true $(&& std::arch::is_aarch64_feature_detected!($f))* };
}
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[allow(unused_macros)]
macro_rules! detected {
    ($($f:tt),*) => {
        false
    };
}

/// From build.rs's table: the baseline's name; per variant built, a module declaring its
/// prefixed functions, and its features.
macro_rules! cpu_variants {
    (baseline: $base:literal; $($v:ident: $name:literal, [$($feat:tt),*];)*) => {
        const BASELINE: &str = $base;
        $(
            mod $v {
                use super::sys::*;
                use std::ffi::c_int;
                // SAFETY (of every call through these): the same functions, with the same
                // signatures, as the baseline's (the same sources compiled with other flags);
                // they are only called once `detected!` said this CPU runs them.
                extern "C" {
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_init")] pub fn ggml_cpu_init();
                    #[link_name = concat!("phi4_", $name, "_ggml_backend_cpu_reg")] pub fn ggml_backend_cpu_reg() -> ggml_backend_reg_t;
                    #[link_name = concat!("phi4_", $name, "_ggml_get_type_traits_cpu")] pub fn ggml_get_type_traits_cpu(t: ggml_type) -> *const ggml_type_traits_cpu;
                    #[link_name = concat!("phi4_", $name, "_ggml_graph_plan")] pub fn ggml_graph_plan(g: *const ggml_cgraph, n: c_int, tp: *mut ggml_threadpool) -> ggml_cplan;
                    #[link_name = concat!("phi4_", $name, "_ggml_graph_compute")] pub fn ggml_graph_compute(g: *mut ggml_cgraph, p: *mut ggml_cplan) -> ggml_status;
                    #[link_name = concat!("phi4_", $name, "_ggml_threadpool_new")] pub fn ggml_threadpool_new(p: *mut ggml_threadpool_params) -> *mut ggml_threadpool;
                    #[link_name = concat!("phi4_", $name, "_ggml_threadpool_free")] pub fn ggml_threadpool_free(tp: *mut ggml_threadpool);
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_neon")] pub fn ggml_cpu_has_neon() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_arm_fma")] pub fn ggml_cpu_has_arm_fma() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_fp16_va")] pub fn ggml_cpu_has_fp16_va() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_dotprod")] pub fn ggml_cpu_has_dotprod() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_matmul_int8")] pub fn ggml_cpu_has_matmul_int8() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_sve")] pub fn ggml_cpu_has_sve() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_sse3")] pub fn ggml_cpu_has_sse3() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_avx")] pub fn ggml_cpu_has_avx() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_avx2")] pub fn ggml_cpu_has_avx2() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_f16c")] pub fn ggml_cpu_has_f16c() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_fma")] pub fn ggml_cpu_has_fma() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_avx512")] pub fn ggml_cpu_has_avx512() -> c_int;
                    #[link_name = concat!("phi4_", $name, "_ggml_cpu_has_avx_vnni")] pub fn ggml_cpu_has_avx_vnni() -> c_int;
                }
            }
        )*
        /// The variants built, best first, each with whether this machine runs it.
        fn variants() -> Vec<(Kernels, bool)> {
            vec![$((kernels!($name, $v), detected!($($feat),*))),*]
        }
    };
}

include!(concat!(env!("OUT_DIR"), "/cpu_variants.rs"));

/// The CPU kernels this process runs: the best variant the CPU and OS support, chosen once.
/// `PHI4_CPU_VARIANT=<name>` asks for another one that they support (to compare variants).
fn kernels() -> &'static Kernels {
    static CHOSEN: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    CHOSEN.get_or_init(|| {
        let asked = std::env::var("PHI4_CPU_VARIANT").ok();
        let runnable: Vec<Kernels> = variants()
            .into_iter()
            .filter(|(_, ok)| *ok)
            .map(|(k, _)| k)
            .collect();
        let baseline = kernels!(BASELINE, sys);
        match asked {
            Some(a) if a == BASELINE => baseline,
            Some(a) if runnable.iter().any(|k| k.name == a) => {
                runnable.into_iter().find(|k| k.name == a).unwrap()
            }
            _ => runnable.into_iter().next().unwrap_or(baseline),
        }
    })
}

/// The name of the CPU kernel variant that runs (e.g. "avx2", "avx512_vnni", "dotprod").
pub fn cpu_variant() -> &'static str {
    kernels().name
}

/// Every CPU kernel variant of this build, best first, with whether this machine runs it (the
/// baseline always does).
pub fn cpu_variants() -> Vec<(&'static str, bool)> {
    variants()
        .iter()
        .map(|(k, ok)| (k.name, *ok))
        .chain([(BASELINE, true)])
        .collect()
}

/// Route ggml's own log lines away from the host process's stderr (ggml logs only through
/// this global hook; phi4 reports problems through its own errors).
fn silence_ggml_log() {
    static ONCE: Once = Once::new();
    unsafe extern "C" fn quiet(
        _level: sys::ggml_log_level,
        _text: *const c_char,
        _user: *mut c_void,
    ) {
    }
    ONCE.call_once(|| {
        // SAFETY: `quiet` is a valid callback for the whole program's life; no user data.
        unsafe { sys::ggml_log_set(Some(quiet), std::ptr::null_mut()) };
        // SAFETY: initialises the chosen ggml-cpu's static tables (idempotent; thread-safe
        // behind Once); the variant was chosen because this CPU runs it.
        unsafe { (kernels().init)() };
    });
}

/// Handle to a tensor in a [`Context`], valid while the context lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorId(usize);

/// A tensor borrowed from its context.
#[derive(Clone, Copy)]
pub struct Tensor<'ctx> {
    ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'ctx Context>,
}

impl<'ctx> Tensor<'ctx> {
    fn raw(&self) -> &sys::ggml_tensor {
        // SAFETY: the pointer came from ggml_new_tensor*/view/op on a live context ('ctx).
        unsafe { self.ptr.as_ref() }
    }
    fn ptr(&self) -> *mut sys::ggml_tensor {
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
    fn is_contiguous(&self) -> bool {
        // SAFETY: valid tensor pointer.
        unsafe { sys::ggml_is_contiguous(self.ptr()) }
    }
    fn has_data(&self) -> bool {
        !self.raw().buffer.is_null() && !self.raw().data.is_null()
    }
}

/// A ggml context holding tensor metadata only (`no_alloc`): data lives in buffers.
pub struct Context {
    ctx: NonNull<sys::ggml_context>,
    tensors: Vec<NonNull<sys::ggml_tensor>>,
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

    fn room(&self) {
        assert!(
            self.tensors.len() < self.capacity,
            "ggml context full ({} tensors)",
            self.capacity
        );
    }

    fn push(&mut self, p: *mut sys::ggml_tensor) -> Tensor<'_> {
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
            ne[0] as u64 % ty.block_size() == 0,
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

fn set_name(t: Tensor<'_>, name: &str) {
    let mut buf = [0u8; 64];
    let n = name.len().min(63);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: buf is NUL-terminated and outlives the call; ggml copies it.
    unsafe { sys::ggml_set_name(t.ptr(), buf.as_ptr().cast()) };
}

/// Graph construction: the ops the forward pass uses, each checking ggml's preconditions.
pub struct Graph<'ctx> {
    ctx: &'ctx mut Context,
    graph: NonNull<sys::ggml_cgraph>,
    size: usize,
}

fn can_repeat(b: &Tensor<'_>, a: &Tensor<'_>) -> bool {
    (0..4).all(|i| a.ne()[i] % b.ne()[i] == 0)
}

impl<'ctx> Graph<'ctx> {
    fn ctx(&self) -> *mut sys::ggml_context {
        self.ctx.ctx.as_ptr()
    }

    fn op(&mut self, p: *mut sys::ggml_tensor) -> Tensor<'ctx> {
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
        assert!(ne[0] as u64 % ty.block_size() == 0);
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
        // SAFETY: same element count (ggml_cpy's assert).
        self.op(unsafe { sys::ggml_cpy(self.ctx(), a.ptr(), dst.ptr()) })
    }

    /// softmax(q·kᵀ·scale + mask)·v with f32 accumulation.
    /// q [d, n_tokens, n_head], k/v [d, n_kv, n_head_kv] (f16), mask f16 [n_kv, n_tokens]
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
        assert!(vn[1] == kn[1] && vn[2] == kn[2] && k.ty() == Type::F16 && v.ty() == Type::F16);
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
    graph: NonNull<sys::ggml_cgraph>,
    _ctx: PhantomData<&'ctx Context>,
}

/// A ggml backend buffer type (where tensor data may live).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BufferType(sys::ggml_backend_buffer_type_t);
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
            bytes.as_ptr() as usize % 64 == 0,
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
        let b = NonNull::new(buf)
            .map(|buf| Buffer {
                buf,
                _borrowed: None,
            })
            .ok_or(AllocError {
                what: what.into(),
                bytes: size,
            })?;
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
        let b = NonNull::new(buf)
            .map(|buf| Buffer {
                buf,
                _borrowed: None,
            })
            .ok_or(AllocError {
                what: what.into(),
                bytes,
            })?;
        b.advise_huge_pages();
        Ok(b)
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
            (self.base() + offset) % align == 0,
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

/// Graph allocator: plans and reuses one compute buffer for intermediate tensors.
pub struct Allocator(NonNull<sys::ggml_gallocr>);
// SAFETY: used by one session at a time (&mut self).
unsafe impl Send for Allocator {}

impl Drop for Allocator {
    fn drop(&mut self) {
        // SAFETY: created by ggml_gallocr_new, freed once.
        unsafe { sys::ggml_gallocr_free(self.0.as_ptr()) }
    }
}

impl Default for Allocator {
    fn default() -> Allocator {
        Allocator::new()
    }
}

impl Allocator {
    pub fn new() -> Allocator {
        // SAFETY: the CPU buffer type is static.
        let a = unsafe { sys::ggml_gallocr_new(BufferType::cpu().0) };
        Allocator(NonNull::new(a).expect("ggml_gallocr_new returned null"))
    }

    /// Size the compute buffer for the largest graph this allocator will see.
    pub fn reserve(&mut self, g: GraphRef<'_>) -> Result<(), AllocError> {
        // SAFETY: valid allocator and graph; a false return means the buffer could not be had.
        if unsafe { sys::ggml_gallocr_reserve(self.0.as_ptr(), g.graph.as_ptr()) } {
            return Ok(());
        }
        // The size it needed, for the message (planned again without allocating).
        let mut bytes = 0usize;
        // SAFETY: one buffer type, so one size is written; NULL ids mean "all in buffer 0".
        unsafe {
            sys::ggml_gallocr_reserve_n_size(
                self.0.as_ptr(),
                g.graph.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                &mut bytes,
            )
        };
        Err(AllocError {
            what: "the compute buffer".into(),
            bytes,
        })
    }

    pub fn alloc(&mut self, g: GraphRef<'_>) -> Result<(), AllocError> {
        // SAFETY: valid allocator and graph.
        if unsafe { sys::ggml_gallocr_alloc_graph(self.0.as_ptr(), g.graph.as_ptr()) } {
            Ok(())
        } else {
            Err(AllocError {
                what: "the compute buffer".into(),
                bytes: self.size(),
            })
        }
    }

    pub fn size(&self) -> usize {
        // SAFETY: valid allocator; buffer 0 is the only one.
        unsafe { sys::ggml_gallocr_get_buffer_size(self.0.as_ptr(), 0) }
    }
}

/// Runs graphs on a pool of threads made once (per session), with a work buffer sized once:
/// nothing is created or allocated per evaluation, so nothing can fail there. (ggml's CPU backend
/// would create threads per graph, asserting that `pthread_create` succeeds, and grow its work
/// buffer with a C++ `new` that aborts when memory runs out.)
pub struct Compute {
    pool: NonNull<sys::ggml_threadpool>,
    n_threads: usize,
    /// The work buffer of the largest graph planned so far (64-byte aligned inside).
    work: Vec<u8>,
}
// SAFETY: used by one session at a time (&mut self); the pool's threads are ggml's own.
unsafe impl Send for Compute {}

impl Drop for Compute {
    fn drop(&mut self) {
        // SAFETY: created by ggml_threadpool_new, freed once; no compute is running (&mut self).
        unsafe { (kernels().threadpool_free)(self.pool.as_ptr()) }
    }
}

unsafe extern "C" fn abort_trampoline(data: *mut c_void) -> bool {
    // SAFETY: data is the &AtomicBool set in `compute`, valid for the whole compute call.
    unsafe { (*(data as *const AtomicBool)).load(Ordering::Relaxed) }
}

/// Whether `n` more threads can exist at once now: each is started and held until all are, so
/// a thread or address-space limit shows here as an error instead of in ggml's assert.
fn probe_threads(n: usize) -> Result<(), AllocError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut lim) } == 0;
    // ggml's threads get the default pthread stack, which glibc takes from RLIMIT_STACK.
    let stack = if ok && lim.rlim_cur != libc::RLIM_INFINITY {
        (lim.rlim_cur as usize).clamp(1 << 16, 64 << 20)
    } else {
        8 << 20
    };
    let go = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let mut started = Vec::with_capacity(n);
    let mut error = None;
    for _ in 0..n {
        let go = go.clone();
        let hold = move || {
            let (m, c) = &*go;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            while !*g {
                g = c.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        };
        match std::thread::Builder::new().stack_size(stack).spawn(hold) {
            Ok(h) => started.push(h),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let (m, c) = &*go;
    *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
    c.notify_all();
    started.into_iter().for_each(|h| drop(h.join()));
    match error {
        None => Ok(()),
        Some(e) => Err(AllocError {
            what: format!("worker threads ({n}): {e}"),
            bytes: 0,
        }),
    }
}

impl Compute {
    pub fn new(n_threads: usize) -> Result<Compute, AllocError> {
        silence_ggml_log();
        let n_threads = n_threads.max(1);
        probe_threads(n_threads - 1)?;
        // SAFETY: plain parameter struct for n_threads >= 1.
        let mut params = unsafe { sys::ggml_threadpool_params_default(n_threads as i32) };
        // SAFETY: valid params; the probe showed the threads can be made (ggml asserts otherwise).
        let pool = unsafe { (kernels().threadpool_new)(&mut params) };
        let pool = NonNull::new(pool).ok_or(AllocError {
            what: "the thread pool".into(),
            bytes: 0,
        })?;
        Ok(Compute {
            pool,
            n_threads,
            work: Vec::new(),
        })
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Plan `g` and make sure the work buffer holds it.
    fn plan(&mut self, g: GraphRef<'_>) -> Result<sys::ggml_cplan, AllocError> {
        // SAFETY: valid graph and pool; planning only reads the graph.
        let mut plan = unsafe {
            (kernels().graph_plan)(g.graph.as_ptr(), self.n_threads as i32, self.pool.as_ptr())
        };
        let need = plan.work_size + 64;
        if plan.work_size > 0 && self.work.len() < need {
            self.work.clear();
            self.work.try_reserve_exact(need).map_err(|_| AllocError {
                what: "the compute work buffer".into(),
                bytes: need,
            })?;
            self.work.resize(need, 0);
        }
        if plan.work_size > 0 {
            let offset = self.work.as_ptr().align_offset(64);
            // SAFETY: offset < 64 and the buffer has work_size + 64 bytes.
            plan.work_data = unsafe { self.work.as_mut_ptr().add(offset) };
        }
        Ok(plan)
    }

    /// Size the work buffer for the largest graph this will run.
    pub fn reserve(&mut self, g: GraphRef<'_>) -> Result<(), AllocError> {
        self.plan(g).map(|_| ())
    }

    /// Run the graph (already allocated) on `n_threads` of the pool's threads (at least one, at
    /// most all). `abort` is polled by ggml's threads between ops.
    pub fn compute(
        &mut self,
        g: GraphRef<'_>,
        n_threads: usize,
        abort: &AtomicBool,
    ) -> Result<(), ComputeError> {
        let mut plan = self.plan(g)?;
        // The plan's work buffer is sized for all threads, which fewer threads fit in.
        plan.n_threads = n_threads.clamp(1, self.n_threads) as i32;
        plan.abort_callback = Some(abort_trampoline);
        plan.abort_callback_data = abort as *const AtomicBool as *mut c_void;
        // SAFETY: graph allocated; plan from ggml_graph_plan with a work buffer of its size;
        // the abort flag outlives the call.
        let st = unsafe { (kernels().graph_compute)(g.graph.as_ptr(), &mut plan) };
        match st {
            sys::GGML_STATUS_SUCCESS => Ok(()),
            sys::GGML_STATUS_ABORTED => Err(ComputeError::Aborted),
            other => panic!("ggml_graph_compute failed with status {other}"),
        }
    }
}

/// Why a graph did not run to the end.
#[derive(Debug)]
pub enum ComputeError {
    Aborted,
    Alloc(AllocError),
}

impl From<AllocError> for ComputeError {
    fn from(e: AllocError) -> Self {
        ComputeError::Alloc(e)
    }
}

/// Encode rows of `n_per_row` f32 values as `ty` (F32, F16, or a type ggml quantizes without
/// an importance matrix), as they are stored in a GGUF file.
pub fn quantize(ty: Type, src: &[f32], n_per_row: usize) -> Result<Vec<u8>, String> {
    if n_per_row == 0 || src.len() % n_per_row != 0 || n_per_row as u64 % ty.block_size() != 0 {
        return Err(format!(
            "{} values in rows of {n_per_row} do not make whole {ty:?} blocks of {}",
            src.len(),
            ty.block_size()
        ));
    }
    let nrows = src.len() / n_per_row;
    let mut out = vec![0u8; ty.row_size(n_per_row as u64) as usize * nrows];
    if ty == Type::F32 {
        out.iter_mut()
            .zip(src.iter().flat_map(|v| v.to_le_bytes()))
            .for_each(|(o, b)| *o = b);
        return Ok(out);
    }
    // ggml_quantize_chunk aborts on a type it has no quantizer for: only these are passed on.
    if ![
        Type::F16,
        Type::Q4_0,
        Type::Q8_0,
        Type::Q4_K,
        Type::Q5_K,
        Type::Q6_K,
    ]
    .contains(&ty)
    {
        return Err(format!(
            "{ty:?} cannot be written here (f32, f16, q4_0, q8_0, q4_K, q5_K, q6_K)"
        ));
    }
    // SAFETY: src holds nrows*n_per_row floats, out holds nrows rows of ty; no imatrix needed.
    unsafe {
        sys::ggml_quantize_init(ty.0);
        sys::ggml_quantize_chunk(
            ty.0,
            src.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            nrows as i64,
            n_per_row as i64,
            std::ptr::null(),
        );
    }
    Ok(out)
}

/// CPU features ggml was built for and detects at run time, by name.
pub fn cpu_features() -> Vec<&'static str> {
    silence_ggml_log();
    let checks = &kernels().has;
    checks
        .iter()
        .filter(|(_, f)| unsafe { f() } != 0)
        .map(|(n, _)| *n)
        .collect()
}

/// f32 → f16 bits (ggml's conversion).
pub fn f32_to_f16(v: f32) -> u16 {
    // SAFETY: pure conversion.
    unsafe { sys::ggml_fp32_to_fp16(v) }
}

/// Open and map the regular file at `path` read-only. Anything else (a FIFO, a device, a
/// directory) is refused before it is read: opening does not block (O_NONBLOCK), and the type
/// is checked on the open file.
pub fn map_path(path: &std::path::Path) -> std::io::Result<memmap2::Mmap> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    map_file(&file)
}

/// Map a file read-only. The mapping is only ever read, and only in ranges that the GGUF reader
/// proved to lie inside the file.
fn map_file(file: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and private to phi4. Another process truncating the file
    // while it is mapped would fault on access; that is documented as the caller's contract
    // (like every mmap-based loader, llama.cpp's included).
    unsafe { memmap2::MmapOptions::new().map(file) }
}

/// Fault in a range of a file mapping now (one kernel call, no per-page faults where the kernel
/// supports MADV_POPULATE_READ; otherwise by reading one byte per page).
pub fn prefault(map: &memmap2::Mmap, offset: usize, len: usize) {
    let page = 4096;
    let start = offset / page * page;
    let end = (offset + len).min(map.len());
    // SAFETY: advisory call on a range inside our read-only mapping.
    let ok = end > start
        && unsafe {
            libc::madvise(
                map.as_ptr().add(start) as *mut c_void,
                end - start,
                libc::MADV_POPULATE_READ,
            )
        } == 0;
    if !ok {
        let mut acc = 0u8;
        for i in (offset..end).step_by(page) {
            acc ^= map[i];
        }
        std::hint::black_box(acc);
    }
}

/// Tell the kernel a range of a read-only file mapping will not be read again soon (its
/// weights now live repacked in another buffer), so its pages leave the resident set.
pub fn drop_pages(map: &memmap2::Mmap, offset: usize, len: usize) {
    let page = 4096;
    let start = offset.div_ceil(page) * page;
    let end = (offset + len) / page * page;
    if end > start {
        // SAFETY: MADV_DONTNEED on a read-only file-backed private mapping only discards
        // clean pages; a later read would fetch them from the file again. No Rust reference
        // into this range is held across this call by the loader.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}
