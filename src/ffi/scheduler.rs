//! `phi4_scheduler`: one engine shared by sessions on a model, whose decode steps it batches.

use super::model::{phi4_model, Log};
use super::session::{open_session, phi4_session, phi4_session_params};
use super::*;
use crate::limits::cpu_count;
use crate::scheduler::Scheduler;

/// A scheduler (opaque): threads and a compute buffer shared by the sessions opened on it.
pub struct phi4_scheduler {
    pub(crate) inner: Scheduler,
    pub(crate) log: Log,
}

impl Handle for phi4_scheduler {
    const NAME: &'static str = "scheduler";
}

/// Make a scheduler for sessions on `model`: while several of them decode at once (each driven
/// by its own thread), one graph per step advances all of them, reading the weights once instead
/// of once per session. `n_threads` runs every graph of its sessions (0: every CPU this process
/// may use); `max_batch` (1..=PHI4_MAX_BATCH) is the most sessions a step takes. On success `*out` owns the
/// scheduler (free with `phi4_scheduler_free`); it keeps the model alive. On failure the message
/// is in `phi4_last_error()`.
///
/// Thread-safe: the scheduler (a const handle) may be used from any number of threads at once.
#[no_mangle]
pub unsafe extern "C" fn phi4_scheduler_new(
    model: *const phi4_model,
    n_threads: u32,
    max_batch: u32,
    out: *mut *mut phi4_scheduler,
) -> phi4_status {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: a live model handle (caller's contract).
        let m = unsafe { borrow(model) }?;
        let n_threads = if n_threads == 0 {
            cpu_count()
        } else {
            n_threads as usize
        };
        let s = Scheduler::new(m.inner.clone(), n_threads, max_batch as usize)
            .map_err(|e| Error::new(PHI4_ERR_INVALID_ARGUMENT, e.to_string()))?;
        let h = phi4_scheduler {
            inner: s,
            log: m.log,
        };
        // SAFETY: out is non-null.
        unsafe { out.write(h.into_raw()) };
        Ok(())
    })
}

/// Open a session whose graphs run on `scheduler` (on its model, with its threads;
/// `params->n_threads` is not used). Otherwise as `phi4_session_new`: use each session from one
/// thread at a time; sessions decoding on different threads at once are stepped together.
#[no_mangle]
pub unsafe extern "C" fn phi4_session_new_on(
    scheduler: *const phi4_scheduler,
    params: *const phi4_session_params,
    out: *mut *mut phi4_session,
) -> phi4_status {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: a live scheduler handle (caller's contract).
        let s = unsafe { borrow(scheduler) }?;
        // SAFETY: NULL or a struct from phi4_session_default_params (caller's contract).
        let h = unsafe { open_session(s.inner.model(), s.log, params, Some(&s.inner)) }?;
        // SAFETY: out is non-null.
        unsafe { out.write(h.into_raw()) };
        Ok(())
    })
}

/// Release a scheduler (NULL allowed). Sessions opened on it keep it alive until they are freed.
#[no_mangle]
pub unsafe extern "C" fn phi4_scheduler_free(scheduler: *mut phi4_scheduler) {
    // SAFETY: NULL or from phi4_scheduler_new, freed once (caller's contract).
    ffi_boundary! { unsafe { free(scheduler) } }
}
