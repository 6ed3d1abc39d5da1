//! Anthropic's Messages API as Ollama serves it: POST /v1/messages (`system`, `messages` of text,
//! `tool_use` and `tool_result` blocks, `max_tokens`, `stop_sequences`, sampling, `tools` and
//! `tool_choice`), one message or its event stream (`message_start` … `message_stop`), and
//! POST /v1/messages/count_tokens. Errors in Anthropic's shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use phi4::{DoneReason, Outcome};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::job::{self, KeyId, Prompt, RequestBody, Spec, WireCall, WireMessage};
use super::openai::sse;
use super::run::{self, async_stream, Event};
use super::{ApiError, App};

/// Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`.
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

/// Anthropic's error type of a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

pub fn error_body(e: &ApiError) -> Value {
    json!({ "type": "error", "error": { "type": error_type(e.status), "message": e.message } })
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        (self.0.status, Json(error_body(&self.0))).into_response()
    }
}

#[derive(Deserialize)]
pub struct MessagesRequest {
    model: String,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's field).
    cache_salt: Option<String>,
    max_tokens: Option<i64>,
    #[serde(default)]
    messages: Vec<MessageParam>,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stream: Option<bool>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    thinking: Option<Value>,
}

#[derive(Deserialize)]
struct MessageParam {
    role: String,
    content: Value,
}

/// The text of a string or of an array of text blocks.
fn text_of(v: &Value) -> Result<String, ApiError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => Ok(b
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()),
                Some("image" | "document") => Err(ApiError::bad(
                    "phi4 does not support images or documents (it reads text only)",
                )),
                _ => Err(ApiError::bad("a content block here must be text")),
            })
            .collect(),
        _ => Err(ApiError::bad(
            "content must be a string or an array of blocks",
        )),
    }
}

/// A message's blocks as wire messages: an assistant's text and `tool_use` blocks are one
/// message with calls; a user's `tool_result` blocks are tool messages, its text a user message.
fn wire(m: MessageParam) -> Result<Vec<WireMessage>, ApiError> {
    if !matches!(m.role.as_str(), "user" | "assistant") {
        return Err(ApiError::bad(format!(
            "role {:?} is not user or assistant",
            m.role
        )));
    }
    let blocks = match m.content {
        Value::Array(b) => b,
        other => {
            return Ok(vec![WireMessage {
                role: m.role,
                content: text_of(&other)?,
                ..Default::default()
            }])
        }
    };
    let mut out: Vec<WireMessage> = Vec::new();
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in &blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("tool_use") if m.role == "assistant" => calls.push(WireCall {
                id: b.get("id").and_then(Value::as_str).map(String::from),
                name: b
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::bad("a tool_use block has no name"))?
                    .into(),
                arguments: job::arguments(b.get("input"))?,
            }),
            Some("tool_result") if m.role == "user" => out.push(WireMessage {
                role: "tool".into(),
                content: text_of(b.get("content").unwrap_or(&Value::Null))?,
                call_id: b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .map(String::from),
                ..Default::default()
            }),
            // Reasoning of another model: nothing Phi-4 reads.
            Some("thinking" | "redacted_thinking") => {}
            _ => text += &text_of(&Value::Array(vec![b.clone()]))?,
        }
    }
    if !text.is_empty() || !calls.is_empty() || out.is_empty() {
        out.push(WireMessage {
            role: m.role,
            content: text,
            calls,
            ..Default::default()
        });
    }
    Ok(out)
}

impl RequestBody for MessagesRequest {
    type Checked = (Spec, Vec<phi4::chat::Message>);
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<Self::Checked, ApiError> {
        if self
            .thinking
            .as_ref()
            .is_some_and(|t| t.get("type").and_then(Value::as_str) == Some("enabled"))
        {
            return Err(ApiError::bad("phi4 does not support thinking"));
        }
        let max_tokens = self
            .max_tokens
            .ok_or_else(|| ApiError::bad("max_tokens is required"))?;
        if max_tokens < 1 {
            return Err(ApiError::bad(format!(
                "max_tokens {max_tokens} must be at least 1"
            )));
        }
        let mut opts = Map::new();
        opts.insert("num_predict".into(), json!(max_tokens));
        opts.insert("temperature".into(), json!(self.temperature.unwrap_or(1.0)));
        if let Some(p) = self.top_p {
            opts.insert("top_p".into(), json!(p));
        }
        if let Some(k) = self.top_k {
            opts.insert("top_k".into(), json!(k));
        }
        if let Some(stops) = self.stop_sequences {
            opts.insert("stop".into(), json!(stops));
        }
        let mut spec = Spec::from_options(
            self.model,
            self.cache_salt,
            opts,
            self.stream.unwrap_or(false),
        )?;
        let (choice, parallel) = match &self.tool_choice {
            Some(c) => (
                Some(c),
                !c.get("disable_parallel_tool_use")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            ),
            None => (None, true),
        };
        let tools = job::tools(self.tools.as_ref(), choice, parallel)?;
        spec.set_tools(tools, choice)?;
        let mut msgs = Vec::new();
        if let Some(system) = &self.system {
            let s = text_of(system)?;
            if !s.is_empty() {
                msgs.push(WireMessage {
                    role: "system".into(),
                    content: s,
                    ..Default::default()
                });
            }
        }
        for m in self.messages {
            msgs.extend(wire(m)?);
        }
        if msgs.iter().all(|m| m.role == "system") {
            return Err(ApiError::bad("messages must not be empty"));
        }
        Ok((spec, job::conversation(msgs)?))
    }
}

fn stop_reason(o: &Outcome) -> &'static str {
    match o.reason {
        _ if !o.tool_calls.is_empty() && o.reason == DoneReason::Stop => "tool_use",
        DoneReason::Stop if o.stop_string.is_some() => "stop_sequence",
        DoneReason::Length | DoneReason::ContextFull => "max_tokens",
        _ => "end_turn",
    }
}

fn usage(o: &Outcome) -> Value {
    let t = &o.timings;
    let cached = t.cached_tokens();
    json!({ "input_tokens": t.prompt_eval_count, "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0, "output_tokens": t.eval_count })
}

fn tool_use(c: &phi4::ToolCall) -> Value {
    json!({ "type": "tool_use", "id": run::new_id("toolu_"), "name": c.name, "input": c.arguments })
}

pub async fn messages(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, AnthropicError> {
    let (admission, (mut spec, messages)) = app.admit::<MessagesRequest>(&body)?;
    let (model, stream) = (spec.model.clone(), spec.stream);
    app.default_tool_choice(&mut spec, &messages);
    let job = spec.job(Prompt::Chat(messages), "POST /v1/messages", admission, key);
    let id = run::new_id("msg_");
    let (first, rx) = run::begin(&app.pool, job).await?;
    if !stream {
        let r = run::collect(first, rx).await?;
        let o = &r.outcome;
        let mut content = Vec::new();
        if !r.text.is_empty() || o.tool_calls.is_empty() {
            content.push(json!({ "type": "text", "text": r.text }));
        }
        content.extend(o.tool_calls.iter().map(tool_use));
        return Ok(Json(json!({ "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(o), "stop_sequence": o.stop_string, "usage": usage(o) })).into_response());
    }
    let (mut began, mut block) = (false, None::<usize>);
    let lines = async_stream(first, rx, move |event| {
        let emit = |v: Value| {
            format!(
                "event: {}\ndata: {v}\n\n",
                v["type"].as_str().unwrap_or("message")
            )
        };
        let mut out = String::new();
        if !began {
            began = true;
            let message = json!({ "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": { "input_tokens": 0, "output_tokens": 0 } });
            out += &emit(json!({ "type": "message_start", "message": message }));
            out += &emit(json!({ "type": "ping" }));
        }
        match event {
            Event::Piece(p, _) if p.is_empty() => {}
            Event::Piece(p, _) => {
                if block.is_none() {
                    block = Some(0);
                    out += &emit(
                        json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
                    );
                }
                out += &emit(
                    json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": p } }),
                );
            }
            Event::Done(o, _, _) => {
                let mut next = 0;
                if block.is_some() || o.tool_calls.is_empty() {
                    if block.is_none() {
                        out += &emit(
                            json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
                        );
                    }
                    out += &emit(json!({ "type": "content_block_stop", "index": 0 }));
                    next = 1;
                }
                for (i, c) in o.tool_calls.iter().enumerate() {
                    let index = next + i;
                    let mut start = tool_use(c);
                    start["input"] = json!({});
                    out += &emit(
                        json!({ "type": "content_block_start", "index": index, "content_block": start }),
                    );
                    out += &emit(
                        json!({ "type": "content_block_delta", "index": index, "delta": { "type": "input_json_delta", "partial_json": c.arguments.to_string() } }),
                    );
                    out += &emit(json!({ "type": "content_block_stop", "index": index }));
                }
                out += &emit(
                    json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason(&o), "stop_sequence": o.stop_string }, "usage": usage(&o) }),
                );
                out += &emit(json!({ "type": "message_stop" }));
            }
            Event::Failed(e) => out += &emit(error_body(&e)),
        }
        out
    });
    Ok(sse(lines))
}

/// POST /v1/messages/count_tokens: the prompt's tokens as the request would be rendered.
pub async fn count_tokens(
    State(app): State<Arc<App>>,
    body: Bytes,
) -> Result<Response, AnthropicError> {
    let mut req: Value = job::parse(&body)?;
    // (count_tokens has no max_tokens; the check needs one.)
    req["max_tokens"] = json!(1);
    let req: MessagesRequest = serde_json::from_value(req)
        .map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
    app.check_model(req.model())?;
    let (spec, messages) = req.check()?;
    let msgs = match &spec.params.tools {
        Some(t) => t.describe(&messages),
        None => messages,
    };
    let n = app
        .pool
        .chat_tokens(msgs, Default::default())
        .await
        .map_err(ApiError::internal)?
        .len();
    Ok(Json(json!({ "input_tokens": n })).into_response())
}
