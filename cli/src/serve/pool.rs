//! The model and its sessions, shared by the requests: a request leases the free session whose
//! cache shares the longest prefix with its prompt (so a chat client that re-sends the history
//! pays for its new turn only), runs on it off the async runtime, and gives it back. At most
//! `parallel` requests generate at once; up to `max_queue` more wait; the rest are refused —
//! when they arrive, before their bodies are parsed or their prompts tokenized ([`Pool::admit`]).
//!
//! With `parallel` above 1 the sessions share one scheduler: requests decoding at the same time
//! are stepped together, reading the weights once per step for all of them (their threads are
//! the scheduler's, so a request's `num_thread` does not apply then).
//!
//! The model is loaded on demand and unloaded, with its sessions, when its keep-alive runs out.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use phi4::{LoadParams, Model, Scheduler, Session, SessionParams};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::job::{Admission, KeepAlive, Scope, Shape};
use super::prompt_cache::PromptCache;

pub struct Pool {
    path: PathBuf,
    /// Threads, batch and overflow policy of every session (the context comes per request).
    session: SessionParams,
    parallel: Arc<Semaphore>,
    max_queue: usize,
    /// Requests admitted and not yet ended: generating, or waiting for a session.
    admitted: Arc<AtomicUsize>,
    state: Mutex<State>,
    /// Saved system prompts (`--prompt-cache-dir`).
    pub cache: Option<PromptCache>,
    /// Tokens drafted per step for a request that names no `draft` (`--draft`).
    pub draft: usize,
}

enum Slot {
    Empty,
    /// A session, how it was made, and the scope of the prefix its cache holds.
    Idle(Box<Session>, SessionParams, Scope),
    Leased,
}

struct State {
    model: Option<Arc<Model>>,
    /// The sessions' shared engine (with `parallel` > 1), made with the first session.
    scheduler: Option<Scheduler>,
    slots: Vec<Slot>,
    expires: Option<Instant>,
}

/// Why a request got no session.
pub enum Refusal {
    /// The request's parameters do not fit the model (its context, say).
    Invalid(String),
    /// The model could not be loaded, or a session not be made.
    Failed(String),
}

/// A context larger than the one the server's memory plan was made for (a request's num_ctx):
/// refused when its session's KV cache alone is more than the memory available now.
fn check_kv_room(model: &Model, want: &SessionParams) -> Result<(), Refusal> {
    let need = want.kv_type.bytes_per_token(&model.config) * want.n_ctx as u64;
    let avail = phi4::memory::available().map_err(Refusal::Failed)?;
    match avail {
        Some(a) if need > a.bytes => Err(Refusal::Invalid(format!(
            "num_ctx {}: its KV cache ({}) needs {:.2} GiB, and {:.2} GiB is available ({})",
            want.n_ctx,
            want.kv_type,
            need as f64 / (1u64 << 30) as f64,
            a.bytes as f64 / (1u64 << 30) as f64,
            a.source
        ))),
        _ => Ok(()),
    }
}

/// A session lent to one request; give it back with [`Pool::give_back`].
pub struct Lease {
    pub session: Session,
    params: SessionParams,
    scope: Scope,
    slot: usize,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(
        path: PathBuf,
        parallel: usize,
        max_queue: usize,
        session: SessionParams,
        cache: Option<PromptCache>,
        draft: usize,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            path,
            session,
            parallel: Arc::new(Semaphore::new(parallel)),
            max_queue,
            admitted: Arc::default(),
            state: Mutex::new(State {
                model: None,
                scheduler: None,
                slots: (0..parallel).map(|_| Slot::Empty).collect(),
                expires: None,
            }),
            cache,
            draft,
        })
    }

    /// The model file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model, loading it if needed (blocking: call off the async runtime).
    pub fn model(&self) -> Result<Arc<Model>, String> {
        self.model_for(&AtomicU64::default())
    }

    /// The model, loading it if needed; the time this call spent loading it is added to
    /// `loading` (a request's `load_duration`).
    pub fn model_for(&self, loading: &AtomicU64) -> Result<Arc<Model>, String> {
        if let Some(m) = &self.state().model {
            return Ok(m.clone());
        }
        let t = Instant::now();
        let loaded =
            Arc::new(Model::load(&self.path, LoadParams::default()).map_err(|e| e.to_string())?);
        let mut st = self.state();
        if st.model.is_none() {
            loading.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(st.model.get_or_insert(loaded).clone())
    }

    /// A conversation's tokens (to choose the session that holds most of them).
    pub async fn chat_tokens(
        self: &Arc<Self>,
        msgs: Vec<phi4::chat::Message>,
        loading: Arc<AtomicU64>,
    ) -> Result<Vec<u32>, String> {
        let pool = self.clone();
        let work = move || {
            let model = pool.model_for(&loading)?;
            let markers = phi4::chat::Markers::of(&model.tokenizer)?;
            Ok(phi4::chat::tokens(&model.tokenizer, markers, &msgs, true))
        };
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    }

    /// The loaded model and when it will be unloaded (None: never), if it is loaded.
    pub fn loaded(&self) -> Option<(Arc<Model>, Option<Instant>)> {
        let st = self.state();
        st.model.clone().map(|m| (m, st.expires))
    }

    /// Let a request in, or not (None: answer 503) when `parallel + max_queue` are in already:
    /// the first thing a generation request does, before any work on its body.
    pub fn admit(&self) -> Option<Admission> {
        Admission::within(&self.admitted, self.max_queue + self.state().slots.len())
    }

    /// Wait for a free session, then lease the one whose cache best matches `prompt` in
    /// `scope` (a session of another scope starts empty), with context `n_ctx` (0: the
    /// default). Only an admitted request waits.
    pub async fn lease(
        self: &Arc<Self>,
        admitted: &Admission,
        prompt: Vec<u32>,
        shape: Shape,
        scope: Scope,
    ) -> Result<Lease, Refusal> {
        let permit = self.parallel.clone().acquire_owned().await;
        let permit = permit.map_err(|_| Refusal::Failed("the server is shutting down".into()))?;
        let pool = self.clone();
        let loading = admitted.loading.clone();
        tokio::task::spawn_blocking(move || pool.take(&prompt, shape, scope, permit, &loading))
            .await
            .unwrap_or_else(|e| Err(Refusal::Failed(e.to_string())))
    }

    fn take(
        &self,
        prompt: &[u32],
        shape: Shape,
        scope: Scope,
        permit: OwnedSemaphorePermit,
        loading: &AtomicU64,
    ) -> Result<Lease, Refusal> {
        let model = self.model_for(loading).map_err(Refusal::Failed)?;
        let d = &self.session;
        let or = |v: usize, default: usize| if v == 0 { default } else { v };
        let mut want = SessionParams {
            n_ctx: or(shape.n_ctx, d.n_ctx),
            n_threads: or(shape.n_threads, d.n_threads),
            n_batch: or(shape.n_batch, d.n_batch),
            ..d.clone()
        };
        want.n_ctx = want.context_for(&model).map_err(Refusal::Invalid)?;
        want.check().map_err(Refusal::Invalid)?;
        let planned = d.context_for(&model).map_err(Refusal::Failed)?;
        if want.n_ctx > planned {
            check_kv_room(&model, &want)?;
        }
        let mut st = self.state();
        let scheduler = match &st.scheduler {
            _ if st.slots.len() == 1 => None,
            Some(s) => Some(s.clone()),
            None => {
                let s = Scheduler::new(model.clone(), d.n_threads, st.slots.len())
                    .map_err(|e| Refusal::Failed(e.to_string()))?;
                Some(st.scheduler.insert(s).clone())
            }
        };
        if let Some(s) = &scheduler {
            // The scheduler's threads run every session on it.
            want.n_threads = s.n_threads();
        }
        let common = |slot: &Slot| match slot {
            Slot::Idle(s, p, sc) if *p == want && *sc == scope => 2 + s.common_prefix(prompt),
            Slot::Idle(_, p, _) if *p == want => 1,
            _ => 0,
        };
        // A permit guarantees a slot that is not leased.
        let slot = (0..st.slots.len())
            .filter(|&i| !matches!(st.slots[i], Slot::Leased))
            .max_by_key(|&i| common(&st.slots[i]))
            .ok_or_else(|| Refusal::Failed("no free session".into()))?;
        let existing = std::mem::replace(&mut st.slots[slot], Slot::Leased);
        drop(st);
        let mut session = match existing {
            // Another scope's prefix is never reused: its tokens are forgotten first.
            Slot::Idle(mut s, p, sc) if p == want => {
                if sc != scope {
                    s.reset();
                }
                *s
            }
            _ => match scheduler.map_or_else(
                || Session::new(model, &want),
                |s| Session::with_scheduler(&s, &want),
            ) {
                Ok(s) => s,
                Err(e) => {
                    self.state().slots[slot] = Slot::Empty;
                    return Err(Refusal::Failed(e.to_string()));
                }
            },
        };
        if let Some(cache) = &self.cache {
            cache.restore(&mut session, prompt, scope);
        }
        Ok(Lease {
            session,
            params: want,
            scope,
            slot,
            _permit: permit,
        })
    }

    /// Take a session back after its request; the model stays loaded for `keep_alive`.
    pub fn give_back(&self, lease: Lease, keep_alive: KeepAlive) {
        let mut st = self.state();
        st.slots[lease.slot] = Slot::Idle(Box::new(lease.session), lease.params, lease.scope);
        st.expires = match keep_alive {
            KeepAlive::Forever => None,
            KeepAlive::For(d) => Some(Instant::now() + d),
        };
        self.unload_if_expired(&mut st);
    }

    /// Unload the model now, or as soon as its running requests end.
    pub fn unload(&self) -> Result<(), String> {
        let mut st = self.state();
        st.expires = Some(Instant::now());
        self.unload_if_expired(&mut st);
        Ok(())
    }

    /// Unload the model if its keep-alive ran out and no request uses it (called periodically).
    pub fn expire(&self) {
        let mut st = self.state();
        self.unload_if_expired(&mut st);
    }

    fn unload_if_expired(&self, st: &mut State) {
        let idle = !st.slots.iter().any(|s| matches!(s, Slot::Leased));
        if idle && st.expires.is_some_and(|t| Instant::now() >= t) {
            st.slots.iter_mut().for_each(|s| *s = Slot::Empty);
            st.model = None;
            st.scheduler = None;
            st.expires = None;
        }
    }
}
