//! `phi4 serve` under load: requests/s and generated tokens/s with 1 and 2 concurrent clients,
//! and the time to the first token of a chat's second turn against its first.
//!
//!     cargo bench --bench serve -- --model FILE [--requests 8] [--gen 32] [--threads 2]
//!
//! The server runs with `--parallel 2`; each request is a non-streamed chat with its own
//! question (so no request reuses another's cache) and `num_predict` = --gen at temperature 0.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{json, Value};

fn chat(s: &Server, messages: &Value, gen: usize) -> Value {
    let (status, v) = s.post("/api/chat", &json!({ "model": "phi4", "messages": messages, "stream": false, "options": { "num_predict": gen, "temperature": 0 } }));
    assert_eq!(status, 200, "{v}");
    v
}

/// Time to the first streamed chunk of a chat, and its final object.
fn first_token(s: &Server, messages: &Value, gen: usize) -> (Duration, Value) {
    let body = json!({ "model": "phi4", "messages": messages, "options": { "num_predict": gen, "temperature": 0 } }).to_string();
    let t = Instant::now();
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(conn, "POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut r = BufReader::new(conn);
    let (mut ttft, mut last) = (None, Value::Null);
    let mut line = String::new();
    while r.read_line(&mut line).unwrap() > 0 {
        // (Chunk-size lines of the chunked body are skipped: only objects are events.)
        if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
            ttft.get_or_insert(t.elapsed());
            last = v;
        }
        line.clear();
    }
    (ttft.expect("no chunk"), last)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut model, mut requests, mut gen, mut threads) = (None, 8usize, 32usize, 2usize);
    while let Some(k) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--model" => model = Some(std::path::PathBuf::from(v())),
            "--requests" => requests = v().parse().unwrap(),
            "--gen" => gen = v().parse().unwrap(),
            "--threads" => threads = v().parse().unwrap(),
            "--bench" => {}
            _ => panic!("unknown argument {k}"),
        }
    }
    let model = model.expect("--model FILE");
    let s = Server::start_with(
        &model,
        &["--parallel", "2", "--threads", &threads.to_string()],
    );
    let question = |i: usize| json!([{ "role": "user", "content": format!("Question {i}: how do I read a file line by line?") }]);
    chat(&s, &question(999), 4); // load and warm up

    println!(
        "phi4 serve on {} ({threads} threads per generation, --parallel 2)",
        model.display()
    );
    println!(
        "{:>8} {:>10} {:>12} {:>14}",
        "clients", "requests", "requests/s", "tokens/s"
    );
    for clients in [1, 2] {
        let t = Instant::now();
        let tokens: u64 = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let (s, question) = (&s, &question);
                    sc.spawn(move || {
                        (0..requests / clients)
                            .map(|i| {
                                chat(s, &question(1000 * clients + 100 * c + i), gen)["eval_count"]
                                    .as_u64()
                                    .unwrap()
                            })
                            .sum::<u64>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{clients:>8} {requests:>10} {:>12.3} {:>14.2}",
            requests as f64 / secs,
            tokens as f64 / secs
        );
    }

    let first = json!([{ "role": "system", "content": "You answer questions about Python." }, { "role": "user", "content": "How do I open a file and read every line of it?" }]);
    let (t1, a) = first_token(&s, &first, gen);
    let mut second = first.as_array().unwrap().clone();
    let reply = chat(&s, &first, gen)["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    second.push(json!({ "role": "assistant", "content": reply }));
    second.push(json!({ "role": "user", "content": "And how do I close it?" }));
    let (t2, b) = first_token(&s, &Value::Array(second), gen);
    println!("time to first token: first turn {:.0} ms ({} prompt tokens evaluated), second turn {:.0} ms ({} evaluated)",
        t1.as_secs_f64() * 1e3, a["prompt_eval_count"], t2.as_secs_f64() * 1e3, b["prompt_eval_count"]);
}
