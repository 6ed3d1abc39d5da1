//! One generation for a request: options checked, a session leased, the reply generated off
//! the async runtime and streamed back as events. A client that goes away cancels its
//! generation (within one micro-batch of prefill, or one token).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use phi4::chat::{self, Markers, Message, Role};
use phi4::{Constraint, GenerateParams, Outcome, Session, SessionError};
use serde_json::Value;
use tokio::sync::mpsc;

use super::pool::{KeepAlive, Pool, Refusal};
use super::prompt_cache::PromptCache;
use super::ApiError;

/// What a request asks for, checked.
pub struct Job {
    pub prompt: Prompt,
    pub params: GenerateParams,
    pub shape: Shape,
    pub keep_alive: KeepAlive,
    /// "POST /api/chat": the request, for the log line written when the generation ends.
    pub label: String,
}

/// The session a request asks for (Ollama's num_ctx, num_thread, num_batch; 0: the server's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    pub n_ctx: usize,
    pub n_threads: usize,
    pub n_batch: usize,
}

pub enum Prompt {
    Chat(Vec<Message>),
    Raw(Vec<u32>),
}

/// What a running generation reports.
pub enum Event {
    Piece(String),
    Done(Box<Outcome>, Vec<u32>, u64),
    Failed(ApiError),
}

/// Ollama's `options` (and the OpenAI fields mapped onto them) into generation parameters and a
/// context size. Every value is checked; Ollama's special values keep their meaning.
pub fn options(
    opts: Option<&Value>,
    gp: &mut GenerateParams,
    shape: &mut Shape,
) -> Result<(), ApiError> {
    let Some(opts) = opts else { return Ok(()) };
    let Some(map) = opts.as_object() else {
        return Err(ApiError::bad("options must be an object"));
    };
    for (name, v) in map {
        let bad = |why: &str| ApiError::bad(format!("option {name}: {why}"));
        let int = || v.as_i64().ok_or_else(|| bad("must be a whole number"));
        match name.as_str() {
            "num_ctx" => {
                shape.n_ctx = usize::try_from(int()?)
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| bad("must be at least 1"))?
            }
            "num_thread" => {
                shape.n_threads = usize::try_from(int()?)
                    .ok()
                    .filter(|&n| n <= phi4::session::MAX_THREADS)
                    .ok_or_else(|| bad("must be in 0..=512"))?
            }
            "num_batch" => {
                shape.n_batch = usize::try_from(int()?)
                    .ok()
                    .filter(|&n| n <= 1 << 16)
                    .ok_or_else(|| bad("must be in 0..=65536"))?
            }
            "num_predict" => {
                gp.max_tokens = match int()? {
                    // -1: no limit, -2: until the context is full (both: until the context is full here)
                    -1 | -2 => 0,
                    n if n >= 0 => n as usize,
                    n => return Err(bad(&format!("{n} is neither a count nor -1 / -2"))),
                }
            }
            // Ollama's GPU and memory-mapping options: nothing to do on a CPU, mmap always.
            "use_mmap" | "num_gpu" | "main_gpu" | "use_mlock" | "numa" | "num_keep"
            | "low_vram" | "vocab_only" => {}
            "stop" => {
                let stops = match v {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(a) => a
                        .iter()
                        .map(|s| {
                            s.as_str()
                                .map(String::from)
                                .ok_or_else(|| bad("must be strings"))
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err(bad("must be a string or an array of strings")),
                };
                gp.stop.extend(stops);
            }
            "seed" => {
                gp.sampling.seed = match int()? {
                    n if n < 0 => None,
                    n => Some(n as u64),
                }
            }
            _ if GenerateParams::options().any(|(n, _)| n == name) => {
                let text = match v {
                    Value::Number(n) => n.to_string(),
                    _ => return Err(bad("must be a number")),
                };
                gp.set(name, &text).map_err(|e| bad(&e))?;
            }
            _ => return Err(bad("unknown option")),
        }
    }
    gp.sampling.validate().map_err(ApiError::bad)
}

/// Ollama's `format`: absent, null or "" (free text), "json" (any JSON object), or a JSON
/// Schema object.
pub fn format(v: Option<&Value>) -> Result<Option<Constraint>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(Constraint::Json)),
        Some(schema @ Value::Object(_)) => Ok(Some(Constraint::JsonSchema(schema.to_string()))),
        Some(other) => Err(ApiError::bad(format!(
            "format must be \"json\" or a JSON schema object, not {other}"
        ))),
    }
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` with its `schema` (a
/// strict schema or not, the reply always matches it).
pub fn response_format(v: Option<&Value>) -> Result<Option<Constraint>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::Json)),
        Some("json_schema") => match v.get("json_schema").and_then(|j| j.get("schema")) {
            Some(schema @ Value::Object(_)) => Ok(Some(Constraint::JsonSchema(schema.to_string()))),
            _ => Err(ApiError::bad(
                "response_format json_schema needs json_schema.schema, an object",
            )),
        },
        _ => Err(ApiError::bad(
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

/// Ollama's `keep_alive`: seconds (a number) or a Go duration ("5m", "1h30m", "-1").
pub fn keep_alive(v: Option<&Value>) -> Result<KeepAlive, ApiError> {
    let secs = match v {
        None | Some(Value::Null) => return Ok(KeepAlive::For(std::time::Duration::from_secs(300))),
        Some(Value::Number(n)) => n
            .as_f64()
            .ok_or_else(|| ApiError::bad("keep_alive is not a number"))?,
        Some(Value::String(s)) => go_duration(s)
            .ok_or_else(|| ApiError::bad(format!("keep_alive {s:?} is not a duration")))?,
        Some(_) => {
            return Err(ApiError::bad(
                "keep_alive must be a number of seconds or a duration",
            ))
        }
    };
    if !secs.is_finite() {
        return Err(ApiError::bad("keep_alive must be finite"));
    }
    Ok(if secs < 0.0 {
        KeepAlive::Forever
    } else {
        KeepAlive::For(std::time::Duration::from_secs_f64(secs.min(1e9)))
    })
}

/// "300", "5m", "1h30m", "1.5s", "-1m" → seconds.
fn go_duration(s: &str) -> Option<f64> {
    if let Ok(n) = s.parse::<f64>() {
        return Some(n);
    }
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Some(if neg { -total } else { total })
}

/// Start `job` on a leased session: events arrive on the returned channel. The first event is
/// `Failed` when the request cannot run (busy, overflow, bad input): nothing was streamed yet.
pub async fn start(pool: &Arc<Pool>, job: Job) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(64);
    let started = Instant::now();
    // The prompt's tokens choose the session; chat prompts are tokenized by the session itself.
    let lease_key = match &job.prompt {
        Prompt::Raw(ids) => ids.clone(),
        Prompt::Chat(msgs) => match pool.chat_tokens(msgs.clone()).await {
            Ok(ids) => ids,
            Err(e) => {
                let _ = tx.send(Event::Failed(ApiError::internal(e))).await;
                return rx;
            }
        },
    };
    let lease = match pool.lease(lease_key, job.shape).await {
        Ok(l) => l,
        Err(Refusal::Busy) => {
            let _ = tx.send(Event::Failed(ApiError::busy())).await;
            return rx;
        }
        Err(Refusal::Invalid(e)) => {
            let _ = tx.send(Event::Failed(ApiError::bad(e))).await;
            return rx;
        }
        Err(Refusal::Failed(e)) => {
            let _ = tx.send(Event::Failed(ApiError::internal(e))).await;
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
    let cache_pool = pool.clone();
    let generation = tokio::task::spawn_blocking(move || {
        let mut lease = lease;
        let mut on_token = |_: Option<u32>, piece: &str| {
            piece.is_empty()
                || pieces
                    .blocking_send(Event::Piece(piece.to_string()))
                    .is_ok()
        };
        let result = match &job.prompt {
            Prompt::Chat(msgs) => lease.session.chat(msgs, &job.params, &mut on_token),
            Prompt::Raw(ids) => lease.session.generate(ids, &job.params, &mut on_token),
        };
        let event = match result {
            Ok(out) => {
                // The request's log line, now that its token counts are known.
                let t = &out.timings;
                eprintln!(
                    "{} 200 tokens in {} (new), out {}, {} {:.1}ms",
                    job.label,
                    t.prompt_eval_count,
                    t.eval_count,
                    out.reason.as_str(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                if let (Some(cache), Prompt::Chat(msgs)) = (&cache_pool.cache, &job.prompt) {
                    keep_system_turn(cache, &lease.session, msgs);
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

/// A finished reply: its text, its outcome, the session's tokens and the total time.
pub struct Reply {
    pub text: String,
    pub outcome: Box<Outcome>,
    pub history: Vec<u32>,
    pub total: u64,
}

/// All of a reply that is not streamed.
pub async fn collect(first: Event, mut rx: mpsc::Receiver<Event>) -> Result<Reply, ApiError> {
    let mut text = String::new();
    let mut event = first;
    loop {
        match event {
            Event::Piece(p) => text.push_str(&p),
            Event::Done(outcome, history, total) => {
                return Ok(Reply {
                    text,
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
fn keep_system_turn(cache: &PromptCache, session: &Session, msgs: &[Message]) {
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
        cache.keep(session, turn.len());
    }
}

fn session_error(e: SessionError) -> ApiError {
    match e {
        SessionError::ContextOverflow { needed, n_ctx } => ApiError::bad(format!(
            "the prompt needs {needed} tokens but the context holds {n_ctx}: raise options.num_ctx (at most the model's) or shorten the conversation"
        )),
        SessionError::BadParams(m) => ApiError::bad(m),
        e @ SessionError::Constraint(_) => ApiError::bad(e.to_string()),
        e @ SessionError::Eval(phi4::session::EvalError::BadToken { .. }) => ApiError::bad(e.to_string()),
        e => ApiError::internal(e.to_string()),
    }
}
