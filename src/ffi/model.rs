//! `phi4_model`: a loaded model, immutable and shared by any number of sessions on any threads.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use super::*;
use crate::model::{LoadError, LoadParams, Model};

/// Severity of a log message.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum phi4_log_level {
    PHI4_LOG_INFO = 0,
    PHI4_LOG_WARN = 1,
}

/// Progress of loading, 0..1. Return false to cancel the load.
pub type phi4_progress_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, progress: f32) -> bool>;

/// A log line of one model (NUL-terminated, valid during the call).
pub type phi4_log_fn = Option<
    unsafe extern "C" fn(user_data: *mut c_void, level: phi4_log_level, message: *const c_char),
>;

/// How to load a model. Get one from `phi4_model_default_params`, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct phi4_model_params {
    /// sizeof(phi4_model_params) as the caller knows it; set by phi4_model_default_params.
    pub struct_size: usize,
    /// Repack the weight types faster kernels have a layout for: phi4's own (Q4_K, Q5_K, Q6_K)
    /// or ggml's (more load time, faster decoding and prefill). Default true.
    pub repack: phi4_bool,
    /// Read all weights at load time instead of on first use. Default true.
    pub prefetch: phi4_bool,
    /// Called during loading with the fraction done; may be NULL. Called on the loading thread.
    pub progress: phi4_progress_fn,
    /// Passed to `progress`.
    pub progress_user_data: *mut c_void,
    /// Log messages of this model (the load summary; sessions' warnings such as dropped turns);
    /// may be NULL. Called from whichever thread uses the model, so it must be thread-safe if
    /// sessions run in parallel; it and its user data must outlive the model and its sessions.
    pub log: phi4_log_fn,
    /// Passed to `log`.
    pub log_user_data: *mut c_void,
}

/// A loaded model (opaque).
pub struct phi4_model {
    pub(crate) inner: Arc<Model>,
    pub(crate) log: Log,
}

impl Handle for phi4_model {
    const NAME: &'static str = "model";
}

/// A model's log callback and its user data.
#[derive(Clone, Copy)]
pub(crate) struct Log {
    f: phi4_log_fn,
    user_data: *mut c_void,
}

// SAFETY: the header requires the log callback (and its user data) to be usable from any thread
// that uses the model.
unsafe impl Send for Log {}
// SAFETY: as above.
unsafe impl Sync for Log {}

impl Log {
    pub(crate) fn write(&self, level: phi4_log_level, msg: &str) {
        if let Some(f) = self.f {
            let msg = to_cstring(msg);
            // SAFETY: the caller's callback with its user data; the message lives for the call.
            unsafe { f(self.user_data, level, msg.as_ptr()) };
        }
    }
}

/// Fill `*out` with the defaults (and its struct_size).
///
/// Thread-safe. `out` is written only on success.
#[no_mangle]
pub unsafe extern "C" fn phi4_model_default_params(out: *mut phi4_model_params) -> phi4_status {
    // SAFETY: out is NULL or writable (caller's contract).
    unsafe { write_out(out, default_model_params()) }
}

fn default_model_params() -> phi4_model_params {
    phi4_model_params {
        struct_size: std::mem::size_of::<phi4_model_params>(),
        repack: 1,
        prefetch: 1,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
        log: None,
        log_user_data: std::ptr::null_mut(),
    }
}

fn load_status(e: &LoadError) -> phi4_status {
    match e {
        LoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::OutOfMemory => {
            PHI4_ERR_OUT_OF_MEMORY
        }
        LoadError::Io { .. } => PHI4_ERR_IO,
        LoadError::Alloc(_) => PHI4_ERR_OUT_OF_MEMORY,
        LoadError::Cancelled => PHI4_ERR_CANCELLED,
        _ => PHI4_ERR_BAD_MODEL,
    }
}

/// Load the GGUF model at `path` (UTF-8). `params` may be NULL for the defaults. On success
/// `*out` owns the model (free it with `phi4_model_free`); on failure `*out` is untouched and
/// `phi4_last_error()` describes the problem.
///
/// Thread-safe: models may be loaded on several threads at once.
#[no_mangle]
pub unsafe extern "C" fn phi4_model_load(
    path: *const c_char,
    params: *const phi4_model_params,
    out: *mut *mut phi4_model,
) -> phi4_status {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: NULL or a NUL-terminated string, per the header's contract.
        let path = unsafe { c_str(path, "path") }?;
        // SAFETY: NULL or a params struct from phi4_model_default_params.
        let p = unsafe { read_params(params, default_model_params(), "params") }?;
        let mut progress = |f: f32| match p.progress {
            // SAFETY: the caller's callback with the caller's user data.
            Some(cb) => unsafe { cb(p.progress_user_data, f) },
            None => true,
        };
        let lp = LoadParams {
            repack: p.repack != 0,
            prefetch: p.prefetch != 0,
            progress: Some(&mut progress),
        };
        let model = Model::load(std::path::Path::new(path), lp)
            .map_err(|e| Error::new(load_status(&e), e.to_string()))?;
        let log = Log {
            f: p.log,
            user_data: p.log_user_data,
        };
        log.write(
            phi4_log_level::PHI4_LOG_INFO,
            &format!(
                "loaded {path}: {} layers x {}, vocabulary {}; cpu kernels {} ({}); repacked: {}",
                model.config.n_layer,
                model.config.n_embd,
                model.config.n_vocab,
                crate::ggml::cpu_variant(),
                crate::ggml::cpu_features().join(" "),
                model.repacked_summary()
            ),
        );
        let m = phi4_model {
            inner: Arc::new(model),
            log,
        }
        .into_raw();
        // SAFETY: out is non-null (checked).
        unsafe { out.write(m) };
        Ok(())
    })
}

/// Release a model. NULL is allowed. Sessions opened on it keep it alive until they are freed,
/// so the order of frees does not matter; the handle itself must not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phi4_model_free(model: *mut phi4_model) {
    // SAFETY: NULL or from phi4_model_load, freed once (caller's contract).
    ffi_boundary! { unsafe { free(model) } }
}

/// Token ids of `text` (`len` bytes of UTF-8, no NUL needed). With `special`, control tokens
/// written in the text (`<|im_start|>`) become their ids. Writes up to `capacity` ids to
/// `tokens` and the count to `*n_tokens`; if `capacity` is too small, returns
/// PHI4_ERR_BUFFER_TOO_SMALL with the needed count in `*n_tokens` and nothing in `tokens`.
///
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn phi4_tokenize(
    model: *const phi4_model,
    text: *const c_char,
    len: usize,
    special: bool,
    tokens: *mut u32,
    capacity: usize,
    n_tokens: *mut usize,
) -> phi4_status {
    guard(|| {
        // SAFETY: NULL or a live handle.
        let m = unsafe { borrow(model) }?;
        // SAFETY: text points to len readable bytes (caller's contract).
        let text: &[u8] = unsafe { array(text.cast(), len, "text") }?;
        let text = std::str::from_utf8(text)
            .map_err(|_| Error::new(PHI4_ERR_INVALID_ARGUMENT, "text is not valid UTF-8"))?;
        let ids = m.inner.tokenizer.encode(text, special);
        let n = ids.len();
        let copy = |tokens: *mut u32| {
            // SAFETY: tokens has room for capacity >= n ids (caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), tokens, n) };
            Ok(())
        };
        // SAFETY: n_tokens is NULL or writable (caller's contract).
        unsafe { sized_output(n, n, capacity, tokens, (n_tokens, "n_tokens"), copy) }
    })
}

/// The text of `n` token ids (control tokens only with `special`), written to `text` (at most
/// `capacity` bytes, NUL-terminated) with its length (without the NUL) in `*len`. If `capacity`
/// is too small, returns PHI4_ERR_BUFFER_TOO_SMALL with the needed length in `*len`. Bytes that
/// do not form UTF-8 are replaced by U+FFFD.
///
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn phi4_detokenize(
    model: *const phi4_model,
    tokens: *const u32,
    n: usize,
    special: bool,
    text: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> phi4_status {
    guard(|| {
        // SAFETY: handle and buffers as documented.
        let m = unsafe { borrow(model) }?;
        non_null(len, "len")?;
        // SAFETY: tokens points to n ids (caller's contract).
        let ids = unsafe { array(tokens, n, "tokens") }?;
        let n_vocab = m.inner.config.n_vocab;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::new(
                PHI4_ERR_INVALID_ARGUMENT,
                format!("token id {bad} is outside the vocabulary"),
            ));
        }
        let s = m.inner.tokenizer.decode(ids, special);
        // SAFETY: text and len as documented.
        unsafe { write_text(&s, text, capacity, len) }
    })
}

/// The model's training context length (16384 for Phi-4), or 0 if `model` is NULL.
#[no_mangle]
pub unsafe extern "C" fn phi4_model_n_ctx_train(model: *const phi4_model) -> u32 {
    // SAFETY: NULL or a live handle.
    ffi_boundary! { unsafe { borrow(model) }.map_or(0, |m| m.inner.config.n_ctx_train as u32) }
}

/// How many weight matrices were repacked into faster layouts, phi4's or ggml's (0 if `model`
/// is NULL).
#[no_mangle]
pub unsafe extern "C" fn phi4_model_n_repacked(model: *const phi4_model) -> u32 {
    // SAFETY: NULL or a live handle.
    ffi_boundary! { unsafe { borrow(model) }.map_or(0, |m| m.inner.repacked.len() as u32) }
}

/// Which weight types were repacked into which layouts, as one line of text: e.g.
/// "100 q4_K tensors into phi4's 8-row groups" or "101 q4_K tensors into CPU_REPACK" (ggml's),
/// several joined by "; ", or "none" (every weight is used in
/// place from the file mapping). With `phi4_cpu_features()` this shows which kernels run.
/// Written to `text` (at most `capacity` bytes, NUL-terminated) with its length in `*len`; if
/// `capacity` is too small, returns PHI4_ERR_BUFFER_TOO_SMALL with the needed length in `*len`.
///
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn phi4_model_repacked(
    model: *const phi4_model,
    text: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> phi4_status {
    guard(|| {
        // SAFETY: NULL or a live handle.
        let m = unsafe { borrow(model) }?;
        // SAFETY: text and len as documented.
        unsafe { write_text(&m.inner.repacked_summary(), text, capacity, len) }
    })
}
