//! Ollama's endpoints, field for field as its server writes them: /api/chat and /api/generate
//! (NDJSON streams or one object), /api/embed and /api/embeddings, /api/tags, /api/show,
//! /api/ps, /api/version.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use phi4::chat::{Message, Role};
use phi4::{DoneReason, GenerateParams, Outcome, ToolCall};
use serde::Deserialize;
use serde_json::{json, Value};

use super::job::{
    self, parse, EmbedSpec, Job, KeepAlive, KeyId, Prompt, RequestBody, Shape, Spec, WireMessage,
};
use super::run::{self, async_stream, Event};
use super::{ApiError, App};

/// RFC 3339 time of now (UTC), as Ollama's `created_at`.
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// RFC 3339 form of a time (UTC).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (secs, nanos) = (d.as_secs() as i64, d.subsec_nanos());
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn done_reason(r: DoneReason) -> &'static str {
    match r {
        DoneReason::Stop | DoneReason::Cancelled => "stop",
        DoneReason::Length | DoneReason::ContextFull => "length",
    }
}

/// Ollama's timing fields of a finished generation.
fn timings(o: &Outcome, total: u64) -> Value {
    let t = &o.timings;
    json!({
        "total_duration": total,
        "load_duration": t.load_duration,
        "prompt_eval_count": t.prompt_eval_count,
        "prompt_eval_duration": t.prompt_eval_duration,
        "eval_count": t.eval_count,
        "eval_duration": t.eval_duration,
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// What Phi-4 cannot do gets Ollama's kind of answer: a 400 naming the reason.
fn unsupported(images: bool, think: Option<&Value>) -> Result<(), ApiError> {
    if images {
        return Err(ApiError::bad(
            "phi4 does not support images (it reads text only)",
        ));
    }
    if think.is_some_and(|t| !matches!(t, Value::Null | Value::Bool(false))) {
        return Err(ApiError::bad("phi4 does not support thinking"));
    }
    Ok(())
}

fn non_empty(v: &Option<Value>) -> bool {
    v.as_ref()
        .is_some_and(|v| !(v.is_null() || v.as_array().is_some_and(|a| a.is_empty())))
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
    images: Option<Value>,
    #[serde(default)]
    tool_calls: Vec<job::ChatToolCall>,
    tool_name: Option<String>,
    tool_call_id: Option<String>,
}

impl ChatMessage {
    fn wire(self) -> Result<WireMessage, ApiError> {
        let calls = job::chat_calls(self.tool_calls)?;
        Ok(WireMessage {
            role: self.role.to_lowercase(),
            content: self.content,
            calls,
            call_id: self.tool_call_id,
            tool_name: self.tool_name,
        })
    }
}

/// The calls of a reply as Ollama writes them (arguments an object).
fn tool_calls(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| json!({ "id": run::call_id(), "function": { "index": i, "name": c.name, "arguments": c.arguments } }))
        .collect()
}

/// A reply's logprobs entries.
fn logprobs(scored: &[run::Scored]) -> Value {
    scored.iter().map(run::Scored::json).collect()
}

#[derive(Deserialize)]
pub struct ChatRequest {
    model: String,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's field).
    cache_salt: Option<String>,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    format: Option<Value>,
    options: Option<Value>,
    keep_alive: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    think: Option<Value>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
}

/// The checked options, format, keep-alive and stream flag of a request.
fn spec(
    model: String,
    salt: Option<String>,
    options: Option<&Value>,
    format: Option<&Value>,
    keep_alive: Option<&Value>,
    stream: Option<bool>,
    logprobs: (bool, Option<i64>),
) -> Result<Spec, ApiError> {
    let mut params = GenerateParams {
        constraint: job::format(format)?,
        logprobs: job::logprobs(logprobs.0, logprobs.1)?,
        ..Default::default()
    };
    let mut shape = Shape::default();
    let ignored = job::options(options, &mut params, &mut shape)?;
    Ok(Spec {
        model,
        params,
        shape,
        keep_alive: job::keep_alive(keep_alive)?,
        stream: stream.unwrap_or(true),
        salt,
        ignored,
        choice_given: false,
    })
}

impl RequestBody for ChatRequest {
    /// No messages: load (or unload) the model.
    type Checked = (Spec, Vec<Message>);
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<Self::Checked, ApiError> {
        let images = self.messages.iter().any(|m| non_empty(&m.images));
        unsupported(images, self.think.as_ref())?;
        let mut spec = spec(
            self.model,
            self.cache_salt,
            self.options.as_ref(),
            self.format.as_ref(),
            self.keep_alive.as_ref(),
            self.stream,
            (self.logprobs, self.top_logprobs),
        )?;
        // (tool_choice: not Ollama's, phi4's addition with OpenAI's values.)
        let choice = self.tool_choice.as_ref();
        spec.set_tools(job::tools(self.tools.as_ref(), choice, true)?, choice)?;
        let wire = self
            .messages
            .into_iter()
            .map(ChatMessage::wire)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((spec, job::conversation(wire)?))
    }
}

pub async fn chat(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (admission, (spec, messages)) = app.admit::<ChatRequest>(&body)?;
    let model = spec.model.clone();
    if messages.is_empty() {
        return load_or_unload(&app, spec.keep_alive, json!({ "model": model, "created_at": now_rfc3339(), "message": { "role": "assistant", "content": "" } })).await;
    }
    let stream = spec.stream;
    let mut spec = spec;
    app.default_tool_choice(&mut spec, &messages);
    let job = spec.job(Prompt::Chat(messages), "POST /api/chat", admission, key);
    let name = model.clone();
    let chunk = move |piece: &str| json!({ "model": name, "created_at": now_rfc3339(), "message": { "role": "assistant", "content": piece }, "done": false });
    respond(&app, job, stream, chunk, |model, text, out, total, _| {
        let mut message = json!({ "role": "assistant", "content": text });
        if !out.tool_calls.is_empty() {
            message["tool_calls"] = tool_calls(&out.tool_calls);
        }
        merge(json!({ "model": model, "created_at": now_rfc3339(), "message": message, "done": true, "done_reason": done_reason(out.reason) }), timings(out, total))
    }, model)
    .await
}

#[derive(Deserialize)]
pub struct GenerateRequest {
    model: String,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's field).
    cache_salt: Option<String>,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    context: Option<Vec<u32>>,
    raw: Option<bool>,
    stream: Option<bool>,
    format: Option<Value>,
    options: Option<Value>,
    keep_alive: Option<Value>,
    images: Option<Value>,
    think: Option<Value>,
    suffix: Option<String>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
}

/// A generate request's text, tokenized when the model is at hand ([`prompt_ids`]).
pub struct Text {
    prompt: String,
    system: Option<String>,
    context: Vec<u32>,
    raw: bool,
}

impl RequestBody for GenerateRequest {
    /// An empty prompt and context: load (or unload) the model.
    type Checked = (Spec, Text);
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<Self::Checked, ApiError> {
        unsupported(non_empty(&self.images), self.think.as_ref())?;
        job::no_suffix(self.suffix.as_deref())?;
        let spec = spec(
            self.model,
            self.cache_salt,
            self.options.as_ref(),
            self.format.as_ref(),
            self.keep_alive.as_ref(),
            self.stream,
            (self.logprobs, self.top_logprobs),
        )?;
        let text = Text {
            prompt: self.prompt,
            system: self.system,
            context: self.context.unwrap_or_default(),
            raw: self.raw.unwrap_or(false),
        };
        Ok((spec, text))
    }
}

pub async fn generate(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (admission, (spec, text)) = app.admit::<GenerateRequest>(&body)?;
    let model = spec.model.clone();
    if text.prompt.is_empty() && text.context.is_empty() {
        return load_or_unload(
            &app,
            spec.keep_alive,
            json!({ "model": model, "created_at": now_rfc3339(), "response": "" }),
        )
        .await;
    }
    let ids = prompt_ids(&app, text, admission.loading.clone()).await?;
    let stream = spec.stream;
    let job = spec.job(Prompt::Raw(ids), "POST /api/generate", admission, key);
    let name = model.clone();
    let chunk = move |piece: &str| json!({ "model": name, "created_at": now_rfc3339(), "response": piece, "done": false });
    respond(&app, job, stream, chunk, |model, text, out, total, history| {
        merge(json!({ "model": model, "created_at": now_rfc3339(), "response": text, "done": true, "done_reason": done_reason(out.reason), "context": history }), timings(out, total))
    }, model)
    .await
}

#[derive(Deserialize)]
pub struct EmbedRequest {
    model: String,
    input: Option<Value>,
    truncate: Option<bool>,
    dimensions: Option<i64>,
    options: Option<Value>,
    keep_alive: Option<Value>,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's field).
    cache_salt: Option<String>,
}

impl RequestBody for EmbedRequest {
    type Checked = EmbedSpec;
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<EmbedSpec, ApiError> {
        let mut spec = EmbedSpec::new(
            self.model,
            self.input,
            self.options.as_ref(),
            self.keep_alive.as_ref(),
            self.dimensions,
        )?;
        spec.truncate = self.truncate.unwrap_or(true);
        spec.salt = self.cache_salt;
        Ok(spec)
    }
}

/// /api/embed: each input's embedding, normalised (no input: the model loaded).
pub async fn embed(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (admission, spec) = app.admit::<EmbedRequest>(&body)?;
    let (model, dims) = (spec.model.clone(), spec.dims);
    let e = run::embed(&app.pool, spec.job("POST /api/embed", admission, key)).await?;
    let embeddings: Vec<_> = e
        .vectors
        .into_iter()
        .map(|v| job::normalized(v, dims))
        .collect();
    Ok(Json(json!({ "model": model, "embeddings": embeddings, "total_duration": e.total, "load_duration": e.load, "prompt_eval_count": e.prompt_tokens })).into_response())
}

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    #[serde(default)]
    prompt: String,
    options: Option<Value>,
    keep_alive: Option<Value>,
}

impl RequestBody for EmbeddingsRequest {
    type Checked = EmbedSpec;
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<EmbedSpec, ApiError> {
        let input = Some(self.prompt)
            .filter(|p| !p.is_empty())
            .map(Value::String);
        EmbedSpec::new(
            self.model,
            input,
            self.options.as_ref(),
            self.keep_alive.as_ref(),
            None,
        )
    }
}

/// /api/embeddings (Ollama's older endpoint): the prompt's embedding as the model gives it, not
/// normalised (an empty prompt: an empty one, the model loaded).
pub async fn embeddings(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (admission, spec) = app.admit::<EmbeddingsRequest>(&body)?;
    let e = run::embed(&app.pool, spec.job("POST /api/embeddings", admission, key)).await?;
    let embedding = e.vectors.into_iter().next().unwrap_or_default();
    Ok(Json(json!({ "embedding": embedding })).into_response())
}

/// The token ids of a generate request: the earlier `context`, then the prompt, templated as a
/// user turn (with the system message) unless `raw`.
async fn prompt_ids(
    app: &Arc<App>,
    text: Text,
    loading: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Vec<u32>, ApiError> {
    let Text {
        prompt,
        system,
        context,
        raw,
    } = text;
    let pool = app.pool.clone();
    let work = move || -> Result<Vec<u32>, ApiError> {
        let model = pool.model_for(&loading).map_err(ApiError::internal)?;
        let tok = &model.tokenizer;
        if let Some(bad) = context
            .iter()
            .find(|&&t| t as usize >= model.config.n_vocab)
        {
            return Err(ApiError::bad(format!(
                "context holds token {bad}, outside the vocabulary"
            )));
        }
        let mut ids = context;
        if raw {
            ids.extend(tok.encode(&prompt, true));
        } else {
            let markers = phi4::chat::Markers::of(tok).map_err(ApiError::internal)?;
            let mut msgs = Vec::new();
            if let Some(s) = system.filter(|s| !s.is_empty()) {
                msgs.push(Message::new(Role::System, s));
            }
            msgs.push(Message::new(Role::User, prompt));
            ids.extend(phi4::chat::tokens(tok, markers, &msgs, true));
        }
        Ok(ids)
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// An empty request loads the model (or, with keep_alive 0, unloads it), as Ollama's does.
async fn load_or_unload(
    app: &Arc<App>,
    keep_alive: KeepAlive,
    base: Value,
) -> Result<Response, ApiError> {
    let pool = app.pool.clone();
    let unload = keep_alive == KeepAlive::For(std::time::Duration::ZERO);
    tokio::task::spawn_blocking(move || {
        if unload {
            pool.unload()
        } else {
            pool.model().map(|_| ())
        }
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::internal)?;
    let reason = if unload { "unload" } else { "load" };
    eprintln!(
        "POST {} 200 {reason}",
        if base.get("message").is_some() {
            "/api/chat"
        } else {
            "/api/generate"
        }
    );
    Ok(Json(merge(base, json!({ "done": true, "done_reason": reason }))).into_response())
}

type Final = fn(&str, &str, &Outcome, u64, &[u32]) -> Value;

/// Run the job and answer: an NDJSON stream of `chunk`s ending with `last`, or one object. An
/// error before the first piece is an HTTP error; one after it is an `{"error"}` line.
async fn respond(
    app: &Arc<App>,
    job: Job,
    stream: bool,
    chunk: impl Fn(&str) -> Value + Send + 'static,
    last: Final,
    model: String,
) -> Result<Response, ApiError> {
    let (first, rx) = run::begin(&app.pool, job).await?;
    if !stream {
        let r = run::collect(first, rx).await?;
        let mut v = last(&model, &r.text, &r.outcome, r.total, &r.history);
        if !r.logprobs.is_empty() {
            v["logprobs"] = logprobs(&r.logprobs);
        }
        return Ok(Json(v).into_response());
    }
    let lines = async_stream(first, rx, move |event| {
        let v = match event {
            Event::Piece(p, scored) => {
                let mut v = chunk(&p);
                if let Some(s) = scored {
                    v["logprobs"] = json!([s.json()]);
                }
                v
            }
            Event::Done(out, history, total) => {
                let v = last(&model, "", &out, total, &history);
                // The calls come in a chunk of their own, before the last one.
                if let Some(calls) = v.get("message").and_then(|m| m.get("tool_calls")) {
                    let mut c = chunk("");
                    c["message"]["tool_calls"] = calls.clone();
                    let mut end = v.clone();
                    end["message"] = json!({ "role": "assistant", "content": "" });
                    return format!("{c}\n{end}\n");
                }
                v
            }
            Event::Failed(e) => json!({ "error": e.message }),
        };
        format!("{v}\n")
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

pub async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

/// The model under `name` as /api/tags and /api/ps describe it.
fn describe(app: &App, name: &str, size: u64) -> Value {
    let quant = app
        .pool
        .loaded()
        .map(|(m, _)| m.gguf.opt_u32("general.file_type").ok().flatten());
    json!({
        "name": format!("{name}:latest"),
        "model": format!("{name}:latest"),
        "size": size,
        "digest": format!("{:064x}", size),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "phi3",
            "families": ["phi3"],
            "parameter_size": "14.7B",
            "quantization_level": quant.flatten().map_or("unknown".to_string(), file_type_name),
        },
    })
}

/// llama.cpp's names of `general.file_type`.
fn file_type_name(t: u32) -> String {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        7 => "Q8_0",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        _ => return format!("type {t}"),
    }
    .to_string()
}

fn file_size(app: &App) -> u64 {
    std::fs::metadata(app.pool.path()).map_or(0, |m| m.len())
}

fn modified(app: &App) -> String {
    rfc3339(
        std::fs::metadata(app.pool.path())
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH),
    )
}

pub async fn tags(State(app): State<Arc<App>>) -> Json<Value> {
    let size = file_size(&app);
    let models: Vec<Value> = app
        .names
        .iter()
        .map(|name| {
            let mut m = describe(&app, name, size);
            m["modified_at"] = json!(modified(&app));
            m
        })
        .collect();
    Json(json!({ "models": models }))
}

pub async fn ps(State(app): State<Arc<App>>) -> Json<Value> {
    let models = match app.pool.loaded() {
        None => vec![],
        Some((model, expires)) => {
            let mut m = describe(&app, &app.names[0], model.file_size);
            let until = expires.map(|t| t.saturating_duration_since(std::time::Instant::now()));
            // (Ollama's "forever" is a date far ahead.)
            m["expires_at"] = json!(rfc3339(
                std::time::SystemTime::now()
                    + until.unwrap_or(std::time::Duration::from_secs(100 * 365 * 86400))
            ));
            m["size_vram"] = json!(0);
            m["context_length"] = json!(model.config.n_ctx_train);
            vec![m]
        }
    };
    Json(json!({ "models": models }))
}

#[derive(Deserialize)]
struct ShowRequest {
    model: Option<String>,
    name: Option<String>,
}

/// The model a /api/show body names.
pub fn show_name(body: &[u8]) -> Result<String, ApiError> {
    let req: ShowRequest = parse(body)?;
    req.model
        .or(req.name)
        .ok_or_else(|| ApiError::bad("model is required"))
}

pub async fn show(State(app): State<Arc<App>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    app.check_model(&show_name(&body)?)?;
    let pool = app.pool.clone();
    let model = tokio::task::spawn_blocking(move || pool.model())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::internal)?;
    let c = &model.config;
    let info = json!({
        "general.architecture": "phi3",
        "general.file_type": model.gguf.opt_u32("general.file_type").ok().flatten(),
        "general.parameter_count": model.gguf.tensors.iter().map(|t| t.n_elements()).sum::<u64>(),
        "phi3.block_count": c.n_layer,
        "phi3.context_length": c.n_ctx_train,
        "phi3.embedding_length": c.n_embd,
        "phi3.feed_forward_length": c.n_ff,
        "phi3.attention.head_count": c.n_head,
        "phi3.attention.head_count_kv": c.n_head_kv,
        "phi3.attention.layer_norm_rms_epsilon": c.rms_eps,
        "phi3.rope.freq_base": c.rope_theta,
        "tokenizer.ggml.model": "gpt2",
    });
    let d = GenerateParams::default();
    let parameters: Vec<String> = ["temperature", "top_k", "top_p", "repeat_penalty"]
        .iter()
        .map(|n| format!("{n:<16}{}", d.get(n).unwrap_or_default()))
        .chain(["stop            \"<|im_end|>\"".to_string()])
        .collect();
    let mut details = describe(&app, &app.names[0], model.file_size)["details"].clone();
    details["parameter_size"] = json!(format!(
        "{:.1}B",
        info["general.parameter_count"].as_u64().unwrap_or(0) as f64 / 1e9
    ));
    Ok(Json(json!({
        "license": "MIT",
        "modelfile": format!("FROM {}\n", app.pool.path().display()),
        "parameters": parameters.join("\n"),
        "template": "{{- range .Messages }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>{{ end }}<|im_start|>assistant<|im_sep|>",
        "details": details,
        "model_info": info,
        "capabilities": ["completion", "tools", "embedding"],
        "modified_at": modified(&app),
    })))
}

#[derive(Deserialize)]
struct PullRequest {
    model: Option<String>,
    name: Option<String>,
    stream: Option<bool>,
}

/// /api/pull: the served model is there already (success, streamed as Ollama's progress is, so
/// that scripts which pull first go on); any other name cannot be pulled (an error, as
/// Ollama's for a model the registry lacks: a 500, or an error line in a stream).
pub async fn pull(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let req: PullRequest = parse(&body)?;
    let name = req
        .model
        .or(req.name)
        .ok_or_else(|| ApiError::bad("model is required"))?;
    let stream = req.stream.unwrap_or(true);
    let result = app.check_model(&name);
    eprintln!(
        "POST /api/pull {name}: {}",
        if result.is_ok() {
            "served already"
        } else {
            "refused"
        }
    );
    let lines: Vec<Value> = match &result {
        Ok(()) => [
            "pulling manifest",
            "verifying sha256 digest",
            "writing manifest",
            "success",
        ]
        .iter()
        .map(|s| json!({ "status": s }))
        .collect(),
        Err(_) => vec![
            json!({ "status": "pulling manifest" }),
            json!({ "error": format!("pull model manifest: phi4 serves one model, from a file; '{name}' is not it") }),
        ],
    };
    if !stream {
        let last = lines.last().cloned().unwrap_or_default();
        if let Some(e) = last.get("error").and_then(Value::as_str) {
            return Err(ApiError::internal(e));
        }
        return Ok(Json(last).into_response());
    }
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], text).into_response())
}
