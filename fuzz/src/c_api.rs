//! The C ABI driven by the fuzzer: a sequence of calls decoded from the input — sessions with
//! any params (sizes, enum values, NULLs), chats with any roles and texts, raw generation with
//! any ids, cancels, resets, rewinds, result structs of any size, tokenize/detokenize with any
//! capacities, and streaming callbacks that cancel, re-enter or free their session. Every call
//! must return a status (never PHI4_ERR_INTERNAL), and nothing may crash or leak.

use std::ffi::{c_char, c_void, CString};
use std::sync::OnceLock;

#[repr(C)]
struct Opaque {
    _p: [u8; 0],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SessionParams {
    struct_size: usize,
    n_ctx: u32,
    n_batch: u32,
    n_threads: u32,
    overflow: u32,
    kv_type: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct GenerateParams {
    struct_size: usize,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_last_n: u32,
    frequency_penalty: f32,
    presence_penalty: f32,
    seed: u64,
    max_tokens: u32,
    stop: *const *const c_char,
    n_stop: usize,
}

#[repr(C)]
struct Msg {
    role: *const c_char,
    content: *const c_char,
}

type StreamFn = Option<unsafe extern "C" fn(*mut c_void, *const c_char, usize) -> bool>;

extern "C" {
    fn phi4_model_load(path: *const c_char, params: *const c_void, out: *mut *mut Opaque) -> u32;
    fn phi4_session_default_params(out: *mut SessionParams) -> u32;
    fn phi4_generate_default_params(out: *mut GenerateParams) -> u32;
    fn phi4_session_new(
        model: *const Opaque,
        params: *const SessionParams,
        out: *mut *mut Opaque,
    ) -> u32;
    fn phi4_session_free(s: *mut Opaque);
    fn phi4_scheduler_new(
        model: *const Opaque,
        n_threads: u32,
        max_batch: u32,
        out: *mut *mut Opaque,
    ) -> u32;
    fn phi4_scheduler_free(s: *mut Opaque);
    fn phi4_session_new_on(
        s: *const Opaque,
        params: *const SessionParams,
        out: *mut *mut Opaque,
    ) -> u32;
    fn phi4_session_chat(
        s: *mut Opaque,
        m: *const Msg,
        n: usize,
        p: *const GenerateParams,
        cb: StreamFn,
        ud: *mut c_void,
    ) -> u32;
    fn phi4_session_generate(
        s: *mut Opaque,
        t: *const u32,
        n: usize,
        p: *const GenerateParams,
        cb: StreamFn,
        ud: *mut c_void,
    ) -> u32;
    fn phi4_session_cancel(s: *const Opaque) -> u32;
    fn phi4_session_reset(s: *mut Opaque) -> u32;
    fn phi4_session_rewind(s: *mut Opaque, n: usize) -> u32;
    fn phi4_session_n_cached(s: *mut Opaque, n: *mut usize) -> u32;
    fn phi4_session_last_result(s: *const Opaque, out: *mut u8) -> u32;
    fn phi4_session_last_error(s: *const Opaque) -> *const c_char;
    fn phi4_tokenize(
        m: *const Opaque,
        text: *const c_char,
        len: usize,
        special: bool,
        tokens: *mut u32,
        cap: usize,
        n: *mut usize,
    ) -> u32;
    fn phi4_detokenize(
        m: *const Opaque,
        tokens: *const u32,
        n: usize,
        special: bool,
        text: *mut c_char,
        cap: usize,
        len: *mut usize,
    ) -> u32;
}

const INTERNAL: u32 = 10;

struct Model(*mut Opaque);
// SAFETY: a phi4_model may be used from any thread.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

fn model() -> *mut Opaque {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let path =
            CString::new(super::corpus("model_load/tiny-q4_0.gguf").to_str().unwrap()).unwrap();
        let mut m = std::ptr::null_mut();
        // SAFETY: valid path and out pointer.
        assert_eq!(
            unsafe { phi4_model_load(path.as_ptr(), std::ptr::null(), &mut m) },
            0
        );
        Model(m)
    })
    .0
}

/// What the streaming callback does, chosen by the input.
struct Callback {
    session: *mut Opaque,
    action: u8,
    pieces: u32,
}

unsafe extern "C" fn on_piece(ud: *mut c_void, piece: *const c_char, len: usize) -> bool {
    // SAFETY: ud is the Callback passed with the call; piece holds len bytes and a NUL.
    let cb = unsafe { &mut *(ud as *mut Callback) };
    assert_eq!(unsafe { *piece.add(len) }, 0);
    cb.pieces += 1;
    unsafe {
        match cb.action % 6 {
            0 => true,
            1 => false,
            2 => {
                phi4_session_cancel(cb.session);
                true
            }
            3 => {
                let m = Msg {
                    role: c"user".as_ptr(),
                    content: c"x".as_ptr(),
                };
                assert_eq!(
                    phi4_session_chat(
                        cb.session,
                        &m,
                        1,
                        std::ptr::null(),
                        None,
                        std::ptr::null_mut()
                    ),
                    7,
                    "re-entry is BUSY"
                );
                true
            }
            4 => {
                phi4_session_free(cb.session); // deferred to the end of the call
                cb.session = std::ptr::null_mut();
                false
            }
            _ => !phi4_session_last_error(cb.session).is_null(),
        }
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn text(&mut self) -> CString {
        let n = (self.byte() % 24) as usize;
        let bytes: Vec<u8> = (0..n).map(|_| self.byte()).filter(|&b| b != 0).collect();
        CString::new(bytes).unwrap()
    }
}

/// The check of one input.
pub fn run(data: &[u8]) {
    let m = model();
    let mut input = Input(data);
    let mut sessions: Vec<*mut Opaque> = Vec::new();
    // A scheduler some sessions are opened on (made on first need; freed at any time: its
    // sessions keep it alive).
    let mut sched: *mut Opaque = std::ptr::null_mut();
    let mut ops = 0;
    while !input.0.is_empty() && ops < 24 {
        ops += 1;
        let op = input.byte() % 12;
        let pick = input.byte() as usize;
        let s = if sessions.is_empty() {
            std::ptr::null_mut()
        } else {
            sessions[pick % sessions.len()]
        };
        // SAFETY: every pointer passed is NULL, a live handle, or points to what the call reads.
        let st = unsafe {
            match op {
                0 | 1 => {
                    let mut p = std::mem::zeroed::<SessionParams>();
                    phi4_session_default_params(&mut p);
                    // One draw for both (kept inputs decode as before): a context, a cache type
                    // (3 is no phi4_kv_type).
                    let raw = input.u32();
                    p.n_ctx = raw % 300;
                    p.kv_type = raw / 300 % 4;
                    p.n_batch = input.u32() % 70;
                    p.n_threads = input.u32() % 4;
                    p.overflow = input.u32() % 4;
                    if input.byte() % 8 == 0 {
                        p.struct_size = input.u32() as usize % 64;
                    }
                    let mut out = std::ptr::null_mut();
                    let on_scheduler = input.byte() % 3 == 0;
                    if on_scheduler
                        && sched.is_null()
                        && phi4_scheduler_new(m, input.u32() % 3, input.u32() % 6, &mut sched) != 0
                    {
                        sched = std::ptr::null_mut();
                    }
                    let st = if on_scheduler {
                        phi4_session_new_on(sched, &p, &mut out)
                    } else {
                        phi4_session_new(m, &p, &mut out)
                    };
                    if st == 0 {
                        sessions.push(out);
                    }
                    st
                }
                2..=4 => {
                    let roles = [c"system", c"user", c"assistant", c"robot"];
                    let texts: Vec<(CString, CString)> = (0..1 + input.byte() % 3)
                        .map(|_| (roles[(input.byte() % 4) as usize].into(), input.text()))
                        .collect();
                    let msgs: Vec<Msg> = texts
                        .iter()
                        .map(|(r, c)| Msg {
                            role: r.as_ptr(),
                            content: c.as_ptr(),
                        })
                        .collect();
                    let mut g = std::mem::zeroed::<GenerateParams>();
                    phi4_generate_default_params(&mut g);
                    g.max_tokens = 1 + input.u32() % 4;
                    g.temperature = f32::from_bits(input.u32() & 0x407F_FFFF);
                    g.top_p = (input.byte() as f32) / 200.0;
                    g.seed = input.u32() as u64;
                    let mut cb = Callback {
                        session: s,
                        action: input.byte(),
                        pieces: 0,
                    };
                    let st = phi4_session_chat(
                        s,
                        msgs.as_ptr(),
                        if input.byte() % 16 == 0 {
                            0
                        } else {
                            msgs.len()
                        },
                        &g,
                        Some(on_piece),
                        &mut cb as *mut _ as *mut c_void,
                    );
                    if cb.session.is_null() {
                        sessions.retain(|&x| x != s);
                    }
                    st
                }
                5 => {
                    let ids: Vec<u32> = (0..input.byte() % 6).map(|_| input.u32() % 300).collect();
                    let mut cb = Callback {
                        session: s,
                        action: input.byte(),
                        pieces: 0,
                    };
                    let mut g = std::mem::zeroed::<GenerateParams>();
                    phi4_generate_default_params(&mut g);
                    g.max_tokens = 1 + input.u32() % 3;
                    let st = phi4_session_generate(
                        s,
                        ids.as_ptr(),
                        ids.len(),
                        &g,
                        Some(on_piece),
                        &mut cb as *mut _ as *mut c_void,
                    );
                    if cb.session.is_null() {
                        sessions.retain(|&x| x != s);
                    }
                    st
                }
                6 => phi4_session_cancel(s),
                7 => phi4_session_reset(s),
                8 => phi4_session_rewind(s, input.u32() as usize),
                9 => {
                    let mut n = 0usize;
                    let mut r = [0u8; 128];
                    let size = (input.byte() as usize % 80).max(8);
                    r[..8].copy_from_slice(&size.to_le_bytes());
                    phi4_session_n_cached(s, &mut n) | phi4_session_last_result(s, r.as_mut_ptr())
                }
                10 => {
                    let text = input.text();
                    let cap = input.byte() as usize % 16;
                    let mut toks = [0u32; 16];
                    let mut n = 0usize;
                    let st = phi4_tokenize(
                        m,
                        text.as_ptr(),
                        text.as_bytes().len(),
                        input.byte() % 2 == 0,
                        toks.as_mut_ptr(),
                        cap,
                        &mut n,
                    );
                    let mut out = [0 as c_char; 64];
                    let mut len = 0usize;
                    let ids: Vec<u32> = (0..input.byte() % 5).map(|_| input.u32() % 400).collect();
                    let st2 = phi4_detokenize(
                        m,
                        ids.as_ptr(),
                        ids.len(),
                        true,
                        out.as_mut_ptr(),
                        input.byte() as usize % 64,
                        &mut len,
                    );
                    if st == INTERNAL {
                        st
                    } else {
                        st2
                    }
                }
                _ => {
                    if !s.is_null() {
                        phi4_session_free(s);
                        sessions.retain(|&x| x != s);
                    }
                    if input.byte() % 4 == 0 {
                        phi4_scheduler_free(sched);
                        sched = std::ptr::null_mut();
                    }
                    0
                }
            }
        };
        assert_ne!(st, INTERNAL, "op {op} returned PHI4_ERR_INTERNAL");
    }
    for s in sessions {
        // SAFETY: live handles, freed once.
        unsafe { phi4_session_free(s) };
    }
    // SAFETY: NULL or a live handle, freed once.
    unsafe { phi4_scheduler_free(sched) };
}
