//! Decoding does not grow memory token by token.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use phi4::model::{LoadParams, Model};
use phi4::session::{Session, SessionParams};
use phi4_synth::Spec;

/// Counts live Rust heap bytes.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: p was allocated by System with l.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The heap count is global: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rss_bytes() -> i64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<i64>().unwrap() * 4096
}

#[test]
fn decoding_does_not_grow_memory() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::tmpdir();
    let spec = Spec::small(2, common::ftype("q4_0"), 9);
    let path = common::synth_model(dir.path(), "m.gguf", &spec);
    let model = Arc::new(Model::load(&path, LoadParams::default()).unwrap());
    let mut st = Session::new(
        model,
        &SessionParams {
            n_ctx: 1024,
            n_batch: 64,
            n_threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let buffer = st.memory().1;

    let prompt: Vec<u32> = (0..100).collect();
    let mut next = phi4::sample::argmax(st.evaluate(&prompt).unwrap());
    let mut pos = prompt.len();
    let mut step = |st: &mut Session, pos: &mut usize| {
        next = phi4::sample::argmax(st.evaluate(&[next]).unwrap());
        *pos += 1;
    };
    for _ in 0..20 {
        step(&mut st, &mut pos);
    }
    let (heap0, rss0, pos0) = (LIVE.load(Ordering::Relaxed), rss_bytes(), pos);
    // (Fewer steps under an emulator, where only the heap and the buffer are checked.)
    let steps = if common::runner().is_some() { 200 } else { 800 };
    for _ in 0..steps {
        step(&mut st, &mut pos);
    }
    let (heap1, rss1) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    assert_eq!(heap1, heap0, "Rust heap grew while decoding");
    assert_eq!(
        st.memory().1,
        buffer,
        "the compute buffer was re-planned larger"
    );
    if common::runner().is_some() {
        // Under qemu-user /proc/self/statm is the emulator's, whose translated code grows.
        eprintln!("under an emulator: RSS is checked in the native test run");
        return;
    }
    // The only memory allowed to become resident: the KV cache rows just written
    // (2 layers x K and V x 128 f16 per token), plus a few pages of slack.
    let kv_written = (pos - pos0) as i64 * 2 * 2 * 128 * 2;
    assert!(
        rss1 - rss0 <= kv_written + 64 * 4096,
        "RSS grew {} bytes for {} bytes of cache",
        rss1 - rss0,
        kv_written
    );
}

/// Many conversations on one session do not accumulate: what the session keeps of its replies
/// (their exact token ids, for the next turn) is limited to the current conversation.
#[test]
fn finished_replies_do_not_accumulate() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use phi4::chat::{Message, Role};
    let model = Arc::new(
        Model::load(
            &common::fixture("phi4-tiny-docs.gguf"),
            LoadParams::default(),
        )
        .unwrap(),
    );
    let mut s = Session::new(
        model,
        &SessionParams {
            n_ctx: 512,
            n_batch: 64,
            n_threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let gp = phi4::GenerateParams {
        sampling: phi4::SamplingParams {
            seed: Some(1),
            ..Default::default()
        },
        max_tokens: 24,
        ..Default::default()
    };
    let mut turn = |i: usize| {
        let q = Message::new(
            Role::User,
            format!("Question {i}: what does module number {i} do?"),
        );
        let out = s
            .chat(std::slice::from_ref(&q), &gp, &mut |_, _| true)
            .unwrap();
        // A second turn that uses the reply, as a chat client does.
        let msgs = [
            q,
            Message::new(Role::Assistant, out.text),
            Message::new(Role::User, "And then?"),
        ];
        s.chat(&msgs, &gp, &mut |_, _| true).unwrap();
    };
    // (Fewer under an emulator, where each conversation is slow.)
    let (warm, n) = if common::runner().is_some() {
        (5, 25)
    } else {
        (20, 100)
    };
    (0..warm).for_each(&mut turn);
    let heap0 = LIVE.load(Ordering::Relaxed);
    (warm..warm + n).for_each(&mut turn);
    let grown = LIVE.load(Ordering::Relaxed) - heap0;
    assert!(
        grown < 16 * 1024,
        "the heap grew {grown} bytes over {n} conversations"
    );
}

/// The memory plan, made before anything is allocated on a declared model, is what loading and
/// running hold: the weights' bytes, each session's KV cache, the scheduler's compute buffer —
/// for every cache type, one session or several on a shared scheduler.
#[test]
fn the_plan_is_what_a_run_holds() {
    use phi4::memory::{largest_context, plan, PlanParams};
    use phi4::{KvType, Scheduler};
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::tmpdir();
    let synth = common::synth_model(
        dir.path(),
        "q4_k_m.gguf",
        &Spec::small(2, common::ftype("q4_k_m"), 61),
    );
    for path in [common::fixture("phi4-tiny-docs.gguf"), synth] {
        let declared = Model::declare(&path, LoadParams::default()).unwrap();
        let loaded = Arc::new(Model::load(&path, LoadParams::default()).unwrap());
        assert!(!declared.is_loaded() && loaded.is_loaded());
        assert_eq!(declared.resident, loaded.resident);
        assert_eq!(declared.repacked, loaded.repacked);
        let refused = Session::new(Arc::new(declared), &SessionParams::default());
        assert!(matches!(refused, Err(phi4::SessionError::BadParams(_))));
        let declared = Model::declare(&path, LoadParams::default()).unwrap();
        for kv in KvType::ALL {
            for sessions in [1, 3] {
                let p = PlanParams {
                    n_ctx: 256,
                    kv_type: kv,
                    sessions,
                    n_batch: 32,
                    n_threads: 2,
                };
                let want = plan(&declared, &p).unwrap();
                assert_eq!(plan(&loaded, &p).unwrap(), want, "declared or loaded");
                let sp = SessionParams {
                    n_ctx: 256,
                    n_batch: 32,
                    n_threads: 2,
                    kv_type: kv,
                    ..Default::default()
                };
                let (kv_bytes, compute) = if sessions == 1 {
                    let s = Session::new(loaded.clone(), &sp).unwrap();
                    let (kv_bytes, compute) = s.memory();
                    (kv_bytes, compute as u64)
                } else {
                    let sched = Scheduler::new(loaded.clone(), 2, sessions).unwrap();
                    let all: Vec<_> = (0..sessions)
                        .map(|_| Session::with_scheduler(&sched, &sp).unwrap())
                        .collect();
                    let kv_bytes = all.iter().map(|s| s.memory().0).sum();
                    (kv_bytes, sched.compute_buffer_size() as u64)
                };
                assert_eq!(
                    (kv_bytes, compute),
                    (want.kv_cache, want.compute),
                    "{kv}, {sessions}"
                );
                assert!(want.compute > 0 && want.work > 0);
            }
        }
        // The largest context that fits a budget: its plan fits, one more position does not.
        let p = PlanParams {
            n_threads: 2,
            ..Default::default()
        };
        let at = |n| {
            let q = PlanParams {
                n_ctx: n,
                ..p.clone()
            };
            plan(&declared, &q).unwrap().total()
        };
        let budget = at(300) + 1;
        let n = largest_context(&declared, &p, budget).unwrap();
        assert!(n >= 300 && at(n) <= budget && at(n + 1) > budget, "{n}");
        assert_eq!(largest_context(&declared, &p, 1000).unwrap(), 0);
    }
}
