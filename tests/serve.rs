//! `phi4 serve` on the demo model, over plain HTTP: the wire format of every endpoint checked
//! line by line, prefix reuse across requests, disconnects, concurrency and the queue, bad input,
//! the API key. Servers listen on 127.0.0.1, on a port the test picks, and are stopped by it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::server::Server;
use common::{cosine, norm};
use serde_json::{json, Value};

const TIMINGS: [&str; 6] = [
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
];

fn chat_body(messages: Value, stream: bool, num_predict: i64) -> Value {
    json!({ "model": "phi4", "messages": messages, "stream": stream, "options": { "num_predict": num_predict, "temperature": 0 } })
}

#[test]
fn ollama_endpoints_field_for_field() {
    let s = Server::start(&[]);
    let (status, _, body) = s.get("/");
    assert_eq!(
        (status, body.as_slice()),
        (200, b"Ollama is running".as_slice())
    );
    assert_eq!(s.request("HEAD", "/", None, &[]).0, 200);
    let (status, _, body) = s.get("/api/version");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(status == 200 && v["version"].is_string(), "{v}");

    // Streaming chat: NDJSON, every chunk with the assistant's role, the last with the timings.
    let msgs = json!([{ "role": "user", "content": "How do I open a file in Python?" }]);
    let (status, ctype, lines) = s.post_lines("/api/chat", &chat_body(msgs.clone(), true, 24));
    assert_eq!((status, ctype.as_str()), (200, "application/x-ndjson"));
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, pieces) = events.split_last().unwrap();
    assert!(!pieces.is_empty());
    for e in pieces {
        assert_eq!(
            (
                e["model"].as_str(),
                e["done"].as_bool(),
                e["message"]["role"].as_str()
            ),
            (Some("phi4"), Some(false), Some("assistant")),
            "{e}"
        );
        assert!(
            e["created_at"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && t.len() > 20),
            "{e}"
        );
    }
    assert_eq!(
        (last["done"].as_bool(), last["message"]["role"].as_str()),
        (Some(true), Some("assistant")),
        "{last}"
    );
    assert!(
        matches!(last["done_reason"].as_str(), Some("stop" | "length")),
        "{last}"
    );
    for k in TIMINGS {
        assert!(last[k].as_u64().is_some(), "{k} in {last}");
    }
    assert_eq!(
        last["eval_count"].as_u64().unwrap() as usize,
        pieces.len(),
        "one chunk per generated token here"
    );
    let streamed: String = pieces
        .iter()
        .map(|e| e["message"]["content"].as_str().unwrap())
        .collect();

    // The same request without streaming: one object with the whole (greedy, so equal) reply.
    let (status, v) = s.post("/api/chat", &chat_body(msgs, false, 24));
    assert_eq!(status, 200);
    assert_eq!(
        v["message"]["content"].as_str(),
        Some(streamed.as_str()),
        "{v}"
    );
    assert_eq!(
        (v["done"].as_bool(), v["message"]["role"].as_str()),
        (Some(true), Some("assistant"))
    );

    // Generate: `response` chunks, the final one with `context`; a second call continues from it.
    let (status, ctype, lines) = s.post_lines("/api/generate", &json!({ "model": "phi4:latest", "prompt": "What is a list?", "options": { "num_predict": 8 } }));
    assert_eq!((status, ctype.as_str()), (200, "application/x-ndjson"));
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| serde_json::from_str::<Value>(l).unwrap()["response"].is_string()));
    let context = last["context"].as_array().unwrap().clone();
    assert!(context.len() > 8 && last["done"] == true, "{last}");
    let (status, v) = s.post("/api/generate", &json!({ "model": "phi4", "prompt": "And a tuple?", "context": context, "stream": false, "options": { "num_predict": 4 } }));
    assert_eq!(status, 200, "{v}");
    assert!(
        v["response"].is_string() && v["context"].as_array().unwrap().len() > context.len(),
        "{v}"
    );

    // Empty requests load the model, and with keep_alive 0 unload it.
    let (_, v) = s.post("/api/generate", &json!({ "model": "phi4" }));
    assert_eq!(v["done_reason"], "load", "{v}");
    let (_, v) = s.post(
        "/api/chat",
        &json!({ "model": "phi4", "messages": [], "keep_alive": 0 }),
    );
    assert_eq!(v["done_reason"], "unload", "{v}");
    let (_, _, ps) = s.get("/api/ps");
    assert_eq!(
        serde_json::from_slice::<Value>(&ps).unwrap()["models"],
        json!([]),
        "unloaded"
    );
    let (status, v) = s.post(
        "/api/chat",
        &chat_body(json!([{ "role": "user", "content": "hi" }]), false, 2),
    );
    assert_eq!(status, 200, "loaded again on demand: {v}");

    let (_, _, tags) = s.get("/api/tags");
    let tags: Value = serde_json::from_slice(&tags).unwrap();
    let m = &tags["models"][0];
    assert_eq!(
        (
            m["name"].as_str(),
            m["details"]["family"].as_str(),
            m["details"]["format"].as_str()
        ),
        (Some("phi4:latest"), Some("phi3"), Some("gguf")),
        "{tags}"
    );
    assert!(
        m["size"].as_u64().unwrap() > 1_000_000
            && m["modified_at"].is_string()
            && m["digest"].is_string()
    );
    let (_, _, ps) = s.get("/api/ps");
    let ps: Value = serde_json::from_slice(&ps).unwrap();
    assert!(
        ps["models"][0]["expires_at"].is_string() && ps["models"][0]["size_vram"] == 0,
        "{ps}"
    );
    let (status, show) = s.post("/api/show", &json!({ "model": "phi4" }));
    assert_eq!(status, 200);
    assert_eq!(show["model_info"]["general.architecture"], "phi3", "{show}");
    assert_eq!(show["model_info"]["phi3.block_count"], 4);
    assert!(
        show["template"].as_str().unwrap().contains("<|im_start|>")
            && show["parameters"].is_string()
            && show["capabilities"] == json!(["completion", "tools", "embedding"])
    );
}

/// Ollama's `format` and OpenAI's `response_format`: the reply, streamed or not, is JSON valid
/// against the schema.
#[test]
fn structured_output_over_both_apis() {
    let s = Server::start(&[]);
    let schema = json!({ "type": "object", "properties": { "state": { "enum": ["ok", "failed"] }, "count": { "type": "integer", "minimum": 0, "maximum": 9 } }, "required": ["state", "count"] });
    let valid = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(
            v["state"].is_string()
                && v["count"].as_u64().is_some_and(|c| c <= 9)
                && v.as_object().unwrap().len() == 2,
            "{v}"
        );
    };
    let msgs = json!([{ "role": "user", "content": "Status?" }]);
    let mut body = chat_body(msgs.clone(), true, 100);
    body["format"] = schema.clone();
    let (status, _, lines) = s.post_lines("/api/chat", &body);
    assert_eq!(status, 200);
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.last().unwrap()["done_reason"], "stop");
    valid(
        &events
            .iter()
            .map(|e| e["message"]["content"].as_str().unwrap())
            .collect::<String>(),
    );
    body["stream"] = json!(false);
    let (_, v) = s.post("/api/chat", &body);
    valid(v["message"]["content"].as_str().unwrap());

    let (status, v) = s.post("/api/generate", &json!({ "model": "phi4", "prompt": "Status?", "format": schema, "stream": false, "options": { "temperature": 0.9, "seed": 4 } }));
    assert_eq!(status, 200, "{v}");
    valid(v["response"].as_str().unwrap());

    let rf = json!({ "type": "json_schema", "json_schema": { "name": "status", "strict": true, "schema": schema } });
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({ "model": "phi4", "messages": msgs, "response_format": rf, "max_tokens": 100 }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    valid(v["choices"][0]["message"]["content"].as_str().unwrap());
}

#[test]
fn openai_endpoints_field_for_field() {
    let s = Server::start(&[]);
    let body = json!({ "model": "phi4", "stream": true, "stream_options": { "include_usage": true }, "max_tokens": 6, "temperature": 0,
                       "messages": [{ "role": "system", "content": "Short answers." }, { "role": "user", "content": [{ "type": "text", "text": "What is a dict?" }] }] });
    let (status, ctype, lines) = s.post_lines("/v1/chat/completions", &body);
    assert_eq!((status, ctype.as_str()), (200, "text/event-stream"));
    let data: Vec<&str> = lines
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("data: ").unwrap_or_else(|| panic!("{l}")))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["total_tokens"].as_u64(),
        Some(
            usage["usage"]["prompt_tokens"].as_u64().unwrap()
                + usage["usage"]["completion_tokens"].as_u64().unwrap()
        )
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        (
            finish["choices"][0]["delta"].clone(),
            finish["choices"][0]["finish_reason"].as_str()
        ),
        (json!({}), Some("length")),
        "{finish}"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();

    let mut body = body;
    body["stream"] = json!(false);
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200);
    assert_eq!(
        (
            v["object"].as_str(),
            v["choices"][0]["message"]["role"].as_str()
        ),
        (Some("chat.completion"), Some("assistant"))
    );
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str(),
        Some(text.as_str())
    );
    assert_eq!(v["usage"]["completion_tokens"], 6);

    let (status, v) = s.post(
        "/v1/completions",
        &json!({ "model": "phi4", "prompt": "Lists are", "max_tokens": 4, "temperature": 0 }),
    );
    assert_eq!(
        (status, v["object"].as_str()),
        (200, Some("text_completion")),
        "{v}"
    );
    assert!(v["choices"][0]["text"].is_string());

    let (_, _, models) = s.get("/v1/models");
    let models: Value = serde_json::from_slice(&models).unwrap();
    assert_eq!(
        (
            models["object"].as_str(),
            models["data"][0]["id"].as_str(),
            models["data"][0]["object"].as_str()
        ),
        (Some("list"), Some("phi4:latest"), Some("model"))
    );
    assert_eq!(s.get("/v1/models/phi4").0, 200);
    let (status, _, b) = s.get("/v1/models/gpt-4");
    let e: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (status, e["error"]["type"].as_str()),
        (404, Some("not_found_error")),
        "{e}"
    );
}

/// A client that re-sends the whole conversation pays only for the new turn.
#[test]
fn second_turn_evaluates_only_the_new_turn() {
    let s = Server::start(&[]);
    let first = json!([{ "role": "system", "content": "You answer questions about Python." }, { "role": "user", "content": "How do I open a file?" }]);
    let (_, a) = s.post("/api/chat", &chat_body(first.clone(), false, 16));
    let reply = a["message"]["content"].as_str().unwrap();
    let mut second = first.as_array().unwrap().clone();
    second.push(json!({ "role": "assistant", "content": reply }));
    second.push(json!({ "role": "user", "content": "And close it?" }));
    let (_, b) = s.post("/api/chat", &chat_body(Value::Array(second), false, 16));
    let (p1, p2) = (
        a["prompt_eval_count"].as_u64().unwrap(),
        b["prompt_eval_count"].as_u64().unwrap(),
    );
    eprintln!("first turn evaluated {p1} prompt tokens, the second {p2}");
    // (All of it would be the first turn's, the reply's and the new one's: over 60 tokens.)
    assert!(
        p2 <= 24 && p2 < p1,
        "second turn evaluated {p2} tokens (first: {p1})"
    );
}

/// What clients send as they are: LlamaIndex's `null` options, LangChain's options Ollama has
/// and phi4 does not use (ignored, named once in the log), Ollama's tag and other cases of the
/// model's name; and OpenAI usage counting the whole prompt, the cached part included.
#[test]
fn clients_as_they_are() {
    let s = Server::start(&[]);
    let user = json!([{ "role": "user", "content": "What is a list?" }]);
    let body = json!({ "model": "phi4:14b", "stream": false, "messages": user, "options": {
        "temperature": null, "top_p": null, "num_predict": 4, "seed": null, "stop": null,
        "mirostat": 1, "mirostat_eta": 0.1, "mirostat_tau": 5.0, "tfs_z": 1.0, "typical_p": 1.0,
        "penalize_newline": true, "num_keep": 4, "num_gpu": 99, "main_gpu": 0, "use_mmap": true,
        "use_mlock": false, "numa": false, "low_vram": false, "f16_kv": true } });
    let (status, v) = s.post("/api/chat", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["eval_count"], 4, "{v}");
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("options ignored"))
        .unwrap_or_else(|| panic!("no log line of the ignored options: {log}"));
    for name in [
        "mirostat",
        "tfs_z",
        "typical_p",
        "num_gpu",
        "f16_kv",
        "use_mmap",
    ] {
        assert!(line.contains(name), "{line}");
    }
    assert!(!line.contains("temperature"), "null is unset: {line}");
    assert_eq!(log.matches("options ignored").count(), 1, "{log}");
    for name in ["PHI4", "Phi4:Latest", "phi4:14B"] {
        let (status, v) = s.post("/api/chat", &json!({ "model": name, "stream": false, "messages": user, "options": { "num_predict": 1 } }));
        assert_eq!(status, 200, "{name}: {v}");
    }
    let (status, v) = s.post(
        "/api/generate",
        &json!({ "model": "phi4", "prompt": "x", "options": null, "stream": false }),
    );
    assert_eq!(status, 200, "options null: {v}");

    // The same prompt twice: the second is a cache hit, and still counts every prompt token.
    let chat = json!({ "model": "phi4", "max_tokens": 2, "messages": user });
    let (_, a) = s.post("/v1/chat/completions", &chat);
    let (_, b) = s.post("/v1/chat/completions", &chat);
    assert_eq!(
        a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"],
        "{a}\n{b}"
    );
    let (total, cached) = (
        b["usage"]["prompt_tokens"].as_u64().unwrap(),
        b["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    );
    assert!(total > 8 && cached >= total - 1, "{b}");
    assert_eq!(
        b["usage"]["total_tokens"].as_u64().unwrap(),
        total + b["usage"]["completion_tokens"].as_u64().unwrap()
    );
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Embeddings on the three routes: the library's (mean-pooled) embedding of each input,
/// normalised on /api/embed and /v1/embeddings (floats or base64), as is on /api/embeddings;
/// dimensions cut and renormalise; a text longer than the context is cut, or refused with
/// truncate false.
#[test]
fn embeddings_on_every_route() {
    let model = std::sync::Arc::new(
        phi4::Model::load(
            &common::fixture("phi4-tiny-docs.gguf"),
            phi4::LoadParams::default(),
        )
        .unwrap(),
    );
    let mut session = phi4::Session::new(model.clone(), &Default::default()).unwrap();
    let texts = ["What is a tuple?", "How do I open a file?"];
    let want: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| session.embed(&model.tokenizer.encode(t, false)).unwrap())
        .collect();
    let s = Server::start(&[]);

    let (status, v) = s.post("/api/embed", &json!({ "model": "phi4", "input": texts }));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "phi4");
    let got = v["embeddings"].as_array().unwrap();
    assert_eq!(got.len(), 2);
    for (g, w) in got.iter().zip(&want) {
        let g = floats(g);
        assert_eq!(g.len(), model.config.n_embd);
        assert!((norm(&g) - 1.0).abs() < 1e-4 && cosine(&g, w) > 0.99999);
    }
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 8, "{v}");
    assert_ne!(got[0], got[1]);

    let (_, v) = s.post(
        "/api/embed",
        &json!({ "model": "phi4", "input": texts[0], "dimensions": 8 }),
    );
    let cut = floats(&v["embeddings"][0]);
    assert!(cut.len() == 8 && (norm(&cut) - 1.0).abs() < 1e-4);
    assert!(cosine(&cut, &want[0][..8]) > 0.99999);

    let (status, v) = s.post(
        "/api/embeddings",
        &json!({ "model": "phi4", "prompt": texts[1] }),
    );
    assert_eq!(status, 200, "{v}");
    let raw = floats(&v["embedding"]);
    assert!(cosine(&raw, &want[1]) > 0.99999);
    assert!(
        (norm(&raw) / norm(&want[1]) - 1.0).abs() < 1e-4,
        "not normalised"
    );

    let body = |format: &str| json!({ "model": "phi4", "input": texts, "encoding_format": format });
    let (status, f) = s.post("/v1/embeddings", &body("float"));
    assert_eq!(status, 200, "{f}");
    assert_eq!(f["object"], "list");
    assert_eq!(f["data"][1]["index"], 1);
    assert_eq!(f["data"][1]["object"], "embedding");
    assert!(f["usage"]["prompt_tokens"].as_u64().unwrap() > 8);
    let (_, b) = s.post("/v1/embeddings", &body("base64"));
    let text = b["data"][0]["embedding"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, floats(&f["data"][0]["embedding"]));

    // Longer than a 16-token context: cut to it (the embedding of the first 16 tokens), or
    // refused.
    let long = "How do I read every line of a large file without loading it all at once?";
    let ids = model.tokenizer.encode(long, false);
    assert!(ids.len() > 16);
    let first16 = session.embed(&ids[..16]).unwrap();
    let opts = json!({ "num_ctx": 16 });
    let (status, v) = s.post(
        "/api/embed",
        &json!({ "model": "phi4", "input": long, "options": opts }),
    );
    assert_eq!(status, 200, "{v}");
    assert!(cosine(&floats(&v["embeddings"][0]), &first16) > 0.99999);
    assert_eq!(v["prompt_eval_count"], 16);
    let (status, v) = s.post(
        "/api/embed",
        &json!({ "model": "phi4", "input": long, "options": opts, "truncate": false }),
    );
    assert_eq!(status, 400, "{v}");
    for (path, bad, says) in [
        (
            "/api/embed",
            json!({ "model": "phi4", "input": 5 }),
            "input",
        ),
        (
            "/api/embed",
            json!({ "model": "phi4", "input": [""] }),
            "empty",
        ),
        (
            "/api/embed",
            json!({ "model": "phi4", "input": "x", "dimensions": 0 }),
            "dimensions",
        ),
        (
            "/v1/embeddings",
            json!({ "model": "phi4", "input": [] }),
            "empty",
        ),
        (
            "/v1/embeddings",
            json!({ "model": "phi4", "input": "x", "encoding_format": "hex" }),
            "encoding_format",
        ),
    ] {
        let (status, v) = s.post(path, &bad);
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v.to_string().contains(says), "{bad}: {v}");
    }
    // No input: the model loaded, nothing embedded.
    let (status, v) = s.post("/api/embed", &json!({ "model": "phi4" }));
    assert_eq!((status, v["embeddings"].clone()), (200, json!([])));
}

/// A client that hangs up mid-stream stops its generation; the next request is served at once.
#[test]
fn disconnect_cancels_the_generation() {
    let s = Server::start(&["--parallel", "1"]);
    // A format that allows no end before 1,500 letters: the generation runs until cancelled.
    let format = json!({ "type": "string", "pattern": "^[a-z ]{1500}$" });
    let body = json!({ "model": "phi4", "prompt": "The os module", "raw": true, "format": format, "options": { "num_predict": -2, "temperature": 1.0, "num_ctx": 2048 } }).to_string();
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(conn, "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    for _ in 0..12 {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    drop(r);
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    drop(conn);
    let t = Instant::now();
    let (status, v) = s.post(
        "/api/chat",
        &chat_body(json!([{ "role": "user", "content": "hi" }]), false, 4),
    );
    let waited = t.elapsed();
    assert_eq!(status, 200, "{v}");
    // The cancelled generation's own report: far fewer tokens than the 2,000 it was allowed.
    let log = s.log();
    let cancelled = log
        .lines()
        .find(|l| l.starts_with("POST /api/generate 200 tokens in") && l.contains(", cancelled"))
        .unwrap_or_else(|| panic!("no cancelled generation in {log}"));
    let out: u64 = cancelled
        .split("out ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("cancelled after {out} tokens; the next request waited {waited:?}");
    assert!(out < 1000, "{cancelled}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");

    // An embedding of many long texts, its client gone at once: the work stops, the session
    // comes back to the pool (with --parallel 1, the next requests need it).
    let texts: Vec<String> = (0..64)
        .map(|i| format!("{i} {}", "The os module provides functions. ".repeat(60)))
        .collect();
    let body = json!({ "model": "phi4", "input": texts }).to_string();
    for _ in 0..2 {
        let mut conn = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        write!(conn, "POST /api/embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        conn.shutdown(std::net::Shutdown::Both).unwrap();
        let t = Instant::now();
        let (status, v) = s.post("/api/embed", &json!({ "model": "phi4", "input": "hi" }));
        assert_eq!(status, 200, "{v}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "waited {:?} behind a cancelled embedding",
            t.elapsed()
        );
    }
    let log = s.log();
    assert_eq!(
        log.matches("POST /api/embed 500: cancelled").count(),
        2,
        "{log}"
    );
}

/// With `--parallel 4`, requests at once decode together (one scheduler step for all) and reply
/// exactly as they do one at a time.
#[test]
fn parallel_requests_reply_as_they_do_one_at_a_time() {
    let s = Server::start(&["--parallel", "4"]);
    let ask = |q: &str| {
        let body = json!({ "model": "phi4", "messages": [{ "role": "user", "content": q }], "stream": false, "options": { "temperature": 0, "num_predict": 32 } });
        let (status, v) = s.post("/api/chat", &body);
        assert_eq!(status, 200, "{v}");
        v["message"]["content"].as_str().unwrap().to_string()
    };
    let questions = [
        "What is a module?",
        "How do I read a file?",
        "What is a tuple?",
        "How do I sort a list?",
    ];
    let alone: Vec<String> = questions.iter().map(|q| ask(q)).collect();
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = questions.iter().map(|q| sc.spawn(move || ask(q))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

/// Reads what `c` sends until the server closes it; panics if that takes longer than `limit`.
fn read_until_closed(c: &mut TcpStream, limit: Duration) -> String {
    let t = Instant::now();
    c.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(c, &mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not closed after {:?}: {e}", t.elapsed()),
        }
        assert!(t.elapsed() < limit, "not closed within {limit:?}");
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Slow clients hold a connection for the read timeout at most: headers sent a byte at a time,
/// a body held short of its last byte (408), an idle kept-alive connection — each is closed,
/// and real requests are served meanwhile.
#[test]
fn slow_clients_are_cut_off_at_the_read_timeout() {
    let s = Server::start(&["--read-timeout", "1"]);
    let connect = || TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let mut slow = connect();
    slow.write_all(b"POST /api/chat HTTP/1.1\r\nHo").unwrap();
    let mut short = connect();
    write!(short, "POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{}", " ".repeat(99)).unwrap();
    let mut idle = connect();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let t = Instant::now();
    assert_eq!(s.get("/").0, 200, "served while slow clients wait");
    let limit = Duration::from_secs(10);
    assert!(read_until_closed(&mut short, limit).starts_with("HTTP/1.1 408"));
    read_until_closed(&mut slow, limit);
    let first = read_until_closed(&mut idle, limit);
    assert!(
        first.starts_with("HTTP/1.1 200") && first.ends_with("Ollama is running"),
        "{first}"
    );
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
}

/// A process that may open 128 files, 150 connections opened on it and left silent: the
/// connections over its bound are closed at once, the silent ones at the read timeout, and a
/// real request is served (within the read timeout at worst), as is every one after.
#[test]
fn connections_stay_within_the_descriptor_limit() {
    let s = Server::start_with_fd_limit(128, &["--read-timeout", "2"]);
    let silent: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", s.port)).ok())
        .collect();
    let t = Instant::now();
    let msgs = json!([{ "role": "user", "content": "What is a tuple?" }]);
    let mut status = 0;
    while status != 200 && t.elapsed() < Duration::from_secs(20) {
        status = s.post("/api/chat", &chat_body(msgs.clone(), false, 4)).0;
    }
    assert_eq!(status, 200, "a request is served after {:?}", t.elapsed());
    for _ in 0..5 {
        assert_eq!(
            s.post("/api/chat", &chat_body(msgs.clone(), false, 4)).0,
            200
        );
    }
    drop(silent);
}

/// With every place taken (one request generating, one queued), a request is refused with 503
/// before its body is parsed or its prompt tokenized: a malformed body gets 503, not 400, and a
/// 16 MB body of empty messages costs nothing. The places come back when the requests end.
#[test]
fn a_full_queue_refuses_before_any_work_on_the_body() {
    let s = Server::start(&["--parallel", "1", "--queue", "1"]);
    let malformed = || s.request("POST", "/api/chat", Some(b"{ not json"), &[]).0;
    let empty = format!(
        "{{\"model\": \"phi4\", \"messages\": [{}]}}",
        vec!["{}"; 2_000_000].join(",")
    );
    assert!(empty.len() < 16 << 20);
    // Two streams that are never read: the first generates a string too long to end before
    // the context is full (seconds), the second waits for the session meanwhile.
    let mut body = chat_body(
        json!([{ "role": "user", "content": "Tell me about lists." }]),
        true,
        0,
    );
    body["format"] = json!({ "type": "string", "minLength": 100000 });
    let body = body.to_string();
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
            write!(c, "POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
            c
        })
        .collect();
    let until = |want: u16| {
        let t = Instant::now();
        while malformed() != want {
            assert!(t.elapsed() < Duration::from_secs(30), "never {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    until(503);
    let t = Instant::now();
    let (status, _, reply) = s.request("POST", "/api/chat", Some(empty.as_bytes()), &[]);
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&reply));
    eprintln!(
        "a {} MB body refused in {:?}",
        empty.len() >> 20,
        t.elapsed()
    );
    drop(held);
    until(400);
}

/// 50 requests at once on 2 sessions with a queue of 8: each completes or gets Ollama's 503, none
/// is lost, and the server's memory is where it was.
#[test]
fn concurrent_requests_complete_or_are_refused() {
    let s = Server::start(&["--parallel", "2", "--queue", "8"]);
    let warm = |i: usize| {
        s.post(
            "/api/chat",
            &chat_body(
                json!([{ "role": "user", "content": format!("Question {i}: what is a module?") }]),
                false,
                12,
            ),
        )
    };
    let burst = |n: usize| -> Vec<(u16, Value)> {
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..n).map(|i| sc.spawn(move || warm(i))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    // Warm up: both sessions made, the runtime's threads started.
    burst(50);
    let pid = s.pid();
    let before = rss_kb(pid);
    let results = burst(50);
    let ok = results
        .iter()
        .filter(|r| r.0 == 200 && r.1["done"] == true)
        .count();
    let busy = results
        .iter()
        .filter(|r| r.0 == 503 && r.1["error"].as_str().is_some_and(|e| e.contains("busy")))
        .count();
    eprintln!("50 concurrent requests: {ok} completed, {busy} refused with 503");
    assert_eq!(
        ok + busy,
        50,
        "{:?}",
        results
            .iter()
            .filter(|r| r.0 != 200 && r.0 != 503)
            .collect::<Vec<_>>()
    );
    assert!(ok >= 10, "at least parallel + queue complete: {ok}");
    for i in 0..4 {
        assert_eq!(warm(i).0, 200);
    }
    let after = rss_kb(pid);
    eprintln!("server RSS {before} kB before, {after} kB after");
    if common::runner().is_some() {
        eprintln!("under an emulator the RSS is the emulator's; checked natively");
        return;
    }
    assert!(
        after as f64 <= before as f64 * 1.05,
        "RSS {before} kB -> {after} kB"
    );
}

/// Every kind of bad input gets its status and a message, and the server goes on.
#[test]
fn bad_input_is_answered_and_the_server_goes_on() {
    let s = Server::start(&[]);
    let user = json!([{ "role": "user", "content": "hi" }]);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/api/chat",
            json!({ "model": "nope", "messages": user }),
            404,
            "model 'nope' not found",
        ),
        (
            "/api/generate",
            json!({ "model": "llama3", "prompt": "x" }),
            404,
            "model 'llama3' not found",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": "hi" }),
            400,
            "invalid request body",
        ),
        (
            "/api/chat",
            json!({ "model": 7, "messages": user }),
            400,
            "invalid request body",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": [{ "role": "wizard", "content": "x" }] }),
            400,
            "role \"wizard\"",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "options": { "temperature": -1 } }),
            400,
            "temperature",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "options": { "top_p": "high" } }),
            400,
            "must be a number",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "options": { "num_predict": -3 } }),
            400,
            "num_predict",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "options": { "num_ctx": 1_000_000 } }),
            400,
            "n_ctx 1000000 must be in 1..=2048",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "options": { "num_ctx": -1 } }),
            400,
            "num_ctx",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "options": { "top_k": 1e300 } }),
            400,
            "top_k",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4:mini", "messages": user }),
            404,
            "model 'phi4:mini' not found",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "options": { "num_keep": 5, "top_k": -2 } }),
            400,
            "top_k",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "keep_alive": "soon" }),
            400,
            "keep_alive",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": [{ "role": "user", "content": "x", "images": ["aGk="] }] }),
            400,
            "images",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "tools": [{ "type": "function" }] }),
            400,
            "no name",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "tools": [{ "type": "function", "function": { "name": "f", "parameters": { "type": "object", "properties": { "x": { "$ref": "#/$defs/none" } } } } }] }),
            400,
            "tools' parameters",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "tools": [{ "type": "function", "function": { "name": "f", "parameters": { "type": "string" } } }] }),
            400,
            "must describe an object",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "format": "json", "tools": [{ "type": "function", "function": { "name": "f" } }] }),
            400,
            "cannot be combined",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": [{ "role": "user", "content": "x" }, { "role": "tool", "content": "42", "tool_name": "f" }] }),
            400,
            "must answer a tool call",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": [{ "role": "assistant", "content": "", "tool_calls": [{ "function": { "name": "f", "arguments": {} } }] }, { "role": "tool", "content": "42", "tool_name": "g" }] }),
            400,
            "tool_name \"g\"",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "logprobs": true, "top_logprobs": 21 }),
            400,
            "top_logprobs",
        ),
        (
            "/api/generate",
            json!({ "model": "phi4", "prompt": "x", "logprobs": true, "top_logprobs": -1 }),
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": user, "tools": [{ "type": "function", "function": { "name": "f" } }], "tool_choice": { "type": "function", "function": { "name": "g" } } }),
            400,
            "tool_choice names \"g\"",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": user, "tool_choice": "required" }),
            400,
            "tool_choice needs tools",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": user, "response_format": { "type": "json_object" }, "tools": [{ "type": "function", "function": { "name": "f" } }] }),
            400,
            "cannot be combined",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": [{ "role": "assistant", "content": null, "tool_calls": [{ "id": "call_1", "type": "function", "function": { "name": "f", "arguments": "{}" } }] }, { "role": "tool", "tool_call_id": "call_2", "content": "42" }] }),
            400,
            "tool_call_id \"call_2\"",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": [{ "role": "assistant", "tool_calls": [{ "id": "call_1", "type": "function", "function": { "name": "f", "arguments": "{not json" } }] }] }),
            400,
            "arguments are not JSON",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": user, "logprobs": true, "top_logprobs": 50 }),
            400,
            "top_logprobs",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "think": true }),
            400,
            "thinking",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "format": "yaml" }),
            400,
            "format must be \"json\" or a JSON schema",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "format": 42 }),
            400,
            "format must be",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": user, "format": { "type": "string", "pattern": "(" } }),
            400,
            "format: the JSON schema does not compile",
        ),
        (
            "/api/generate",
            json!({ "model": "phi4", "prompt": "x", "format": { "type": "integer", "minimum": 5, "maximum": 1 } }),
            400,
            "JSON schema",
        ),
        (
            "/api/chat",
            json!({ "model": "phi4", "messages": [{ "role": "user", "content": "word ".repeat(3000) }] }),
            400,
            "needs",
        ),
        (
            "/api/generate",
            json!({ "model": "phi4", "prompt": "x", "context": [99999999] }),
            400,
            "outside the vocabulary",
        ),
        (
            "/api/pull",
            json!({ "stream": false }),
            400,
            "model is required",
        ),
        (
            "/api/delete",
            json!({ "model": "phi4" }),
            400,
            "not supported",
        ),
        (
            "/api/create",
            json!({ "model": "x", "from": "/etc/passwd" }),
            400,
            "not supported",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": user, "max_tokens": 0 }),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": user, "response_format": { "type": "xml" } }),
            400,
            "response_format.type",
        ),
        (
            "/v1/chat/completions",
            json!({ "model": "phi4", "messages": user, "response_format": { "type": "json_schema", "json_schema": { "name": "x" } } }),
            400,
            "json_schema.schema",
        ),
    ];
    for (path, body, want, text) in cases {
        let (status, _, b) = s.request("POST", path, Some(body.to_string().as_bytes()), &[]);
        let b: Value = serde_json::from_slice(&b)
            .unwrap_or_else(|_| panic!("{path} {body}: {}", String::from_utf8_lossy(&b)));
        assert_eq!(status, want, "{path} {body}: {b}");
        // Ollama's {"error": "..."}, or OpenAI's {"error": {"message": "..."}} on /v1.
        let message = b["error"]
            .as_str()
            .or(b["error"]["message"].as_str())
            .unwrap_or_else(|| panic!("{b}"));
        assert!(message.contains(text), "{path} {body}: {message}");
        assert_eq!(s.get("/").0, 200, "alive after {body}");
    }
    for raw in [&b"{not json"[..], b"", b"\xff\xfe", b"[]"] {
        let (status, _, b) = s.request("POST", "/api/chat", Some(raw), &[]);
        assert_eq!(status, 400, "{raw:?}: {}", String::from_utf8_lossy(&b));
    }
    // 100 MB: refused by its length, before it is read.
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(conn, "POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{\"model\":", 100 << 20).unwrap();
    let mut reply = String::new();
    let _ = BufReader::new(conn).read_line(&mut reply);
    assert!(reply.contains("413"), "{reply}");
    // And a generation still works.
    let (status, v) = s.post("/api/chat", &chat_body(user, false, 4));
    assert_eq!(status, 200, "{v}");
}

/// Ollama's num_thread and num_batch make a session of that shape; out of range is a 400.
#[test]
fn num_thread_and_num_batch_apply() {
    let s = Server::start(&[]);
    let user = json!([{ "role": "user", "content": "What is a set?" }]);
    let (status, v) = s.post("/api/chat", &json!({ "model": "phi4", "messages": user, "stream": false, "options": { "num_thread": 1, "num_batch": 8, "num_predict": 4 } }));
    assert_eq!(status, 200, "{v}");
    let (status, v) = s.post("/api/chat", &json!({ "model": "phi4", "messages": user, "stream": false, "options": { "num_thread": 100000 } }));
    assert_eq!(status, 400, "{v}");
    let (status, v) = s.post("/api/chat", &json!({ "model": "phi4", "messages": user, "stream": false, "options": { "num_batch": -5 } }));
    assert_eq!(status, 400, "{v}");
    // One log line per request, with the token counts of the generations.
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.starts_with("POST /api/chat 200 tokens in ") && l.contains("out 4, length")),
        "{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with("POST /api/chat 400"))
            .count(),
        2,
        "{log}"
    );
}

/// With --drop-oldest a conversation that outgrows the context loses its oldest turns instead.
#[test]
fn drop_oldest_is_an_option() {
    let s = Server::start(&["--drop-oldest"]);
    let long = json!([{ "role": "system", "content": "Short answers." }, { "role": "user", "content": "word ".repeat(3000) }, { "role": "assistant", "content": "ok" }, { "role": "user", "content": "What is a list?" }]);
    let (status, v) = s.post("/api/chat", &chat_body(long, false, 4));
    assert_eq!(status, 200, "{v}");
    assert!(s.log().contains("tokens in"), "{}", s.log());
}

#[test]
fn api_key_is_required_when_set() {
    let s = Server::start(&["--api-key", "sesame"]);
    let body = chat_body(json!([{ "role": "user", "content": "hi" }]), false, 2).to_string();
    assert_eq!(
        s.request("POST", "/api/chat", Some(body.as_bytes()), &[]).0,
        401
    );
    assert_eq!(
        s.request(
            "POST",
            "/api/chat",
            Some(body.as_bytes()),
            &[("Authorization", "Bearer wrong")]
        )
        .0,
        401
    );
    assert_eq!(
        s.request(
            "POST",
            "/api/chat",
            Some(body.as_bytes()),
            &[("Authorization", "Bearer sesame")]
        )
        .0,
        200
    );
    assert_eq!(
        s.request(
            "GET",
            "/v1/models",
            None,
            &[("Authorization", "Bearer sesame")]
        )
        .0,
        200
    );
}

/// With several API keys, each key's clients reuse only their own cached prefixes, in memory
/// and in the prompt cache: the same prompt sent with another key is evaluated whole (its
/// `prompt_eval_count` tells nothing of the other's), with its own key again only the new
/// tokens. A `cache_salt` isolates likewise under one key.
#[test]
fn cached_prefixes_are_isolated_per_key_and_salt() {
    let dir = common::tmpdir();
    let cache = dir.path().to_str().unwrap();
    let s = Server::start(&[
        "--api-key",
        "alpha",
        "--api-key",
        "beta",
        "--prompt-cache-dir",
        cache,
    ]);
    let msgs = json!([{ "role": "system", "content": "You are a careful assistant. ".repeat(20) }, { "role": "user", "content": "What is a set?" }]);
    let ask = |key: &str, salt: Option<&str>| -> u64 {
        let mut body = chat_body(msgs.clone(), false, 2);
        if let Some(salt) = salt {
            body["cache_salt"] = json!(salt);
        }
        let auth = format!("Bearer {key}");
        let (status, _, reply) = s.request(
            "POST",
            "/api/chat",
            Some(body.to_string().as_bytes()),
            &[("Authorization", &auth)],
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
        let v: Value = serde_json::from_slice(&reply).unwrap();
        v["prompt_eval_count"].as_u64().unwrap()
    };
    let whole = ask("alpha", None);
    assert!(whole > 100, "{whole}");
    assert!(
        ask("alpha", None) < whole / 2,
        "the same key reuses its prefix"
    );
    assert_eq!(
        ask("beta", None),
        whole,
        "another key's prefix is not reused"
    );
    assert_eq!(ask("alpha", Some("mine")), whole, "nor another salt's");
    assert!(
        ask("alpha", Some("mine")) < whole / 2,
        "a salt reuses its own"
    );
    assert_eq!(
        ask("beta", Some("mine")),
        whole,
        "the same salt under another key is another scope"
    );
}

/// A web page's requests: on a loopback bind a foreign `Host` (DNS rebinding) is 403; a
/// page of this machine (any port) gets the CORS headers and its preflight answered, a foreign
/// page 403 unless `--origins` names it; `GET /` stays open without the key.
#[test]
fn browsers_reach_it_only_from_allowed_origins() {
    let s = Server::start(&["--api-key", "k", "--origins", "https://app.example"]);
    let get = |headers: &[(&str, &str)]| s.request("GET", "/api/version", None, headers);
    let auth = ("Authorization", "Bearer k");
    assert_eq!(get(&[auth]).0, 200);
    for evil in [
        "evil.example",
        "evil.example:11434",
        "127.0.0.1.evil.example",
    ] {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        write!(c, "GET /api/version HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\nAuthorization: Bearer k\r\n\r\n").unwrap();
        let reply = read_until_closed(&mut c, Duration::from_secs(10));
        assert!(reply.starts_with("HTTP/1.1 403"), "{evil}: {reply}");
    }
    let preflight = |origin: &str| {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        write!(c, "OPTIONS /api/chat HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\r\n", s.port).unwrap();
        read_until_closed(&mut c, Duration::from_secs(10)).to_ascii_lowercase()
    };
    for ok in [
        "http://localhost:5173",
        "http://127.0.0.1:3000",
        "https://app.example",
    ] {
        let reply = preflight(ok);
        assert!(reply.starts_with("http/1.1 204"), "{ok}: {reply}");
        assert!(
            reply.contains(&format!("access-control-allow-origin: {ok}")),
            "{reply}"
        );
        assert!(
            reply.contains("access-control-allow-headers: authorization, content-type"),
            "{reply}"
        );
    }
    assert!(preflight("https://evil.example").starts_with("http/1.1 403"));
    let (status, _, _) = get(&[auth, ("Origin", "https://evil.example")]);
    assert_eq!(status, 403);
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(c, "GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nOrigin: http://localhost:8080\r\nAuthorization: Bearer k\r\n\r\n").unwrap();
    let reply = read_until_closed(&mut c, Duration::from_secs(10)).to_ascii_lowercase();
    assert!(
        reply.starts_with("http/1.1 200")
            && reply.contains("access-control-allow-origin: http://localhost:8080"),
        "{reply}"
    );
    assert_eq!(s.get("/").0, 200, "health checks need no key");
    assert_eq!(s.request("HEAD", "/", None, &[]).0, 200);
    assert_eq!(s.get("/api/tags").0, 401);
}

/// An empty key (`--api-key ""`, or `PHI4_API_KEY=` as a mistaken script leaves it) would
/// serve without authentication: the server refuses to start instead, saying why.
#[test]
fn an_empty_api_key_is_refused_at_start() {
    for (args, env) in [
        (&["--api-key", ""][..], None),
        (&[][..], Some("")),
        (&[][..], Some(" ")),
    ] {
        let mut c = common::target_command(common::cli());
        c.args(["serve", "--port", "1", "--model"])
            .arg(common::fixture("phi4-tiny-docs.gguf"))
            .args(args)
            .env_remove("PHI4_API_KEY");
        if let Some(v) = env {
            c.env("PHI4_API_KEY", v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("empty"),
            "{args:?} {env:?}: {err}"
        );
    }
}

/// `--prompt-cache-dir`: a system prompt evaluated by one server is restored by the next (after
/// a restart), which evaluates only the rest of the prompt; the directory stays within its bound.
#[test]
fn system_prompts_survive_a_restart() {
    let dir = common::tmpdir();
    let cache = dir.path().to_str().unwrap();
    let system = "You are the help system of a weather station. Answer in one sentence, using the station's manual: sensors, units, alarms and maintenance intervals are described there.";
    let chat = |s: &Server, question: &str| {
        let msgs = json!([{ "role": "system", "content": system }, { "role": "user", "content": question }]);
        let (status, v) = s.post("/api/chat", &chat_body(msgs, false, 4));
        assert_eq!(status, 200, "{v}");
        v["prompt_eval_count"].as_u64().unwrap()
    };
    let files = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|f| {
                f.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|e| e == "kv")
            })
            .count()
    };
    let full = {
        let s = Server::start(&["--prompt-cache-dir", cache]);
        let n = chat(&s, "What is a list?");
        assert_eq!(files(), 1, "{}", s.log());
        n
    };
    let s = Server::start(&["--prompt-cache-dir", cache]);
    let rest = chat(&s, "How do I sort a dict?");
    eprintln!("first server evaluated {full} prompt tokens; after the restart, {rest}");
    assert!(
        rest + 30 < full,
        "the system turn was restored: {rest} of {full}"
    );
    assert_eq!(files(), 1, "one state per system prompt");
    drop(s);
    // A bound of 1 MiB holds one state of 300-odd tokens (2 KiB each on the demo model): a
    // second system prompt replaces the first.
    let small = common::tmpdir();
    let s = Server::start(&[
        "--prompt-cache-dir",
        small.path().to_str().unwrap(),
        "--prompt-cache-max-mib",
        "1",
    ]);
    let mut kept: Vec<std::path::PathBuf> = Vec::new();
    let mut first = None;
    for topic in ["lists", "files"] {
        let system = format!("You answer questions about {topic}. ").repeat(30);
        let msgs =
            json!([{ "role": "system", "content": system }, { "role": "user", "content": "hi" }]);
        assert_eq!(s.post("/api/chat", &chat_body(msgs, false, 2)).0, 200);
        kept = std::fs::read_dir(small.path())
            .unwrap()
            .map(|f| f.unwrap().path())
            .collect();
        assert_eq!(kept.len(), 1, "{}", s.log());
        assert_ne!(
            first.replace(kept[0].clone()).as_ref(),
            Some(&kept[0]),
            "the newer state is kept"
        );
    }
    let size = std::fs::metadata(&kept[0]).unwrap().len();
    assert!(
        size > 512 << 10 && size < 1 << 20,
        "a state of {size} bytes: the test needs one that fits alone, not twice"
    );
}

fn weather_tool() -> Value {
    json!({ "type": "function", "function": { "name": "get_weather", "description": "The current weather in a city.", "parameters": {
        "type": "object",
        "properties": { "city": { "type": "string", "maxLength": 30 }, "unit": { "enum": ["celsius", "fahrenheit"] } },
        "required": ["city", "unit"] } } })
}

/// A call's arguments are valid for the weather tool's schema.
fn assert_valid_weather(args: &Value) {
    let schema = &weather_tool()["function"]["parameters"];
    let validator = jsonschema::validator_for(schema).unwrap();
    assert!(validator.is_valid(args), "{args}");
}

#[test]
fn tool_calls_over_both_apis() {
    // The demo model never chooses a call on its own: the server's `alternate` choice makes one
    // after each user message (and an answer after the results) for requests that name none.
    let s = Server::start(&["--tool-choice", "alternate"]);
    let ask = json!([{ "role": "user", "content": "What is the weather in Paris?" }]);
    // Ollama's API (which has no tool_choice): over 100 seeds, every reply a valid call.
    let (mut replies_with_calls, mut calls) = (0, 0);
    for seed in 0..100 {
        let body = json!({ "model": "phi4", "stream": false, "messages": ask, "tools": [weather_tool()],
            "options": { "temperature": 1.0, "seed": seed, "num_predict": 200 } });
        let (status, v) = s.post("/api/chat", &body);
        assert_eq!(status, 200, "{v}");
        if let Some(tc) = v["message"]["tool_calls"].as_array() {
            replies_with_calls += 1;
            for c in tc {
                assert_eq!(c["function"]["name"], "get_weather", "{v}");
                assert!(c["function"]["arguments"].is_object(), "an object: {v}");
                assert_valid_weather(&c["function"]["arguments"]);
                calls += 1;
            }
            assert_eq!(v["done_reason"], "stop", "{v}");
        }
    }
    eprintln!("ollama: {replies_with_calls} of 100 replies made {calls} calls, all valid");
    assert_eq!(replies_with_calls, 100);
    // With the server's default (auto), the demo model answers in text: never a broken call.
    let auto = Server::start(&[]);
    for seed in 0..5 {
        let body = json!({ "model": "phi4", "stream": false, "messages": ask, "tools": [weather_tool()],
            "options": { "temperature": 1.0, "seed": seed, "num_predict": 60 } });
        let (status, v) = auto.post("/api/chat", &body);
        assert_eq!(status, 200, "{v}");
        assert!(
            !v["message"]["content"]
                .as_str()
                .unwrap()
                .contains("<tool_call>"),
            "{v}"
        );
        if let Some(tc) = v["message"]["tool_calls"].as_array() {
            tc.iter()
                .for_each(|c| assert_valid_weather(&c["function"]["arguments"]));
        }
    }
    drop(auto);

    // OpenAI: required, 100 seeds, every reply a valid call.
    for seed in 0..100 {
        let body = json!({ "model": "phi4", "messages": ask, "tools": [weather_tool()], "tool_choice": "required",
            "parallel_tool_calls": false, "temperature": 1.0, "seed": seed, "max_tokens": 200 });
        let (status, v) = s.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        assert!(choice["message"]["content"].is_null(), "{v}");
        let tc = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(tc.len(), 1, "{v}");
        assert!(tc[0]["id"].as_str().unwrap().starts_with("call_"), "{v}");
        assert_eq!(tc[0]["type"], "function");
        let args: Value =
            serde_json::from_str(tc[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_valid_weather(&args);
    }

    // The Responses API and Anthropic's Messages API: 100 each, every call valid.
    let flat = json!({ "type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": weather_tool()["function"]["parameters"] });
    let anthropic = json!({ "name": "get_weather", "description": "The weather in a city.", "input_schema": weather_tool()["function"]["parameters"] });
    for seed in 0..100 {
        let body = json!({ "model": "phi4", "input": "What is the weather in Paris?", "tools": [flat], "tool_choice": "required",
            "parallel_tool_calls": false, "temperature": 1.0, "seed": seed, "max_output_tokens": 200 });
        let (status, v) = s.post("/v1/responses", &body);
        assert_eq!(status, 200, "{v}");
        let calls: Vec<&Value> = v["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        assert_eq!(calls.len(), 1, "{v}");
        assert_valid_weather(
            &serde_json::from_str(calls[0]["arguments"].as_str().unwrap()).unwrap(),
        );
        let body = json!({ "model": "phi4", "max_tokens": 200, "temperature": 1.0, "tools": [anthropic],
            "tool_choice": { "type": "any", "disable_parallel_tool_use": true }, "messages": ask });
        let (status, v) = s.post("/v1/messages", &body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["stop_reason"], "tool_use", "{v}");
        let uses: Vec<&Value> = v["content"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .collect();
        assert_eq!(uses.len(), 1, "{v}");
        assert_valid_weather(&uses[0]["input"]);
    }
    eprintln!("100 of 100 calls valid through each of Ollama's, OpenAI's chat, Responses and Messages APIs");

    // Streamed: the calls in a delta with indexes, then finish_reason tool_calls.
    let body = json!({ "model": "phi4", "stream": true, "messages": ask, "tools": [weather_tool()], "tool_choice": { "type": "function", "function": { "name": "get_weather" } }, "temperature": 0, "max_tokens": 200 });
    let (status, _, lines) = s.post_lines("/v1/chat/completions", &body);
    assert_eq!(status, 200);
    let chunks: Vec<Value> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(deltas.len(), 1, "{lines:?}");
    assert_eq!(deltas[0]["index"], 0);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls",
        "{lines:?}"
    );
    // Ollama streamed: a chunk with the calls, then the last one.
    let body = json!({ "model": "phi4", "stream": true, "messages": ask, "tools": [weather_tool()], "options": { "temperature": 1.0, "seed": 1, "num_predict": 200 } });
    let seed_with_call = (0..100)
        .find(|&seed| {
            let mut b = body.clone();
            b["stream"] = json!(false);
            b["options"]["seed"] = json!(seed);
            s.post("/api/chat", &b).1["message"]["tool_calls"].is_array()
        })
        .unwrap();
    let mut b = body.clone();
    b["options"]["seed"] = json!(seed_with_call);
    let (_, _, lines) = s.post_lines("/api/chat", &b);
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, rest) = events.split_last().unwrap();
    assert_eq!(last["done"], true);
    let with_calls: Vec<_> = rest
        .iter()
        .filter(|e| e["message"]["tool_calls"].is_array())
        .collect();
    assert_eq!(with_calls.len(), 1, "{lines:?}");
    assert!(
        rest.iter().all(|e| !e["message"]["content"]
            .as_str()
            .unwrap()
            .contains("<tool_call>")),
        "{lines:?}"
    );

    // The agent loop: call → result → answer, the call found in the cache.
    let (_, first) = s.post("/v1/chat/completions", &json!({ "model": "phi4", "messages": ask, "tools": [weather_tool()], "tool_choice": "required", "temperature": 0, "max_tokens": 200 }));
    let call = first["choices"][0]["message"].clone();
    let id = call["tool_calls"][0]["id"].clone();
    let mut msgs = ask.as_array().unwrap().clone();
    msgs.push(call);
    msgs.push(json!({ "role": "tool", "tool_call_id": id, "content": "{\"temperature\": 21, \"sky\": \"clear\"}" }));
    let (status, answer) = s.post("/v1/chat/completions", &json!({ "model": "phi4", "messages": msgs, "tools": [weather_tool()], "temperature": 0, "max_tokens": 30 }));
    assert_eq!(status, 200, "{answer}");
    let u = &answer["usage"];
    let new = u["prompt_tokens"].as_u64().unwrap()
        - u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
    assert!(new < 40, "only the tool turn is new: {answer}");
    // Ollama's shape of the same loop: arguments an object, the result named by tool_name.
    let (_, first) = s.post("/api/chat", &json!({ "model": "phi4", "stream": false, "messages": ask, "tools": [weather_tool()], "options": { "temperature": 1.0, "seed": seed_with_call, "num_predict": 200 } }));
    let mut msgs = ask.as_array().unwrap().clone();
    msgs.push(first["message"].clone());
    msgs.push(json!({ "role": "tool", "tool_name": "get_weather", "content": "21 degrees" }));
    let (status, answer) = s.post("/api/chat", &json!({ "model": "phi4", "stream": false, "messages": msgs, "tools": [weather_tool()], "options": { "temperature": 0, "num_predict": 30 } }));
    assert_eq!(status, 200, "{answer}");
    assert!(
        (answer["prompt_eval_count"].as_u64().unwrap()) < 40,
        "{answer}"
    );
}

#[test]
fn logprobs_over_every_route() {
    let s = Server::start(&[]);
    let ask = json!([{ "role": "user", "content": "What is a list?" }]);
    let check = |entries: &Value, top: usize, exact: bool| {
        let entries = entries.as_array().unwrap();
        assert!(!entries.is_empty());
        for e in entries {
            let lp = e["logprob"].as_f64().unwrap();
            let alts = e["top_logprobs"].as_array().unwrap();
            assert_eq!(alts.len(), top, "{e}");
            assert!(lp <= 0.0);
            // Greedy without penalties: the chosen token is the most likely one.
            if top > 0 && exact {
                assert_eq!(alts[0]["token"], e["token"], "{e}");
                assert_eq!(alts[0]["logprob"], e["logprob"], "{e}");
            }
            let bytes: Vec<u8> = e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(
                String::from_utf8_lossy(&bytes),
                e["token"].as_str().unwrap()
            );
        }
        entries.len()
    };
    let (_, v) = s.post("/api/chat", &json!({ "model": "phi4", "stream": false, "messages": ask, "logprobs": true, "top_logprobs": 3, "options": { "temperature": 0, "repeat_penalty": 1, "num_predict": 8 } }));
    assert_eq!(check(&v["logprobs"], 3, true), 8, "{v}");
    let (_, v) = s.post("/api/generate", &json!({ "model": "phi4", "stream": false, "prompt": "What is a list?", "logprobs": true, "options": { "temperature": 0, "num_predict": 5 } }));
    assert_eq!(check(&v["logprobs"], 0, true), 5, "{v}");
    // Without logprobs: none.
    let (_, v) = s.post("/api/chat", &json!({ "model": "phi4", "stream": false, "messages": ask, "options": { "num_predict": 2 } }));
    assert!(v.get("logprobs").is_none(), "{v}");
    // Streamed: each chunk carries its tokens'.
    let (_, _, lines) = s.post_lines("/api/chat", &json!({ "model": "phi4", "stream": true, "messages": ask, "logprobs": true, "top_logprobs": 2, "options": { "temperature": 0, "repeat_penalty": 1, "num_predict": 6 } }));
    let n: usize = lines[..lines.len() - 1]
        .iter()
        .map(|l| {
            check(
                &serde_json::from_str::<Value>(l).unwrap()["logprobs"],
                2,
                true,
            )
        })
        .sum();
    assert_eq!(n, 6);
    let (_, v) = s.post("/v1/chat/completions", &json!({ "model": "phi4", "messages": ask, "logprobs": true, "top_logprobs": 4, "temperature": 0, "max_tokens": 7 }));
    // (OpenAI's routes keep Ollama's default repeat penalty: not exactly greedy.)
    assert_eq!(
        check(&v["choices"][0]["logprobs"]["content"], 4, false),
        7,
        "{v}"
    );
    let (_, v) = s.post(
        "/v1/chat/completions",
        &json!({ "model": "phi4", "messages": ask, "max_tokens": 2 }),
    );
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    // The legacy completions shape.
    let (_, v) = s.post("/v1/completions", &json!({ "model": "phi4", "prompt": "What is a list?", "logprobs": 2, "temperature": 0, "max_tokens": 5 }));
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5, "{v}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"][0], 0);
    let text: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap(), "{v}");
    for (t, top) in tokens.iter().zip(lp["top_logprobs"].as_array().unwrap()) {
        assert!(
            top.as_object().unwrap().len() <= 2 && top.get(t.as_str().unwrap()).is_some(),
            "{v}"
        );
    }
}

#[test]
fn names_pull_and_load_duration() {
    let s = Server::start(&["--name", "assistant", "--name", "phi4"]);
    // The model loads at start, so no request reports a load.
    let (_, v) = s.post("/api/chat", &json!({ "model": "Assistant:latest", "stream": false, "messages": [{ "role": "user", "content": "hi" }], "options": { "num_predict": 1 } }));
    assert_eq!(v["load_duration"], 0, "{v}");
    let total = v["total_duration"].as_u64().unwrap();
    let parts = v["prompt_eval_duration"].as_u64().unwrap() + v["eval_duration"].as_u64().unwrap();
    assert!(total >= parts, "{v}");
    let (_, _, body) = s.get("/api/tags");
    let tags: Value = serde_json::from_slice(&body).unwrap();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["assistant:latest", "phi4:latest"]);
    // Unloaded, the next request loads it and says so.
    let (status, _) = s.post(
        "/api/generate",
        &json!({ "model": "phi4", "keep_alive": 0 }),
    );
    assert_eq!(status, 200);
    let (_, v) = s.post("/api/generate", &json!({ "model": "phi4", "prompt": "hi", "stream": false, "options": { "num_predict": 1 } }));
    let load = v["load_duration"].as_u64().unwrap();
    assert!(
        load > 0 && v["total_duration"].as_u64().unwrap() >= load,
        "{v}"
    );
    let (_, v) = s.post("/api/generate", &json!({ "model": "phi4", "prompt": "hi", "stream": false, "options": { "num_predict": 1 } }));
    assert_eq!(v["load_duration"], 0, "{v}");
    // Pulling a served name succeeds; another fails as Ollama's pull of a missing model does.
    let (status, _, lines) = s.post_lines("/api/pull", &json!({ "model": "phi4:14b" }));
    assert_eq!(status, 200);
    assert_eq!(
        lines.last().unwrap(),
        r#"{"status":"success"}"#,
        "{lines:?}"
    );
    let (status, v) = s.post(
        "/api/pull",
        &json!({ "model": "assistant", "stream": false }),
    );
    assert_eq!((status, &v), (200, &json!({ "status": "success" })));
    let (status, _, lines) = s.post_lines("/api/pull", &json!({ "model": "llama3" }));
    assert_eq!(status, 200);
    assert!(lines.last().unwrap().contains("\"error\""), "{lines:?}");
    let (status, v) = s.post("/api/pull", &json!({ "model": "llama3", "stream": false }));
    assert!(
        status == 500 && v["error"].as_str().unwrap().contains("llama3"),
        "{v}"
    );
}

/// The SSE events of a streamed body: (event name, data).
fn sse_events(lines: &[String]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut name = String::new();
    for l in lines {
        if let Some(n) = l.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = l.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["type"].as_str(), Some(name.as_str()), "{l}");
            out.push((name.clone(), v));
        }
    }
    out
}

#[test]
fn responses_api_stateless() {
    let s = Server::start(&["--tool-choice", "alternate"]);
    let (status, v) = s.post("/v1/responses", &json!({ "model": "phi4", "input": "What is a list?", "instructions": "Answer briefly.", "max_output_tokens": 8, "temperature": 0 }));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["object"].as_str(), v["status"].as_str()),
        (Some("response"), Some("incomplete")),
        "{v}"
    );
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert!(v["id"].as_str().unwrap().starts_with("resp_"));
    let item = &v["output"][0];
    assert_eq!(
        (item["type"].as_str(), item["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    let text = item["content"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty() && item["content"][0]["type"] == "output_text");
    assert_eq!(v["usage"]["output_tokens"], 8);
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["input_tokens"].as_u64().unwrap() + 8
    );
    // Streamed: the event sequence, numbered, with the same text.
    let (status, ctype, lines) = s.post_lines("/v1/responses", &json!({ "model": "phi4", "input": [{ "role": "user", "content": [{ "type": "input_text", "text": "What is a list?" }] }], "instructions": "Answer briefly.", "max_output_tokens": 8, "temperature": 0, "stream": true }));
    assert_eq!((status, ctype.as_str()), (200, "text/event-stream"));
    let events = sse_events(&lines);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ],
        "{names:?}"
    );
    assert_eq!(
        &names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete"
        ],
        "{names:?}"
    );
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, v)| v["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text);
    assert!(
        events
            .iter()
            .enumerate()
            .all(|(i, (_, v))| v["sequence_number"] == i),
        "{names:?}"
    );
    // Function tools (flat, as the Responses API defines them), the call and its output fed back.
    let tool = json!({ "type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": weather_tool()["function"]["parameters"] });
    let (status, v) = s.post("/v1/responses", &json!({ "model": "phi4", "input": "Weather in Oslo?", "tools": [tool], "tool_choice": "required", "temperature": 0, "max_output_tokens": 200 }));
    assert_eq!(status, 200, "{v}");
    let call = v["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    assert_valid_weather(&serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap());
    let input = json!([{ "role": "user", "content": "Weather in Oslo?" }, call, { "type": "function_call_output", "call_id": call["call_id"], "output": "12 degrees" }]);
    let (status, v) = s.post("/v1/responses", &json!({ "model": "phi4", "input": input, "tools": [tool], "temperature": 0, "max_output_tokens": 10 }));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["output"][0]["type"], "message", "{v}");
    assert!(
        v["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{v}"
    );
    // Streamed calls.
    let (_, _, lines) = s.post_lines("/v1/responses", &json!({ "model": "phi4", "input": "Weather in Oslo?", "tools": [tool], "tool_choice": { "type": "function", "name": "get_weather" }, "temperature": 0, "max_output_tokens": 200, "stream": true }));
    let events = sse_events(&lines);
    let done = events
        .iter()
        .find(|(n, _)| n == "response.function_call_arguments.done")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_valid_weather(&serde_json::from_str(done.1["arguments"].as_str().unwrap()).unwrap());
    assert_eq!(events.last().unwrap().0, "response.completed");
    // JSON Schema output.
    let (_, v) = s.post("/v1/responses", &json!({ "model": "phi4", "input": "A city?", "text": { "format": { "type": "json_schema", "name": "city", "schema": { "type": "object", "properties": { "name": { "type": "string", "maxLength": 20 } }, "required": ["name"] } } }, "temperature": 0, "max_output_tokens": 40 }));
    let out: Value =
        serde_json::from_str(v["output"][0]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert!(out["name"].is_string(), "{v}");
    // Bad input, in OpenAI's error shape.
    for (body, text) in [
        (
            json!({ "model": "phi4", "input": "x", "previous_response_id": "resp_1" }),
            "stateless",
        ),
        (
            json!({ "model": "phi4", "input": [{ "type": "function_call_output", "call_id": "call_9", "output": "1" }] }),
            "must answer a tool call",
        ),
        (
            json!({ "model": "phi4", "input": [{ "role": "user", "content": [{ "type": "input_image", "image_url": "x" }] }] }),
            "images",
        ),
        (
            json!({ "model": "phi4", "input": "x", "tools": [{ "type": "web_search" }] }),
            "not supported",
        ),
        (json!({ "model": "phi4", "input": 7 }), "input must be"),
    ] {
        let (status, v) = s.post("/v1/responses", &body);
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(text),
            "{body}: {v}"
        );
    }
}

#[test]
fn anthropic_messages_api() {
    let s = Server::start(&["--tool-choice", "alternate", "--api-key", "sk-test"]);
    let key = [
        ("x-api-key", "sk-test"),
        ("anthropic-version", "2023-06-01"),
    ];
    let post = |body: &Value| {
        let (status, _, b) = s.request(
            "POST",
            "/v1/messages",
            Some(body.to_string().as_bytes()),
            &key,
        );
        (
            status,
            serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
            b,
        )
    };
    let body = json!({ "model": "phi4", "max_tokens": 8, "system": "Answer briefly.", "temperature": 0, "messages": [{ "role": "user", "content": "What is a list?" }] });
    let (status, v, _) = post(&body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["type"].as_str(),
            v["role"].as_str(),
            v["stop_reason"].as_str()
        ),
        (Some("message"), Some("assistant"), Some("max_tokens")),
        "{v}"
    );
    let text = v["content"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["usage"]["output_tokens"], 8);
    // A stop sequence is named.
    let mut b = body.clone();
    b["max_tokens"] = json!(40);
    b["stop_sequences"] = json!([text.chars().nth(2).unwrap().to_string()]);
    let (_, v, _) = post(&b);
    assert_eq!(v["stop_reason"], "stop_sequence", "{v}");
    assert_eq!(v["stop_sequence"], b["stop_sequences"][0], "{v}");
    // Streamed: Anthropic's event sequence, the same text.
    let mut b = body.clone();
    b["stream"] = json!(true);
    let (_, _, raw) = s.request("POST", "/v1/messages", Some(b.to_string().as_bytes()), &key);
    let lines: Vec<String> = String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let events = sse_events(&lines);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..3],
        ["message_start", "ping", "content_block_start"],
        "{names:?}"
    );
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"],
        "{names:?}"
    );
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, v)| v["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    // Tools: tool_use blocks, then the tool_result fed back.
    let tool = json!({ "name": "get_weather", "description": "The weather in a city.", "input_schema": weather_tool()["function"]["parameters"] });
    let ask = json!({ "role": "user", "content": "Weather in Oslo?" });
    let (status, v, _) = post(
        &json!({ "model": "phi4", "max_tokens": 200, "temperature": 0, "tools": [tool], "messages": [ask] }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
    let call = v["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert!(call["id"].as_str().unwrap().starts_with("toolu_"));
    assert_valid_weather(&call["input"]);
    let msgs = json!([ask, { "role": "assistant", "content": [call] }, { "role": "user", "content": [{ "type": "tool_result", "tool_use_id": call["id"], "content": "12 degrees" }] }]);
    let (status, v, _) = post(
        &json!({ "model": "phi4", "max_tokens": 10, "temperature": 0, "tools": [tool], "messages": msgs }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["content"][0]["type"], "text", "{v}");
    assert!(
        v["usage"]["cache_read_input_tokens"].as_u64().unwrap() > 0,
        "{v}"
    );
    // Streamed tool use: an input_json_delta with the whole input.
    let b = json!({ "model": "phi4", "max_tokens": 200, "temperature": 0, "tools": [tool], "tool_choice": { "type": "tool", "name": "get_weather" }, "messages": [ask], "stream": true });
    let (_, _, raw) = s.request("POST", "/v1/messages", Some(b.to_string().as_bytes()), &key);
    let lines: Vec<String> = String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let events = sse_events(&lines);
    let json_delta = events
        .iter()
        .find(|(_, v)| v["delta"]["type"] == "input_json_delta")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_valid_weather(
        &serde_json::from_str(json_delta.1["delta"]["partial_json"].as_str().unwrap()).unwrap(),
    );
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    // count_tokens.
    let (status, _, b) = s.request(
        "POST",
        "/v1/messages/count_tokens",
        Some(
            json!({ "model": "phi4", "messages": [ask] })
                .to_string()
                .as_bytes(),
        ),
        &key,
    );
    let n: Value = serde_json::from_slice(&b).unwrap();
    assert!(
        status == 200 && n["input_tokens"].as_u64().unwrap() > 5,
        "{n}"
    );
    // Errors in Anthropic's shape: no key, a bad request, an unknown model.
    let (status, _, b) = s.request(
        "POST",
        "/v1/messages",
        Some(body.to_string().as_bytes()),
        &[],
    );
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (status, v["type"].as_str(), v["error"]["type"].as_str()),
        (401, Some("error"), Some("authentication_error")),
        "{v}"
    );
    let (status, _, b) = s.request("POST", "/v1/chat/completions", Some(b"{}"), &[]);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (401, Some("invalid_request_error")),
        "OpenAI's shape on /v1: {v}"
    );
    for (body, status, kind, text) in [
        (
            json!({ "model": "phi4", "messages": [ask] }),
            400,
            "invalid_request_error",
            "max_tokens is required",
        ),
        (
            json!({ "model": "claude-3", "max_tokens": 5, "messages": [ask] }),
            404,
            "not_found_error",
            "not found",
        ),
        (
            json!({ "model": "phi4", "max_tokens": 5, "messages": [{ "role": "user", "content": [{ "type": "tool_result", "tool_use_id": "toolu_x", "content": "1" }] }] }),
            400,
            "invalid_request_error",
            "must answer a tool call",
        ),
        (
            json!({ "model": "phi4", "max_tokens": 5, "messages": [{ "role": "user", "content": [{ "type": "image", "source": {} }] }] }),
            400,
            "invalid_request_error",
            "images",
        ),
        (
            json!({ "model": "phi4", "max_tokens": 5, "thinking": { "type": "enabled", "budget_tokens": 100 }, "messages": [ask] }),
            400,
            "invalid_request_error",
            "thinking",
        ),
    ] {
        let (got, v, _) = post(&body);
        assert_eq!(
            (got, v["type"].as_str(), v["error"]["type"].as_str()),
            (status, Some("error"), Some(kind)),
            "{body}: {v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains(text),
            "{body}: {v}"
        );
    }
}

#[test]
fn draft_per_server_and_per_request() {
    // The server drafts for every request (--draft 8) unless one names its own `draft`.
    let s = Server::start(&["--draft", "8"]);
    let msgs = json!([{ "role": "user", "content": "The list type is mutable. The tuple type is immutable. The list type is mutable." }]);
    let reply = |draft: Option<i64>| {
        let mut body = chat_body(msgs.clone(), false, 48);
        body["options"]["repeat_penalty"] = json!(1);
        if let Some(d) = draft {
            body["options"]["draft"] = json!(d);
        }
        let (status, v) = s.post("/api/chat", &body);
        assert_eq!(status, 200, "{v}");
        v["message"]["content"].as_str().unwrap().to_string()
    };
    let (drafted, plain) = (reply(None), reply(Some(0)));
    assert_eq!(drafted, plain);
    // The log line of each: the first with its drafts, the second without.
    let log = s.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" 200 tokens in "))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].contains("(drafted ") && !lines[1].contains("drafted"),
        "{log}"
    );
    // Out of range: 400, and the server goes on.
    let mut body = chat_body(msgs.clone(), false, 4);
    body["options"]["draft"] = json!(17);
    let (status, v) = s.post("/api/chat", &body);
    assert!(
        status == 400 && v["error"].as_str().unwrap().contains("draft"),
        "{v}"
    );
    assert_eq!(reply(Some(3)), plain);
    drop(s);
    // A bad --draft stops the server before it listens.
    let out = common::target_command(common::cli())
        .args([
            "serve",
            "--model",
            common::fixture("phi4-tiny-docs.gguf").to_str().unwrap(),
        ])
        .args(["--draft", "99", "--port", "1"])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--draft"),
        "{out:?}"
    );
}

/// Ollama's OLLAMA_KV_CACHE_TYPE and OLLAMA_CONTEXT_LENGTH set every session's cache type and
/// default context (the start line's memory plan says so; saved prompts are of that type); a
/// plan larger than the memory available stops the server before it listens, unless
/// --skip-memory-check.
#[test]
fn kv_cache_type_context_and_memory_plan() {
    let dir = common::tmpdir();
    let cache = dir.path().to_str().unwrap();
    let s = Server::start_env(
        &["--prompt-cache-dir", cache],
        &[
            ("OLLAMA_KV_CACHE_TYPE", "q8_0"),
            ("OLLAMA_CONTEXT_LENGTH", "640"),
        ],
    );
    let log = s.log();
    assert!(
        log.contains("session(s) of 640 positions, KV cache q8_0"),
        "{log}"
    );
    let msgs = json!([{ "role": "system", "content": "Answer briefly." }, { "role": "user", "content": "What is a list?" }]);
    let (status, v) = s.post("/api/chat", &chat_body(msgs, false, 4));
    assert_eq!(status, 200, "{v}");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with(".q8_0.kv")),
        "{names:?} {}",
        s.log()
    );
    drop(s);
    // A port in use: a server that gets as far as listening fails there, at once.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let serve = |env: &[(&str, &str)], extra: &[&str]| {
        common::target_command(common::cli())
            .args([
                "serve",
                "--model",
                common::fixture("phi4-tiny-docs.gguf").to_str().unwrap(),
                "--port",
                &port,
            ])
            .args(extra)
            .env_remove("OLLAMA_KV_CACHE_TYPE")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = serve(&[("PHI4_MEMORY_AVAILABLE", "20M")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("not enough memory")
            && err.contains("--skip-memory-check"),
        "{err}"
    );
    // With the flag it goes on to listen (on a port in use: that is the error now).
    let out = serve(
        &[("PHI4_MEMORY_AVAILABLE", "20M")],
        &["--skip-memory-check"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: not enough memory") && err.contains("cannot listen"),
        "{err}"
    );
    // A request whose num_ctx is beyond the plan's context is refused when its cache alone is
    // more than the memory available (1 MiB here: the demo model's 2048 positions are 4 MiB);
    // requests within the plan go on.
    let s = Server::start_env(
        &["--skip-memory-check", "--ctx-size", "256"],
        &[("PHI4_MEMORY_AVAILABLE", "1M")],
    );
    let msgs = json!([{ "role": "user", "content": "What is a list?" }]);
    let mut body = chat_body(msgs.clone(), false, 2);
    body["options"]["num_ctx"] = json!(2048);
    let (status, v) = s.post("/api/chat", &body);
    assert!(
        status == 400
            && v["error"]
                .as_str()
                .unwrap()
                .contains("num_ctx 2048: its KV cache"),
        "{status} {v}"
    );
    let (status, v) = s.post("/api/chat", &chat_body(msgs, false, 2));
    assert_eq!(status, 200, "{v}");
    drop(s);
    let out = serve(&[("OLLAMA_KV_CACHE_TYPE", "q3_k")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown KV cache type \"q3_k\""), "{err}");
}
