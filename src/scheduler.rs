//! Where every session's graphs run: a [`Scheduler`] owns one [`Engine`] (threads, compute
//! buffer) and steps the sessions made on it. A lone session has a private one of batch size 1;
//! sessions that share one decode in the same steps.
//!
//! Decoding reads every weight once per step, whatever the number of tokens the step takes, so
//! N sessions each stepping alone read the weights N times per token; stepped together, once.
//! A [`Scheduler`] owns one [`Engine`] (threads, compute buffer) for all its sessions:
//!
//! - a session puts its work in the queue and waits: a token while it decodes, a micro-batch
//!   of its prompt while it prefills;
//! - the first waiting session whose work is still queued leads a step once every decoding
//!   session has queued a token (or a quarter of a step after the oldest came): it takes up to `max_batch`
//!   of them, at most one a prompt's micro-batch, runs one graph over their caches, hands each
//!   its logits and wakes them. A new request's prompt thus joins the running decodes instead
//!   of waiting for them (or stopping them) — and the cores never run two graphs at once.
//!
//! Each session's tokens are those it would produce alone: attention stays per cache, and in a
//! step of decoding sessions a token's logits are those of a lone step, bit for bit (see
//! `Engine::step`); a step that also takes a prompt's micro-batch may sum ggml's matrix
//! products in another order.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::{EvalError, SessionError};
use crate::forward::{Engine, Segment};
use crate::kv_cache::KvCache;
use crate::limits::{self, cpu_count, VERIFY_PER_STEP};
use crate::model::Model;

pub use crate::limits::MAX_BATCH;
/// How long a queued token waits for the other decoding sessions' before a step goes without
/// them: a quarter of the last step (their sampling takes a small part of a step), within these
/// bounds.
const GATHER_MIN: Duration = Duration::from_millis(2);
const GATHER_MAX: Duration = Duration::from_millis(50);

/// An engine that advances the sessions made on it ([`crate::Session::with_scheduler`])
/// together. Cloning it is cheap (the clones share the engine); it lives as long as a clone or
/// a session on it does. All its methods may be called from any thread.
#[derive(Clone)]
pub struct Scheduler(Arc<Shared>);

struct Shared {
    model: Arc<Model>,
    max_batch: usize,
    n_threads: usize,
    engine: Mutex<Engine>,
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: Mutex<Steps>,
}

/// What a scheduler's steps have done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Steps {
    pub steps: u64,
    /// Tokens the steps took (prompts' included).
    pub tokens: u64,
    /// Requests (sessions) in the widest step.
    pub widest: usize,
}

#[derive(Default)]
struct Queue {
    /// Sessions in their decode loop: each will queue a token soon.
    decoding: usize,
    waiting: Vec<Request>,
    done: Vec<Done>,
    next_ticket: u64,
    stepping: bool,
    /// When the oldest waiting request was queued.
    since: Option<Instant>,
    /// How long the last step took.
    last_step: Duration,
}

/// What a step hands back to a request: the logits of its last token, of every token (a
/// decode token and its drafts, verified), or the final hidden states of all its tokens (one
/// row each: what embeddings pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    Last,
    Every,
    Hidden,
}

struct Request {
    ticket: u64,
    kv: Arc<Mutex<KvCache>>,
    /// A token, or a micro-batch of a prompt (the session's buffer, handed back with `logits`).
    tokens: Vec<u32>,
    n_past: usize,
    /// The session's output buffer, filled by the step with `output` and handed back.
    out: Vec<f32>,
    output: Output,
    /// The session's cancel flag: it aborts a step that carries this request alone.
    cancel: Arc<AtomicBool>,
}

struct Done {
    ticket: u64,
    result: Result<(), EvalError>,
    tokens: Vec<u32>,
    out: Vec<f32>,
}

/// A step of several sessions is never aborted: a session's cancel flag takes effect after it
/// (one token, or one micro-batch of a prompt). A step of one session aborts on its flag.
static NEVER: AtomicBool = AtomicBool::new(false);

impl Scheduler {
    /// A scheduler for sessions on `model`, stepping up to `max_batch` (1..=[`MAX_BATCH`]) of
    /// them at once on `n_threads` threads (1..=[`MAX_THREADS`], at most the CPUs).
    pub fn new(
        model: Arc<Model>,
        n_threads: usize,
        max_batch: usize,
    ) -> Result<Scheduler, SessionError> {
        limits::check_threads(n_threads).map_err(SessionError::BadParams)?;
        limits::check_max_batch(max_batch).map_err(SessionError::BadParams)?;
        if !model.is_loaded() {
            return Err(SessionError::BadParams(
                "the model is only declared (Model::declare): load it to run it".into(),
            ));
        }
        let n_threads = n_threads.min(cpu_count());
        let engine = Engine::new(&model, n_threads, max_batch).map_err(EvalError::from)?;
        Ok(Scheduler(Arc::new(Shared {
            model,
            max_batch,
            n_threads,
            engine: Mutex::new(engine),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            stats: Mutex::new(Steps::default()),
        })))
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.0.model
    }

    pub fn n_threads(&self) -> usize {
        self.0.n_threads
    }

    pub fn max_batch(&self) -> usize {
        self.0.max_batch
    }

    /// What the steps have done so far.
    pub fn steps(&self) -> Steps {
        *self.0.stats.lock()
    }

    /// Bytes of the shared compute buffer.
    pub fn compute_buffer_size(&self) -> usize {
        self.0.engine.lock().compute_buffer_size()
    }

    /// Make room in the shared engine for a session's cache and micro-batches.
    pub(crate) fn join(&self, kv: &KvCache, n_batch: usize) -> Result<(), EvalError> {
        Ok(self.0.engine.lock().reserve(&self.0.model, kv, n_batch)?)
    }

    /// Count the caller as decoding until the guard drops: steps wait for its tokens.
    pub(crate) fn decoding(&self) -> Decoding<'_> {
        self.0.queue.lock().decoding += 1;
        Decoding(&self.0)
    }

    /// Queue `tokens` (in the session's buffer: a decode token, or a micro-batch of a prompt,
    /// checked by the caller) of `kv` at `n_past`, and wait for the step that evaluates them —
    /// leading it if no one else does; `out` gets `output` (of the last token, or of every one). `cancel` aborts
    /// the step if it carries this request alone (else it takes effect after the step).
    pub(crate) fn submit(
        &self,
        kv: &Arc<Mutex<KvCache>>,
        tokens: &mut Vec<u32>,
        n_past: usize,
        (out, output): (&mut Vec<f32>, Output),
        cancel: &Arc<AtomicBool>,
    ) -> Result<(), EvalError> {
        if cancel.load(Ordering::Relaxed) {
            return Err(EvalError::Cancelled);
        }
        let sh = &*self.0;
        let mut q = sh.queue.lock();
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.waiting.push(Request {
            ticket,
            kv: kv.clone(),
            tokens: std::mem::take(tokens),
            n_past,
            out: std::mem::take(out),
            output,
            cancel: cancel.clone(),
        });
        q.since.get_or_insert_with(Instant::now);
        sh.wake.notify_all();
        loop {
            if let Some(i) = q.done.iter().position(|d| d.ticket == ticket) {
                let done = q.done.swap_remove(i);
                *tokens = done.tokens;
                *out = done.out;
                return done.result;
            }
            let queued = q.waiting.iter().any(|r| r.ticket == ticket);
            if q.stepping || !queued {
                sh.wake.wait(&mut q);
                continue;
            }
            let deadline = q.since.unwrap_or_else(Instant::now)
                + (q.last_step / 4).clamp(GATHER_MIN, GATHER_MAX);
            if q.waiting.len() < q.decoding.min(sh.max_batch) && Instant::now() < deadline {
                sh.wake.wait_until(&mut q, deadline);
                continue;
            }
            self.lead(&mut q, ticket);
        }
    }

    /// Take up to `max_batch` queued requests, oldest first, at most one of them a prompt's
    /// micro-batch and [`VERIFY_PER_STEP`] of them drafts to verify; step them (the queue unlocked meanwhile), post their results. A panic in the
    /// step fails every other request of it and goes on in the leader (whose ticket is `mine`).
    fn lead(&self, q: &mut MutexGuard<'_, Queue>, mine: u64) {
        let sh = &*self.0;
        let mut batch: Vec<Request> = Vec::with_capacity(sh.max_batch);
        let (mut i, mut prompt, mut verify) = (0, false, 0);
        while i < q.waiting.len() && batch.len() < sh.max_batch {
            let r = &q.waiting[i];
            let is_verify = r.output == Output::Every;
            let is_prompt = r.tokens.len() > 1 && !is_verify;
            if (is_prompt && prompt) || (is_verify && verify == VERIFY_PER_STEP) {
                i += 1;
                continue;
            }
            prompt |= is_prompt;
            verify += usize::from(is_verify);
            batch.push(q.waiting.remove(i));
        }
        q.since = if q.waiting.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        q.stepping = true;
        let started = Instant::now();
        let outcome = MutexGuard::unlocked(q, || {
            panic::catch_unwind(AssertUnwindSafe(|| self.step(&mut batch)))
        });
        q.stepping = false;
        q.last_step = started.elapsed();
        // Requests queued during the step could not join it: their wait for the others (those
        // just stepped, now sampling their next token) starts now.
        if !q.waiting.is_empty() {
            q.since = Some(Instant::now());
        }
        let result = outcome
            .as_ref()
            .map_or(Err(EvalError::StepFailed), Clone::clone);
        let posted = batch
            .into_iter()
            .filter(|r| outcome.is_ok() || r.ticket != mine);
        q.done.extend(posted.map(|r| Done {
            ticket: r.ticket,
            result: result.clone(),
            tokens: r.tokens,
            out: r.out,
        }));
        sh.wake.notify_all();
        if let Err(p) = outcome {
            panic::resume_unwind(p);
        }
    }

    /// One graph over every request's cache; each request's output filled from it.
    fn step(&self, batch: &mut [Request]) -> Result<(), EvalError> {
        let sh = &*self.0;
        let mut engine = sh.engine.lock();
        let caches: Vec<_> = batch.iter().map(|r| r.kv.lock()).collect();
        let segments: Vec<_> = batch
            .iter()
            .zip(&caches)
            .map(|(r, kv)| Segment {
                kv,
                tokens: &r.tokens,
                n_past: r.n_past,
                every: r.output == Output::Every,
            })
            .collect();
        let abort = match &*batch {
            [alone] => &*alone.cancel,
            _ => &NEVER,
        };
        let all_rows = batch.iter().any(|r| r.output == Output::Hidden);
        engine.step(&sh.model, &segments, all_rows, abort)?;
        drop(segments);
        drop(caches);
        let (n_vocab, n_embd) = (sh.model.config.n_vocab, sh.model.config.n_embd);
        let (mut first, mut row) = (0, 0);
        for r in batch.iter_mut() {
            let n = r.tokens.len();
            let n_out = if r.output == Output::Every { n } else { 1 };
            let rows = match r.output {
                Output::Last | Output::Every => {
                    &engine.logits[row * n_vocab..(row + n_out) * n_vocab]
                }
                Output::Hidden => &engine.hidden[first * n_embd..(first + n) * n_embd],
            };
            first += n;
            row += n_out;
            r.out.clear();
            r.out.extend_from_slice(rows);
        }
        let mut stats = sh.stats.lock();
        stats.steps += 1;
        stats.tokens += batch.iter().map(|r| r.tokens.len() as u64).sum::<u64>();
        stats.widest = stats.widest.max(batch.len());
        Ok(())
    }
}

/// A session in its decode loop (see [`Scheduler::decoding`]).
pub(crate) struct Decoding<'a>(&'a Shared);

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        self.0.queue.lock().decoding -= 1;
        // Steps waiting for this session's token go without it.
        self.0.wake.notify_all();
    }
}
