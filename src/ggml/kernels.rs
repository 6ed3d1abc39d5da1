//! Runtime ISA dispatch: ggml's CPU backend in the variant this CPU runs best. build.rs compiles
//! the backend again per variant (every symbol prefixed) and writes the table that
//! `cpu_variants!` reads; one variant is chosen once per process.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Once;

use llama_cpp_sys_2 as sys;
use sys::{
    ggml_backend_reg_t, ggml_cgraph, ggml_cplan, ggml_status, ggml_tensor, ggml_threadpool,
    ggml_threadpool_params, ggml_type, ggml_type_traits_cpu,
};

/// The baseline: ggml's CPU backend as llama-cpp-sys-2 built it, and phi4's kernels built with
/// the same flags (build.rs).
mod base {
    pub use super::sys::*;
    use std::ffi::{c_int, c_void};
    // SAFETY (of every call through these): declared as matmul.c defines them.
    extern "C" {
        pub fn phi4_mm_vector() -> c_int;
        pub fn phi4_mm_group_size(ty: c_int, k: i64) -> usize;
        pub fn phi4_mm_act_size(k: i64) -> usize;
        pub fn phi4_mm_pack(
            ty: c_int,
            src: *const c_void,
            row_bytes: usize,
            nrows: i64,
            k: i64,
            dst: *mut c_void,
            g0: i64,
            g1: i64,
        );
        pub fn phi4_mm_quantize(
            ty: c_int,
            x: *const f32,
            x_stride: usize,
            k: i64,
            q: *mut c_void,
            t0: i64,
            t1: i64,
        );
        #[allow(clippy::too_many_arguments)]
        pub fn phi4_mm_run(
            ty: c_int,
            w: *const c_void,
            q: *const c_void,
            k: i64,
            m: i64,
            nrows: i64,
            y: *mut f32,
            y_stride: usize,
            g0: i64,
            g1: i64,
            scalar: c_int,
        );
        pub fn phi4_mm_op_quantize(
            dst: *mut ggml_tensor,
            ith: c_int,
            nth: c_int,
            user: *mut c_void,
        );
        pub fn phi4_mm_op_matmul(dst: *mut ggml_tensor, ith: c_int, nth: c_int, user: *mut c_void);
    }
}

/// The functions phi4 calls of ggml's CPU backend, named once: (field of [`Kernels`], symbol,
/// signature), and the feature checks (ggml's name, symbol). `cpu_api!(then!(args))` hands the
/// list to `then!` after `args`, which makes the table's type, a table, or a variant's
/// declarations from it.
macro_rules! cpu_api {
    ($then:ident!($($args:tt)*)) => {
        $then! { $($args)*;
            fns {
                init = ggml_cpu_init();
                reg = ggml_backend_cpu_reg() -> ggml_backend_reg_t;
                type_traits = ggml_get_type_traits_cpu(t: ggml_type) -> *const ggml_type_traits_cpu;
                graph_plan = ggml_graph_plan(g: *const ggml_cgraph, n: c_int, tp: *mut ggml_threadpool) -> ggml_cplan;
                graph_compute = ggml_graph_compute(g: *mut ggml_cgraph, p: *mut ggml_cplan) -> ggml_status;
                threadpool_new = ggml_threadpool_new(p: *mut ggml_threadpool_params) -> *mut ggml_threadpool;
                threadpool_free = ggml_threadpool_free(tp: *mut ggml_threadpool);
                // phi4's own kernels (matmul.c, compiled with each variant).
                mm_vector = phi4_mm_vector() -> c_int;
                mm_group_size = phi4_mm_group_size(ty: c_int, k: i64) -> usize;
                mm_act_size = phi4_mm_act_size(k: i64) -> usize;
                mm_pack = phi4_mm_pack(ty: c_int, src: *const c_void, row_bytes: usize, nrows: i64, k: i64, dst: *mut c_void, g0: i64, g1: i64);
                mm_quantize = phi4_mm_quantize(ty: c_int, x: *const f32, x_stride: usize, k: i64, q: *mut c_void, t0: i64, t1: i64);
                mm_run = phi4_mm_run(ty: c_int, w: *const c_void, q: *const c_void, k: i64, m: i64, nrows: i64, y: *mut f32, y_stride: usize, g0: i64, g1: i64, scalar: c_int);
                mm_op_quantize = phi4_mm_op_quantize(dst: *mut ggml_tensor, ith: c_int, nth: c_int, user: *mut c_void);
                mm_op_matmul = phi4_mm_op_matmul(dst: *mut ggml_tensor, ith: c_int, nth: c_int, user: *mut c_void);
            }
            features {
                "NEON" = ggml_cpu_has_neon,
                "ARM_FMA" = ggml_cpu_has_arm_fma,
                "FP16_VA" = ggml_cpu_has_fp16_va,
                "DOTPROD" = ggml_cpu_has_dotprod,
                "MATMUL_INT8" = ggml_cpu_has_matmul_int8,
                "SVE" = ggml_cpu_has_sve,
                "SSE3" = ggml_cpu_has_sse3,
                "AVX" = ggml_cpu_has_avx,
                "AVX2" = ggml_cpu_has_avx2,
                "F16C" = ggml_cpu_has_f16c,
                "FMA" = ggml_cpu_has_fma,
                "AVX512" = ggml_cpu_has_avx512,
                "AVX_VNNI" = ggml_cpu_has_avx_vnni,
            }
        }
    };
}

/// The type of a table of [`cpu_api!`]'s functions.
macro_rules! kernels_type {
    (; fns { $($field:ident = $sym:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)* }
       features { $($feat:literal = $has:ident,)* }) => {
        /// The functions phi4 calls of ggml's CPU backend, in one of its builds (variants): the
        /// baseline llama-cpp-sys-2 builds, or one that build.rs compiled for a wider ISA (every
        /// symbol of it prefixed `phi4_<variant>_`).
        pub(super) struct Kernels {
            pub name: &'static str,
            $(pub $field: unsafe extern "C" fn($($ty),*) $(-> $ret)?,)*
            /// ggml's feature names, and whether this build uses each.
            pub has: [(&'static str, unsafe extern "C" fn() -> c_int); [$($feat),*].len()],
        }
    };
}

/// The table of module `$m`, which has [`cpu_api!`]'s functions under their own names.
macro_rules! kernels_table {
    ($name:expr, $m:ident;
     fns { $($field:ident = $sym:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)* }
     features { $($feat:literal = $has:ident,)* }) => {
        Kernels {
            name: $name,
            $($field: $m::$sym,)*
            has: [$(($feat, $m::$has)),*],
        }
    };
}

/// The declarations of a variant's [`cpu_api!`] functions: `phi4_<name>_<symbol>`.
macro_rules! kernels_extern {
    ($name:literal;
     fns { $($field:ident = $sym:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)* }
     features { $($feat:literal = $has:ident,)* }) => {
        // SAFETY (of every call through these): the same functions, with the same signatures,
        // as the baseline's (the same sources compiled with other flags); they are only called
        // once `detected!` said this CPU runs them.
        extern "C" {
            $(#[link_name = concat!("phi4_", $name, "_", stringify!($sym))]
              pub fn $sym($($arg: $ty),*) $(-> $ret)?;)*
            $(#[link_name = concat!("phi4_", $name, "_", stringify!($has))]
              pub fn $has() -> c_int;)*
        }
    };
}

cpu_api!(kernels_type!());

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
                use std::ffi::{c_int, c_void};
                cpu_api!(kernels_extern!($name));
            }
        )*
        /// The variants built, best first, each with whether this machine runs it.
        fn variants() -> Vec<(Kernels, bool)> {
            vec![$((cpu_api!(kernels_table!($name, $v)), detected!($($feat),*))),*]
        }
    };
}

include!(concat!(env!("OUT_DIR"), "/cpu_variants.rs"));

/// The CPU kernels this process runs: the best variant the CPU and OS support, chosen once.
/// `PHI4_CPU_VARIANT=<name>` asks for another one that they support (to compare variants).
pub(super) fn kernels() -> &'static Kernels {
    static CHOSEN: std::sync::OnceLock<&'static Kernels> = std::sync::OnceLock::new();
    CHOSEN.get_or_init(|| {
        let asked = std::env::var("PHI4_CPU_VARIANT").ok();
        let mut runnable = variants_runnable();
        let first = runnable.clone().next().expect("the baseline runs");
        runnable
            .find(|k| Some(k.name) == asked.as_deref())
            .unwrap_or(first)
    })
}

/// The variants built that this machine runs, best first, then the baseline.
pub(super) fn variants_runnable() -> impl Iterator<Item = &'static Kernels> + Clone {
    static RUNNABLE: std::sync::OnceLock<Vec<Kernels>> = std::sync::OnceLock::new();
    RUNNABLE
        .get_or_init(|| {
            variants()
                .into_iter()
                .filter(|(_, ok)| *ok)
                .map(|(k, _)| k)
                .chain([cpu_api!(kernels_table!(BASELINE, base))])
                .collect()
        })
        .iter()
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

/// CPU features ggml was built for and detects at run time, by name.
pub fn cpu_features() -> Vec<&'static str> {
    silence_ggml_log();
    let checks = &kernels().has;
    checks
        .iter()
        // SAFETY: a feature check of the chosen variant: no arguments, reads static state.
        .filter(|(_, f)| unsafe { f() } != 0)
        .map(|(n, _)| *n)
        .collect()
}

/// Route ggml's own log lines away from the host process's stderr (ggml logs only through
/// this global hook; phi4 reports problems through its own errors).
pub(crate) fn silence_ggml_log() {
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
