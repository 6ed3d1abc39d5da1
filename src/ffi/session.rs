//! `phi4_session`: a conversation on a model — its KV cache, history and last result. Used by
//! one thread at a time; a second concurrent call gets PHI4_ERR_BUSY. `phi4_session_cancel`
//! may be called from any thread at any time.

use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::model::{phi4_log_level, phi4_model, Log};
use super::*;
use crate::chat::{Message, Role};
use crate::constrain::Constraint;
use crate::error::{EvalError, SessionError};
use crate::kv_cache::KvType;
use crate::limits::{DEFAULT_DRAFT, MAX_DRAFT, MAX_TOP_LOGPROBS};
use crate::model::Model;
use crate::sample::SamplingParams;
use crate::scheduler::Scheduler;
use crate::session::{
    DoneReason, GenerateParams, Outcome, Overflow, Session, SessionParams, Token,
};
use crate::state::StateError;
use crate::tools::{self, Tool, ToolChoice, Tools};

/// What to do when a conversation outgrows the context (the values of
/// `phi4_session_params.overflow`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum phi4_overflow {
    /// Fail with PHI4_ERR_CONTEXT_OVERFLOW before any work (default).
    PHI4_OVERFLOW_ERROR = 0,
    /// Drop the oldest messages after the system message until the prompt fits.
    PHI4_OVERFLOW_DROP_OLDEST = 1,
}

/// What the KV cache keeps K and V in (the values of `phi4_session_params.kv_type`): as
/// llama.cpp's cache types and Ollama's OLLAMA_KV_CACHE_TYPE.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum phi4_kv_type {
    /// 16-bit floats (default): 2 bytes per value.
    PHI4_KV_F16 = 0,
    /// 8-bit blocks of 32: about half f16's memory.
    PHI4_KV_Q8_0 = 1,
    /// 4-bit blocks of 32: about a quarter of f16's memory.
    PHI4_KV_Q4_0 = 2,
}

/// What a reply must be (the values of `phi4_generate_params.format`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum phi4_format {
    /// Free text (default).
    PHI4_FORMAT_TEXT = 0,
    /// Any JSON object; format_text is not read.
    PHI4_FORMAT_JSON = 1,
    /// A JSON value valid against the JSON Schema in format_text.
    PHI4_FORMAT_JSON_SCHEMA = 2,
    /// Text matched, whole, by the regular expression in format_text.
    PHI4_FORMAT_REGEX = 3,
    /// Text in the language of the Lark grammar in format_text (llguidance's dialect).
    PHI4_FORMAT_GRAMMAR = 4,
}

/// How to open a session. Get one from `phi4_session_default_params`, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct phi4_session_params {
    /// sizeof(phi4_session_params) as the caller knows it; set by phi4_session_default_params.
    pub struct_size: usize,
    /// Context size in tokens: 1 ..= min(model's, PHI4_MAX_CONTEXT); 0 (the default) means
    /// PHI4_DEFAULT_CONTEXT, or the model's context if that is smaller.
    pub n_ctx: u32,
    /// Prompt tokens per micro-batch (also how often prefill checks for cancellation). Default
    /// PHI4_DEFAULT_BATCH.
    pub n_batch: u32,
    /// Threads for the forward pass, 1..=PHI4_MAX_THREADS; more than the CPUs are clamped to
    /// their number (a warning is logged). Default: the number of CPUs.
    pub n_threads: u32,
    /// A phi4_overflow value. Default PHI4_OVERFLOW_ERROR.
    pub overflow: u32,
    /// A phi4_kv_type value. Default PHI4_KV_F16. A saved state loads only into a session of
    /// the cache type it was saved from (phi4_session_load fails otherwise).
    pub kv_type: u32,
}

/// `phi4_generate_params.seed`: a fresh random seed for every generation (the default).
pub const PHI4_SEED_RANDOM: u64 = 0xFFFF_FFFF_FFFF_FFFF;

/// How to generate. Get one from `phi4_generate_default_params` (Ollama's defaults).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct phi4_generate_params {
    /// sizeof(phi4_generate_params) as the caller knows it; set by phi4_generate_default_params.
    pub struct_size: usize,
    /// Softmax temperature; 0 is greedy. Default 0.8.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all. Default 40.
    pub top_k: u32,
    /// Nucleus sampling threshold in (0, 1]. Default 0.9.
    pub top_p: f32,
    /// Drop tokens below min_p times the most likely one's probability, [0, 1]. Default 0.
    pub min_p: f32,
    /// Penalty on recently seen tokens (> 0; 1 is off). Default 1.1.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at. Default 64.
    pub repeat_last_n: u32,
    /// Subtracted per occurrence in the window. Default 0.
    pub frequency_penalty: f32,
    /// Subtracted once if present in the window. Default 0.
    pub presence_penalty: f32,
    /// Seed of the random draw: the same seed and inputs give the same reply. Default
    /// PHI4_SEED_RANDOM: a fresh seed per generation.
    pub seed: u64,
    /// Tokens to generate at most; 0 means until the context is full. Default 0.
    pub max_tokens: u32,
    /// `n_stop` NUL-terminated UTF-8 strings; generation ends before any of them (not emitted).
    /// Read during the call only. May be NULL when n_stop is 0.
    pub stop: *const *const c_char,
    pub n_stop: usize,
    /// A phi4_format value: only tokens that keep the reply valid are sampled, and the reply
    /// ends (PHI4_DONE_STOP) when it is complete. Default PHI4_FORMAT_TEXT. A schema, regex or
    /// grammar that does not compile fails the call with PHI4_ERR_INVALID_ARGUMENT before any
    /// work. (Callers built before this field get free text.)
    pub format: u32,
    /// The schema, regex or grammar of `format`: NUL-terminated UTF-8, read during the call
    /// only. NULL for PHI4_FORMAT_TEXT and PHI4_FORMAT_JSON.
    pub format_text: *const c_char,
    /// Tools the model may call (phi4_session_chat only; not with `format`): a JSON array of
    /// tool definitions, OpenAI's and Ollama's `{"type": "function", "function": {"name",
    /// "description", "parameters"}}` (or the function objects alone), NUL-terminated UTF-8,
    /// read during the call only. NULL (the default): no tools. The reply is text, or text
    /// then calls whose arguments are valid for their tool's parameters schema; the calls:
    /// phi4_session_last_tool_calls. (Since 0.4.)
    pub tools: *const c_char,
    /// A phi4_tool_choice value. Default PHI4_TOOL_CHOICE_AUTO.
    pub tool_choice: u32,
    /// With PHI4_TOOL_CHOICE_FUNCTION: the tool's name (NUL-terminated); else not read.
    pub tool_choice_name: *const c_char,
    /// More than one call per reply (at most PHI4_MAX_TOOL_CALLS). Default true.
    pub parallel_tool_calls: phi4_bool,
    /// Record each generated token's log-probability (phi4_session_last_logprobs). Default false.
    pub logprobs: phi4_bool,
    /// With `logprobs`: the most likely alternatives recorded per token,
    /// 0..=PHI4_MAX_TOP_LOGPROBS. Default 0.
    pub top_logprobs: u32,
    /// Speculative decoding: at most this many tokens, 0..=PHI4_MAX_DRAFT, drafted per step by
    /// prompt lookup (the continuation of the last few tokens where they occurred before) and
    /// verified in one step. The reply is the same, token for token; phi4_result says how many
    /// drafts were right. 0: off. Default PHI4_DEFAULT_DRAFT. (Since 0.5.)
    pub draft: u32,
}

/// Which calls a reply may make (the values of `phi4_generate_params.tool_choice`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum phi4_tool_choice {
    /// Text, or text then calls: the model decides (default).
    PHI4_TOOL_CHOICE_AUTO = 0,
    /// Text only (the tools are still described to the model).
    PHI4_TOOL_CHOICE_NONE = 1,
    /// One or more calls, no text.
    PHI4_TOOL_CHOICE_REQUIRED = 2,
    /// Calls of the tool named in tool_choice_name only.
    PHI4_TOOL_CHOICE_FUNCTION = 3,
}

/// A generated token's log-probability (the natural log of its probability under the model's
/// logits, before penalties, temperature and any format's mask) and the most likely tokens at
/// its position, most likely first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct phi4_token_logprob {
    pub token: u32,
    pub logprob: f32,
    /// How many of top_tokens / top_logprobs are set.
    pub n_top: u32,
    pub top_tokens: [u32; 20],
    pub top_logprobs: [f32; 20],
}

/// One chat message: role is "system", "user", "assistant" or "tool" (a tool's result); both
/// strings NUL-terminated UTF-8, read during the call only. An assistant message that made
/// calls holds its text followed by each call as phi4 writes it:
/// `<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>`, one per line (see
/// phi4_session_last_tool_calls).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct phi4_message {
    pub role: *const c_char,
    pub content: *const c_char,
}

/// Receives each piece of generated text: `len` bytes of complete UTF-8 (also NUL-terminated),
/// valid during the call only. Return true to go on, false to cancel the generation.
pub type phi4_stream_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, piece: *const c_char, len: usize) -> bool>;

/// Why the last generation ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum phi4_done_reason {
    /// No generation has finished on this session yet.
    PHI4_DONE_NONE = 0,
    /// An end-of-generation token or a stop string.
    PHI4_DONE_STOP = 1,
    /// max_tokens reached.
    PHI4_DONE_LENGTH = 2,
    /// Cancelled by the callback or phi4_session_cancel.
    PHI4_DONE_CANCELLED = 3,
    /// The context filled up.
    PHI4_DONE_CONTEXT_FULL = 4,
}

/// The last generation's outcome (Ollama's timings; durations in nanoseconds).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct phi4_result {
    /// sizeof(phi4_result) as the caller knows it: set it before calling phi4_session_last_result.
    pub struct_size: usize,
    /// A phi4_done_reason value.
    pub done_reason: u32,
    pub load_duration: u64,
    /// Prompt tokens evaluated (the part not already in the cache).
    pub prompt_eval_count: u64,
    pub prompt_eval_duration: u64,
    /// Tokens generated.
    pub eval_count: u64,
    pub eval_duration: u64,
    /// Messages dropped from the front to fit the context (PHI4_OVERFLOW_DROP_OLDEST).
    pub dropped_messages: u32,
    /// Tokens drafted (phi4_generate_params.draft), and of them those the model agreed with:
    /// generated without a step of their own. (Since 0.5.)
    pub drafted: u64,
    pub accepted: u64,
}

const BUSY_MESSAGE: &str = "another call is running on this session";

/// A session (opaque).
pub struct phi4_session {
    inner: Mutex<Session>,
    log: Log,
    cancel: Arc<AtomicBool>,
    /// The message of the last failed call (copied out per thread by phi4_session_last_error).
    last_error: Mutex<String>,
    last_result: Mutex<phi4_result>,
    /// The last generation's calls as a JSON array, and its tokens' log-probabilities.
    last_tool_calls: Mutex<String>,
    last_logprobs: Mutex<Vec<phi4_token_logprob>>,
    /// Set by phi4_session_free called from inside a call on this session (from its streaming
    /// or log callback): the call frees the session as it returns.
    free_requested: AtomicBool,
}

impl Handle for phi4_session {
    const NAME: &'static str = "session";
}

fn default_session_params() -> phi4_session_params {
    let d = SessionParams::default();
    phi4_session_params {
        struct_size: std::mem::size_of::<phi4_session_params>(),
        n_ctx: d.n_ctx as u32,
        n_batch: d.n_batch as u32,
        n_threads: d.n_threads as u32,
        overflow: phi4_overflow::PHI4_OVERFLOW_ERROR as u32,
        kv_type: phi4_kv_type::PHI4_KV_F16 as u32,
    }
}

fn default_generate_params() -> phi4_generate_params {
    let d = SamplingParams::default();
    phi4_generate_params {
        struct_size: std::mem::size_of::<phi4_generate_params>(),
        temperature: d.temperature,
        top_k: d.top_k as u32,
        top_p: d.top_p,
        min_p: d.min_p,
        repeat_penalty: d.repeat_penalty,
        repeat_last_n: d.repeat_last_n as u32,
        frequency_penalty: d.frequency_penalty,
        presence_penalty: d.presence_penalty,
        seed: d.seed.unwrap_or(PHI4_SEED_RANDOM),
        max_tokens: 0,
        stop: std::ptr::null(),
        n_stop: 0,
        format: phi4_format::PHI4_FORMAT_TEXT as u32,
        format_text: std::ptr::null(),
        tools: std::ptr::null(),
        tool_choice: phi4_tool_choice::PHI4_TOOL_CHOICE_AUTO as u32,
        tool_choice_name: std::ptr::null(),
        parallel_tool_calls: 1,
        logprobs: 0,
        top_logprobs: 0,
        draft: DEFAULT_DRAFT as u32,
    }
}

fn empty_result() -> phi4_result {
    phi4_result {
        struct_size: std::mem::size_of::<phi4_result>(),
        done_reason: phi4_done_reason::PHI4_DONE_NONE as u32,
        load_duration: 0,
        prompt_eval_count: 0,
        prompt_eval_duration: 0,
        eval_count: 0,
        eval_duration: 0,
        dropped_messages: 0,
        drafted: 0,
        accepted: 0,
    }
}

/// Fill `*out` with the defaults (and its struct_size). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn phi4_session_default_params(out: *mut phi4_session_params) -> phi4_status {
    // SAFETY: out is NULL or writable (caller's contract).
    unsafe { write_out(out, default_session_params()) }
}

/// Bytes of phi4_generate_params as phi4 0.1.0 had it (up to `n_stop`): what programs built
/// then pass to phi4_generate_default_params.
const GENERATE_PARAMS_0_1: usize = std::mem::offset_of!(phi4_generate_params, format);

/// Fill `*out` with the defaults for a struct of `size` bytes (`sizeof *out`: the header's
/// phi4_generate_default_params macro passes it): at most `size` bytes are written and
/// struct_size is set to what was written, so a program built against an older header keeps
/// working. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn phi4_generate_params_init(
    out: *mut phi4_generate_params,
    size: usize,
) -> phi4_status {
    // SAFETY: out is NULL or points to `size` writable bytes (caller's contract).
    unsafe { write_prefix(out, default_generate_params(), size) }
}

/// The entry point of programs built against phi4 0.1.0's header, which had no `format` fields:
/// writes that struct's bytes only. (The header's `phi4_generate_default_params` is a macro
/// over phi4_generate_params_init; this symbol stays for those programs.)
#[export_name = "phi4_generate_default_params"]
pub unsafe extern "C" fn generate_default_params_0_1(
    out: *mut phi4_generate_params,
) -> phi4_status {
    // SAFETY: programs of 0.1.0 pass a struct of that version's size.
    unsafe { write_prefix(out, default_generate_params(), GENERATE_PARAMS_0_1) }
}

fn session_status(e: &SessionError) -> phi4_status {
    match e {
        SessionError::ContextOverflow { .. } => PHI4_ERR_CONTEXT_OVERFLOW,
        SessionError::BadParams(_) | SessionError::Constraint(_) => PHI4_ERR_INVALID_ARGUMENT,
        SessionError::Eval(EvalError::BadToken { .. }) => PHI4_ERR_INVALID_ARGUMENT,
        SessionError::Eval(EvalError::ContextFull { .. }) => PHI4_ERR_CONTEXT_OVERFLOW,
        SessionError::Eval(EvalError::Alloc(_)) => PHI4_ERR_OUT_OF_MEMORY,
        SessionError::Eval(EvalError::Cancelled) => PHI4_OK,
        SessionError::Eval(EvalError::StepFailed) => PHI4_ERR_INTERNAL,
    }
}

fn serr(e: SessionError) -> Error {
    Error::new(session_status(&e), e.to_string())
}

/// A session handle on `model` (its own scheduler, or `scheduler`), from C params.
///
/// # Safety
/// `params` is NULL or points to a params struct of its `struct_size`.
pub(crate) unsafe fn open_session(
    model: &Arc<Model>,
    log: Log,
    params: *const phi4_session_params,
    scheduler: Option<&Scheduler>,
) -> Result<phi4_session, Error> {
    // SAFETY: NULL or a struct from phi4_session_default_params (caller's contract).
    let p = unsafe { read_params(params, default_session_params(), "params") }?;
    let overflow = match p.overflow {
        v if v == phi4_overflow::PHI4_OVERFLOW_ERROR as u32 => Overflow::Error,
        v if v == phi4_overflow::PHI4_OVERFLOW_DROP_OLDEST as u32 => Overflow::DropOldest,
        v => {
            return Err(Error::new(
                PHI4_ERR_INVALID_ARGUMENT,
                format!("overflow {v} is not a phi4_overflow"),
            ))
        }
    };
    let kv_type = [
        (phi4_kv_type::PHI4_KV_F16, KvType::F16),
        (phi4_kv_type::PHI4_KV_Q8_0, KvType::Q8_0),
        (phi4_kv_type::PHI4_KV_Q4_0, KvType::Q4_0),
    ]
    .into_iter()
    .find(|&(c, _)| c as u32 == p.kv_type)
    .map(|(_, t)| t)
    .ok_or_else(|| {
        Error::new(
            PHI4_ERR_INVALID_ARGUMENT,
            format!("kv_type {} is not a phi4_kv_type", p.kv_type),
        )
    })?;
    let sp = SessionParams {
        n_ctx: p.n_ctx as usize,
        n_batch: p.n_batch as usize,
        n_threads: p.n_threads as usize,
        overflow,
        kv_type,
    };
    let s = match scheduler {
        Some(sched) => Session::with_scheduler(sched, &sp),
        None => Session::new(model.clone(), &sp),
    }
    .map_err(serr)?;
    if scheduler.is_none() && s.n_threads() < sp.n_threads {
        log.write(
            phi4_log_level::PHI4_LOG_WARN,
            &format!(
                "n_threads {} is more than the {} CPUs this process may use: using {}",
                sp.n_threads,
                s.n_threads(),
                s.n_threads()
            ),
        );
    }
    Ok(phi4_session {
        cancel: s.cancel_flag(),
        log,
        inner: Mutex::new(s),
        last_error: Mutex::new(String::new()),
        free_requested: AtomicBool::new(false),
        last_result: Mutex::new(empty_result()),
        last_tool_calls: Mutex::new("[]".into()),
        last_logprobs: Mutex::new(Vec::new()),
    })
}

/// Open a session on `model`. `params` may be NULL for the defaults. On success `*out` owns the
/// session (free with `phi4_session_free`); the session keeps the model alive. On failure the
/// message is in `phi4_last_error()`.
///
/// Thread-safe: sessions may be opened on one model from many threads at once.
#[no_mangle]
pub unsafe extern "C" fn phi4_session_new(
    model: *const phi4_model,
    params: *const phi4_session_params,
    out: *mut *mut phi4_session,
) -> phi4_status {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: a live model handle (caller's contract).
        let m = unsafe { borrow(model) }?;
        // SAFETY: NULL or a struct from phi4_session_default_params (caller's contract).
        let h = unsafe { open_session(&m.inner, m.log, params, None) }?;
        // SAFETY: out is non-null.
        unsafe { out.write(h.into_raw()) };
        Ok(())
    })
}

/// Free a session (NULL allowed). Must not race with a call on the same session from another
/// thread. From inside a call on the session (its streaming callback, or the model's log
/// callback during it) the free is deferred: the session is freed as that call returns.
#[no_mangle]
pub unsafe extern "C" fn phi4_session_free(session: *mut phi4_session) {
    // SAFETY: NULL or a live handle from phi4_session_new (caller's contract).
    let Ok(h) = (unsafe { borrow(session) }) else {
        return;
    };
    ffi_boundary! {
        if h.inner.is_locked() {
            // Called from a callback of a call running on this session: that call frees it.
            h.free_requested.store(true, Ordering::Release);
        } else {
            // SAFETY: no call runs on it; freed once (caller's contract).
            unsafe { free(session) }
        }
    }
}

/// Run `f` on the session under its lock (PHI4_ERR_BUSY if another call holds it), recording the
/// error message on the handle (not a BUSY's: that belongs to the intruding caller, and would
/// replace the message of the call that holds the session). If `f`'s callbacks asked to free the
/// session, it is freed here, after `f`.
///
/// # Safety
/// `session` is NULL or a live handle from phi4_session_new.
unsafe fn with_session(
    session: *const phi4_session,
    f: impl FnOnce(&phi4_session, &mut Session) -> Result<(), Error>,
) -> phi4_status {
    // SAFETY: NULL or a live handle (caller's contract).
    let h = match unsafe { borrow(session) } {
        Ok(h) => h,
        Err(e) => return fail(e, |_| ()),
    };
    let Some(mut inner) = h.inner.try_lock() else {
        note_busy(session as usize, Some(BUSY_MESSAGE));
        return fail(Error::new(PHI4_ERR_BUSY, BUSY_MESSAGE), |_| ());
    };
    note_busy(session as usize, None);
    // A BUSY from inside (another session that `f` needs is busy) is this caller's alone too.
    let record = |e: &Error| match e.0 {
        PHI4_ERR_BUSY => note_busy(session as usize, Some(&e.1)),
        _ => *h.last_error.lock() = e.1.clone(),
    };
    let status = guard_with(record, || f(h, &mut inner));
    drop(inner);
    if h.free_requested.load(Ordering::Acquire) {
        // SAFETY: phi4_session_free deferred the free to here, the end of the call it was made
        // in; nothing else runs on the session, and `h` is not used again.
        unsafe { free(session as *mut phi4_session) };
    }
    status
}

/// # Safety
/// `p` is NULL or a params struct whose `stop` points to `n_stop` strings.
unsafe fn generate_params(p: *const phi4_generate_params) -> Result<GenerateParams, Error> {
    // SAFETY: NULL or a struct from phi4_generate_default_params.
    let p = unsafe { read_params(p, default_generate_params(), "params") }?;
    // SAFETY: stop points to n_stop string pointers (caller's contract).
    let stop_ptrs = unsafe { array(p.stop, p.n_stop, "params.stop") }?;
    let stop = stop_ptrs
        .iter()
        // SAFETY: each is a NUL-terminated string (caller's contract).
        .map(|&s| unsafe { c_str(s, "a stop string") }.map(str::to_string))
        .collect::<Result<Vec<_>, _>>()?;
    let sampling = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n: p.repeat_last_n as usize,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        seed: (p.seed != PHI4_SEED_RANDOM).then_some(p.seed),
    };
    sampling
        .validate()
        .map_err(|m| Error::new(PHI4_ERR_INVALID_ARGUMENT, m))?;
    // SAFETY: format_text is NULL or a NUL-terminated string (caller's contract).
    let constraint = unsafe { constraint(p.format, p.format_text) }?;
    let bad = |m: String| Error::new(PHI4_ERR_INVALID_ARGUMENT, m);
    // SAFETY: tools and tool_choice_name are NULL or NUL-terminated strings (caller's contract).
    let tools = unsafe { tool_params(&p) }?;
    if p.logprobs != 0 && p.top_logprobs as usize > MAX_TOP_LOGPROBS {
        return Err(bad(format!(
            "top_logprobs {} is above PHI4_MAX_TOP_LOGPROBS",
            p.top_logprobs
        )));
    }
    if p.draft as usize > MAX_DRAFT {
        return Err(bad(format!("draft {} is above PHI4_MAX_DRAFT", p.draft)));
    }
    Ok(GenerateParams {
        draft: p.draft as usize,
        sampling,
        max_tokens: p.max_tokens as usize,
        stop,
        constraint,
        tools,
        logprobs: (p.logprobs != 0).then_some(p.top_logprobs as usize),
    })
}

/// # Safety
/// `p.tools` and `p.tool_choice_name` are NULL or NUL-terminated strings.
unsafe fn tool_params(p: &phi4_generate_params) -> Result<Option<Tools>, Error> {
    if p.tools.is_null() {
        return Ok(None);
    }
    let bad = |m: String| Error::new(PHI4_ERR_INVALID_ARGUMENT, m);
    // SAFETY: per this function's contract.
    let text = unsafe { c_str(p.tools, "params.tools") }?;
    let list: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("params.tools is not JSON: {e}")))?;
    let list = list
        .as_array()
        .ok_or_else(|| bad("params.tools must be a JSON array of tools".into()))?
        .iter()
        .map(Tool::from_json)
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let choice = match p.tool_choice {
        v if v == phi4_tool_choice::PHI4_TOOL_CHOICE_AUTO as u32 => ToolChoice::Auto,
        v if v == phi4_tool_choice::PHI4_TOOL_CHOICE_NONE as u32 => ToolChoice::None,
        v if v == phi4_tool_choice::PHI4_TOOL_CHOICE_REQUIRED as u32 => ToolChoice::Required,
        v if v == phi4_tool_choice::PHI4_TOOL_CHOICE_FUNCTION as u32 => {
            // SAFETY: per this function's contract.
            let name = unsafe { c_str(p.tool_choice_name, "params.tool_choice_name") }?;
            ToolChoice::Function(name.to_string())
        }
        v => {
            return Err(bad(format!(
                "params.tool_choice {v} is not a phi4_tool_choice"
            )))
        }
    };
    let tools = Tools {
        tools: list,
        choice,
        parallel: p.parallel_tool_calls != 0,
    };
    tools.check().map_err(bad)?;
    Ok(Some(tools))
}

/// # Safety
/// `text` is NULL or a NUL-terminated string.
unsafe fn constraint(format: u32, text: *const c_char) -> Result<Option<Constraint>, Error> {
    // SAFETY: per this function's contract.
    let text = || unsafe { c_str(text, "params.format_text") }.map(str::to_string);
    Ok(match format {
        v if v == phi4_format::PHI4_FORMAT_TEXT as u32 => None,
        v if v == phi4_format::PHI4_FORMAT_JSON as u32 => Some(Constraint::Json),
        v if v == phi4_format::PHI4_FORMAT_JSON_SCHEMA as u32 => {
            Some(Constraint::JsonSchema(text()?))
        }
        v if v == phi4_format::PHI4_FORMAT_REGEX as u32 => Some(Constraint::Regex(text()?)),
        v if v == phi4_format::PHI4_FORMAT_GRAMMAR as u32 => Some(Constraint::Lark(text()?)),
        v => {
            return Err(Error::new(
                PHI4_ERR_INVALID_ARGUMENT,
                format!("params.format {v} is not a phi4_format"),
            ))
        }
    })
}

fn store_result(h: &phi4_session, o: &Outcome, logprobs: Vec<phi4_token_logprob>) {
    *h.last_logprobs.lock() = logprobs;
    if o.dropped_messages > 0 {
        h.log.write(
            phi4_log_level::PHI4_LOG_WARN,
            &format!(
                "dropped the {} oldest message(s) to fit the context",
                o.dropped_messages
            ),
        );
    }
    if o.reason == DoneReason::ContextFull {
        h.log.write(
            phi4_log_level::PHI4_LOG_WARN,
            "the reply filled the context and was cut short",
        );
    }
    let reason = match o.reason {
        DoneReason::Stop => phi4_done_reason::PHI4_DONE_STOP,
        DoneReason::Length => phi4_done_reason::PHI4_DONE_LENGTH,
        DoneReason::Cancelled => phi4_done_reason::PHI4_DONE_CANCELLED,
        DoneReason::ContextFull => phi4_done_reason::PHI4_DONE_CONTEXT_FULL,
    };
    let calls: Vec<serde_json::Value> = o
        .tool_calls
        .iter()
        .map(|c| serde_json::json!({"name": c.name, "arguments": c.arguments}))
        .collect();
    *h.last_tool_calls.lock() = tools::write_json(&serde_json::Value::Array(calls));
    let t = &o.timings;
    *h.last_result.lock() = phi4_result {
        done_reason: reason as u32,
        load_duration: t.load_duration,
        prompt_eval_count: t.prompt_eval_count as u64,
        prompt_eval_duration: t.prompt_eval_duration,
        eval_count: t.eval_count as u64,
        eval_duration: t.eval_duration,
        dropped_messages: o.dropped_messages as u32,
        drafted: t.drafted as u64,
        accepted: t.accepted as u64,
        ..empty_result()
    };
}

/// Adapts the C callback to the session's: pieces with text only, NUL-terminated copies;
/// tokens' log-probabilities kept in `logprobs`.
fn stream<'a>(
    cb: phi4_stream_fn,
    user_data: *mut c_void,
    logprobs: &'a mut Vec<phi4_token_logprob>,
) -> impl FnMut(Option<&Token>, &str) -> bool + 'a {
    let mut buf = Vec::new();
    logprobs.clear();
    move |token, piece: &str| {
        if let Some((id, lp)) = token.and_then(|t| Some((t.id, t.logprob.as_ref()?))) {
            let mut entry = phi4_token_logprob {
                token: id,
                logprob: lp.logprob,
                n_top: lp.top.len() as u32,
                top_tokens: [0; 20],
                top_logprobs: [0.0; 20],
            };
            for (i, &(t, p)) in lp.top.iter().enumerate().take(MAX_TOP_LOGPROBS) {
                entry.top_tokens[i] = t;
                entry.top_logprobs[i] = p;
            }
            logprobs.push(entry);
        }
        let Some(cb) = cb else { return true };
        if piece.is_empty() {
            return true;
        }
        buf.clear();
        buf.extend_from_slice(piece.as_bytes());
        buf.push(0);
        // SAFETY: the caller's callback; the piece is valid UTF-8, NUL-terminated, alive for the call.
        unsafe { cb(user_data, buf.as_ptr().cast(), piece.len()) }
    }
}

/// Reply to a conversation of `n_messages` messages, streaming the reply's text to `on_piece`
/// (may be NULL). Tokens already in the session's cache for the same conversation prefix are
/// reused. `params` may be NULL for the defaults. Returns PHI4_OK when the generation ran (for
/// whatever reason it ended: see phi4_session_last_result), or an error (nothing generated).
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_chat(
    session: *mut phi4_session,
    messages: *const phi4_message,
    n_messages: usize,
    params: *const phi4_generate_params,
    on_piece: phi4_stream_fn,
    user_data: *mut c_void,
) -> phi4_status {
    let call = |h: &phi4_session, s: &mut Session| {
        // SAFETY: messages points to n_messages messages; params as documented.
        let (msgs, gp) = unsafe {
            (
                read_messages(messages, n_messages)?,
                generate_params(params)?,
            )
        };
        let mut logprobs = Vec::new();
        let out = s
            .chat(&msgs, &gp, &mut stream(on_piece, user_data, &mut logprobs))
            .map_err(serr)?;
        store_result(h, &out, logprobs);
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// # Safety
/// `messages` points to `n` messages whose strings are NUL-terminated.
unsafe fn read_messages(messages: *const phi4_message, n: usize) -> Result<Vec<Message>, Error> {
    if n == 0 {
        return Err(Error::new(PHI4_ERR_INVALID_ARGUMENT, "no messages"));
    }
    // SAFETY: n messages (caller's contract).
    let raw = unsafe { array(messages, n, "messages") }?;
    raw.iter()
        .map(|m| {
            // SAFETY: NUL-terminated strings (caller's contract).
            let (role, content) = unsafe { (c_str(m.role, "role")?, c_str(m.content, "content")?) };
            let role = Role::parse(role).ok_or_else(|| {
                Error::new(
                    PHI4_ERR_INVALID_ARGUMENT,
                    format!("role {role:?} is not system, user, assistant or tool"),
                )
            })?;
            Ok(Message::new(role, content))
        })
        .collect()
}

/// Continue from `n_tokens` raw token ids (no chat template), streaming text as for
/// phi4_session_chat.
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_generate(
    session: *mut phi4_session,
    tokens: *const u32,
    n_tokens: usize,
    params: *const phi4_generate_params,
    on_piece: phi4_stream_fn,
    user_data: *mut c_void,
) -> phi4_status {
    let call = |h: &phi4_session, s: &mut Session| {
        if n_tokens == 0 {
            return Err(Error::new(PHI4_ERR_INVALID_ARGUMENT, "no tokens"));
        }
        // SAFETY: tokens points to n_tokens ids; params as documented.
        let (prompt, gp) =
            unsafe { (array(tokens, n_tokens, "tokens")?, generate_params(params)?) };
        let mut logprobs = Vec::new();
        let out = s
            .generate(prompt, &gp, &mut stream(on_piece, user_data, &mut logprobs))
            .map_err(serr)?;
        store_result(h, &out, logprobs);
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// The embedding of `n_tokens` token ids (phi4_tokenize makes them from text): the mean of
/// the model's final hidden states over them (llama.cpp's mean pooling), `n_embd` floats,
/// scaled to unit length if `normalize` (as Ollama's /api/embed returns them). Writes them to
/// `out` (room for `capacity` floats) and their count to `*n_out`; if `capacity` is too small,
/// returns PHI4_ERR_BUFFER_TOO_SMALL with the count needed in `*n_out` and computes nothing
/// (call with `out` NULL and `capacity` 0 to ask). The session's cache then holds the tokens;
/// what it held before is forgotten. Cancellable with phi4_session_cancel (PHI4_ERR_CANCELLED).
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_embed(
    session: *mut phi4_session,
    tokens: *const u32,
    n_tokens: usize,
    normalize: bool,
    out: *mut f32,
    capacity: usize,
    n_out: *mut usize,
) -> phi4_status {
    let call = |_: &phi4_session, s: &mut Session| {
        if n_tokens == 0 {
            return Err(Error::new(PHI4_ERR_INVALID_ARGUMENT, "no tokens"));
        }
        // SAFETY: tokens points to n_tokens ids (caller's contract).
        let ids = unsafe { array(tokens, n_tokens, "tokens") }?;
        let n = s.model().config.n_embd;
        let embed = |out: *mut f32| {
            let mut v = s.embed(ids).map_err(serr)?;
            if normalize {
                crate::session::normalize(&mut v);
            }
            // SAFETY: out has room for capacity >= n floats (caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out, n) };
            Ok(())
        };
        // SAFETY: n_out is NULL or writable (caller's contract).
        unsafe { sized_output(n, n, capacity, out, (n_out, "n_out"), embed) }
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// Ask the running generation on `session` to stop; it ends within one micro-batch with
/// PHI4_DONE_CANCELLED. Any thread, any time; no effect if nothing runs (the flag is cleared
/// when the next generation starts).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_cancel(session: *const phi4_session) -> phi4_status {
    guard(|| {
        // SAFETY: NULL or a live handle (caller's contract).
        unsafe { borrow(session) }?
            .cancel
            .store(true, Ordering::Relaxed);
        Ok(())
    })
}

/// Forget the conversation held in the session's cache.
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_reset(session: *mut phi4_session) -> phi4_status {
    let call = |_: &phi4_session, s: &mut Session| {
        s.reset();
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// Keep only the first `n_tokens` tokens of the session's cache (no effect if it holds fewer).
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_rewind(
    session: *mut phi4_session,
    n_tokens: usize,
) -> phi4_status {
    let call = |_: &phi4_session, s: &mut Session| {
        s.rewind(n_tokens);
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// Number of tokens in the session's cache, written to `*n`.
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_n_cached(
    session: *mut phi4_session,
    n: *mut usize,
) -> phi4_status {
    let call = |_: &phi4_session, s: &mut Session| {
        non_null(n, "n")?;
        // SAFETY: n is non-null and writable (caller's contract).
        unsafe { n.write(s.history().len()) };
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

fn state_err(e: StateError) -> Error {
    match e {
        StateError::Io(m) => Error::new(PHI4_ERR_IO, m),
        StateError::Invalid(m) => Error::new(PHI4_ERR_BAD_STATE, m),
    }
}

/// Save the session's cache — its tokens and their K/V rows — to the file at `path` (UTF-8),
/// atomically: a temporary file beside it is written, synced and renamed over `path`, so a
/// crash or a full disk leaves any previous file intact. Restore it with
/// phi4_session_load_file, in this or another process, on the same model file.
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_save_file(
    session: *mut phi4_session,
    path: *const c_char,
) -> phi4_status {
    let call = |_: &phi4_session, s: &mut Session| {
        // SAFETY: path is a NUL-terminated string (caller's contract).
        let path = unsafe { c_str(path, "path") }?;
        s.save(path.as_ref(), usize::MAX).map_err(state_err)?;
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// Restore a state saved by phi4_session_save_file (or _save_buffer) from a session of this
/// model and KV cache type: the cache becomes the saved tokens (the first n_ctx if there are
/// more; see phi4_session_n_cached), and the next chat or generate evaluates only what they
/// lack. A file that is damaged, of another model, format version or cache type fails with
/// PHI4_ERR_BAD_STATE (PHI4_ERR_IO when it cannot be read) and leaves the session as it was.
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_load_file(
    session: *mut phi4_session,
    path: *const c_char,
) -> phi4_status {
    let call = |_: &phi4_session, s: &mut Session| {
        // SAFETY: path is a NUL-terminated string (caller's contract).
        let path = unsafe { c_str(path, "path") }?;
        s.load(path.as_ref()).map_err(state_err)?;
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// Save the session's state into the caller's buffer `buf` of `capacity` bytes; `*len` gets
/// its size. When it does not fit, PHI4_ERR_BUFFER_TOO_SMALL with the size needed in `*len`
/// (call with buf NULL and capacity 0 to ask). `buf` is written during the call only.
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_save_buffer(
    session: *mut phi4_session,
    buf: *mut u8,
    capacity: usize,
    len: *mut usize,
) -> phi4_status {
    let call = |_: &phi4_session, s: &mut Session| {
        let size = usize::try_from(s.state_size(usize::MAX))
            .map_err(|_| Error::new(PHI4_ERR_OUT_OF_MEMORY, "the state does not fit in memory"))?;
        let save = |buf: *mut u8| {
            // SAFETY: buf points to capacity >= size writable bytes (caller's contract).
            let mut out = unsafe { std::slice::from_raw_parts_mut(buf, size) };
            s.save_to(&mut out, usize::MAX)
                .map_err(|e| Error::new(PHI4_ERR_INTERNAL, format!("writing the state: {e}")))
        };
        // SAFETY: len is NULL or writable (caller's contract).
        unsafe { sized_output(size, size, capacity, buf, (len, "len"), save) }
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// phi4_session_load_file from the `len` bytes at `buf` (read during the call only).
///
/// One thread at a time per session (PHI4_ERR_BUSY otherwise).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_load_buffer(
    session: *mut phi4_session,
    buf: *const u8,
    len: usize,
) -> phi4_status {
    let call = |_: &phi4_session, s: &mut Session| {
        // SAFETY: buf points to len readable bytes (caller's contract).
        let bytes = unsafe { array(buf, len, "buf") }?;
        s.load_bytes(bytes).map_err(state_err)?;
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(session, call) }
}

/// Make `to`'s cache a copy of `from`'s (sessions on the same model file and of one KV cache
/// type, else PHI4_ERR_BAD_STATE; the first n_ctx tokens of `from` if `to`'s context is
/// smaller): e.g. sessions sharing one evaluated system prompt.
/// Both sessions must be free (PHI4_ERR_BUSY otherwise); copying a session onto itself does
/// nothing.
#[no_mangle]
pub unsafe extern "C" fn phi4_session_copy(
    to: *mut phi4_session,
    from: *mut phi4_session,
) -> phi4_status {
    if std::ptr::eq(to, from) && !to.is_null() {
        return PHI4_OK;
    }
    let call = |_: &phi4_session, s: &mut Session| {
        // SAFETY: NULL or a live handle (caller's contract).
        let f = unsafe { borrow(from as *const phi4_session) }?;
        let src = f.inner.try_lock().ok_or_else(|| {
            Error::new(
                PHI4_ERR_BUSY,
                "`from`: another call is running on that session",
            )
        })?;
        s.copy_from(&src).map_err(state_err)?;
        Ok(())
    };
    // SAFETY: NULL or a live handle (caller's contract).
    unsafe { with_session(to, call) }
}

/// The outcome of the last generation. Set `out->struct_size = sizeof(phi4_result)` first; at
/// most that many bytes are written. Thread-safe (does not wait for a running generation; it
/// reports the last finished one).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_last_result(
    session: *const phi4_session,
    out: *mut phi4_result,
) -> phi4_status {
    guard(|| {
        // SAFETY: NULL or a live handle (caller's contract).
        let h = unsafe { borrow(session) }?;
        non_null(out, "out")?;
        // SAFETY: out is non-null and its first field is its size.
        let size = unsafe { *(out as *const usize) };
        if size < std::mem::size_of::<usize>() {
            return Err(Error::new(
                PHI4_ERR_INVALID_ARGUMENT,
                "out->struct_size is not set",
            ));
        }
        let mut r = *h.last_result.lock();
        r.struct_size = size.min(std::mem::size_of::<phi4_result>());
        // SAFETY: the caller's struct has `size` writable bytes; we write at most ours.
        unsafe {
            std::ptr::copy_nonoverlapping(
                &r as *const phi4_result as *const u8,
                out as *mut u8,
                r.struct_size,
            )
        };
        Ok(())
    })
}

/// The calls the last generation made (with `params.tools`), as a JSON array
/// `[{"name": "NAME", "arguments": {...}}, ...]` (`[]` when it made none), each call complete and
/// valid for its tool's parameters. Copied to `text` (room for `capacity` bytes, NUL-terminated),
/// its length (without the NUL) to `*len`; PHI4_ERR_BUFFER_TOO_SMALL with the length in `*len`
/// when it does not fit. Thread-safe (reports the last finished generation).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_last_tool_calls(
    session: *const phi4_session,
    text: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> phi4_status {
    guard(|| {
        // SAFETY: NULL or a live handle (caller's contract).
        let h = unsafe { borrow(session) }?;
        let calls = h.last_tool_calls.lock().clone();
        // SAFETY: text has room for capacity bytes; len is NULL or writable (caller's contract).
        unsafe { write_text(&calls, text, capacity, len) }
    })
}

/// The log-probabilities of the last generation's tokens (with `params.logprobs`), one per
/// generated token in order, copied to `out` (room for `capacity`), their number to `*n`;
/// PHI4_ERR_BUFFER_TOO_SMALL with the number in `*n` when they do not fit (ask with `out`
/// NULL and `capacity` 0). Thread-safe (reports the last finished generation).
#[no_mangle]
pub unsafe extern "C" fn phi4_session_last_logprobs(
    session: *const phi4_session,
    out: *mut phi4_token_logprob,
    capacity: usize,
    n: *mut usize,
) -> phi4_status {
    guard(|| {
        // SAFETY: NULL or a live handle (caller's contract).
        let h = unsafe { borrow(session) }?;
        let lps = h.last_logprobs.lock().clone();
        let fill = |out: *mut phi4_token_logprob| {
            // SAFETY: out has room for capacity >= lps.len() entries (caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(lps.as_ptr(), out, lps.len()) };
            Ok(())
        };
        // SAFETY: n is NULL or writable (caller's contract).
        unsafe { sized_output(lps.len(), lps.len(), capacity, out, (n, "n"), fill) }
    })
}

/// The message of the last failed call on this session ("" if none). A PHI4_ERR_BUSY's message
/// is seen only by the thread that got it (until its next call on the session): the running
/// call's message stays for everyone else. The text is a copy in a buffer of the calling thread:
/// valid for the thread's life, replaced by its next phi4_session_last_error call. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn phi4_session_last_error(session: *const phi4_session) -> *const c_char {
    // SAFETY: NULL or a live handle.
    let h = unsafe { borrow(session) };
    ffi_boundary! {
        match h {
            Ok(h) => match busy_message(session as usize) {
                Some(busy) => session_error_ptr(&busy),
                None => session_error_ptr(&h.last_error.lock()),
            },
            Err(_) => c"session is NULL".as_ptr(),
        }
    }
}
