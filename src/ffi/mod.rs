//! The C ABI (`include/phi4.h`). One module per C type (`model`, `scheduler`, `session`); the plumbing —
//! status codes, the panic boundary, pointer and string checks, versioned params structs — is
//! here. This module and `src/ggml/` are the only places with `unsafe`.
//!
//! Rules every exported function follows:
//! - it never unwinds: the body runs under [`guard`], a panic becomes `PHI4_ERR_INTERNAL`;
//! - every pointer is checked for NULL, every string for UTF-8, before use;
//! - outputs are written only on success, except the size output of BUFFER_TOO_SMALL
//!   ([`sized_output`]);
//! - a failure's message is recorded for the calling thread ([`guard`], [`fail`]: what
//!   `phi4_last_error` returns), and a session call's on the session too;
//! - `*_free` accepts NULL.
//!
//! Each exported function's doc states its pointer contract in C terms (it becomes the header),
//! hence no Rust-style `# Safety` sections.
#![allow(clippy::missing_safety_doc, non_camel_case_types)]

pub mod model;
pub mod scheduler;
pub mod session;

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of every fallible phi4 function.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum phi4_status {
    /// Success.
    PHI4_OK = 0,
    /// A required pointer was NULL.
    PHI4_ERR_NULL = 1,
    /// A parameter is out of range, or a string is not valid UTF-8.
    PHI4_ERR_INVALID_ARGUMENT = 2,
    /// The model file could not be opened or read.
    PHI4_ERR_IO = 3,
    /// The file is not a valid Phi-4 GGUF model.
    PHI4_ERR_BAD_MODEL = 4,
    /// Memory could not be allocated.
    PHI4_ERR_OUT_OF_MEMORY = 5,
    /// The prompt does not fit the session's context.
    PHI4_ERR_CONTEXT_OVERFLOW = 6,
    /// Another call is running on this session.
    PHI4_ERR_BUSY = 7,
    /// Cancelled by the progress callback (loading).
    PHI4_ERR_CANCELLED = 8,
    /// An output buffer is too small; the size needed was written.
    PHI4_ERR_BUFFER_TOO_SMALL = 9,
    /// A bug in phi4 (caught; the process is intact).
    PHI4_ERR_INTERNAL = 10,
    /// A saved session state is damaged, or of another model or format version.
    PHI4_ERR_BAD_STATE = 11,
}

pub use phi4_status::*;

/// An error: a status and a message.
pub(crate) struct Error(pub phi4_status, pub String);

impl Error {
    pub fn new(status: phi4_status, msg: impl Into<String>) -> Error {
        Error(status, msg.into())
    }
}

/// What an exported function returns when its body panics (a bug in phi4, caught).
pub(crate) trait OnPanic {
    fn on_panic() -> Self;
}

impl OnPanic for phi4_status {
    fn on_panic() -> Self {
        PHI4_ERR_INTERNAL
    }
}

impl OnPanic for () {
    fn on_panic() -> Self {}
}

impl OnPanic for u32 {
    fn on_panic() -> Self {
        0
    }
}

impl OnPanic for *const c_char {
    fn on_panic() -> Self {
        c"internal error".as_ptr()
    }
}

/// The body of every exported function: a panic inside never unwinds into C; the function
/// returns its type's [`OnPanic`] value instead.
macro_rules! ffi_boundary {
    ($($body:tt)*) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| { $($body)* })) {
            Ok(v) => v,
            Err(_) => $crate::ffi::OnPanic::on_panic(),
        }
    };
}
pub(crate) use ffi_boundary;

/// Run `f` under the boundary, turning its error (or a panic, with its message) into a status
/// whose message becomes the calling thread's [`phi4_last_error`].
pub(crate) fn guard(f: impl FnOnce() -> Result<(), Error>) -> phi4_status {
    guard_with(|_| (), f)
}

/// [`guard`], and `record` keeps the message elsewhere too (a session's, for other threads).
pub(crate) fn guard_with(
    record: impl FnOnce(&Error),
    f: impl FnOnce() -> Result<(), Error>,
) -> phi4_status {
    let e = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return PHI4_OK,
        Ok(Err(e)) => e,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned());
            Error::new(
                PHI4_ERR_INTERNAL,
                format!("internal error: {}", msg.unwrap_or_default()),
            )
        }
    };
    fail(e, record)
}

/// A failed call's status, its message recorded: this thread's, and by `record`. Recording
/// must not unwind either (it takes locks, writes buffers).
pub(crate) fn fail(e: Error, record: impl FnOnce(&Error)) -> phi4_status {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        set_last_error(&e.1);
        record(&e)
    }));
    e.0
}

/// An opaque C handle: a `Box<Self>` handed to C as a pointer, borrowed back by [`borrow`]
/// and released by [`free`].
pub(crate) trait Handle: Sized {
    /// The argument name in error messages.
    const NAME: &'static str;

    fn into_raw(self) -> *mut Self {
        Box::into_raw(Box::new(self))
    }
}

/// Borrow a handle argument (`PHI4_ERR_NULL` naming it when NULL).
///
/// # Safety
/// `p` is NULL or a live pointer from [`Handle::into_raw`], not freed during `'a`.
pub(crate) unsafe fn borrow<'a, T: Handle>(p: *const T) -> Result<&'a T, Error> {
    non_null(p, T::NAME)?;
    // SAFETY: non-null and live per the contract.
    Ok(unsafe { &*p })
}

/// Release a handle (NULL is a no-op).
///
/// # Safety
/// `p` is NULL or a live pointer from [`Handle::into_raw`], freed only once.
pub(crate) unsafe fn free<T: Handle>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: from into_raw, freed once per the contract.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// A non-NULL pointer, or `PHI4_ERR_NULL` naming the argument.
pub(crate) fn non_null<T>(p: *const T, what: &str) -> Result<*const T, Error> {
    if p.is_null() {
        Err(Error::new(PHI4_ERR_NULL, format!("{what} is NULL")))
    } else {
        Ok(p)
    }
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Error> {
    non_null(p, what)?;
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| {
        Error::new(
            PHI4_ERR_INVALID_ARGUMENT,
            format!("{what} is not valid UTF-8"),
        )
    })
}

/// A C `bool` in a struct the caller fills, read as its byte (`!= 0` is true): a Rust `bool`
/// holding any byte but 0 or 1 is undefined behaviour, and a caller's struct may hold any byte.
/// The header says `bool`.
pub type phi4_bool = u8;

/// The rule of every output with a size: `*len` gets `report` on success, and when `capacity`
/// is less than the `needed` items (PHI4_ERR_BUFFER_TOO_SMALL: `report` is then what to ask
/// for); `fill` writes `buf` (checked non-NULL) only when it fits. Nothing is written on any
/// other error.
///
/// # Safety
/// `len` is NULL or writable.
pub(crate) unsafe fn sized_output<T>(
    needed: usize,
    report: usize,
    capacity: usize,
    buf: *mut T,
    len: (*mut usize, &str),
    fill: impl FnOnce(*mut T) -> Result<(), Error>,
) -> Result<(), Error> {
    non_null(len.0, len.1)?;
    if needed > capacity {
        // SAFETY: non-null and writable per the contract.
        unsafe { len.0.write(report) };
        return Err(Error::new(
            PHI4_ERR_BUFFER_TOO_SMALL,
            format!(
                "the buffer holds {capacity} but {needed} are needed (written to {})",
                len.1
            ),
        ));
    }
    if needed > 0 {
        non_null(buf, "the buffer")?;
        fill(buf)?;
    }
    // SAFETY: as above.
    unsafe { len.0.write(report) };
    Ok(())
}

/// Copy `s` into the caller's `text` buffer (`capacity` bytes, NUL-terminated), its length in
/// `*len`, by the rule of [`sized_output`].
///
/// # Safety
/// `len` is NULL or writable; `text` is NULL or points to `capacity` writable bytes.
pub(crate) unsafe fn write_text(
    s: &str,
    text: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> Result<(), Error> {
    // SAFETY: per this function's contract.
    unsafe {
        sized_output(s.len() + 1, s.len(), capacity, text, (len, "len"), |text| {
            // SAFETY: text has room for capacity >= s.len() + 1 bytes.
            std::ptr::copy_nonoverlapping(s.as_ptr(), text.cast(), s.len());
            text.add(s.len()).write(0);
            Ok(())
        })
    }
}

/// An array argument of `len` items (NULL allowed when `len` is 0).
///
/// # Safety
/// `p` points to `len` readable items (or `len` is 0).
pub(crate) unsafe fn array<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], Error> {
    if len == 0 {
        return Ok(&[]);
    }
    non_null(p, what)?;
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Error::new(
            PHI4_ERR_INVALID_ARGUMENT,
            format!("{what}: {len} items is impossibly many"),
        ));
    }
    // SAFETY: p is non-null and points to len items per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `*out = value` (the body of every `phi4_*_default_params`).
///
/// # Safety
/// `out` is NULL or points to a writable `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T) -> phi4_status {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: non-null and writable per the contract.
        unsafe { out.write(value) };
        Ok(())
    })
}

/// Write the first `min(size, size_of::<T>())` bytes of `value` (a params struct starting with
/// its `size_t struct_size`, set to the number of bytes written) to `out`.
///
/// # Safety
/// `out` is NULL or points to `size` writable bytes.
pub(crate) unsafe fn write_prefix<T: Copy>(out: *mut T, value: T, size: usize) -> phi4_status {
    guard(|| {
        non_null(out, "out")?;
        if size < std::mem::size_of::<usize>() {
            return Err(Error::new(
                PHI4_ERR_INVALID_ARGUMENT,
                format!("size {size} is smaller than the struct_size field"),
            ));
        }
        let n = size.min(std::mem::size_of::<T>());
        let mut v = value;
        // SAFETY: T starts with a usize (struct_size) per the contract.
        unsafe { (&mut v as *mut T as *mut usize).write(n) };
        // SAFETY: out has `size` >= n writable bytes; v is n readable bytes.
        unsafe { std::ptr::copy_nonoverlapping(&v as *const T as *const u8, out as *mut u8, n) };
        Ok(())
    })
}

/// Read a versioned params struct: start from `defaults` and take the first
/// `min(caller's struct_size, ours)` bytes from the caller, so a caller compiled against an older
/// (shorter) struct keeps the defaults of fields added since.
///
/// # Safety
/// `p` is NULL (use the defaults) or points to a struct whose first field is a `size_t`
/// `struct_size` holding the number of readable bytes.
pub(crate) unsafe fn read_params<T: Copy>(
    p: *const T,
    defaults: T,
    what: &str,
) -> Result<T, Error> {
    if p.is_null() {
        return Ok(defaults);
    }
    // SAFETY: the struct starts with a size_t per the contract.
    let size = unsafe { *(p as *const usize) };
    let ours = std::mem::size_of::<T>();
    if size < std::mem::size_of::<usize>() || size > 1 << 16 {
        return Err(Error::new(
            PHI4_ERR_INVALID_ARGUMENT,
            format!("{what}.struct_size {size} is invalid (use the *_default_params function)"),
        ));
    }
    let mut out = defaults;
    // SAFETY: the caller's struct has `size` readable bytes; we copy at most `ours` into a T.
    unsafe {
        std::ptr::copy_nonoverlapping(
            p as *const u8,
            &mut out as *mut T as *mut u8,
            size.min(ours),
        )
    };
    // Our struct_size field now holds the caller's; that is fine, it is not read again.
    Ok(out)
}

const MESSAGE_MAX: usize = 1024;
type MessageBuf = [u8; MESSAGE_MAX];

/// Store `msg` in `buf` NUL-terminated (NULs replaced, cut at a character boundary to fit).
fn store_message(buf: &mut MessageBuf, msg: &str) {
    let mut end = msg.len().min(MESSAGE_MAX - 1);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    buf[..end].copy_from_slice(&msg.as_bytes()[..end]);
    buf[..end]
        .iter_mut()
        .filter(|b| **b == 0)
        .for_each(|b| *b = b'?');
    buf[end] = 0;
}

thread_local! {
    // Messages handed to C, one buffer per thread each: a pointer stays valid for the thread's
    // life and no other thread writes to it. Plain arrays, constant-initialized: no destructor,
    // so they still work while the thread exits (a call from a TLS destructor or atexit handler).
    /// The message of this thread's last failed call (phi4_last_error).
    static LAST_ERROR: RefCell<MessageBuf> = const { RefCell::new([0; MESSAGE_MAX]) };
    /// The copy of a session's last error that phi4_session_last_error returned on this thread.
    static SESSION_ERROR: RefCell<MessageBuf> = const { RefCell::new([0; MESSAGE_MAX]) };
    /// The session (address) whose last call on this thread returned PHI4_ERR_BUSY, or 0.
    static BUSY_ON: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// That PHI4_ERR_BUSY's message.
    static BUSY_TEXT: RefCell<MessageBuf> = const { RefCell::new([0; MESSAGE_MAX]) };
}

/// Note which session this thread's last call was on, and the message if it was busy.
pub(crate) fn note_busy(session: usize, busy: Option<&str>) {
    BUSY_ON.with(|b| b.set(if busy.is_some() { session } else { 0 }));
    if let Some(msg) = busy {
        BUSY_TEXT.with(|b| store_message(&mut b.borrow_mut(), msg));
    }
}

/// The message of the PHI4_ERR_BUSY this thread's last call on `session` returned, if it did.
pub(crate) fn busy_message(session: usize) -> Option<String> {
    (BUSY_ON.with(|b| b.get()) == session).then(|| {
        BUSY_TEXT.with(|b| {
            let b = b.borrow();
            CStr::from_bytes_until_nul(&b[..])
                .map_or_else(|_| String::new(), |s| s.to_string_lossy().into_owned())
        })
    })
}

/// Copy `msg` into this thread's buffer for session errors; returns the pointer for C.
pub(crate) fn session_error_ptr(msg: &str) -> *const c_char {
    SESSION_ERROR.with(|b| {
        let mut b = b.borrow_mut();
        store_message(&mut b, msg);
        b.as_ptr().cast()
    })
}

pub(crate) fn to_cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{FFFD}")).expect("NULs replaced")
}

pub(crate) fn set_last_error(msg: &str) {
    LAST_ERROR.with(|e| store_message(&mut e.borrow_mut(), msg));
}

// The version as the header's macros (C reads them at compile time; phi4_version() is the
// library's at run time). A unit test keeps them equal to the package version.
/// The library's major version, the N of its SONAME `libphi4.so.N`: a new one breaks the ABI.
#[allow(dead_code)]
pub const PHI4_VERSION_MAJOR: u32 = 0;
/// The library's minor version: it grows with the ABI (a function, a field at the end of a
/// params struct, a value of an enum added) and keeps what was there, so a program can test
/// for a feature at compile time (`#if PHI4_VERSION_MINOR >= 2`). 2: phi4_scheduler_*,
/// phi4_session_new_on, phi4_session_{save,load}_*, phi4_session_copy, phi4_cpu_variant,
/// phi4_last_error, phi4_generate_params.format, the PHI4_* limits. 3: phi4_session_embed.
/// 4: tools and log-probabilities (phi4_generate_params.tools … top_logprobs, the role "tool",
/// phi4_session_last_tool_calls, phi4_session_last_logprobs). 5: speculative decoding
/// (phi4_generate_params.draft, phi4_result.drafted and accepted, PHI4_MAX_DRAFT,
/// PHI4_DEFAULT_DRAFT). 6: quantized KV caches (phi4_session_params.kv_type, phi4_kv_type).
#[allow(dead_code)]
pub const PHI4_VERSION_MINOR: u32 = 6;
/// The library's patch version.
#[allow(dead_code)]
pub const PHI4_VERSION_PATCH: u32 = 0;

// The limits, for C (the library's own are in src/limits.rs; these must equal them).
/// The largest context a session may have (`phi4_session_params.n_ctx`).
pub const PHI4_MAX_CONTEXT: u32 = 16384;
/// The context of a session whose `n_ctx` is 0 (or the model's, if smaller).
pub const PHI4_DEFAULT_CONTEXT: u32 = 4096;
/// `phi4_session_params.n_batch`'s default.
pub const PHI4_DEFAULT_BATCH: u32 = 512;
/// The most threads a session or scheduler may ask for.
pub const PHI4_MAX_THREADS: u32 = 512;
/// The most sessions a step of a scheduler may take (`phi4_scheduler_new`'s `max_batch`).
pub const PHI4_MAX_BATCH: u32 = 64;
/// The most calls one reply makes (`phi4_generate_params.parallel_tool_calls`).
pub const PHI4_MAX_TOOL_CALLS: u32 = 16;
/// The most alternatives per token (`phi4_generate_params.top_logprobs`, the size of
/// `phi4_token_logprob.top_tokens`).
pub const PHI4_MAX_TOP_LOGPROBS: u32 = 20;
/// The most tokens drafted per step (`phi4_generate_params.draft`).
pub const PHI4_MAX_DRAFT: u32 = 16;
/// The tokens drafted per step unless a generation asks otherwise (`phi4_generate_params.draft`).
pub const PHI4_DEFAULT_DRAFT: u32 = 7;
const _: () = {
    use crate::limits::*;
    assert!(PHI4_MAX_CONTEXT as usize == MAX_CONTEXT);
    assert!(PHI4_DEFAULT_CONTEXT as usize == DEFAULT_CONTEXT);
    assert!(PHI4_DEFAULT_BATCH as usize == DEFAULT_BATCH);
    assert!(PHI4_MAX_THREADS as usize == MAX_THREADS);
    assert!(PHI4_MAX_BATCH as usize == MAX_BATCH);
    assert!(PHI4_MAX_TOOL_CALLS as usize == MAX_TOOL_CALLS);
    assert!(PHI4_MAX_TOP_LOGPROBS as usize == MAX_TOP_LOGPROBS);
    assert!(PHI4_MAX_DRAFT as usize == MAX_DRAFT);
    assert!(PHI4_DEFAULT_DRAFT as usize == DEFAULT_DRAFT);
};

/// The message of the last call on the calling thread that failed (returned a status other
/// than PHI4_OK), whatever the function; "" if none has. Read it on the thread that made the
/// call, before that thread's next failing call replaces it (a successful call leaves it). The
/// pointer stays valid for the thread's life. Thread-safe.
#[no_mangle]
pub extern "C" fn phi4_last_error() -> *const c_char {
    ffi_boundary! { LAST_ERROR.with(|e| e.borrow().as_ptr().cast()) }
}

/// The older name of phi4_last_error (phi4 0.1 recorded only loads and new sessions there).
#[no_mangle]
pub extern "C" fn phi4_last_load_error() -> *const c_char {
    phi4_last_error()
}

/// The version of the library linked at run time, e.g. "0.3.0" (PHI4_VERSION_* are the
/// header's). Static; never NULL.
#[no_mangle]
pub extern "C" fn phi4_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The CPU kernel variant that runs: the best one of this build that the CPU and OS support
/// (e.g. "avx2", "avx512_vnni", "armv8-a", "dotprod", "i8mm"). Static; never NULL.
#[no_mangle]
pub extern "C" fn phi4_cpu_variant() -> *const c_char {
    static VARIANT: std::sync::OnceLock<CString> = std::sync::OnceLock::new();
    ffi_boundary! { VARIANT.get_or_init(|| to_cstring(crate::ggml::cpu_variant())).as_ptr() }
}

/// CPU features ggml uses on this machine (those of `phi4_cpu_variant()`), space-separated
/// (e.g. "AVX AVX2 F16C FMA AVX512", or "NEON ARM_FMA DOTPROD"). Static; never NULL.
#[no_mangle]
pub extern "C" fn phi4_cpu_features() -> *const c_char {
    static FEATURES: std::sync::OnceLock<CString> = std::sync::OnceLock::new();
    ffi_boundary! { FEATURES.get_or_init(|| to_cstring(&crate::ggml::cpu_features().join(" "))).as_ptr() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_macros_match_the_package() {
        let v = [
            super::PHI4_VERSION_MAJOR,
            super::PHI4_VERSION_MINOR,
            super::PHI4_VERSION_PATCH,
        ]
        .map(|n| n.to_string())
        .join(".");
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
    }
}
