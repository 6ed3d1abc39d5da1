//! `phi4 serve` for the tests: started on a port the test picks (127.0.0.1 only), stopped when
//! dropped; a minimal HTTP/1.1 client (chunked bodies included) so that the tests see the bytes
//! on the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `phi4 serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with(&super::fixture("phi4-tiny-docs.gguf"), extra)
    }

    /// A server of another model.
    pub fn start_with(model: &std::path::Path, extra: &[&str]) -> Server {
        Server::launch(model, extra, None, &[])
    }

    /// The demo model's server with these environment variables set.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch(&super::fixture("phi4-tiny-docs.gguf"), extra, None, env)
    }

    /// The demo model's server in a process that may open at most `n` files (natively; under
    /// an emulator the emulator's own descriptors would count too, so no limit is set there).
    pub fn start_with_fd_limit(n: u32, extra: &[&str]) -> Server {
        Server::launch(&super::fixture("phi4-tiny-docs.gguf"), extra, Some(n), &[])
    }

    fn launch(
        model: &std::path::Path,
        extra: &[&str],
        fd_limit: Option<u32>,
        env: &[(&str, &str)],
    ) -> Server {
        let dir = super::tmpdir();
        let log = dir.path().join("serve.log");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = match fd_limit.filter(|_| super::runner().is_none()) {
            Some(n) => {
                let mut c = std::process::Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(super::cli());
                c
            }
            None => super::target_command(super::cli()),
        };
        let child = command
            .args(["serve", "--model"])
            .arg(model)
            .args(["--port", &port.to_string()])
            .args(if extra.contains(&"--threads") {
                &[][..]
            } else {
                &["--threads", "2"][..]
            })
            .args(extra)
            .env_remove("OLLAMA_HOST")
            .env_remove("PHI4_API_KEY")
            .env_remove("OLLAMA_ORIGINS")
            .env_remove("OLLAMA_KV_CACHE_TYPE")
            .env_remove("OLLAMA_CONTEXT_LENGTH")
            .env_remove("PHI4_MEMORY_AVAILABLE")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Server {
            child,
            port,
            log,
            _dir: dir,
        };
        let t = Instant::now();
        while s.get("/").0 == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the server did not start: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// One request; returns status, content type and the whole (de-chunked) body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> (u16, String, Vec<u8>) {
        let mut conn = match TcpStream::connect(("127.0.0.1", self.port)) {
            Ok(c) => c,
            Err(_) => return (0, String::new(), Vec::new()),
        };
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        if let Some(b) = body {
            head += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            );
        }
        head += "\r\n";
        if conn.write_all(head.as_bytes()).is_err()
            || body.is_some_and(|b| conn.write_all(b).is_err())
        {
            return (0, String::new(), Vec::new());
        }
        let mut r = BufReader::new(conn);
        let (status, ctype, chunked) = read_head(&mut r);
        let mut out = Vec::new();
        if chunked {
            while let Some(chunk) = read_chunk(&mut r) {
                out.extend(chunk);
            }
        } else {
            let _ = r.read_to_end(&mut out);
        }
        (status, ctype, out)
    }

    pub fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        self.request("GET", path, None, &[])
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, b) = self.request("POST", path, Some(body.to_string().as_bytes()), &[]);
        (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    /// A POST whose streamed body is returned as lines.
    pub fn post_lines(&self, path: &str, body: &Value) -> (u16, String, Vec<String>) {
        let (status, ctype, b) = self.request("POST", path, Some(body.to_string().as_bytes()), &[]);
        (
            status,
            ctype,
            String::from_utf8(b)
                .unwrap()
                .lines()
                .map(String::from)
                .collect(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_head(r: &mut BufReader<TcpStream>) -> (u16, String, bool) {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return (0, String::new(), false);
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut ctype, mut chunked) = (String::new(), false);
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-type:") {
            ctype = v.trim().to_string();
        }
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
    (status, ctype, chunked)
}

fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    r.read_line(&mut size).ok()?;
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}
