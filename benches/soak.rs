//! `phi4 serve` soaked: many clients, every kind of request, for minutes; then whether the
//! server stayed whole (requests served, errors by kind, latency, RSS and open descriptors at
//! the start and the end).
//!
//!     cargo bench --bench soak -- [--model FILE] [--minutes 10] [--clients 8] [--read-timeout 5]
//!
//! The server runs with `--parallel 2` (the demo model by default). Each client loops over
//! randomly chosen requests until the time is up:
//! - `chat`: a non-streamed /api/chat of up to 16 tokens;
//! - `generate-stream`: a streamed /api/generate;
//! - `openai-stream`: a streamed /v1/chat/completions with usage;
//! - `embed`: /api/embed or /v1/embeddings of one text;
//! - `cancel`: a streamed chat whose connection is dropped after its first chunk;
//! - `hostile`: a malformed or invalid body (truncated JSON, wrong types, bad options, an
//!   unknown role, random bytes), which must get a 4xx;
//! - `slow`: a connection that sends half a header and waits, which the server must close
//!   after its read timeout.
//!
//! A request "served" got the answer its kind expects (2xx for the generations, 4xx for hostile
//! bodies, a close for slow connections); anything else is an error, counted by kind and status.
//! RSS is sampled every 30 s; descriptors are counted before the load and after it has ended.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::json;

const KINDS: [&str; 7] = [
    "chat",
    "generate-stream",
    "openai-stream",
    "embed",
    "cancel",
    "hostile",
    "slow",
];

#[derive(Default)]
struct Tally {
    /// Per kind: latencies of the requests served.
    served: BTreeMap<&'static str, Vec<Duration>>,
    /// Per kind and what happened instead ("status 500", "connection: ...").
    errors: BTreeMap<(&'static str, String), u64>,
}

/// A tiny xorshift: each client its own sequence of kinds and questions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Connects and sends a POST (Connection: close).
fn send(port: u16, path: &str, body: &[u8]) -> std::io::Result<BufReader<TcpStream>> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
    Ok(BufReader::new(conn))
}

/// The status of a response, its head read.
fn status(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let code = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    code.ok_or_else(|| std::io::Error::other(format!("no status line: {line:?}")))
}

/// A request whose whole answer is read; its status.
fn whole(port: u16, path: &str, body: &[u8]) -> std::io::Result<u16> {
    let mut r = send(port, path, body)?;
    let code = status(&mut r)?;
    r.read_to_end(&mut Vec::new())?;
    Ok(code)
}

fn hostile_body(rng: &mut Rng) -> (&'static str, Vec<u8>) {
    let bodies: [(&str, Vec<u8>); 7] = [
        (
            "/api/chat",
            br#"{"model":"phi4","messages":[{"role":"user","content":"#.to_vec(),
        ),
        (
            "/api/chat",
            br#"{"model":"phi4","messages":"hello"}"#.to_vec(),
        ),
        (
            "/api/generate",
            br#"{"model":"phi4","prompt":"x","options":{"num_ctx":-5}}"#.to_vec(),
        ),
        (
            "/api/chat",
            br#"{"model":"phi4","messages":[{"role":"wizard","content":"x"}]}"#.to_vec(),
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"phi4","messages":[],"temperature":"hot"}"#.to_vec(),
        ),
        (
            "/v1/completions",
            br#"{"model":"phi4","prompt":{"a":1},"max_tokens":0}"#.to_vec(),
        ),
        (
            "/api/generate",
            (0..4096).map(|_| rng.next() as u8).collect(),
        ),
    ];
    let (path, body) = bodies[rng.below(bodies.len())].clone();
    (path, body)
}

/// One request of `kind`: Ok(latency) when it got what that kind expects, Err(what instead).
fn one(kind: &str, port: u16, rng: &mut Rng, read_timeout: f64) -> Result<Duration, String> {
    let t = Instant::now();
    let question = format!(
        "Question {}: how do I {} in Python?",
        rng.next() % 1000,
        ["read a file", "sort a list", "define a class", "use a dict"][rng.below(4)]
    );
    let expect_2xx = |code: std::io::Result<u16>| match code {
        Ok(c) if (200..300).contains(&c) => Ok(t.elapsed()),
        Ok(c) => Err(format!("status {c}")),
        Err(e) => Err(format!("connection: {}", e.kind())),
    };
    match kind {
        "chat" => {
            let body = json!({ "model": "phi4", "stream": false, "messages": [{ "role": "user", "content": question }], "options": { "num_predict": 16 } });
            expect_2xx(whole(port, "/api/chat", body.to_string().as_bytes()))
        }
        "generate-stream" => {
            let body =
                json!({ "model": "phi4", "prompt": question, "options": { "num_predict": 16 } });
            expect_2xx(whole(port, "/api/generate", body.to_string().as_bytes()))
        }
        "openai-stream" => {
            let body = json!({ "model": "phi4", "stream": true, "stream_options": { "include_usage": true }, "max_tokens": 16, "messages": [{ "role": "user", "content": question }] });
            expect_2xx(whole(
                port,
                "/v1/chat/completions",
                body.to_string().as_bytes(),
            ))
        }
        "embed" => {
            let (path, body) = if rng.below(2) == 0 {
                ("/api/embed", json!({ "model": "phi4", "input": question }))
            } else {
                (
                    "/v1/embeddings",
                    json!({ "model": "phi4", "input": [question] }),
                )
            };
            expect_2xx(whole(port, path, body.to_string().as_bytes()))
        }
        "cancel" => {
            let body = json!({ "model": "phi4", "messages": [{ "role": "user", "content": question }], "options": { "num_predict": 64 } });
            let mut r = send(port, "/api/chat", body.to_string().as_bytes())
                .map_err(|e| format!("connection: {}", e.kind()))?;
            let code = status(&mut r).map_err(|e| format!("connection: {}", e.kind()))?;
            if code != 200 {
                return Err(format!("status {code}"));
            }
            let mut line = String::new();
            while line.trim().is_empty() || line.trim().len() <= 4 {
                // (skips chunk-size lines)
                line.clear();
                if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                    return Err("ended before a chunk".into());
                }
            }
            drop(r); // the client goes away mid-stream
            Ok(t.elapsed())
        }
        "hostile" => {
            let (path, body) = hostile_body(rng);
            match whole(port, path, &body) {
                Ok(c) if (400..500).contains(&c) => Ok(t.elapsed()),
                Ok(c) => Err(format!("status {c}")),
                Err(e) => Err(format!("connection: {}", e.kind())),
            }
        }
        "slow" => {
            let mut conn =
                TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs_f64(read_timeout * 3.0)))
                .unwrap();
            conn.write_all(b"POST /api/chat HTTP/1.1\r\nHost: 127")
                .map_err(|e| e.to_string())?;
            // The server must give up on the header and close (a 408 or nothing at all).
            let mut rest = Vec::new();
            match conn.read_to_end(&mut rest) {
                Ok(_) => Ok(t.elapsed()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(t.elapsed()),
                Err(e) => Err(format!("not closed: {}", e.kind())),
            }
        }
        _ => unreachable!(),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut model, mut minutes, mut clients, mut read_timeout) = (
        common::fixture("phi4-tiny-docs.gguf"),
        10.0f64,
        8usize,
        5.0f64,
    );
    while let Some(k) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--model" => model = v().into(),
            "--minutes" => minutes = v().parse().unwrap(),
            "--clients" => clients = v().parse().unwrap(),
            "--read-timeout" => read_timeout = v().parse().unwrap(),
            "--bench" => {}
            _ => panic!("unknown argument {k}"),
        }
    }
    let rt = read_timeout.to_string();
    let s = Server::start_with(&model, &["--parallel", "2", "--read-timeout", &rt]);
    let (port, pid) = (s.port, s.pid());
    // Warm up (the model loaded, the first sessions made), then the baseline.
    for _ in 0..2 {
        let body = json!({ "model": "phi4", "stream": false, "messages": [{ "role": "user", "content": "Hi" }], "options": { "num_predict": 4 } });
        assert_eq!(
            whole(port, "/api/chat", body.to_string().as_bytes()).unwrap(),
            200
        );
    }
    let (rss0, fds0) = (rss_kib(pid), open_fds(pid));
    println!(
        "phi4 serve --parallel 2 --read-timeout {rt} on {}, {clients} clients for {minutes} min",
        model.display()
    );

    let tally = Mutex::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut rss_samples = vec![rss0];
    std::thread::scope(|sc| {
        for c in 0..clients {
            let tally = &tally;
            sc.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c as u64 + 1) * 0x1234_5677));
                while Instant::now() < deadline {
                    let kind = KINDS[rng.below(KINDS.len())];
                    let r = one(kind, port, &mut rng, read_timeout);
                    let mut t = tally.lock().unwrap();
                    match r {
                        Ok(d) => t.served.entry(kind).or_default().push(d),
                        Err(e) => *t.errors.entry((kind, e)).or_default() += 1,
                    }
                }
            });
        }
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(30).min(deadline - Instant::now()));
            rss_samples.push(rss_kib(pid));
        }
    });
    // Cancelled generations and timed-out connections settle.
    std::thread::sleep(Duration::from_secs_f64(read_timeout + 2.0));
    let (rss1, fds1) = (rss_kib(pid), open_fds(pid));
    let t = tally.into_inner().unwrap();

    println!(
        "{:<16} {:>8} {:>10} {:>10}",
        "kind", "served", "p50 ms", "p99 ms"
    );
    let mut total = 0;
    for kind in KINDS {
        let mut l = t.served.get(kind).cloned().unwrap_or_default();
        l.sort();
        total += l.len();
        println!(
            "{kind:<16} {:>8} {:>10.0} {:>10.0}",
            l.len(),
            percentile(&l, 0.5),
            percentile(&l, 0.99)
        );
    }
    println!("served: {total}");
    println!("errors by kind:");
    if t.errors.is_empty() {
        println!("  none");
    }
    for ((kind, what), n) in &t.errors {
        println!("  {kind:<16} {what:<32} {n}");
    }
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "rss: {:.1} MiB at the start, {:.1} MiB at the end (samples every 30 s: {})",
        mib(rss0),
        mib(rss1),
        rss_samples
            .iter()
            .map(|&k| format!("{:.0}", mib(k)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("open descriptors: {fds0} at the start, {fds1} at the end");
    drop(s);
}
