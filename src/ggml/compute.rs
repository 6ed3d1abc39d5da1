//! Running graphs: a thread pool made once, a work buffer sized once, any number of its
//! threads per graph.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use super::buffer::AllocError;
use super::graph::GraphRef;
use super::kernels::{kernels, silence_ggml_log};

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

    /// Bytes of the work buffer `g` needs on `n_threads` threads (planned, nothing allocated).
    pub fn work_size(g: GraphRef<'_>, n_threads: usize) -> usize {
        // SAFETY: valid graph; planning only reads it (a null pool: sizes only).
        let plan = unsafe {
            (kernels().graph_plan)(g.graph.as_ptr(), n_threads as i32, std::ptr::null_mut())
        };
        plan.work_size + 64
    }

    /// Size the work buffer for the largest graph this will run.
    pub fn reserve(&mut self, g: GraphRef<'_>) -> Result<(), AllocError> {
        self.plan(g).map(|_| ())
    }

    /// Run the graph (already allocated) on `n_threads` of the pool's threads (at least one, at
    /// most all). `abort` is polled by ggml's threads between ops. `row_exact` asks for ggml's
    /// reference paths (its plan's `use_ref`): each output row then computed by one thread, in
    /// one order, whatever the number of rows or threads — no split of attention over the
    /// cache, no tiled attention or matrix paths, no fused ops.
    pub fn compute(
        &mut self,
        g: GraphRef<'_>,
        n_threads: usize,
        abort: &AtomicBool,
        row_exact: bool,
    ) -> Result<(), ComputeError> {
        let mut plan = self.plan(g)?;
        // The plan's work buffer is sized for all threads, which fewer threads fit in.
        plan.n_threads = n_threads.clamp(1, self.n_threads) as i32;
        plan.use_ref = row_exact;
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
