//! Sessions: a KV cache, the tokens it holds, and generation — chat turns or raw prompts — with
//! streaming, stop strings, cancellation and Ollama's timings.
//!
//! A new request reuses the longest prefix of tokens already in the cache and evaluates only the
//! rest; a history that diverges (an edited earlier turn) rewinds to the common prefix. A prompt
//! that does not fit is never cut silently: it is an error before any work, unless the session's
//! overflow policy allows dropping the oldest turns (the system message is kept), which the
//! outcome reports.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::chat::{self, Markers, Message, Role};
use crate::constrain::{Constraint, Guide};
use crate::draft::{Drafter, PromptLookup};
use crate::error::{EvalError, SessionError};
use crate::forward::Segment;
use crate::hash::{Map, Set};
use crate::kv_cache::{KvCache, KvType};
use crate::limits::{self, cpu_count, DEFAULT_BATCH, DEFAULT_CONTEXT, MAX_CONTEXT};
use crate::model::Model;
use crate::sample::{Sampler, SamplingParams};
use crate::scheduler::{Output, Scheduler};
use crate::state::{self, StateError};
use crate::tokenizer::StreamDecoder;
use crate::tools::{self, ToolCall, ToolChoice, Tools, CALL_OPEN};

/// What to do when a conversation no longer fits the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Fail with [`SessionError::ContextOverflow`] before doing any work.
    Error,
    /// Drop the oldest messages after the system message until the prompt fits.
    DropOldest,
}

/// How a session is made.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionParams {
    /// Positions in the KV cache: 1 ..= min(the model's context, [`MAX_CONTEXT`]).
    /// 0 means [`DEFAULT_CONTEXT`], or the model's context if that is smaller.
    pub n_ctx: usize,
    /// Prompt tokens per micro-batch (also the cancellation granularity of prefill).
    pub n_batch: usize,
    pub n_threads: usize,
    pub overflow: Overflow,
    /// What the KV cache keeps K and V in: f16 (the default), q8_0 or q4_0 — about 1/2 and
    /// 1/4 of the memory per position, at a small cost in accuracy (as llama.cpp's).
    pub kv_type: KvType,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            n_ctx: 0,
            n_batch: DEFAULT_BATCH,
            n_threads: cpu_count(),
            overflow: Overflow::Error,
            kv_type: KvType::F16,
        }
    }
}

impl SessionParams {
    /// Every value in range (the context is checked against the model by `context_for`).
    pub fn check(&self) -> Result<(), String> {
        if self.n_batch == 0 {
            return Err("n_batch must be at least 1".into());
        }
        limits::check_threads(self.n_threads)
    }

    /// The context these parameters give on `model`, or why they give none.
    pub fn context_for(&self, model: &Model) -> Result<usize, String> {
        let max = model.config.n_ctx_train.min(MAX_CONTEXT);
        match self.n_ctx {
            0 => Ok(max.min(DEFAULT_CONTEXT)),
            n if n <= max => Ok(n),
            n => Err(format!(
                "n_ctx {n} must be in 1..={max} (0 for the default)"
            )),
        }
    }
}

/// How one reply is generated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    /// Tokens to generate at most; 0 means until the context is full.
    pub max_tokens: usize,
    /// Generation ends before any of these strings; the string itself is not emitted.
    pub stop: Vec<String>,
    /// What the reply must be (JSON, a JSON Schema, a regex, a grammar): only tokens that keep
    /// it valid are sampled, and the reply ends when it is complete. None: free text.
    pub constraint: Option<Constraint>,
    /// Tools the model may call (chat only; not with `constraint`): described in the system
    /// message, the reply constrained to text or valid calls, the calls in [`Outcome::tool_calls`].
    pub tools: Option<Tools>,
    /// Report each generated token's log-probability ([`Token::logprob`]) with this many of the
    /// most likely alternatives (0..=[`limits::MAX_TOP_LOGPROBS`]); None: none.
    pub logprobs: Option<usize>,
    /// Speculative decoding: at most this many tokens (0..=[`limits::MAX_DRAFT`]; 0: off)
    /// drafted per step by prompt lookup ([`crate::PromptLookup`]) and verified in the step of
    /// the token before them. The reply is the same token for token; only the number of steps
    /// changes ([`Timings::drafted`], [`Timings::accepted`]).
    pub draft: usize,
}

impl Default for GenerateParams {
    fn default() -> GenerateParams {
        GenerateParams {
            sampling: SamplingParams::default(),
            max_tokens: 0,
            stop: Vec::new(),
            constraint: None,
            tools: None,
            logprobs: None,
            draft: limits::DEFAULT_DRAFT,
        }
    }
}

impl GenerateParams {
    /// Options of the reply itself (Ollama's names); the sampling ones are
    /// [`SamplingParams::OPTIONS`].
    pub const OPTIONS: &'static [(&'static str, &'static str)] = &[
        (
            "num_predict",
            "Tokens to generate at most; 0 means until the context is full.",
        ),
        (
            "stop",
            "Stop before this string (setting it again adds another).",
        ),
        (
            "draft",
            "Speculative decoding: tokens drafted per step by prompt lookup and verified together \
             (0: off; at most 16). The reply stays the same, in fewer steps when it repeats its input.",
        ),
    ];

    /// Every option by name, with its help: the reply's, then the sampler's.
    pub fn options() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
        Self::OPTIONS.iter().chain(SamplingParams::OPTIONS)
    }

    /// Set an option by name from its text form; the result is validated, and on error nothing
    /// changes.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let mut next = self.clone();
        match name {
            "num_predict" => {
                next.max_tokens = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("num_predict takes a whole number >= 0, not {value:?}"))?
            }
            "stop" => next.stop.push(value.to_string()),
            "draft" => {
                next.draft = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&n| n <= limits::MAX_DRAFT)
                    .ok_or_else(|| {
                        format!("draft takes 0..={}, not {value:?}", limits::MAX_DRAFT)
                    })?
            }
            _ => next.sampling.set(name, value)?,
        }
        next.sampling.validate()?;
        *self = next;
        Ok(())
    }

    /// An option's value in text form, by name.
    pub fn get(&self, name: &str) -> Option<String> {
        match name {
            "num_predict" => Some(self.max_tokens.to_string()),
            "stop" => Some(format!("{:?}", self.stop)),
            "draft" => Some(self.draft.to_string()),
            _ => self.sampling.get(name),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoneReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller cancelled (callback or cancel flag).
    Cancelled,
    /// The context filled up.
    ContextFull,
}

impl DoneReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DoneReason::Stop => "stop",
            DoneReason::Length => "length",
            DoneReason::Cancelled => "cancelled",
            DoneReason::ContextFull => "context_full",
        }
    }
}

/// Ollama's timings and counts for one generation (durations in nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timings {
    pub load_duration: u64,
    /// Tokens of the prompt, those found in the cache included.
    pub prompt_tokens: usize,
    /// Tokens evaluated for the prompt (the part not already in the cache).
    pub prompt_eval_count: usize,
    pub prompt_eval_duration: u64,
    /// Tokens generated.
    pub eval_count: usize,
    pub eval_duration: u64,
    /// Of `eval_duration`, the time spent choosing tokens: the constraint's mask, the sampler.
    pub sample_duration: u64,
    /// Tokens drafted (speculative decoding, [`GenerateParams::draft`]) and verified.
    pub drafted: usize,
    /// Of `drafted`, those the model agreed with: generated without a step of their own.
    pub accepted: usize,
    /// Of `eval_duration`, the time spent drafting.
    pub draft_duration: u64,
}

impl Timings {
    /// Tokens of the prompt found in the cache (not evaluated).
    pub fn cached_tokens(&self) -> usize {
        self.prompt_tokens.saturating_sub(self.prompt_eval_count)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub reason: DoneReason,
    pub timings: Timings,
    /// Messages dropped from the front of the conversation to make it fit.
    pub dropped_messages: usize,
    /// The whole reply text (what the callback received): with tools, the text before the calls.
    pub text: String,
    /// The calls the reply made (with tools), each complete and valid for its tool.
    pub tool_calls: Vec<ToolCall>,
    /// The stop string that ended the reply, if one did.
    pub stop_string: Option<String>,
}

/// A generated token, as the streaming callback receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    /// With [`GenerateParams::logprobs`]: the natural log of its probability under the model's
    /// logits (before penalties, temperature and any constraint's mask).
    pub logprob: Option<Logprob>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub logprob: f32,
    /// The most likely tokens at its position with theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The log-sum-exp of `logits` and its `n` largest entries as log-probabilities, largest first.
fn log_softmax_top(logits: &[f32], n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (id, &x) in logits.iter().enumerate() {
            if top.len() < n || x > top[top.len() - 1].1 {
                let at = top.partition_point(|&(_, y)| y >= x);
                top.insert(at, (id as u32, x));
                top.truncate(n);
            }
        }
    }
    top.iter_mut().for_each(|(_, x)| *x -= lse);
    (lse, top)
}

/// Scale `v` to unit length (L2; a zero vector stays zero): embeddings as Ollama's /api/embed
/// and OpenAI's return them, compared by dot product.
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
}

/// The streaming callback: `(Some(token) | None for a final flush, complete text) -> go on?`
pub type OnToken<'a> = dyn FnMut(Option<&Token>, &str) -> bool + 'a;

pub struct Session {
    model: Arc<Model>,
    /// Where this session's graphs run: its own (batch size 1), or one shared with other
    /// sessions, whose decode steps then take a token of each.
    scheduler: Scheduler,
    /// Whether `scheduler` was made for this session alone (its compute buffer is this
    /// session's memory).
    own_scheduler: bool,
    /// The cache (locked by the step that evaluates this session's tokens).
    kv: Arc<parking_lot::Mutex<KvCache>>,
    n_batch: usize,
    /// Logits of the last evaluated token (filled by the scheduler's step).
    logits: Vec<f32>,
    /// The tokens of the step this session waits for (handed to the scheduler and back).
    queued: Vec<u32>,
    overflow: Overflow,
    /// Tokens whose K and V are in the cache, in order.
    history: Vec<u32>,
    /// Replies generated here, text → their exact ids, so the next turn finds them in the cache.
    replies: Map<String, Vec<u32>>,
    /// The last generated token when it was not evaluated (generation ended right after it).
    last_token: Option<u32>,
    cancel: Arc<AtomicBool>,
}

impl Session {
    /// A session with its own threads and compute buffer (a scheduler of its own, batch size 1).
    pub fn new(model: Arc<Model>, p: &SessionParams) -> Result<Session, SessionError> {
        Session::make(model, p, None)
    }

    /// A session whose graphs run on `scheduler`'s engine: while other sessions on it decode,
    /// their tokens and this one's are evaluated in one step. `p.n_threads` is not used (the
    /// scheduler's threads run everything).
    pub fn with_scheduler(
        scheduler: &Scheduler,
        p: &SessionParams,
    ) -> Result<Session, SessionError> {
        Session::make(scheduler.model().clone(), p, Some(scheduler))
    }

    fn make(
        model: Arc<Model>,
        p: &SessionParams,
        shared: Option<&Scheduler>,
    ) -> Result<Session, SessionError> {
        p.check().map_err(SessionError::BadParams)?;
        let n_ctx = p.context_for(&model).map_err(SessionError::BadParams)?;
        p.kv_type
            .check(&model.config)
            .map_err(SessionError::BadParams)?;
        // The largest allocation first: the KV cache, then the threads, then the compute buffer.
        let kv = KvCache::new(&model.config, n_ctx, p.kv_type, false).map_err(EvalError::from)?;
        let scheduler = match shared {
            Some(s) => s.clone(),
            None => Scheduler::new(model.clone(), p.n_threads.min(cpu_count()), 1)?,
        };
        scheduler.join(&kv, p.n_batch)?;
        Ok(Session {
            logits: Vec::with_capacity(model.config.n_vocab),
            queued: Vec::with_capacity(p.n_batch.min(n_ctx)),
            model,
            scheduler,
            own_scheduler: shared.is_none(),
            kv: Arc::new(parking_lot::Mutex::new(kv)),
            n_batch: p.n_batch.min(n_ctx),
            overflow: p.overflow,
            history: Vec::with_capacity(n_ctx),
            replies: Map::default(),
            last_token: None,
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.lock().n_ctx
    }

    /// What the KV cache keeps K and V in.
    pub fn kv_type(&self) -> KvType {
        self.kv.lock().ty
    }

    /// Threads the forward pass runs on: the scheduler's (for a session's own, the requested
    /// number, at most [`cpu_count`]).
    pub fn n_threads(&self) -> usize {
        self.scheduler.n_threads()
    }

    /// The scheduler this session's graphs run on (its own, or the one it was made on).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Tokens currently in the cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// How many leading tokens of `tokens` the cache already holds (what a generation from
    /// them reuses).
    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.history
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// A flag that, once set (from any thread), cancels the running generation within one
    /// micro-batch. It is cleared when the next generation starts.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Memory this session holds: its KV cache and its compute buffer (none of its own on a
    /// shared scheduler), in bytes.
    pub fn memory(&self) -> (u64, usize) {
        let compute = match self.own_scheduler {
            true => self.scheduler.compute_buffer_size(),
            false => 0,
        };
        (
            self.kv_type().bytes_per_token(&self.model.config) * self.n_ctx() as u64,
            compute,
        )
    }

    /// Evaluate `tokens` at positions `n_past..`, a micro-batch of `n_batch` at a time, each in
    /// a step of the scheduler: afterwards `self.logits` holds the last one's. Cancelling takes
    /// effect within a micro-batch when the step carries this session alone (ggml checks
    /// between ops), else after it.
    fn eval(&mut self, tokens: &[u32], n_past: usize) -> Result<(), EvalError> {
        self.eval_for(tokens, n_past, Output::Last, |_| {})
    }

    /// [`Session::eval`], each step handing back `output` (`self.logits` is the buffer) to
    /// `each` before the next.
    fn eval_for(
        &mut self,
        tokens: &[u32],
        n_past: usize,
        output: Output,
        mut each: impl FnMut(&[f32]),
    ) -> Result<(), EvalError> {
        Segment {
            kv: &self.kv.lock(),
            tokens,
            n_past,
            every: false,
        }
        .check(self.model.config.n_vocab)?;
        for (i, chunk) in tokens.chunks(self.n_batch).enumerate() {
            self.queued.clear();
            self.queued.extend_from_slice(chunk);
            let past = n_past + i * self.n_batch;
            self.scheduler.submit(
                &self.kv,
                &mut self.queued,
                past,
                (&mut self.logits, output),
                &self.cancel,
            )?;
            each(&self.logits);
        }
        Ok(())
    }

    /// Forget everything in the cache.
    pub fn reset(&mut self) {
        self.history.clear();
        self.replies.clear();
    }

    /// Keep only the first `n` tokens of the cache.
    pub fn rewind(&mut self, n: usize) {
        self.history.truncate(n);
    }

    /// Evaluate what the cache lacks of `tokens` (the prefix it shares with the cache is kept):
    /// a prompt evaluated ahead of its reply, e.g. to save it ([`Session::save`]). Returns the
    /// number of tokens evaluated.
    pub fn warm(&mut self, tokens: &[u32]) -> Result<usize, SessionError> {
        self.cancel.store(false, Ordering::Relaxed);
        self.check_fits(tokens, tokens.len())?;
        let keep = self.common_prefix(tokens);
        self.history.truncate(keep);
        self.last_token = None;
        if keep < tokens.len() {
            self.eval(&tokens[keep..], keep)?;
            self.history.extend_from_slice(&tokens[keep..]);
        }
        Ok(tokens.len() - keep)
    }

    /// Bytes a saved state of the first `n` cached tokens takes ([`Session::save`]).
    pub fn state_size(&self, n: usize) -> u64 {
        state::size(&self.model, self.kv_type(), n.min(self.history.len()))
    }

    /// Save the first `n` tokens of the cache (all: `usize::MAX`) with their K/V rows to `path`,
    /// atomically (a temporary file renamed into place). Returns the bytes written.
    pub fn save(&self, path: &Path, n: usize) -> Result<u64, StateError> {
        let tokens = &self.history[..n.min(self.history.len())];
        state::save_file(path, |w| {
            state::write(&self.model, &self.kv.lock(), tokens, w)
        })?;
        Ok(state::size(&self.model, self.kv_type(), tokens.len()))
    }

    /// The saved state of the first `n` cached tokens, written to `w`.
    pub fn save_to(&self, w: &mut dyn std::io::Write, n: usize) -> std::io::Result<()> {
        state::write(
            &self.model,
            &self.kv.lock(),
            &self.history[..n.min(self.history.len())],
            w,
        )
    }

    /// Restore a state saved from a session of this model with this KV cache type: the cache
    /// becomes its tokens (the first `n_ctx` of them if it holds more). Returns how many. A
    /// state that is damaged, of another model, version or cache type (not converted: a clear
    /// error), leaves the session as it was.
    pub fn load(&mut self, path: &Path) -> Result<usize, StateError> {
        let file = state::open(path)?;
        self.restore(&file).map_err(|e| match e {
            StateError::Invalid(m) => StateError::Invalid(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// [`Session::load`] from bytes.
    pub fn load_bytes(&mut self, bytes: &[u8]) -> Result<usize, StateError> {
        self.restore(bytes)
    }

    fn restore(&mut self, src: &(impl state::Source + ?Sized)) -> Result<usize, StateError> {
        let checked = state::check(&self.model, self.kv_type(), src)?;
        let n = checked.tokens.len().min(self.n_ctx());
        // From here the cache's rows change: on an error it holds nothing usable.
        self.last_token = None;
        self.replies.clear();
        self.history.clear();
        state::restore(&checked, src, &self.kv.lock(), n)?;
        self.history.extend_from_slice(&checked.tokens[..n]);
        Ok(n)
    }

    /// Make this session's cache a copy of `other`'s (the first `n_ctx` tokens of it): sessions
    /// of one model, e.g. a server's, sharing one evaluated system prompt. Returns the tokens
    /// copied.
    pub fn copy_from(&mut self, other: &Session) -> Result<usize, StateError> {
        if self.model.fingerprint() != other.model.fingerprint() {
            return Err(StateError::Invalid(
                "the sessions are of different models".into(),
            ));
        }
        if self.kv_type() != other.kv_type() {
            return Err(StateError::Invalid(format!(
                "the sessions' KV caches are of different types ({} here, {} there)",
                self.kv_type(),
                other.kv_type()
            )));
        }
        let n = other.history.len().min(self.n_ctx());
        state::copy(&other.kv.lock(), &self.kv.lock(), n);
        self.history.clear();
        self.history.extend_from_slice(&other.history[..n]);
        self.replies = other.replies.clone();
        self.last_token = None;
        Ok(n)
    }

    /// Evaluate `tokens` after those in the cache, without sampling, and return the logits of
    /// the last one (one per vocabulary entry): for scoring text, or comparing engines.
    pub fn evaluate(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        if tokens.is_empty() {
            return Err(SessionError::BadParams("no tokens".into()));
        }
        self.last_token = None;
        self.eval(tokens, self.history.len())?;
        self.history.extend_from_slice(tokens);
        Ok(&self.logits)
    }

    /// The embedding of `tokens`: the mean of their final hidden states (the model's normed
    /// output before the vocabulary projection, as llama.cpp's mean pooling), `n_embd` numbers,
    /// not normalised. The tokens are evaluated from the start of the cache (which then holds
    /// them; a shared prefix with what it held is evaluated again, as every token's state is
    /// needed).
    pub fn embed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
        if tokens.is_empty() {
            return Err(SessionError::BadParams("no tokens to embed".into()));
        }
        self.cancel.store(false, Ordering::Relaxed);
        self.check_fits(tokens, tokens.len())?;
        self.history.clear();
        self.last_token = None;
        let n_embd = self.model.config.n_embd;
        let mut sum = vec![0f64; n_embd];
        self.eval_for(tokens, 0, Output::Hidden, |rows| {
            for row in rows.chunks_exact(n_embd) {
                sum.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
            }
        })?;
        self.history.extend_from_slice(tokens);
        Ok(sum
            .iter()
            .map(|s| (s / tokens.len() as f64) as f32)
            .collect())
    }

    /// Reply to a conversation (the last message is usually the user's). `on_token` is called
    /// for each generated token with its id and the text that became complete with it (possibly
    /// empty: a split character or a possible stop string is held back), and once more with
    /// `None` if held-back text is flushed at the end; returning false cancels.
    ///
    /// Chat = tokenize each message once (cancellable) → fit the context (drop the oldest turns
    /// if the policy allows) → generate.
    pub fn chat(
        &mut self,
        messages: &[Message],
        gp: &GenerateParams,
        on_token: &mut OnToken<'_>,
    ) -> Result<Outcome, SessionError> {
        self.cancel.store(false, Ordering::Relaxed);
        let markers = Markers::of(&self.model.tokenizer).map_err(SessionError::BadParams)?;
        let described;
        let messages = match &gp.tools {
            Some(t) => {
                t.check().map_err(SessionError::BadParams)?;
                described = t.describe(messages);
                &described
            }
            None => messages,
        };
        let Some(turns) = self.tokenize_turns(messages, markers) else {
            return Ok(Text::new(&[], false).outcome(DoneReason::Cancelled, self.timings()));
        };
        let reply_start = chat::turn(&self.model.tokenizer, markers, Role::Assistant, None);
        let (tokens, dropped) = self.fit(messages, &turns, &reply_start)?;
        let start = tokens.len();
        let mut out = self.run(&tokens, gp, &mut PromptLookup::new(), on_token)?;
        out.dropped_messages = dropped;
        self.remember_reply(messages, start, &out);
        Ok(out)
    }

    /// Each message's tokens (a reply generated here: its exact ids, since re-tokenizing its
    /// text need not give them back). None when cancelled.
    fn tokenize_turns(&self, messages: &[Message], markers: Markers) -> Option<Vec<Vec<u32>>> {
        let tok = &self.model.tokenizer;
        messages
            .iter()
            .map(|m| {
                let known = if m.role == Role::Assistant {
                    self.replies.get(&m.content).cloned()
                } else {
                    None
                };
                let content = match known {
                    Some(ids) => ids,
                    None => tok.encode_cancellable(&m.content, false, &self.cancel)?,
                };
                Some(chat::turn(tok, markers, m.role, Some(content)))
            })
            .collect()
    }

    /// The prompt: every turn, or (drop-oldest) without the oldest turns after the system
    /// message until it fits with room for one token. Returns it and the number dropped.
    fn fit(
        &self,
        messages: &[Message],
        turns: &[Vec<u32>],
        reply_start: &[u32],
    ) -> Result<(Vec<u32>, usize), SessionError> {
        let first = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
        let mut needed = turns.iter().map(Vec::len).sum::<usize>() + reply_start.len() + 1;
        let mut dropped = 0;
        while needed > self.n_ctx() {
            if self.overflow == Overflow::Error || turns.len() <= first + dropped + 1 {
                return Err(SessionError::ContextOverflow {
                    needed,
                    n_ctx: self.n_ctx(),
                });
            }
            needed -= turns[first + dropped].len();
            dropped += 1;
        }
        let kept = turns[..first].iter().chain(&turns[first + dropped..]);
        let tokens = kept.flatten().chain(reply_start).copied().collect();
        Ok((tokens, dropped))
    }

    /// Record the ids of a finished reply (when its text is exactly what they decode to; not after
    /// a stop string, which cuts the text short). Only replies of this conversation are kept, so
    /// the record never outgrows the conversation.
    fn remember_reply(&mut self, messages: &[Message], start: usize, out: &Outcome) {
        let in_conversation: Set<&str> = messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| m.content.as_str())
            .collect();
        self.replies
            .retain(|text, _| in_conversation.contains(text.as_str()));
        let mut ids = self.history.get(start..).unwrap_or_default().to_vec();
        ids.extend(self.last_token);
        // (With calls, the message that carries the reply back holds them as the model wrote them.)
        let text = tools::reply_text(&out.text, &out.tool_calls);
        if matches!(
            out.reason,
            DoneReason::Stop | DoneReason::Length | DoneReason::ContextFull
        ) && self.model.tokenizer.decode(&ids, false) == text
            && !text.is_empty()
        {
            self.replies.insert(text, ids);
        }
    }

    fn timings(&self) -> Timings {
        Timings {
            load_duration: self.model.load_duration,
            ..Default::default()
        }
    }

    /// Continue from `prompt` (token ids, no template), generating a reply; `on_token` as for
    /// [`Session::chat`]. Generate = check → prefill (only what the cache lacks) → decode → flush.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        gp: &GenerateParams,
        on_token: &mut OnToken<'_>,
    ) -> Result<Outcome, SessionError> {
        self.generate_drafted(prompt, gp, &mut PromptLookup::new(), on_token)
    }

    /// [`Session::generate`] with drafts (up to `gp.draft` per step) from `drafter` instead of
    /// prompt lookup: a drafter of one's own (another model, a retrieval index), or a test's.
    pub fn generate_drafted(
        &mut self,
        prompt: &[u32],
        gp: &GenerateParams,
        drafter: &mut dyn Drafter,
        on_token: &mut OnToken<'_>,
    ) -> Result<Outcome, SessionError> {
        self.cancel.store(false, Ordering::Relaxed);
        if gp.tools.is_some() {
            return Err(SessionError::BadParams(
                "tools need a conversation (chat), not a raw prompt".into(),
            ));
        }
        self.run(prompt, gp, drafter, on_token)
    }

    /// `generate` without clearing the cancel flag (a cancel during `chat`'s preparation holds).
    fn run(
        &mut self,
        prompt: &[u32],
        gp: &GenerateParams,
        drafter: &mut dyn Drafter,
        on_token: &mut OnToken<'_>,
    ) -> Result<Outcome, SessionError> {
        self.check_prompt(prompt, gp)?;
        let mut guide = self.guide(gp)?;
        self.last_token = None;
        let mut timings = self.timings();
        // (A reply has calls unless the choice is none: then it is free text, no grammar.)
        let calls = gp
            .tools
            .as_ref()
            .is_some_and(|t| t.choice != ToolChoice::None);
        let mut text = Text::new(&gp.stop, calls);
        if !self.prefill(prompt, &mut timings)? {
            return Ok(text.outcome(DoneReason::Cancelled, timings));
        }
        let t = Instant::now();
        let reason = self.decode(
            gp,
            guide.as_mut(),
            drafter,
            &mut timings,
            (&mut text, on_token),
        )?;
        text.flush(reason, on_token);
        timings.eval_duration = t.elapsed().as_nanos() as u64;
        Ok(text.outcome(reason, timings))
    }

    fn check_prompt(&self, prompt: &[u32], gp: &GenerateParams) -> Result<(), SessionError> {
        gp.sampling.validate().map_err(SessionError::BadParams)?;
        if gp.tools.is_some() && gp.constraint.is_some() {
            return Err(SessionError::BadParams(
                "tools and a format cannot be combined".into(),
            ));
        }
        if gp.draft > limits::MAX_DRAFT {
            return Err(SessionError::BadParams(format!(
                "draft {} is above {}",
                gp.draft,
                limits::MAX_DRAFT
            )));
        }
        if let Some(n) = gp.logprobs.filter(|&n| n > limits::MAX_TOP_LOGPROBS) {
            return Err(SessionError::BadParams(format!(
                "top_logprobs {n} is above {}",
                limits::MAX_TOP_LOGPROBS
            )));
        }
        if prompt.is_empty() {
            return Err(SessionError::BadParams("empty prompt".into()));
        }
        self.check_fits(prompt, prompt.len() + 1)
    }

    /// Every token in the vocabulary, and `needed` positions within the context.
    fn check_fits(&self, tokens: &[u32], needed: usize) -> Result<(), SessionError> {
        let n_vocab = self.model.config.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(EvalError::BadToken { id, n_vocab }.into());
        }
        if needed > self.n_ctx() {
            return Err(SessionError::ContextOverflow {
                needed,
                n_ctx: self.n_ctx(),
            });
        }
        Ok(())
    }

    /// The constraint of `gp` compiled for this generation, or why it does not compile.
    fn guide(&self, gp: &GenerateParams) -> Result<Option<Guide>, SessionError> {
        let tools = gp
            .tools
            .as_ref()
            .and_then(Tools::grammar)
            .map(Constraint::Lark);
        let Some(c) = tools.as_ref().or(gp.constraint.as_ref()) else {
            return Ok(None);
        };
        let compiled = self.model.constraints.compile(&self.model.tokenizer, c);
        compiled.map(Some).map_err(|e| {
            SessionError::Constraint(match tools {
                Some(_) => format!("the tools' parameters do not compile: {e}"),
                None => e,
            })
        })
    }

    /// Evaluate what the cache lacks of `prompt` (its last token always: its logits are needed).
    /// Returns false when cancelled.
    fn prefill(&mut self, prompt: &[u32], timings: &mut Timings) -> Result<bool, SessionError> {
        let keep = self.common_prefix(prompt).min(prompt.len() - 1);
        self.history.truncate(keep);
        let t = Instant::now();
        let new = &prompt[keep..];
        match self.eval(new, keep) {
            Ok(()) => {}
            Err(EvalError::Cancelled) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        self.history.extend_from_slice(new);
        timings.prompt_tokens = prompt.len();
        timings.prompt_eval_count = new.len();
        timings.prompt_eval_duration = t.elapsed().as_nanos() as u64;
        Ok(true)
    }

    /// Sample, emit and evaluate one token at a time until a reason to stop.
    /// With a guide, the logits are masked first, and the reply ends when it is complete.
    ///
    /// With drafts (`gp.draft` > 0), a token's step also evaluates the tokens `drafter` guesses
    /// after it, each with its logits: the next tokens are then sampled from those rows, exactly
    /// as they would be after steps of their own, and each one that equals its draft is already
    /// in the cache — no step. The first that differs ends the run: the drafts after it are
    /// dropped (the history, which says which rows of the cache hold, never took them) and its
    /// own step comes next. Sampling the model's token and comparing is the speculative-sampling
    /// rule for a draft that is one token for sure (accepted with the probability the model
    /// gives it, else a draw from the rest), so replies keep their distribution — and with a
    /// seed, their tokens: the draw per token is the same.
    fn decode(
        &mut self,
        gp: &GenerateParams,
        mut guide: Option<&mut Guide>,
        drafter: &mut dyn Drafter,
        timings: &mut Timings,
        (text, on_token): (&mut Text, &mut OnToken<'_>),
    ) -> Result<DoneReason, SessionError> {
        let model = self.model.clone();
        let tok = &model.tokenizer;
        let n_vocab = model.config.n_vocab;
        let mut sampler = Sampler::new(gp.sampling.clone());
        let scheduler = self.scheduler.clone();
        let _decoding = scheduler.decoding();
        // Tokens drafted after the history whose rows the cache holds, and the row of
        // `self.logits` that scores the next token (also: how many of the step's drafts were
        // taken so far).
        let mut ahead: Vec<u32> = Vec::with_capacity(gp.draft);
        let mut row = 0;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Ok(DoneReason::Cancelled);
            }
            let t = Instant::now();
            let logits = &mut self.logits[row * n_vocab..(row + 1) * n_vocab];
            let scores = gp.logprobs.map(|n| log_softmax_top(logits, n));
            if let Some(g) = guide.as_deref_mut() {
                g.mask(logits).map_err(SessionError::Constraint)?;
            }
            let id = sampler.sample(logits, &self.history);
            // (A token the mask allowed keeps its logit.)
            let token = Token {
                id,
                logprob: scores.map(|(lse, top)| Logprob {
                    logprob: logits[id as usize] - lse,
                    top,
                }),
            };
            if tok.end_of_generation.contains(&id) {
                return Ok(DoneReason::Stop);
            }
            // Drafted: its row is in the cache already, it needs no step.
            let drafted = ahead.first() == Some(&id);
            timings.accepted += usize::from(drafted);
            if let Some(g) = guide.as_deref_mut() {
                g.accept(id).map_err(SessionError::Constraint)?;
            }
            timings.sample_duration += t.elapsed().as_nanos() as u64;
            timings.eval_count += 1;
            self.last_token = Some(id);
            let (emit, stopped) = text.push(tok.piece(id, false));
            if !on_token(Some(&token), &emit) {
                return Ok(DoneReason::Cancelled);
            }
            if stopped || guide.as_deref().is_some_and(Guide::finished) {
                return Ok(DoneReason::Stop);
            }
            if gp.max_tokens > 0 && timings.eval_count >= gp.max_tokens {
                return Ok(DoneReason::Length);
            }
            if self.history.len() >= self.n_ctx() {
                return Ok(DoneReason::ContextFull);
            }
            if drafted {
                ahead.remove(0);
                if ahead.is_empty() {
                    drafter.verified(row + 1, row + 1);
                }
                self.history.push(id);
                self.last_token = None;
                row += 1;
                continue;
            }
            if !ahead.is_empty() {
                drafter.verified(row + ahead.len(), row);
            }
            // This token's step, with what follows it drafted: no further than the reply may go
            // (the tokens after the next one) or the context has room for.
            self.history.push(id);
            let t = Instant::now();
            ahead.clear();
            let left = match gp.max_tokens {
                0 => usize::MAX,
                n => n - timings.eval_count - 1,
            };
            let room = self.n_ctx() - self.history.len();
            let max = gp.draft.min(left).min(room);
            if max > 0 {
                drafter.draft(&self.history, max, &mut ahead);
                ahead.truncate(max);
                if let (Some(g), false) = (guide.as_deref_mut(), ahead.is_empty()) {
                    // Drafts the constraint would reject cannot be sampled: not verified.
                    ahead.truncate(g.valid_prefix(&ahead));
                }
            }
            timings.draft_duration += t.elapsed().as_nanos() as u64;
            timings.drafted += ahead.len();
            row = 0;
            let n_past = self.history.len() - 1;
            match self.eval_step(id, &ahead, n_past) {
                Ok(()) => self.last_token = None,
                Err(e) => {
                    self.history.pop();
                    return match e {
                        EvalError::Cancelled => Ok(DoneReason::Cancelled),
                        e => Err(e.into()),
                    };
                }
            }
        }
    }

    /// A decode step: `id` at `n_past`, and the `drafts` after it; afterwards `self.logits`
    /// holds a row per token (one row without drafts).
    fn eval_step(&mut self, id: u32, drafts: &[u32], n_past: usize) -> Result<(), EvalError> {
        self.queued.clear();
        self.queued.push(id);
        self.queued.extend_from_slice(drafts);
        let output = match drafts.is_empty() {
            true => Output::Last,
            false => Output::Every,
        };
        Segment {
            kv: &self.kv.lock(),
            tokens: &self.queued,
            n_past,
            every: false,
        }
        .check(self.model.config.n_vocab)?;
        self.scheduler.submit(
            &self.kv,
            &mut self.queued,
            n_past,
            (&mut self.logits, output),
            &self.cancel,
        )
    }
}

/// The reply's text as it streams: token bytes → whole UTF-8 characters → (with tools) text
/// before the first call marker → stop-string check. What follows the marker is the calls.
struct Text {
    utf8: StreamDecoder,
    /// With tools: finds the call marker (held back like a stop string).
    marker: Option<StopMatcher>,
    stops: StopMatcher,
    text: String,
    /// The text after the call marker, once it was written.
    calls: Option<String>,
}

impl Text {
    fn new(stop: &[String], calls: bool) -> Text {
        Text {
            utf8: StreamDecoder::default(),
            marker: calls.then(|| StopMatcher::new(&[CALL_OPEN.to_string()])),
            stops: StopMatcher::new(stop),
            text: String::new(),
            calls: None,
        }
    }

    /// A token's bytes in; the text that can be emitted now out, and whether a stop string ended it.
    fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        let mut piece = self.utf8.push(bytes);
        if let Some(calls) = &mut self.calls {
            calls.push_str(&piece);
            return (String::new(), false);
        }
        if let Some(m) = &mut self.marker {
            let (before, found) = m.push(&piece);
            if found {
                self.calls = Some(std::mem::take(&mut m.rest));
            }
            piece = before;
        }
        let (emit, stopped) = self.stops.push(&piece);
        self.text.push_str(&emit);
        (emit, stopped)
    }

    /// Text held back (an unfinished character, a partial stop string) is emitted unless the
    /// generation ended on a stop string or was cancelled.
    fn flush(&mut self, reason: DoneReason, on_token: &mut OnToken<'_>) {
        if matches!(reason, DoneReason::Length | DoneReason::ContextFull)
            || (reason == DoneReason::Stop && !self.stops.stopped)
        {
            let mut tail = self.utf8.finish();
            if let Some(calls) = &mut self.calls {
                calls.push_str(&tail);
                tail.clear();
            } else if let Some(m) = &mut self.marker {
                tail = m.finish(&tail);
            }
            let tail = self.stops.finish(&tail);
            if !tail.is_empty() {
                self.text.push_str(&tail);
                on_token(None, &tail);
            }
        }
    }

    fn outcome(self, reason: DoneReason, timings: Timings) -> Outcome {
        Outcome {
            reason,
            timings,
            dropped_messages: 0,
            text: self.text,
            tool_calls: self
                .calls
                .as_deref()
                .map(tools::parse_calls)
                .unwrap_or_default(),
            stop_string: self.stops.matched,
        }
    }
}

/// Finds stop strings in streamed text, across piece boundaries: text that could still be the
/// start of a stop string is held back until it is known not to be.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    pub stopped: bool,
    /// The stop string found, and the text after it.
    pub matched: Option<String>,
    pub rest: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
            matched: None,
            rest: String::new(),
        }
    }

    /// Add text; returns what can be emitted now and whether a stop string was found (the text
    /// before it is emitted, the stop string and anything after it are not).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some((pos, stop)) = self
            .stops
            .iter()
            .filter_map(|s| Some((self.held.find(s.as_str())?, s)))
            .min_by_key(|&(pos, s)| (pos, s.len()))
        {
            self.stopped = true;
            let out = self.held[..pos].to_string();
            self.rest = self.held[pos + stop.len()..].to_string();
            self.matched = Some(stop.clone());
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail of the text that is a proper prefix of a stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// Whatever is held back, plus `tail`, once no more text is coming.
    pub fn finish(&mut self, tail: &str) -> String {
        let (mut out, stopped) = self.push(tail);
        if !stopped {
            out.push_str(&self.held);
            self.held.clear();
        }
        out
    }
}
