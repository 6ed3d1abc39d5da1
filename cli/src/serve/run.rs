//! A [`Job`] run into events: a session leased, the reply generated off the async runtime and
//! streamed back. A client that goes away cancels its generation (within one micro-batch of
//! prefill, or one token).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use phi4::chat::{self, Markers, Message, Role};
use phi4::{Outcome, Session, SessionError, Token};
use tokio::sync::mpsc;

use super::job::{EmbedJob, Job, Prompt, Scope};
use super::pool::{Pool, Refusal};
use super::prompt_cache::PromptCache;
use super::ApiError;

/// What a running generation reports.
pub enum Event {
    /// Text (possibly empty) and, when asked for, the log-probability of the token that made it.
    Piece(String, Option<Box<Scored>>),
    Done(Box<Outcome>, Vec<u32>, u64),
    Failed(ApiError),
}

/// A token's text, bytes and log-probability.
pub struct Alt {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely alternatives at its position.
pub struct Scored {
    pub token: Alt,
    pub top: Vec<Alt>,
}

impl Alt {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "token": self.text, "logprob": self.logprob, "bytes": self.bytes })
    }
}

impl Scored {
    /// As Ollama and OpenAI's chat API write a token's entry: `{token, logprob, bytes,
    /// top_logprobs: [{token, logprob, bytes}]}`.
    pub fn json(&self) -> serde_json::Value {
        let mut v = self.token.json();
        v["top_logprobs"] = self.top.iter().map(Alt::json).collect();
        v
    }

    fn of(t: &Token, tok: &phi4::tokenizer::Tokenizer) -> Option<Box<Scored>> {
        let lp = t.logprob.as_ref()?;
        let alt = |id: u32, logprob: f32| {
            let bytes = tok.piece(id, false).to_vec();
            Alt {
                text: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob,
            }
        };
        Some(Box::new(Scored {
            token: alt(t.id, lp.logprob),
            top: lp.top.iter().map(|&(id, p)| alt(id, p)).collect(),
        }))
    }
}

/// Start `job` on a leased session: events arrive on the returned channel. The first event is
/// `Failed` when the request cannot run (busy, overflow, bad input): nothing was streamed yet.
pub async fn start(pool: &Arc<Pool>, job: Job) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(64);
    let started = job.admission.started;
    // The prompt's tokens choose the session; chat prompts are tokenized by the session itself.
    let loading = job.admission.loading.clone();
    let lease_key = match &job.prompt {
        Prompt::Raw(ids) => ids.clone(),
        Prompt::Chat(msgs) => match pool.chat_tokens(msgs.clone(), loading.clone()).await {
            Ok(ids) => ids,
            Err(e) => {
                let _ = tx.send(Event::Failed(ApiError::internal(e))).await;
                return rx;
            }
        },
    };
    let lease = match pool
        .lease(&job.admission, lease_key, job.shape, job.scope)
        .await
    {
        Ok(l) => l,
        Err(r) => {
            let _ = tx.send(Event::Failed(refused(r))).await;
            return rx;
        }
    };
    // The client going away (the receiver dropped) cancels the generation. The watcher ends
    // before the session goes back to the pool, so that a late cancel can never reach the
    // session's next request.
    let cancel = lease.session.cancel_flag();
    let watcher = tx.clone();
    let (ended, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let watch = tokio::spawn(async move {
        tokio::select! {
            biased;
            _ = ended_rx => {}
            _ = watcher.closed() => cancel.store(true, Ordering::Relaxed),
        }
    });
    let pool = pool.clone();
    let pieces = tx.clone();
    let mut job = job;
    job.params.draft = job.shape.draft.unwrap_or(pool.draft);
    let cache_pool = pool.clone();
    // The request keeps its place until its session is back in the pool.
    let admission = job.admission;
    let generation = tokio::task::spawn_blocking(move || {
        let mut lease = lease;
        let model = lease.session.model().clone();
        let mut on_token = |token: Option<&Token>, piece: &str| {
            let scored = token.and_then(|t| Scored::of(t, &model.tokenizer));
            (piece.is_empty() && scored.is_none())
                || pieces
                    .blocking_send(Event::Piece(piece.to_string(), scored))
                    .is_ok()
        };
        let result = match &job.prompt {
            Prompt::Chat(msgs) => lease.session.chat(msgs, &job.params, &mut on_token),
            Prompt::Raw(ids) => lease.session.generate(ids, &job.params, &mut on_token),
        };
        let event = match result {
            Ok(mut out) => {
                // The model's load counts for the request that loaded it only.
                out.timings.load_duration = loading.load(Ordering::Relaxed);
                // The request's log line, now that its token counts are known.
                let t = &out.timings;
                let drafts = match t.drafted {
                    0 => String::new(),
                    n => format!(" (drafted {n}, accepted {})", t.accepted),
                };
                eprintln!(
                    "{} 200 tokens in {} (new), out {}{drafts}, {} {:.1}ms",
                    job.label,
                    t.prompt_eval_count,
                    t.eval_count,
                    out.reason.as_str(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                if let (Some(cache), Prompt::Chat(msgs)) = (&cache_pool.cache, &job.prompt) {
                    keep_system_turn(cache, &lease.session, msgs, job.scope);
                }
                Event::Done(
                    Box::new(out),
                    lease.session.history().to_vec(),
                    started.elapsed().as_nanos() as u64,
                )
            }
            Err(e) => Event::Failed(session_error(e)),
        };
        (lease, event, job.keep_alive)
    });
    tokio::spawn(async move {
        let result = generation.await;
        drop(ended);
        let _ = watch.await;
        match result {
            // The session is back in the pool before the client hears the end: its next
            // request (or an unload) finds it free.
            Ok((lease, event, keep_alive)) => {
                pool.give_back(lease, keep_alive);
                drop(admission);
                let _ = tx.send(event).await;
            }
            Err(e) => {
                let _ = tx
                    .send(Event::Failed(ApiError::internal(format!(
                        "the generation failed: {e}"
                    ))))
                    .await;
            }
        }
    });
    rx
}

/// Embeddings of a job's texts, not normalised, and the tokens they took.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    /// Nanoseconds spent loading the model (when this request loaded it).
    pub load: u64,
    /// Nanoseconds from the start.
    pub total: u64,
}

/// Run an embedding job: its texts tokenized, a session leased, each text embedded in it
/// (cut to the context if `truncate`, else refused when longer).
pub async fn embed(pool: &Arc<Pool>, job: EmbedJob) -> Result<Embedded, ApiError> {
    let started = job.admission.started;
    let texts = job.texts;
    let p = pool.clone();
    let loading = job.admission.loading.clone();
    let tokens = tokio::task::spawn_blocking(move || {
        let model = p.model_for(&loading).map_err(ApiError::internal)?;
        Ok::<_, ApiError>(
            texts
                .iter()
                .map(|t| model.tokenizer.encode(t, false))
                .collect::<Vec<_>>(),
        )
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    if let Some(i) = tokens.iter().position(|t| t.is_empty()) {
        return Err(ApiError::bad(format!(
            "input {i} is empty: nothing to embed"
        )));
    }
    let Some(first) = tokens.first() else {
        return Ok(Embedded {
            vectors: vec![],
            prompt_tokens: 0,
            load: job.admission.load_duration(),
            total: started.elapsed().as_nanos() as u64,
        });
    };
    let lease = pool
        .lease(&job.admission, first.clone(), job.shape, job.scope)
        .await
        .map_err(refused)?;
    let truncate = job.truncate;
    // The session goes back to the pool when the work ends, whether or not the client waits for
    // it; a client that goes away (this future dropped) cancels the work.
    let cancel = CancelOnDrop(Arc::new(std::sync::Mutex::new(Some(
        lease.session.cancel_flag(),
    ))));
    let reach = cancel.0.clone();
    let (done, result) = tokio::sync::oneshot::channel();
    let (back, keep_alive, admission) = (pool.clone(), job.keep_alive, job.admission);
    let label = job.label.clone();
    let load = admission.load_duration();
    tokio::spawn(async move {
        let work = tokio::task::spawn_blocking(move || {
            let mut lease = lease;
            let result = embed_all(&mut lease.session, tokens, truncate);
            (lease, result)
        });
        let result = match work.await {
            Ok((lease, result)) => {
                // No cancel may reach the session once it is back in the pool, and none
                // stays set.
                if let Some(flag) = reach.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    flag.store(false, Ordering::Relaxed);
                }
                back.give_back(lease, keep_alive);
                result
            }
            Err(e) => Err(ApiError::internal(format!("the embedding failed: {e}"))),
        };
        drop(admission);
        if let (Err(e), true) = (&result, done.is_closed()) {
            eprintln!("{label} {}: {}", e.status.as_u16(), e.message);
        }
        let _ = done.send(result);
    });
    let result = result.await;
    drop(cancel);
    let (vectors, prompt_tokens) =
        result.map_err(|_| ApiError::internal("the embedding ended without a result"))??;
    eprintln!(
        "{} 200 inputs {}, tokens {prompt_tokens} {:.1}ms",
        job.label,
        vectors.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(Embedded {
        vectors,
        prompt_tokens,
        load,
        total: started.elapsed().as_nanos() as u64,
    })
}

/// Each text's embedding in `session`, and the tokens they took: a text longer than the
/// context is cut to it if `truncate`, else refused.
fn embed_all(
    session: &mut Session,
    tokens: Vec<Vec<u32>>,
    truncate: bool,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let n_ctx = session.n_ctx();
    let cancel = session.cancel_flag();
    let (mut vectors, mut n) = (Vec::with_capacity(tokens.len()), 0);
    for (i, mut t) in tokens.into_iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(ApiError::internal("cancelled: the client went away"));
        }
        if t.len() > n_ctx && !truncate {
            return Err(ApiError::bad(format!(
                "input {i} takes {} tokens, more than the context's {n_ctx} (truncate: false)",
                t.len()
            )));
        }
        t.truncate(n_ctx);
        vectors.push(session.embed(&t).map_err(session_error)?);
        n += t.len();
    }
    Ok((vectors, n))
}

/// Sets a session's cancel flag when dropped, unless the work already took the flag away (the
/// session went back to the pool).
struct CancelOnDrop(Arc<std::sync::Mutex<Option<Arc<std::sync::atomic::AtomicBool>>>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let flag = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flag) = flag.as_ref() {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// A lease refused: the request's fault (400) or the server's (500).
fn refused(r: Refusal) -> ApiError {
    match r {
        Refusal::Invalid(e) => ApiError::bad(e),
        Refusal::Failed(e) => ApiError::internal(e),
    }
}

/// Start `job` and wait for its first event; a failure before anything was generated is
/// returned as the error (an HTTP error, not a broken stream).
pub async fn begin(pool: &Arc<Pool>, job: Job) -> Result<(Event, mpsc::Receiver<Event>), ApiError> {
    let mut rx = start(pool, job).await;
    match rx.recv().await {
        None => Err(ApiError::internal("the generation ended without a result")),
        Some(Event::Failed(e)) => Err(e),
        Some(first) => Ok((first, rx)),
    }
}

/// A finished reply: its text, its tokens' log-probabilities (when asked for), its outcome,
/// the session's tokens and the total time.
pub struct Reply {
    pub text: String,
    pub logprobs: Vec<Scored>,
    pub outcome: Box<Outcome>,
    pub history: Vec<u32>,
    pub total: u64,
}

/// All of a reply that is not streamed.
pub async fn collect(first: Event, mut rx: mpsc::Receiver<Event>) -> Result<Reply, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut event = first;
    loop {
        match event {
            Event::Piece(p, scored) => {
                text.push_str(&p);
                logprobs.extend(scored.map(|s| *s));
            }
            Event::Done(outcome, history, total) => {
                return Ok(Reply {
                    text,
                    logprobs,
                    outcome,
                    history,
                    total,
                })
            }
            Event::Failed(e) => return Err(e),
        }
        event = rx
            .recv()
            .await
            .ok_or_else(|| ApiError::internal("the generation ended without a result"))?;
    }
}

/// Save the state of the conversation's system turn (when it has one and the session holds it).
fn keep_system_turn(cache: &PromptCache, session: &Session, msgs: &[Message], scope: Scope) {
    let Some(system) = msgs.first().filter(|m| m.role == Role::System) else {
        return;
    };
    let tok = &session.model().tokenizer;
    let Ok(markers) = Markers::of(tok) else {
        return;
    };
    let turn = chat::turn(
        tok,
        markers,
        Role::System,
        Some(tok.encode(&system.content, false)),
    );
    if session.history().starts_with(&turn) {
        cache.keep(session, turn.len(), scope);
    }
}

fn session_error(e: SessionError) -> ApiError {
    match e {
        SessionError::ContextOverflow { needed, n_ctx } => ApiError::bad(format!(
            "the prompt needs {needed} tokens but the context holds {n_ctx}: raise options.num_ctx (at most the model's) or shorten the conversation"
        )),
        SessionError::BadParams(m) => ApiError::bad(m),
        e @ SessionError::Constraint(_) => ApiError::bad(e.to_string()),
        e @ SessionError::Eval(phi4::EvalError::BadToken { .. }) => ApiError::bad(e.to_string()),
        e => ApiError::internal(e.to_string()),
    }
}

/// The events as NDJSON lines, `first` included.
pub fn async_stream(
    first: Event,
    rx: tokio::sync::mpsc::Receiver<Event>,
    mut line: impl FnMut(Event) -> String + Send + 'static,
) -> impl tokio_stream::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let rest = tokio_stream::wrappers::ReceiverStream::new(rx);
    let all = tokio_stream::StreamExt::chain(tokio_stream::once(first), rest);
    tokio_stream::StreamExt::map(all, move |e| Ok(Bytes::from(line(e))))
}

/// A fresh id for a tool call (`call_` and 24 hex digits, unique in practice).
pub fn call_id() -> String {
    new_id("call_")
}

/// A fresh id: `prefix` and 24 hex digits, unique in practice.
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mix = (t ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    format!(
        "{prefix}{:016x}{:08x}",
        mix,
        (n as u32) ^ std::process::id()
    )
}
