//! OpenAI's Responses API, stateless as Ollama serves it: POST /v1/responses with `input` (text
//! or items: messages, function calls and their outputs), `instructions`, `max_output_tokens`,
//! `text.format`, function tools; one response object, or its event stream (`response.created`
//! … `response.completed`). Errors in OpenAI's shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use phi4::{DoneReason, Outcome};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::job::{self, KeyId, Prompt, RequestBody, Spec, WireCall, WireMessage};
use super::openai::{sse, OpenAiError};
use super::run::{self, async_stream, Event};
use super::{ApiError, App};

#[derive(Deserialize)]
pub struct ResponsesRequest {
    model: String,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's field).
    cache_salt: Option<String>,
    #[serde(default)]
    input: Value,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    text: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    stream: Option<bool>,
    previous_response_id: Option<String>,
}

/// What a response repeats of its request.
#[derive(Clone)]
pub struct Echo {
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: f64,
    top_p: f64,
    text: Value,
    tools: Value,
    tool_choice: Value,
    parallel_tool_calls: bool,
}

/// A content part's text: `input_text`, `output_text` or `text` (phi4 reads text only).
fn part_text(p: &Value) -> Result<&str, ApiError> {
    match p.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => p
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("a text part has no text")),
        Some("input_image" | "input_file") => Err(ApiError::bad(
            "phi4 does not support images or files (it reads text only)",
        )),
        _ => Err(ApiError::bad(
            "a content part must be input_text or output_text",
        )),
    }
}

/// A string, or an array of text parts, as one text.
fn text_of(v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts.iter().map(part_text).collect(),
        Some(_) => Err(ApiError::bad(
            "content must be a string or an array of parts",
        )),
    }
}

/// The conversation of `input` (after `instructions`, as a system message).
fn conversation(input: Value, instructions: Option<&str>) -> Result<Vec<WireMessage>, ApiError> {
    let mut msgs: Vec<WireMessage> = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        msgs.push(WireMessage {
            role: "system".into(),
            content: i.into(),
            ..Default::default()
        });
    }
    let items = match input {
        Value::String(s) => vec![json!({ "role": "user", "content": s })],
        Value::Array(a) => a,
        Value::Null => return Err(ApiError::bad("input is required")),
        _ => return Err(ApiError::bad("input must be a string or an array of items")),
    };
    for item in items {
        let kind = item.get("type").and_then(Value::as_str);
        match kind {
            None | Some("message") => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                msgs.push(WireMessage {
                    role: role.into(),
                    content: text_of(item.get("content"))?,
                    ..Default::default()
                });
            }
            Some("function_call") => {
                let field = |k: &str| item.get(k).and_then(Value::as_str).map(String::from);
                let call = WireCall {
                    id: field("call_id"),
                    name: field("name")
                        .ok_or_else(|| ApiError::bad("a function_call has no name"))?,
                    arguments: job::arguments(item.get("arguments"))?,
                };
                match msgs.last_mut() {
                    Some(m) if m.role == "assistant" => m.calls.push(call),
                    _ => msgs.push(WireMessage {
                        role: "assistant".into(),
                        calls: vec![call],
                        ..Default::default()
                    }),
                }
            }
            Some("function_call_output") => msgs.push(WireMessage {
                role: "tool".into(),
                content: text_of(item.get("output"))?,
                call_id: item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .map(String::from),
                ..Default::default()
            }),
            // Reasoning from another model: nothing Phi-4 reads.
            Some("reasoning") => {}
            Some(t) => {
                return Err(ApiError::bad(format!(
                    "input item type {t:?} is not supported"
                )))
            }
        }
    }
    Ok(msgs)
}

impl RequestBody for ResponsesRequest {
    type Checked = (Spec, Vec<phi4::chat::Message>, Echo);
    fn model(&self) -> &str {
        &self.model
    }
    fn check(self) -> Result<Self::Checked, ApiError> {
        if self.previous_response_id.is_some() {
            return Err(ApiError::bad(
                "previous_response_id is not supported: phi4's responses are stateless (send the conversation in input)",
            ));
        }
        let mut opts = Map::new();
        opts.insert("temperature".into(), json!(self.temperature.unwrap_or(1.0)));
        opts.insert("top_p".into(), json!(self.top_p.unwrap_or(1.0)));
        if let Some(n) = self.max_output_tokens {
            if n < 1 {
                return Err(ApiError::bad(format!(
                    "max_output_tokens {n} must be at least 1"
                )));
            }
            opts.insert("num_predict".into(), json!(n));
        }
        let mut spec = Spec::from_options(
            self.model,
            self.cache_salt,
            opts,
            self.stream.unwrap_or(false),
        )?;
        let format = self
            .text
            .as_ref()
            .and_then(|t| t.get("format"))
            .filter(|f| !f.is_null());
        // The Responses API's format, in the chat API's words.
        let format = format.map(|f| match f.get("type").and_then(Value::as_str) {
            Some("json_schema") => {
                json!({ "type": "json_schema", "json_schema": { "schema": f.get("schema") } })
            }
            _ => f.clone(),
        });
        spec.params.constraint = job::response_format(format.as_ref())?;
        let parallel = self.parallel_tool_calls.unwrap_or(true);
        let tools = job::tools(self.tools.as_ref(), self.tool_choice.as_ref(), parallel)?;
        spec.set_tools(tools, self.tool_choice.as_ref())?;
        let messages = job::conversation(conversation(self.input, self.instructions.as_deref())?)?;
        if messages.iter().all(|m| m.role == phi4::chat::Role::System) {
            return Err(ApiError::bad("input holds no message to answer"));
        }
        let echo = Echo {
            instructions: self.instructions,
            max_output_tokens: self.max_output_tokens,
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            text: self
                .text
                .unwrap_or_else(|| json!({ "format": { "type": "text" } })),
            tools: self.tools.unwrap_or_else(|| json!([])),
            tool_choice: self.tool_choice.unwrap_or_else(|| json!("auto")),
            parallel_tool_calls: parallel,
        };
        Ok((spec, messages, echo))
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response object: `status` in_progress (no output yet), completed or incomplete.
fn response(id: &str, model: &str, echo: &Echo, out: Option<(&Outcome, Vec<Value>)>) -> Value {
    let created = now();
    let (status, incomplete, output, usage) = match out {
        None => ("in_progress", Value::Null, vec![], Value::Null),
        Some((o, items)) => {
            let t = &o.timings;
            let (input, output) = (t.prompt_tokens, t.eval_count);
            let cached = t.cached_tokens();
            let usage = json!({ "input_tokens": input, "input_tokens_details": { "cached_tokens": cached },
                "output_tokens": output, "output_tokens_details": { "reasoning_tokens": 0 }, "total_tokens": input + output });
            match o.reason {
                DoneReason::Length | DoneReason::ContextFull => (
                    "incomplete",
                    json!({ "reason": "max_output_tokens" }),
                    items,
                    usage,
                ),
                _ => ("completed", Value::Null, items, usage),
            }
        }
    };
    json!({
        "id": id, "object": "response", "created_at": created, "status": status,
        "completed_at": (status != "in_progress").then_some(created),
        "error": null, "incomplete_details": incomplete, "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens, "model": model, "output": output,
        "parallel_tool_calls": echo.parallel_tool_calls, "previous_response_id": null,
        "reasoning": null, "store": false, "temperature": echo.temperature, "text": echo.text,
        "tool_choice": echo.tool_choice, "tools": echo.tools, "top_p": echo.top_p,
        "truncation": "disabled", "usage": usage, "metadata": {},
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "completed" {
        json!([{ "type": "output_text", "text": text, "annotations": [] }])
    } else {
        json!([])
    };
    json!({ "type": "message", "id": id, "status": status, "role": "assistant", "content": content })
}

fn call_item(id: &str, call: &phi4::ToolCall, status: &str) -> Value {
    let args = if status == "completed" {
        call.arguments.to_string()
    } else {
        String::new()
    };
    json!({ "type": "function_call", "id": id, "call_id": run::call_id(), "name": call.name, "arguments": args, "status": status })
}

/// The output items of a finished reply: its text (unless it is only calls), then its calls.
fn output(msg_id: &str, text: &str, o: &Outcome) -> Vec<Value> {
    let mut items = Vec::new();
    if !text.is_empty() || o.tool_calls.is_empty() {
        items.push(message_item(msg_id, text, "completed"));
    }
    items.extend(
        o.tool_calls
            .iter()
            .map(|c| call_item(&run::new_id("fc_"), c, "completed")),
    );
    items
}

pub async fn create(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyId>,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let (admission, (mut spec, messages, echo)) = app.admit::<ResponsesRequest>(&body)?;
    let (model, stream) = (spec.model.clone(), spec.stream);
    app.default_tool_choice(&mut spec, &messages);
    let job = spec.job(Prompt::Chat(messages), "POST /v1/responses", admission, key);
    let id = run::new_id("resp_");
    let msg_id = run::new_id("msg_");
    let (first, rx) = run::begin(&app.pool, job).await?;
    if !stream {
        let r = run::collect(first, rx).await?;
        let items = output(&msg_id, &r.text, &r.outcome);
        return Ok(Json(response(&id, &model, &echo, Some((&r.outcome, items)))).into_response());
    }
    let mut events = Events {
        seq: 0,
        text: String::new(),
        began: false,
        in_message: false,
    };
    let lines = async_stream(first, rx, move |event| {
        let mut out = String::new();
        if !events.began {
            events.began = true;
            let r = response(&id, &model, &echo, None);
            out += &events.emit(json!({ "type": "response.created", "response": r }));
            out += &events.emit(json!({ "type": "response.in_progress", "response": r }));
        }
        let part = |text: &str| json!({ "type": "output_text", "text": text, "annotations": [] });
        match event {
            Event::Piece(p, _) if p.is_empty() => {}
            Event::Piece(p, _) => {
                if !events.in_message {
                    events.in_message = true;
                    out += &events.emit(json!({ "type": "response.output_item.added", "output_index": 0, "item": message_item(&msg_id, "", "in_progress") }));
                    out += &events.emit(json!({ "type": "response.content_part.added", "item_id": msg_id, "output_index": 0, "content_index": 0, "part": part("") }));
                }
                events.text.push_str(&p);
                out += &events.emit(json!({ "type": "response.output_text.delta", "item_id": msg_id, "output_index": 0, "content_index": 0, "delta": p }));
            }
            Event::Done(o, _, _) => {
                let text = std::mem::take(&mut events.text);
                let mut index = 0;
                if events.in_message || o.tool_calls.is_empty() {
                    if !events.in_message {
                        out += &events.emit(json!({ "type": "response.output_item.added", "output_index": 0, "item": message_item(&msg_id, "", "in_progress") }));
                        out += &events.emit(json!({ "type": "response.content_part.added", "item_id": msg_id, "output_index": 0, "content_index": 0, "part": part("") }));
                    }
                    out += &events.emit(json!({ "type": "response.output_text.done", "item_id": msg_id, "output_index": 0, "content_index": 0, "text": text }));
                    out += &events.emit(json!({ "type": "response.content_part.done", "item_id": msg_id, "output_index": 0, "content_index": 0, "part": part(&text) }));
                    out += &events.emit(json!({ "type": "response.output_item.done", "output_index": 0, "item": message_item(&msg_id, &text, "completed") }));
                    index = 1;
                }
                let mut items: Vec<Value> = Vec::new();
                if index == 1 {
                    items.push(message_item(&msg_id, &text, "completed"));
                }
                for (i, c) in o.tool_calls.iter().enumerate() {
                    let output_index = index + i;
                    let mut item = call_item(&run::new_id("fc_"), c, "in_progress");
                    let item_id = item["id"].clone();
                    out += &events.emit(json!({ "type": "response.output_item.added", "output_index": output_index, "item": item }));
                    let args = c.arguments.to_string();
                    out += &events.emit(json!({ "type": "response.function_call_arguments.delta", "item_id": item_id, "output_index": output_index, "delta": args }));
                    out += &events.emit(json!({ "type": "response.function_call_arguments.done", "item_id": item_id, "output_index": output_index, "arguments": args }));
                    item["arguments"] = json!(args);
                    item["status"] = json!("completed");
                    out += &events.emit(json!({ "type": "response.output_item.done", "output_index": output_index, "item": item }));
                    items.push(item);
                }
                let r = response(&id, &model, &echo, Some((&o, items)));
                let kind = if r["status"] == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                out += &events.emit(json!({ "type": kind, "response": r }));
            }
            Event::Failed(e) => {
                out += &events.emit(
                    json!({ "type": "error", "code": null, "message": e.message, "param": null }),
                );
            }
        }
        out
    });
    Ok(sse(lines))
}

/// The event stream's state: events are numbered, the message item opens at the first text.
struct Events {
    seq: u64,
    text: String,
    began: bool,
    in_message: bool,
}

impl Events {
    fn emit(&mut self, mut v: Value) -> String {
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        let kind = v["type"].as_str().unwrap_or("message").to_string();
        format!("event: {kind}\ndata: {v}\n\n")
    }
}
