//! A request, in either dialect, turned into a [`Job`]: its body parsed, its options, format and
//! keep-alive checked. Nothing here touches a session; `run.rs` runs the job.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phi4::chat::{Message, Role};
use phi4::{Constraint, GenerateParams, Tool, ToolCall, ToolChoice, Tools};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// What a request asks for, checked.
pub struct Job {
    pub prompt: Prompt,
    pub params: GenerateParams,
    pub shape: Shape,
    pub keep_alive: KeepAlive,
    /// "POST /api/chat": the request, for the log line written when the generation ends.
    pub label: String,
    /// The request's place among those let in (released when the job ends).
    pub admission: Admission,
    /// Whose cached prefixes it may reuse.
    pub scope: Scope,
}

/// A request let in (`Pool::admit`): one of the places counted by `counter` until dropped;
/// when it came, and how long it waited for the model to load (Ollama's `load_duration`: only
/// the request that loaded the model has one).
pub struct Admission {
    counter: Arc<AtomicUsize>,
    pub started: Instant,
    /// Nanoseconds this request spent loading the model.
    pub loading: Arc<AtomicU64>,
}

impl Admission {
    /// A place, if fewer than `limit` are taken.
    pub fn within(counter: &Arc<AtomicUsize>, limit: usize) -> Option<Admission> {
        if counter.fetch_add(1, Ordering::SeqCst) >= limit {
            counter.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Admission {
            counter: counter.clone(),
            started: Instant::now(),
            loading: Arc::default(),
        })
    }

    /// Nanoseconds it spent loading the model.
    pub fn load_duration(&self) -> u64 {
        self.loading.load(Ordering::Relaxed)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The configured API key a request came with (its index among them), when keys are
/// configured: set by the server's gate on every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyId(pub Option<usize>);

/// Whose cached prefixes a request may reuse: those of requests with the same API key (where
/// several are configured) and the same `cache_salt`. Requests of different scopes never share
/// a cached prefix, in memory or in the prompt cache, so neither `prompt_eval_count` nor the
/// time to the first token tells one client how much of its prompt another sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scope(pub u64);

impl Scope {
    /// The scope of a request with `key` and `cache_salt` (none of either: the shared one, 0).
    pub fn of(key: KeyId, salt: Option<&str>) -> Scope {
        let salt = salt.filter(|s| !s.is_empty());
        if key.0.is_none_or(|k| k == 0) && salt.is_none() {
            return Scope(0);
        }
        let bytes = key.0.map_or(u64::MAX, |k| k as u64).to_le_bytes();
        let all = bytes.iter().chain(salt.unwrap_or("").as_bytes());
        let h = all.fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        Scope(h.max(1))
    }
}

/// The session a request asks for (Ollama's num_ctx, num_thread, num_batch; 0: the server's),
/// and its drafting (phi4's `draft` option; None: the server's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    pub n_ctx: usize,
    pub n_threads: usize,
    pub n_batch: usize,
    pub draft: Option<usize>,
}

pub enum Prompt {
    Chat(Vec<Message>),
    Raw(Vec<u32>),
}

/// How long the model stays loaded after a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeepAlive {
    For(Duration),
    Forever,
}

/// The body of a generation route, as its JSON reads: the model it names, and the rest checked
/// into [`RequestBody::Checked`] without a model, a session or a place in the queue (so the
/// request-layer fuzz target runs every route's checks on arbitrary bytes).
pub trait RequestBody: DeserializeOwned {
    type Checked;
    /// The model the request names.
    fn model(&self) -> &str;
    /// Every field checked: 400 with what is wrong.
    fn check(self) -> Result<Self::Checked, ApiError>;
}

/// What the generation routes share, checked: the job but its prompt.
pub struct Spec {
    pub model: String,
    pub params: GenerateParams,
    pub shape: Shape,
    pub keep_alive: KeepAlive,
    pub stream: bool,
    /// Requests with another salt never reuse this one's cached prefix (vLLM's `cache_salt`).
    pub salt: Option<String>,
    /// The options phi4 has no use for, named in the log.
    pub ignored: Vec<String>,
    /// The request named its tool choice (else the server's default applies).
    pub choice_given: bool,
}

impl Spec {
    /// The spec of a request whose fields were mapped onto Ollama's option names (the OpenAI
    /// and Anthropic routes); its keep-alive the default.
    pub fn from_options(
        model: String,
        salt: Option<String>,
        opts: serde_json::Map<String, Value>,
        stream: bool,
    ) -> Result<Spec, ApiError> {
        let mut params = GenerateParams::default();
        let mut shape = Shape::default();
        let ignored = options(Some(&Value::Object(opts)), &mut params, &mut shape)?;
        Ok(Spec {
            model,
            params,
            shape,
            keep_alive: keep_alive(None)?,
            stream,
            salt,
            ignored,
            choice_given: false,
        })
    }

    /// Tools for the reply (not with a format: a reply cannot follow both).
    pub fn set_tools(
        &mut self,
        tools: Option<Tools>,
        choice: Option<&Value>,
    ) -> Result<(), ApiError> {
        self.choice_given = choice.is_some_and(|c| !c.is_null());
        if tools.is_some() && self.params.constraint.is_some() {
            return Err(ApiError::bad(
                "tools cannot be combined with a format (format / response_format)",
            ));
        }
        self.params.tools = tools;
        Ok(())
    }

    /// The job of a request let in (`admission`) with `key`.
    pub fn job(self, prompt: Prompt, label: &str, admission: Admission, key: KeyId) -> Job {
        if !self.ignored.is_empty() {
            eprintln!(
                "{label}: options ignored (phi4 has no use for them): {}",
                self.ignored.join(", ")
            );
        }
        Job {
            prompt,
            params: self.params,
            shape: self.shape,
            keep_alive: self.keep_alive,
            label: label.into(),
            admission,
            scope: Scope::of(key, self.salt.as_deref()),
        }
    }
}

/// What the embedding routes share, checked.
pub struct EmbedSpec {
    pub model: String,
    pub texts: Vec<String>,
    /// Cut a text longer than the context to fit (else 400).
    pub truncate: bool,
    /// Keep only the first `dims` numbers of each embedding (then normalised again).
    pub dims: Option<usize>,
    pub shape: Shape,
    pub keep_alive: KeepAlive,
    pub salt: Option<String>,
}

/// Texts to embed, let in: what an embedding route runs (`run::embed`).
pub struct EmbedJob {
    pub texts: Vec<String>,
    pub truncate: bool,
    pub shape: Shape,
    pub keep_alive: KeepAlive,
    pub label: String,
    pub admission: Admission,
    pub scope: Scope,
}

impl EmbedSpec {
    /// A spec of `texts` (an `input`: a string or an array of strings) with the options of an
    /// Ollama request (or none).
    pub fn new(
        model: String,
        input: Option<Value>,
        opts: Option<&Value>,
        keep: Option<&Value>,
        dimensions: Option<i64>,
    ) -> Result<EmbedSpec, ApiError> {
        let wrong = || ApiError::bad("input must be a string or an array of strings");
        let texts = match input {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(wrong()),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(wrong()),
        };
        let dims = match dimensions {
            None => None,
            Some(d) if d >= 1 => Some(d as usize),
            Some(d) => return Err(ApiError::bad(format!("dimensions {d} must be at least 1"))),
        };
        let mut shape = Shape::default();
        // Sampling options mean nothing to an embedding; the context and threads do.
        options(opts, &mut GenerateParams::default(), &mut shape)?;
        Ok(EmbedSpec {
            model,
            texts,
            truncate: true,
            dims,
            shape,
            keep_alive: keep_alive(keep)?,
            salt: None,
        })
    }

    pub fn job(self, label: &str, admission: Admission, key: KeyId) -> EmbedJob {
        EmbedJob {
            texts: self.texts,
            truncate: self.truncate,
            shape: self.shape,
            keep_alive: self.keep_alive,
            label: label.into(),
            admission,
            scope: Scope::of(key, self.salt.as_deref()),
        }
    }
}

/// `v`'s first `dims` numbers (all without), scaled to unit length (L2), as Ollama's and
/// OpenAI's embeddings are.
pub fn normalized(mut v: Vec<f32>, dims: Option<usize>) -> Vec<f32> {
    v.truncate(dims.unwrap_or(v.len()));
    phi4::session::normalize(&mut v);
    v
}

/// The body as JSON of type T: malformed JSON and wrong types are 400s naming the problem.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// A body of route `B` parsed and checked (but its model name).
pub fn checked<B: RequestBody>(body: &[u8]) -> Result<B::Checked, ApiError> {
    parse::<B>(body)?.check()
}

/// Ollama's `options` (and the OpenAI fields mapped onto them) into generation parameters and a
/// context size. Every value of an option phi4 uses is checked; Ollama's special values keep
/// their meaning; `null` is unset. Returns the names of the options phi4 has no use for
/// (Ollama's GPU, memory-mapping and other samplers' options, or unknown names), which, as
/// Ollama does, are ignored rather than refused.
pub fn options(
    opts: Option<&Value>,
    gp: &mut GenerateParams,
    shape: &mut Shape,
) -> Result<Vec<String>, ApiError> {
    let mut ignored = Vec::new();
    let Some(opts) = opts.filter(|o| !o.is_null()) else {
        return Ok(ignored);
    };
    let Some(map) = opts.as_object() else {
        return Err(ApiError::bad("options must be an object"));
    };
    for (name, v) in map.iter().filter(|(_, v)| !v.is_null()) {
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
                    .filter(|&n| n <= phi4::limits::MAX_THREADS)
                    .ok_or_else(|| bad(&format!("must be in 0..={}", phi4::limits::MAX_THREADS)))?
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
                if name == "draft" {
                    shape.draft = Some(gp.draft);
                }
            }
            _ => ignored.push(name.clone()),
        }
    }
    gp.sampling.validate().map_err(ApiError::bad)?;
    Ok(ignored)
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
        None | Some(Value::Null) => return Ok(KeepAlive::For(Duration::from_secs(300))),
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
        KeepAlive::For(Duration::from_secs_f64(secs.min(1e9)))
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

/// A completion's `suffix` (fill-in-the-middle), which Phi-4's chat format cannot express:
/// absent or empty only.
pub fn no_suffix(suffix: Option<&str>) -> Result<(), ApiError> {
    match suffix {
        Some(s) if !s.is_empty() => Err(ApiError::bad(
            "phi4 does not support suffix (fill-in-the-middle)",
        )),
        _ => Ok(()),
    }
}

/// A message as a request carries it, before it is checked into the conversation.
#[derive(Default)]
pub struct WireMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant message made.
    pub calls: Vec<WireCall>,
    /// A tool message: the call it answers (OpenAI's `tool_call_id`) …
    pub call_id: Option<String>,
    /// … or the tool whose result it is (Ollama's `tool_name`).
    pub tool_name: Option<String>,
}

/// A call in an assistant message as Ollama's and OpenAI's chat APIs send it back:
/// `{"id", "function": {"name", "arguments"}}` (arguments an object, or OpenAI's string of JSON).
#[derive(serde::Deserialize)]
pub struct ChatToolCall {
    id: Option<String>,
    function: ChatFunction,
}

#[derive(serde::Deserialize)]
struct ChatFunction {
    name: String,
    arguments: Option<Value>,
}

/// The calls of a chat message, checked.
pub fn chat_calls(calls: Vec<ChatToolCall>) -> Result<Vec<WireCall>, ApiError> {
    calls
        .into_iter()
        .map(|c| {
            Ok(WireCall {
                id: c.id,
                name: c.function.name,
                arguments: arguments(c.function.arguments.as_ref())?,
            })
        })
        .collect()
}

/// A call in an assistant message of a request.
pub struct WireCall {
    pub id: Option<String>,
    pub name: String,
    pub arguments: Value,
}

/// The conversation of a request: roles checked (`developer` is OpenAI's `system`), an
/// assistant message's calls written back the way the model writes them, and every tool
/// message answering a call of the assistant message before it.
pub fn conversation(msgs: Vec<WireMessage>) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::with_capacity(msgs.len());
    let mut open: Vec<WireCall> = Vec::new();
    for m in msgs {
        let role = match m.role.as_str() {
            "developer" => Role::System,
            r => Role::parse(r).ok_or_else(|| {
                ApiError::bad(format!(
                    "role {:?} is not system, user, assistant or tool",
                    m.role
                ))
            })?,
        };
        if role != Role::Assistant && !m.calls.is_empty() {
            return Err(ApiError::bad("only assistant messages carry tool calls"));
        }
        match role {
            Role::Tool => {
                if open.is_empty() {
                    return Err(ApiError::bad(
                        "a tool message must answer a tool call of the assistant message before it",
                    ));
                }
                if let Some(id) = m.call_id.as_deref().filter(|i| !i.is_empty()) {
                    if !open.iter().any(|c| c.id.as_deref() == Some(id)) {
                        return Err(ApiError::bad(format!(
                            "tool_call_id {id:?} answers no call of the assistant message before it"
                        )));
                    }
                }
                if let Some(name) = m.tool_name.as_deref().filter(|n| !n.is_empty()) {
                    if !open.iter().any(|c| c.name == name) {
                        return Err(ApiError::bad(format!(
                            "tool_name {name:?} answers no call of the assistant message before it"
                        )));
                    }
                }
                out.push(Message::new(role, m.content));
            }
            Role::Assistant => {
                let calls: Vec<ToolCall> = m
                    .calls
                    .iter()
                    .map(|c| ToolCall {
                        name: c.name.clone(),
                        arguments: c.arguments.clone(),
                    })
                    .collect();
                out.push(Message::new(
                    role,
                    phi4::tools::reply_text(&m.content, &calls),
                ));
                open = m.calls;
            }
            _ => {
                open.clear();
                out.push(Message::new(role, m.content));
            }
        }
    }
    Ok(out)
}

/// A call's arguments as OpenAI sends them back: a string of JSON (an object may come too).
pub fn arguments(v: Option<&Value>) -> Result<Value, ApiError> {
    let args = match v {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Default::default()),
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| ApiError::bad(format!("a tool call's arguments are not JSON: {e}")))?,
        Some(v) => v.clone(),
    };
    if !args.is_object() {
        return Err(ApiError::bad(
            "a tool call's arguments must be a JSON object",
        ));
    }
    Ok(args)
}

/// The tools of a request (None without any): definitions in any API's shape, the choice as
/// OpenAI (`auto`, `none`, `required`, a function), the Responses API or Anthropic (`any`,
/// `tool`) say it, and whether several calls may come in one reply.
pub fn tools(
    defs: Option<&Value>,
    choice: Option<&Value>,
    parallel: bool,
) -> Result<Option<Tools>, ApiError> {
    let defs = match defs {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => &a[..],
        Some(_) => return Err(ApiError::bad("tools must be an array")),
    };
    let choice = tool_choice(choice)?;
    if defs.is_empty() {
        return match choice {
            None | Some(ToolChoice::None | ToolChoice::Auto) => Ok(None),
            Some(_) => Err(ApiError::bad("tool_choice needs tools")),
        };
    }
    let list = defs
        .iter()
        .map(|d| {
            // Anthropic's tools name their schema input_schema.
            let mut d = d.clone();
            if let Some(o) = d.as_object_mut() {
                if let Some(schema) = o.remove("input_schema") {
                    o.insert("parameters".into(), schema);
                }
            }
            Tool::from_json(&d).map_err(ApiError::bad)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tools = Tools {
        tools: list,
        choice: choice.unwrap_or_default(),
        parallel,
    };
    tools.check().map_err(ApiError::bad)?;
    Ok(Some(tools))
}

fn tool_choice(v: Option<&Value>) -> Result<Option<ToolChoice>, ApiError> {
    let named = |name: Option<&Value>| {
        name.and_then(Value::as_str)
            .map(|n| ToolChoice::Function(n.to_string()))
            .ok_or_else(|| ApiError::bad("tool_choice names no function"))
    };
    let by_word = |w: &str| match w {
        "auto" => Ok(ToolChoice::Auto),
        "none" => Ok(ToolChoice::None),
        "required" | "any" => Ok(ToolChoice::Required),
        w => Err(ApiError::bad(format!(
            "tool_choice {w:?} is not auto, none, required or a function"
        ))),
    };
    Ok(Some(match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(w)) => by_word(w)?,
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("function") => match o.get("function") {
                Some(f) => named(f.get("name"))?,
                None => named(o.get("name"))?,
            },
            Some("tool") => named(o.get("name"))?,
            Some(w) => by_word(w)?,
            None => return Err(ApiError::bad("tool_choice has no type")),
        },
        Some(_) => return Err(ApiError::bad("tool_choice must be a string or an object")),
    }))
}

/// `logprobs` and `top_logprobs` of a request: how many alternatives per token, if any.
pub fn logprobs(on: bool, top: Option<i64>) -> Result<Option<usize>, ApiError> {
    let max = phi4::limits::MAX_TOP_LOGPROBS;
    let top = match top {
        None => 0,
        Some(n) if (0..=max as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad(format!(
                "top_logprobs {n} must be between 0 and {max}"
            )))
        }
    };
    Ok(on.then_some(top))
}
