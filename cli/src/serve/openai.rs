//! OpenAI's endpoints as Ollama serves them: /v1/chat/completions and /v1/completions (SSE
//! streams ending with `data: [DONE]`, or one object), /v1/embeddings, /v1/models. Errors in OpenAI's shape.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use phi4::chat::{Message, Role};
use phi4::{Outcome, ToolCall};
use serde::Deserialize;
use serde_json::{json, Value};

use super::job::{self, EmbedSpec, KeyId, Prompt, RequestBody, Spec, WireMessage};
use super::run::{self, async_stream, Event};
use super::{ApiError, App};

/// OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.
pub struct OpenAiError(ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let kind = match self.0.status.as_u16() {
            404 => "not_found_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        };
        (self.0.status, Json(json!({ "error": { "message": self.0.message, "type": kind, "param": null, "code": null } }))).into_response()
    }
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}",
        N.fetch_add(1, Ordering::Relaxed) + created() % 100_000 * 1000
    )
}

fn finish_reason(o: &Outcome) -> &'static str {
    super::ollama::done_reason(o.reason)
}

fn usage(o: &Outcome) -> Value {
    let t = &o.timings;
    let (p, c) = (t.prompt_tokens, t.eval_count);
    let cached = t.cached_tokens();
    json!({ "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "prompt_tokens_details": { "cached_tokens": cached } })
}

#[derive(Deserialize)]
pub struct ChatRequest {
    model: String,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's field).
    cache_salt: Option<String>,
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    sampling: Sampling,
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    n: Option<i64>,
}

/// The sampling fields both endpoints take.
#[derive(Deserialize)]
struct Sampling {
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Value>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Vec<job::ChatToolCall>,
    tool_call_id: Option<String>,
    /// (A tool message's function name, in older clients.)
    name: Option<String>,
}

impl ChatMessage {
    fn wire(self) -> Result<WireMessage, ApiError> {
        let calls = job::chat_calls(self.tool_calls)?;
        let tool = self.role == "tool";
        Ok(WireMessage {
            content: content(self.content)?,
            role: self.role,
            calls,
            call_id: self.tool_call_id,
            tool_name: self.name.filter(|_| tool),
        })
    }
}

/// The calls of a reply as OpenAI writes them (arguments a string of JSON), with `index`
/// in a stream's deltas.
fn tool_calls(calls: &[ToolCall], indexed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({ "id": run::call_id(), "type": "function", "function": { "name": c.name, "arguments": c.arguments.to_string() } });
            if indexed {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

fn chat_finish(o: &Outcome) -> &'static str {
    match o.tool_calls.is_empty() {
        false if o.reason == phi4::DoneReason::Stop => "tool_calls",
        _ => finish_reason(o),
    }
}

/// A message's content: a string, or an array of parts of which only text parts are accepted.
fn content(v: Option<Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => Ok(t.to_string()),
                    (Some("image_url"), _) => Err(ApiError::bad(
                        "phi4 does not support images (it reads text only)",
                    )),
                    _ => Err(ApiError::bad(
                        "a content part must be {\"type\": \"text\", \"text\": ...}",
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.join("")),
        Some(_) => Err(ApiError::bad(
            "content must be a string or an array of parts",
        )),
    }
}

/// The OpenAI sampling fields onto the options (OpenAI's defaults: temperature and top_p 1).
fn spec(
    model: String,
    salt: Option<String>,
    s: Sampling,
    max_tokens: Option<i64>,
    stream: Option<bool>,
) -> Result<Spec, ApiError> {
    let Sampling {
        temperature,
        top_p,
        seed,
        stop,
        frequency_penalty: freq,
        presence_penalty: presence,
        ..
    } = s;
    let mut opts = serde_json::Map::new();
    opts.insert("temperature".into(), json!(temperature.unwrap_or(1.0)));
    opts.insert("top_p".into(), json!(top_p.unwrap_or(1.0)));
    if let Some(n) = max_tokens {
        if n < 1 {
            return Err(ApiError::bad(format!("max_tokens {n} must be at least 1")));
        }
        opts.insert("num_predict".into(), json!(n));
    }
    for (k, v) in [
        ("seed", seed.map(|s| json!(s))),
        ("stop", stop.filter(|s| !s.is_null())),
        ("frequency_penalty", freq.map(|f| json!(f))),
        ("presence_penalty", presence.map(|f| json!(f))),
    ] {
        if let Some(v) = v {
            opts.insert(k.into(), v);
        }
    }
    Spec::from_options(model, salt, opts, stream.unwrap_or(false))
}

impl RequestBody for ChatRequest {
    /// With `stream_options.include_usage`.
    type Checked = (Spec, Vec<Message>, bool);
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<Self::Checked, ApiError> {
        let constraint = job::response_format(self.response_format.as_ref())?;
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n must be 1"));
        }
        let tools = job::tools(
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls.unwrap_or(true),
        )?;
        let logprobs = job::logprobs(self.logprobs.unwrap_or(false), self.top_logprobs)?;
        let wire = self
            .messages
            .into_iter()
            .map(ChatMessage::wire)
            .collect::<Result<Vec<_>, _>>()?;
        let messages = job::conversation(wire)?;
        if messages.is_empty() {
            return Err(ApiError::bad("messages must not be empty"));
        }
        let max_tokens = self.max_completion_tokens.or(self.sampling.max_tokens);
        let mut spec = spec(
            self.model,
            self.cache_salt,
            self.sampling,
            max_tokens,
            self.stream,
        )?;
        spec.params.constraint = constraint;
        spec.params.logprobs = logprobs;
        spec.set_tools(tools, self.tool_choice.as_ref())?;
        let include_usage = self
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok((spec, messages, include_usage))
    }
}

pub async fn chat(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let (admission, (spec, messages, include_usage)) = app.admit::<ChatRequest>(&body)?;
    let (model, stream) = (spec.model.clone(), spec.stream);
    let want_logprobs = spec.params.logprobs.is_some();
    let mut spec = spec;
    app.default_tool_choice(&mut spec, &messages);
    let job = spec.job(
        Prompt::Chat(messages),
        "POST /v1/chat/completions",
        admission,
        key,
    );
    let head = json!({ "id": id("chatcmpl"), "object": "chat.completion.chunk", "created": created(), "model": model, "system_fingerprint": "fp_phi4" });
    let (first, rx) = run::begin(&app.pool, job).await?;
    if !stream {
        let run::Reply {
            text,
            outcome: out,
            logprobs,
            ..
        } = run::collect(first, rx).await?;
        let mut v = head;
        v["object"] = json!("chat.completion");
        let mut message = json!({ "role": "assistant", "content": text });
        if !out.tool_calls.is_empty() {
            message["tool_calls"] = tool_calls(&out.tool_calls, false);
            if text.is_empty() {
                message["content"] = Value::Null;
            }
        }
        let lp = want_logprobs.then(
            || json!({ "content": logprobs.iter().map(run::Scored::json).collect::<Vec<_>>() }),
        );
        v["choices"] = json!([{ "index": 0, "message": message, "logprobs": lp, "finish_reason": chat_finish(&out) }]);
        v["usage"] = usage(&out);
        return Ok(Json(v).into_response());
    }
    let mut said_role = false;
    let lines = async_stream(first, rx, move |event| {
        let chunk = |delta: Value, finish: Value, logprobs: Value| {
            let mut v = head.clone();
            v["choices"] = json!([{ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish }]);
            format!("data: {v}\n\n")
        };
        match event {
            Event::Piece(p, scored) => {
                let delta = if said_role {
                    json!({ "content": p })
                } else {
                    json!({ "role": "assistant", "content": p })
                };
                said_role = true;
                let lp = scored.map_or(Value::Null, |s| json!({ "content": [s.json()] }));
                chunk(delta, Value::Null, lp)
            }
            Event::Done(out, _, _) => {
                let mut s = String::new();
                if !said_role {
                    s += &chunk(
                        json!({ "role": "assistant", "content": "" }),
                        Value::Null,
                        Value::Null,
                    );
                }
                if !out.tool_calls.is_empty() {
                    let delta = json!({ "tool_calls": tool_calls(&out.tool_calls, true) });
                    s += &chunk(delta, Value::Null, Value::Null);
                }
                s += &chunk(json!({}), json!(chat_finish(&out)), Value::Null);
                if include_usage {
                    let mut v = head.clone();
                    v["choices"] = json!([]);
                    v["usage"] = usage(&out);
                    s += &format!("data: {v}\n\n");
                }
                s + "data: [DONE]\n\n"
            }
            Event::Failed(e) => sse_error(&e),
        }
    });
    Ok(sse(lines))
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    model: String,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's field).
    cache_salt: Option<String>,
    prompt: Value,
    stream: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
    suffix: Option<String>,
    /// Alternatives per token to report (the legacy API's log-probabilities).
    logprobs: Option<i64>,
}

impl RequestBody for CompletionRequest {
    type Checked = (Spec, String);
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<Self::Checked, ApiError> {
        let prompt = match self.prompt {
            Value::String(s) => s,
            _ => return Err(ApiError::bad("prompt must be a string")),
        };
        job::no_suffix(self.suffix.as_deref())?;
        let max_tokens = self.sampling.max_tokens;
        let mut spec = spec(
            self.model,
            self.cache_salt,
            self.sampling,
            max_tokens,
            self.stream,
        )?;
        spec.params.logprobs = job::logprobs(self.logprobs.is_some(), self.logprobs)?;
        Ok((spec, prompt))
    }
}

pub async fn completions(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let (admission, (spec, prompt)) = app.admit::<CompletionRequest>(&body)?;
    let (model, stream) = (spec.model.clone(), spec.stream);
    let want_logprobs = spec.params.logprobs.is_some();
    let prompt = Prompt::Chat(vec![Message::new(Role::User, prompt)]);
    let job = spec.job(prompt, "POST /v1/completions", admission, key);
    let head = json!({ "id": id("cmpl"), "object": "text_completion", "created": created(), "model": model, "system_fingerprint": "fp_phi4" });
    let (first, rx) = run::begin(&app.pool, job).await?;
    if !stream {
        let run::Reply {
            text,
            outcome: out,
            logprobs,
            ..
        } = run::collect(first, rx).await?;
        let mut v = head;
        let lp = want_logprobs.then(|| legacy_logprobs(&logprobs, 0));
        v["choices"] = json!([{ "text": text, "index": 0, "logprobs": lp, "finish_reason": finish_reason(&out) }]);
        v["usage"] = usage(&out);
        return Ok(Json(v).into_response());
    }
    let mut offset = 0;
    let lines = async_stream(first, rx, move |event| {
        let chunk = |text: &str, finish: Value, logprobs: Value| {
            let mut v = head.clone();
            v["choices"] = json!([{ "text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish }]);
            format!("data: {v}\n\n")
        };
        match event {
            Event::Piece(p, scored) => {
                let lp = scored.map_or(Value::Null, |s| legacy_logprobs(&[*s], offset));
                offset += p.len();
                chunk(&p, Value::Null, lp)
            }
            Event::Done(out, _, _) => {
                chunk("", json!(finish_reason(&out)), Value::Null) + "data: [DONE]\n\n"
            }
            Event::Failed(e) => sse_error(&e),
        }
    });
    Ok(sse(lines))
}

/// The legacy completions API's log-probabilities: `tokens`, `token_logprobs`, `top_logprobs`
/// (a map of token text to log-probability per token) and `text_offset` (from `offset`, in
/// bytes of the text).
fn legacy_logprobs(scored: &[run::Scored], mut offset: usize) -> Value {
    let mut offsets = Vec::with_capacity(scored.len());
    for s in scored {
        offsets.push(offset);
        offset += s.token.text.len();
    }
    let top: Vec<Value> = scored
        .iter()
        .map(|s| {
            let m: serde_json::Map<String, Value> = s
                .top
                .iter()
                .map(|a| (a.text.clone(), json!(a.logprob)))
                .collect();
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": scored.iter().map(|s| s.token.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": scored.iter().map(|s| s.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's field).
    cache_salt: Option<String>,
}

impl RequestBody for EmbeddingsRequest {
    /// With whether the numbers go as base64 (of little-endian f32s, as OpenAI sends them).
    type Checked = (EmbedSpec, bool);
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<Self::Checked, ApiError> {
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(f) => {
                return Err(ApiError::bad(format!(
                    "encoding_format {f:?} is neither \"float\" nor \"base64\""
                )))
            }
        };
        let mut spec = EmbedSpec::new(self.model, Some(self.input), None, None, self.dimensions)?;
        if spec.texts.is_empty() {
            return Err(ApiError::bad("input must not be empty"));
        }
        spec.salt = self.cache_salt;
        Ok((spec, base64))
    }
}

/// /v1/embeddings: each input's embedding, normalised, as floats or base64.
pub async fn embeddings(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    use base64::Engine as _;
    let (admission, (spec, base64)) = app.admit::<EmbeddingsRequest>(&body)?;
    let (model, dims) = (spec.model.clone(), spec.dims);
    let e = run::embed(&app.pool, spec.job("POST /v1/embeddings", admission, key)).await?;
    let data: Vec<Value> = e
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let v = job::normalized(v, dims);
            let embedding = match base64 {
                true => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
                false => json!(v),
            };
            json!({ "object": "embedding", "embedding": embedding, "index": index })
        })
        .collect();
    let n = e.prompt_tokens;
    Ok(Json(json!({ "object": "list", "data": data, "model": model, "usage": { "prompt_tokens": n, "total_tokens": n } })).into_response())
}

fn model_object(id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": created(), "owned_by": "library" })
}

pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app
        .names
        .iter()
        .map(|n| model_object(&format!("{n}:latest")))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

pub async fn model(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    app.check_model(&id)?;
    Ok(Json(model_object(&id)))
}

/// A failure after the stream began: an error event, then the end of the stream.
fn sse_error(e: &ApiError) -> String {
    let error = json!({ "error": { "message": e.message, "type": "api_error", "param": null, "code": null } });
    format!("data: {error}\n\ndata: [DONE]\n\n")
}

/// Server-sent events as a response.
pub fn sse(
    lines: impl tokio_stream::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, Body::from_stream(lines)).into_response()
}
