//! phi4's quantized matrix kernels (`matmul.c`, compiled per CPU variant): which weights they
//! take, the layout they read (packed once, at load), and the two custom ops that run them
//! inside a ggml graph: the tokens quantized once per product, then every weight group of 8
//! rows unpacked once and applied to all the step's tokens.

use std::ffi::{c_int, c_void};

use llama_cpp_sys_2 as sys;

use super::context::Tensor;
use super::graph::Graph;
use super::kernels::{kernels, variants_runnable, Kernels};
use super::types::Type;

/// Rows per packed group (matmul.c's ROWS).
const ROWS: usize = 8;
/// Weights per superblock: a row's length must be a multiple (matmul.c's QK).
const QK: usize = 256;

/// A macro of ggml.h that bindgen does not carry over: the most sources of an op.
const MAX_SRC: usize = 10; // GGML_MAX_SRC

/// The weight types phi4's kernels multiply.
pub const KERNEL_TYPES: [Type; 13] = [
    Type::Q2_K,
    Type::Q3_K,
    Type::Q4_0,
    Type::Q4_K,
    Type::Q5_K,
    Type::Q6_K,
    Type::Q8_0,
    Type::IQ4_XS,
    Type::IQ3_S,
    Type::IQ3_XXS,
    Type::IQ2_S,
    Type::IQ2_XS,
    Type::IQ2_XXS,
];

/// Which kernels multiply a matrix: phi4's, or ggml's (`PHI4_KERNELS=ggml` asks for ggml's
/// everywhere, to compare).
pub fn own_kernels_enabled() -> bool {
    std::env::var("PHI4_KERNELS").map_or(true, |v| v != "ggml")
        // SAFETY: no arguments; reads a constant of the chosen variant.
        && unsafe { (kernels().mm_vector)() } != 0
}

/// Whether phi4's kernels take a weight matrix of `ty` with rows of `k` (on any CPU: a type
/// they know, whole superblocks).
pub fn takes(ty: Type, k: usize) -> bool {
    KERNEL_TYPES.contains(&ty) && k > 0 && k.is_multiple_of(QK)
}

/// Bytes of one packed group of 8 rows.
fn group_size(k: &Kernels, ty: Type, n: usize) -> usize {
    // SAFETY: plain arithmetic on its arguments.
    unsafe { (k.mm_group_size)(ty.0 as c_int, n as i64) }
}

/// The shape of a packed matrix's tensor (I8): [bytes of a group, groups].
pub fn packed_shape(ty: Type, rows: usize, k: usize) -> [i64; 2] {
    assert!(takes(ty, k) && rows > 0);
    [
        group_size(kernels(), ty, k) as i64,
        rows.div_ceil(ROWS) as i64,
    ]
}

/// Pack `rows` rows of `k` weights of `ty`, as a GGUF file stores them (`src`), into the
/// placed tensor `dst` of [`packed_shape`], on `threads` threads.
pub fn pack_into(dst: Tensor<'_>, ty: Type, src: &[u8], rows: usize, k: usize, threads: usize) {
    let shape = packed_shape(ty, rows, k);
    let row_bytes = ty.row_size(k as u64) as usize;
    assert!(
        src.len() == row_bytes * rows,
        "pack: {} bytes for {rows} rows",
        src.len()
    );
    assert!(
        dst.ty() == Type::I8 && dst.ne() == [shape[0], shape[1], 1, 1] && dst.has_data(),
        "pack: the destination is not a placed packed tensor"
    );
    // Host memory: every buffer phi4 makes is CPU memory.
    let out = dst.raw().data as usize;
    pack_raw(kernels(), ty, src, rows, k, out, shape[1] as usize, threads);
}

/// Run `f(start, end)` over `n` items split evenly between up to `threads` threads.
fn split(n: usize, threads: usize, f: impl Fn(i64, i64) + Sync) {
    let threads = threads.clamp(1, n.max(1));
    std::thread::scope(|s| {
        for i in 0..threads {
            let f = &f;
            s.spawn(move || f((n * i / threads) as i64, (n * (i + 1) / threads) as i64));
        }
    });
}

/// Pack into `out` (the address of `groups` groups' bytes) on `threads` threads.
#[allow(clippy::too_many_arguments)]
fn pack_raw(
    kern: &Kernels,
    ty: Type,
    src: &[u8],
    rows: usize,
    k: usize,
    out: usize,
    groups: usize,
    threads: usize,
) {
    let row_bytes = ty.row_size(k as u64) as usize;
    split(groups, threads, |g0, g1| {
        // SAFETY: src holds `rows` rows of `row_bytes`; out has `groups` groups of group_size
        // bytes (the tensor's shape, checked by the callers); each call writes only its own
        // groups [g0, g1).
        unsafe {
            (kern.mm_pack)(
                ty.0 as c_int,
                src.as_ptr().cast(),
                row_bytes,
                rows as i64,
                k as i64,
                out as *mut c_void,
                g0,
                g1,
            )
        }
    });
}

impl<'ctx> Graph<'ctx> {
    /// w · x → [rows, n] where `w` is a matrix of `ty` with `rows` rows packed by
    /// [`pack_into`] and x is f32 [k, n] (rows contiguous).
    pub fn packed_mul_mat(
        &mut self,
        w: Tensor<'ctx>,
        ty: Type,
        rows: usize,
        x: Tensor<'ctx>,
    ) -> Tensor<'ctx> {
        let (k, n) = (x.ne()[0] as usize, x.ne()[1]);
        let shape = packed_shape(ty, rows, k);
        assert!(
            w.ty() == Type::I8 && w.ne() == [shape[0], shape[1], 1, 1],
            "packed_mul_mat: {:?} is not {ty:?} [{k}, {rows}] packed",
            w.ne()
        );
        assert!(
            x.ty() == Type::F32 && x.nb()[0] == 4 && x.ne()[2] == 1 && x.ne()[3] == 1,
            "packed_mul_mat: x must be f32 [k, n] with contiguous rows"
        );
        let kern = kernels();
        // SAFETY: plain arithmetic.
        let act = unsafe { (kern.mm_act_size)(k as i64) } as i64;
        let q = self.custom(Type::I8, [act, n], &[x], kern.mm_op_quantize, ty.0 as usize);
        self.custom(
            Type::F32,
            [rows as i64, n],
            &[w, q],
            kern.mm_op_matmul,
            ty.0 as usize,
        )
    }

    /// A custom op of ggml's making a new tensor of `ty` and shape `ne` from `args`, run by `f`
    /// on every thread with `user` as its user data.
    pub(super) fn custom(
        &mut self,
        ty: Type,
        ne: [i64; 2],
        args: &[Tensor<'ctx>],
        f: unsafe extern "C" fn(*mut sys::ggml_tensor, c_int, c_int, *mut c_void),
        user: usize,
    ) -> Tensor<'ctx> {
        self.ctx.room();
        let mut ptrs: Vec<*mut sys::ggml_tensor> = args.iter().map(|t| t.ptr()).collect();
        assert!(ptrs.len() <= MAX_SRC);
        // SAFETY: valid context and tensors; n_args within GGML_MAX_SRC; `f` is one of the
        // variant's ops, which read their sources' shapes (checked by the caller) and write
        // only their destination; -1 tasks = every thread.
        self.op(unsafe {
            sys::ggml_custom_4d(
                self.ctx(),
                ty.0,
                ne[0],
                ne[1],
                1,
                1,
                ptrs.as_mut_ptr(),
                ptrs.len() as c_int,
                Some(f),
                -1,
                user as *mut c_void,
            )
        })
    }
}

/// A matrix packed for phi4's kernels in memory of its own (benchmarks and tests: the model's
/// weights are packed into its buffers by [`pack_into`]).
pub struct PackedMatrix {
    ty: Type,
    rows: usize,
    k: usize,
    data: Vec<u8>,
}

/// The names of the CPU variants whose kernels this machine runs, best first; the one the
/// process runs is the first.
pub fn kernel_variants() -> Vec<&'static str> {
    let chosen = kernels().name;
    let mut v = vec![chosen];
    v.extend(variants_runnable().map(|k| k.name).filter(|n| *n != chosen));
    v
}

fn variant(name: &str) -> &'static Kernels {
    variants_runnable()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("no runnable CPU variant {name}"))
}

/// Why `src` is not `rows` GGUF rows of `k` weights of `ty` (one row at least).
pub fn check_rows(ty: Type, rows: usize, k: usize, src: &[u8]) -> Result<(), String> {
    if rows == 0 || src.len() != ty.row_size(k as u64) as usize * rows {
        return Err(format!(
            "{} bytes are not {rows} rows of {ty:?} [{k}]",
            src.len()
        ));
    }
    Ok(())
}

impl PackedMatrix {
    /// Pack `rows` GGUF rows of `k` weights of `ty`.
    pub fn pack(ty: Type, rows: usize, k: usize, src: &[u8]) -> Result<PackedMatrix, String> {
        if !takes(ty, k) {
            return Err(format!("phi4's kernels do not take {ty:?} [{k}]"));
        }
        check_rows(ty, rows, k, src)?;
        let groups = rows.div_ceil(ROWS);
        let mut data = vec![0u8; group_size(kernels(), ty, k) * groups];
        let out = data.as_mut_ptr() as usize;
        pack_raw(kernels(), ty, src, rows, k, out, groups, 2);
        Ok(PackedMatrix { ty, rows, k, data })
    }

    /// y [m × rows] = x [m × k] · selfᵀ on `threads` threads with the kernels of CPU variant
    /// `variant` (one of [`kernel_variants`]), its vector path or, with `scalar`, its scalar one.
    pub fn mul(
        &self,
        x: &[f32],
        m: usize,
        threads: usize,
        variant_name: &str,
        scalar: bool,
    ) -> Vec<f32> {
        assert!(x.len() == m * self.k && m > 0);
        let kern = variant(variant_name);
        // SAFETY: plain arithmetic.
        let act = unsafe { (kern.mm_act_size)(self.k as i64) };
        let mut q = vec![0u8; act * m];
        let mut y = vec![0f32; m * self.rows];
        let groups = self.rows.div_ceil(ROWS);
        let (qp, yp) = (q.as_mut_ptr() as usize, y.as_mut_ptr() as usize);
        let (w, ty, rows, k) = (self.data.as_ptr() as usize, self.ty, self.rows, self.k);
        split(m, threads, |t0, t1| {
            // SAFETY: x holds m rows of k floats; q has room for m tokens; each call writes its
            // own tokens [t0, t1).
            unsafe {
                (kern.mm_quantize)(
                    ty.0 as c_int,
                    x.as_ptr(),
                    k * 4,
                    k as i64,
                    qp as *mut c_void,
                    t0,
                    t1,
                )
            }
        });
        split(groups, threads, |g0, g1| {
            // SAFETY: w is this matrix's packed groups, q its m quantized tokens, y has m rows
            // of `rows` floats; each call writes its own groups' rows.
            unsafe {
                (kern.mm_run)(
                    ty.0 as c_int,
                    w as *const c_void,
                    qp as *const c_void,
                    k as i64,
                    m as i64,
                    rows as i64,
                    yp as *mut f32,
                    rows * 4,
                    g0,
                    g1,
                    scalar as c_int,
                )
            }
        });
        y
    }
}
