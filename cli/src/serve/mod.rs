//! `phi4 serve`: Ollama's HTTP API (and OpenAI's, as Ollama serves it) over the library, so
//! Ollama's and OpenAI's clients work unchanged. axum on tokio; the forward pass runs on
//! blocking threads, never on the runtime's workers (`run.rs`); sessions are pooled by cached
//! prefix (`pool.rs`); the wire formats are `ollama.rs`, `openai.rs`, `responses.rs` (OpenAI's
//! Responses API) and `anthropic.rs` (Anthropic's Messages API); connections and their timeouts
//! are `listen.rs`.

mod anthropic;
mod job;
mod listen;
mod ollama;
mod openai;
mod origins;
mod pool;
mod prompt_cache;
mod responses;
mod run;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::Res;
use job::Admission;
use pool::Pool;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// A name clients use for the model (again for more names; each answers with or without
    /// a tag of `latest` or `14b`, in any case).
    #[arg(long = "name", value_name = "NAME", default_value = "phi4")]
    names: Vec<String>,
    /// Address to listen on [default: OLLAMA_HOST's, else 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// Port [default: OLLAMA_HOST's, else 11434].
    #[arg(long)]
    port: Option<u16>,
    #[arg(long, default_value_t = 1, help = format!(
        "Requests that generate at once, 1..={} (each has a session of its own; above 1 they \
         decode in the same steps)", phi4::limits::MAX_BATCH
    ))]
    parallel: usize,
    #[arg(long, default_value_t = phi4::limits::DEFAULT_DRAFT, help = format!(
        "Speculative decoding for every request that names no `draft` option: tokens drafted \
         per step by prompt lookup, 0..={} (0: off)", phi4::limits::MAX_DRAFT
    ))]
    draft: usize,
    /// Requests that may wait for a session; more get 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Threads per generation [default: the number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, env = "OLLAMA_CONTEXT_LENGTH", help = format!(
        "The context of requests that set no num_ctx, at most the model's and {} [default: {}]; \
         the memory plan's", phi4::limits::MAX_CONTEXT, phi4::limits::DEFAULT_CONTEXT
    ))]
    ctx_size: Option<usize>,
    /// Serve even when the memory plan (--parallel sessions of --ctx-size with --kv-type) is
    /// larger than the memory available (see `phi4 info`).
    #[arg(long)]
    skip_memory_check: bool,
    /// What every session's KV cache keeps K and V in: f16, q8_0 (about half the memory) or
    /// q4_0 (about a quarter).
    #[arg(long, value_name = "TYPE", env = "OLLAMA_KV_CACHE_TYPE", default_value = "f16",
          value_parser = phi4::KvType::from_name)]
    kv_type: phi4::KvType,
    /// When a conversation outgrows the context, drop its oldest turns (after the system
    /// message) instead of answering 400.
    #[arg(long)]
    drop_oldest: bool,
    /// Require `Authorization: Bearer KEY` (also PHI4_API_KEY). Repeatable: each key's
    /// clients reuse only their own cached prefixes.
    #[arg(long, env = "PHI4_API_KEY", hide_env_values = true)]
    api_key: Vec<String>,
    /// More keys, one per line (blank lines and lines starting with # are skipped).
    #[arg(long, value_name = "FILE")]
    api_keys_file: Option<PathBuf>,
    /// Keep evaluated system prompts in DIR across restarts: a conversation whose system prompt
    /// was seen before starts from its saved state instead of evaluating it again.
    #[arg(long, value_name = "DIR")]
    prompt_cache_dir: Option<PathBuf>,
    /// At most this many MiB of saved prompts (the least recently used are removed first).
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    prompt_cache_max_mib: u64,
    /// Web pages that may call the server from a browser, beyond this machine's own
    /// (`http://localhost:*`, …): origins like `https://app.example`, `*` a wildcard;
    /// repeatable, or comma-separated in OLLAMA_ORIGINS.
    #[arg(long, env = "OLLAMA_ORIGINS", value_delimiter = ',')]
    origins: Vec<String>,
    /// Seconds a client has to send a request's headers, its body, or its next request on a
    /// kept-alive connection; then the connection is closed (a body: 408).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    read_timeout: f64,
    /// Log more than one line per request.
    #[arg(long)]
    verbose: bool,
    /// The tool choice of requests with tools that name none: `auto` (the model decides) or
    /// `alternate` (a call after each user message, an answer after the tools' results: for a
    /// model that does not decide on its own, such as the demo model).
    #[arg(long, value_name = "CHOICE", default_value = "auto", value_parser = ["auto", "alternate"])]
    tool_choice: String,
}

/// What every handler sees.
pub struct App {
    pool: Arc<Pool>,
    /// The model's names (the first is the one /api/ps shows).
    names: Vec<String>,
    /// The keys a request may bring (none: no authentication).
    api_keys: Vec<String>,
    verbose: bool,
    /// `--tool-choice alternate`.
    alternate_tools: bool,
    limits: listen::Limits,
    origins: origins::Origins,
}

/// An error answer: the status and the message, shaped per API by the handler's module.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: m.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: m.into(),
        }
    }
    pub fn busy() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "server busy, please try again.  maximum pending requests exceeded".into(),
        }
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: m.into(),
        }
    }

    /// In the shape of the API that `path` belongs to: Anthropic's on /v1/messages, OpenAI's on
    /// the rest of /v1, Ollama's elsewhere.
    pub fn shaped(self, path: &str) -> Response {
        if path.starts_with("/v1/messages") {
            anthropic::AnthropicError(self).into_response()
        } else if path.starts_with("/v1/") {
            openai::OpenAiError::from(self).into_response()
        } else {
            self.into_response()
        }
    }
}

/// Ollama's shape: `{"error": "..."}`.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl App {
    /// A generation request: let in (or refused, 503) before any work on its body, then its
    /// body parsed, the model it names checked (404), and the rest (400).
    pub fn admit<B: job::RequestBody>(
        &self,
        body: &[u8],
    ) -> Result<(Admission, B::Checked), ApiError> {
        let admission = self.pool.admit().ok_or_else(ApiError::busy)?;
        let req: B = job::parse(body)?;
        self.check_model(req.model())?;
        Ok((admission, req.check()?))
    }

    /// A request with tools that names no choice gets the server's (`--tool-choice`).
    pub fn default_tool_choice(&self, spec: &mut job::Spec, msgs: &[phi4::chat::Message]) {
        use phi4::chat::Role;
        let Some(tools) = spec.params.tools.as_mut().filter(|_| !spec.choice_given) else {
            return;
        };
        if self.alternate_tools {
            tools.choice = match msgs.last().map(|m| m.role) {
                Some(Role::Tool) => phi4::ToolChoice::None,
                _ => phi4::ToolChoice::Required,
            };
        }
    }

    /// The model a request names: ours, in any case, with no tag or one of [`MODEL_TAGS`]
    /// (`phi4`, `PHI4`, `phi4:latest`, `phi4:14b`), or 404.
    pub fn check_model(&self, name: &str) -> Result<(), ApiError> {
        let (base, tag) = name.rsplit_once(':').unwrap_or((name, "latest"));
        let ours = self.names.iter().any(|n| {
            name.eq_ignore_ascii_case(n)
                || (base.eq_ignore_ascii_case(n)
                    && MODEL_TAGS.iter().any(|t| t.eq_ignore_ascii_case(tag)))
        });
        if ours {
            Ok(())
        } else {
            Err(ApiError::not_found(format!("model '{name}' not found")))
        }
    }
}

/// The tags a request may give the model's name: Ollama's default tag, and its tag for Phi-4 by
/// size (`phi4:14b`). Names compare without regard to case, as Ollama's do.
pub const MODEL_TAGS: [&str; 2] = ["latest", "14b"];

/// The routes whose bodies [`check_body`] checks: every one that reads a body.
pub const BODY_ROUTES: [&str; 10] = [
    "/api/show",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
];

/// A body for the route `path` ([`BODY_ROUTES`]) parsed and checked as the server does before
/// it runs the request (all but the model name; no model needed): `Err` with the message a
/// client would get. For the request-layer fuzz target.
pub fn check_body(path: &str, body: &[u8]) -> Result<(), String> {
    let r = match path {
        "/api/show" => ollama::show_name(body).map(drop),
        "/api/chat" => job::checked::<ollama::ChatRequest>(body).map(drop),
        "/api/generate" => job::checked::<ollama::GenerateRequest>(body).map(drop),
        "/v1/chat/completions" => job::checked::<openai::ChatRequest>(body).map(drop),
        "/v1/completions" => job::checked::<openai::CompletionRequest>(body).map(drop),
        "/api/embed" => job::checked::<ollama::EmbedRequest>(body).map(drop),
        "/api/embeddings" => job::checked::<ollama::EmbeddingsRequest>(body).map(drop),
        "/v1/embeddings" => job::checked::<openai::EmbeddingsRequest>(body).map(drop),
        "/v1/responses" => job::checked::<responses::ResponsesRequest>(body).map(drop),
        "/v1/messages" => job::checked::<anthropic::MessagesRequest>(body).map(drop),
        _ => return Err(format!("{path} reads no body")),
    };
    r.map_err(|e| e.message)
}

/// Where to listen: --host/--port, else OLLAMA_HOST ("host", "host:port", "http://host:port"),
/// else 127.0.0.1:11434.
fn address(a: &ServeArgs) -> Result<SocketAddr, String> {
    let env = std::env::var("OLLAMA_HOST").ok().filter(|s| !s.is_empty());
    let env = env.as_deref().map(|s| {
        s.trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
    });
    let (env_host, env_port) = match env {
        Some(s) => match s.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                Some(h.to_string()),
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("OLLAMA_HOST {s:?}: bad port"))?,
                ),
            ),
            _ => (Some(s.to_string()), None),
        },
        None => (None, None),
    };
    let host = a
        .host
        .clone()
        .or(env_host)
        .unwrap_or_else(|| "127.0.0.1".into());
    let host = if host.is_empty() {
        "127.0.0.1".to_string()
    } else {
        host
    };
    let port = a.port.or(env_port).unwrap_or(11434);
    let ip: std::net::IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("{host:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

pub fn serve(a: ServeArgs) -> Res {
    phi4::limits::check_max_batch(a.parallel).map_err(|e| format!("--parallel: {e}"))?;
    phi4::GenerateParams::default()
        .set("draft", &a.draft.to_string())
        .map_err(|e| format!("--draft: {e}"))?;
    let api_keys = api_keys(&a)?;
    let addr = address(&a)?;
    let d = phi4::SessionParams::default();
    let overflow = if a.drop_oldest {
        phi4::Overflow::DropOldest
    } else {
        phi4::Overflow::Error
    };
    let session = phi4::SessionParams {
        n_ctx: a.ctx_size.unwrap_or(d.n_ctx),
        n_threads: a.threads.unwrap_or(d.n_threads),
        overflow,
        kv_type: a.kv_type,
        ..d
    };
    session.check()?;
    let plan = crate::memory::check(
        &a.model,
        true,
        &phi4::memory::PlanParams {
            n_ctx: session.n_ctx,
            kv_type: session.kv_type,
            sessions: a.parallel,
            n_batch: session.n_batch,
            n_threads: session.n_threads,
        },
        a.skip_memory_check,
    )?;
    eprintln!(
        "phi4: memory plan: {:.2} GiB for {} session(s) of {} positions, KV cache {}",
        plan.total() as f64 / (1u64 << 30) as f64,
        plan.sessions,
        plan.n_ctx,
        plan.kv_type
    );
    let cache = a
        .prompt_cache_dir
        .map(|dir| prompt_cache::PromptCache::new(dir, a.prompt_cache_max_mib << 20))
        .transpose()?;
    let pool = Pool::new(
        a.model.clone(),
        a.parallel,
        a.queue,
        session,
        cache,
        a.draft,
    );
    // Load now: a bad file is reported at start, not at the first request.
    pool.model()?;
    if !(a.read_timeout.is_finite() && a.read_timeout > 0.0) {
        return Err("--read-timeout must be a number of seconds above 0".into());
    }
    let limits = listen::Limits::new(Duration::from_secs_f64(a.read_timeout.min(1e6)));
    let app = Arc::new(App {
        pool,
        names: a.names.clone(),
        api_keys,
        verbose: a.verbose,
        alternate_tools: a.tool_choice == "alternate",
        limits,
        origins: origins::Origins::new(addr.ip(), &a.origins),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        eprintln!(
            "phi4: serving {} as '{}' on http://{}",
            a.model.display(),
            a.names.join("', '"),
            listener.local_addr()?
        );
        let expiry = app.pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let p = expiry.clone();
                let _ = tokio::task::spawn_blocking(move || p.expire()).await;
            }
        });
        listen::serve(listener, router(app.clone()), &app.limits, shutdown()).await;
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

fn router(app: Arc<App>) -> Router {
    let refused = |what: &'static str| {
        any(move || async move {
            ApiError::bad(format!("{what} is not supported: this server runs one model, from a file given at its start"))
        })
    };
    Router::new()
        .route("/", get(|| async { "Ollama is running" }).head(|| async {}))
        .route("/api/version", get(ollama::version).head(|| async {}))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/pull", post(ollama::pull))
        .route("/api/push", refused("pushing models"))
        .route("/api/create", refused("creating models"))
        .route("/api/copy", refused("copying models"))
        .route("/api/delete", refused("deleting models"))
        .route("/api/blobs/{digest}", refused("uploading blobs"))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(responses::create))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .layer(DefaultBodyLimit::max(listen::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(app.clone(), gate))
        .with_state(app)
}

/// Every request: the checks of [`check`], then one log line (method, path, status, duration;
/// a generation that started logs its own line when it ends, with its token counts).
async fn gate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let (method, path, t) = (
        req.method().clone(),
        req.uri().path().to_string(),
        Instant::now(),
    );
    if app.verbose {
        let header = |name: &str| {
            let v = req.headers().get(name).and_then(|v| v.to_str().ok());
            v.unwrap_or("-").to_string()
        };
        let (agent, length) = (header("user-agent"), header("content-length"));
        eprintln!("{method} {path} from {agent}, {length} bytes");
    }
    let resp = check(&app, req, next).await;
    let generating = matches!(
        path.as_str(),
        "/api/chat"
            | "/api/generate"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/responses"
            | "/v1/messages"
    );
    if !(generating && resp.status().is_success()) {
        eprintln!(
            "{method} {path} {} {:.1}ms",
            resp.status().as_u16(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    resp
}

/// A request's way in, each step a refusal or the next: its `Host` and `Origin` (a page of an
/// allowed origin gets the CORS headers on every answer; its preflight is answered here), its
/// key (`GET /` and `HEAD /` need none: health checks), its declared size, its body.
async fn check(app: &App, mut req: Request, next: Next) -> Response {
    let header = |req: &Request, name: &str| {
        let v = req.headers().get(name).and_then(|v| v.to_str().ok());
        v.map(String::from)
    };
    let path = req.uri().path().to_string();
    let refuse = |status: StatusCode, message: String| ApiError { status, message }.shaped(&path);
    let host = header(&req, "host");
    if !app.origins.host_allowed(host.as_deref()) {
        let host = host.unwrap_or_default();
        return refuse(
            StatusCode::FORBIDDEN,
            format!("host {host:?} is not this machine's"),
        );
    }
    let cors = match header(&req, "origin") {
        None => HeaderMap::new(),
        Some(o) if app.origins.origin_allowed(&o) => {
            app.origins.cors_headers(&o, req.method(), req.headers())
        }
        Some(o) => {
            let why = format!("origin {o:?} is not allowed (see --origins)");
            return refuse(StatusCode::FORBIDDEN, why);
        }
    };
    let preflight = req.method() == Method::OPTIONS
        && req.headers().contains_key("access-control-request-method");
    let mut resp = if preflight && !cors.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        match authorize(app, &mut req) {
            Some(refusal) => refusal,
            None => read_and_run(app, req, next).await,
        }
    };
    resp.headers_mut().extend(cors);
    resp
}

/// The request's key among the configured ones (its [`job::KeyId`] goes with it), or the 401
/// refusing it.
fn authorize(app: &App, req: &mut Request) -> Option<Response> {
    let open = req.uri().path() == "/" && matches!(*req.method(), Method::GET | Method::HEAD);
    if app.api_keys.is_empty() || open {
        req.extensions_mut().insert(job::KeyId(None));
        return None;
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    // A bearer token, or Anthropic's x-api-key.
    let given = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header("x-api-key"));
    // Every key is compared (no early end): the time says nothing of which one matched.
    let matched = given.and_then(|g| {
        let hits = app
            .api_keys
            .iter()
            .map(|k| same_secret(g.as_bytes(), k.as_bytes()));
        hits.enumerate()
            .fold(None, |found, (i, hit)| found.or(hit.then_some(i)))
    });
    if matched.is_none() {
        let mut r = ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "unauthorized".into(),
        }
        .shaped(req.uri().path());
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return Some(r);
    }
    req.extensions_mut().insert(job::KeyId(matched));
    None
}

/// The body (a declared size over the limit refused before any of it is read), then the handler.
async fn read_and_run(app: &App, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > listen::MAX_BODY as u64) {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("request body over {} MiB", listen::MAX_BODY >> 20),
        }
        .shaped(req.uri().path());
    }
    let path = req.uri().path().to_string();
    match app.limits.read_body(req, declared).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.shaped(&path),
    }
}

/// Whether two secrets are equal, in time that depends on their lengths only (not on where
/// they first differ): a client cannot find a key byte by byte by timing.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    let diff = given
        .iter()
        .zip(key)
        .fold(given.len() ^ key.len(), |d, (a, b)| d | usize::from(a ^ b));
    std::hint::black_box(diff) == 0
}

/// The keys of `--api-key` (or PHI4_API_KEY) and `--api-keys-file`; an empty one is an error (it
/// would serve without authentication by mistake).
fn api_keys(a: &ServeArgs) -> Res<Vec<String>> {
    let mut keys = a.api_key.clone();
    if let Some(file) = &a.api_keys_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("--api-keys-file {}: {e}", file.display()))?;
        let lines = text.lines().map(str::trim);
        keys.extend(
            lines
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
        if keys.is_empty() {
            return Err(format!("--api-keys-file {}: no key in it", file.display()).into());
        }
    }
    // (clap takes an empty environment variable for an absent one: it is checked here.)
    let empty_env =
        std::env::var_os("PHI4_API_KEY").is_some_and(|v| v.to_string_lossy().trim().is_empty());
    if keys.iter().any(|k| k.trim().is_empty()) || (a.api_key.is_empty() && empty_env) {
        return Err(
            "--api-key (or PHI4_API_KEY) is empty: give a key, or unset it to serve without one"
                .into(),
        );
    }
    Ok(keys)
}
