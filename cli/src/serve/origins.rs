//! Who may call the server from a browser. A web page the user visits can send requests to a
//! server on the user's machine: by DNS rebinding (its own name, resolved to 127.0.0.1) or
//! directly across origins. So, as Ollama does: on a loopback bind a request must name a local
//! host (`Host`), and a request from a page (`Origin`) must come from a local origin — or one
//! allowed by `--origins` / `OLLAMA_ORIGINS` — and gets the CORS headers that let the page read
//! the answer; preflights are answered.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderValue, Method};

/// Origins allowed without being named: pages served from this machine, and the app schemes of
/// desktop shells and editors (as Ollama allows them).
const LOCAL_HOSTS: &[&str] = &["localhost", "127.0.0.1", "0.0.0.0", "[::1]"];
const APP_SCHEMES: &[&str] = &["app", "file", "tauri", "vscode-webview", "vscode-file"];

pub struct Origins {
    /// The server listens on a loopback address only: a request must name a local host.
    loopback: bool,
    /// Allowed origins: exact, or with `*` standing for any run of characters.
    allowed: Vec<String>,
}

impl Origins {
    pub fn new(bind: IpAddr, extra: &[String]) -> Origins {
        let mut allowed: Vec<String> = LOCAL_HOSTS
            .iter()
            .flat_map(|h| ["http", "https"].map(|s| [format!("{s}://{h}"), format!("{s}://{h}:*")]))
            .flatten()
            .collect();
        allowed.extend(APP_SCHEMES.iter().map(|s| format!("{s}://*")));
        allowed.extend(
            extra
                .iter()
                .flat_map(|o| o.split(','))
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty()),
        );
        Origins {
            loopback: bind.is_loopback(),
            allowed,
        }
    }

    /// Whether `host` (a `Host` header) may reach this server: anything unless it listens on
    /// loopback only; then a loopback address, `localhost`, or a name under `.localhost`.
    pub fn host_allowed(&self, host: Option<&str>) -> bool {
        if !self.loopback {
            return true;
        }
        let Some(host) = host else { return true }; // HTTP/1.0 without Host: not a browser's
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(h, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    h
                } else {
                    host
                }
            }),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name == "localhost"
            || name.ends_with(".localhost")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed.iter().any(|p| glob(p, origin))
    }

    /// The CORS headers of an answer to a page of an allowed `origin`; for a preflight
    /// (`OPTIONS` with `Access-Control-Request-Method`) also what it may send.
    pub fn cors_headers(&self, origin: &str, method: &Method, request: &HeaderMap) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = |v: &str| HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static(""));
        h.insert("access-control-allow-origin", value(origin));
        h.insert("vary", HeaderValue::from_static("Origin"));
        if method == Method::OPTIONS {
            h.insert(
                "access-control-allow-methods",
                HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
            );
            let asked = request
                .get("access-control-request-headers")
                .and_then(|v| v.to_str().ok());
            h.insert(
                "access-control-allow-headers",
                value(asked.unwrap_or("Authorization, Content-Type")),
            );
            h.insert("access-control-max-age", HeaderValue::from_static("86400"));
        }
        h
    }
}

/// `pattern` matches `text`, `*` standing for any run of characters (`*` alone: everything).
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins() {
        let o = Origins::new(
            "127.0.0.1".parse().unwrap(),
            &["https://app.example, http://*.lan:8080".into()],
        );
        for ok in [
            "localhost",
            "localhost:11434",
            "127.0.0.1:11434",
            "[::1]:11434",
            "api.localhost",
            "LOCALHOST.",
        ] {
            assert!(o.host_allowed(Some(ok)), "{ok}");
        }
        for bad in [
            "evil.com",
            "evil.com:11434",
            "127.0.0.1.evil.com",
            "localhost.evil.com",
            "10.0.0.1:11434",
        ] {
            assert!(!o.host_allowed(Some(bad)), "{bad}");
        }
        assert!(Origins::new("0.0.0.0".parse().unwrap(), &[]).host_allowed(Some("evil.com")));
        for ok in [
            "http://localhost",
            "http://localhost:5173",
            "https://127.0.0.1:8443",
            "app://x",
            "https://app.example",
            "http://box.lan:8080",
        ] {
            assert!(o.origin_allowed(ok), "{ok}");
        }
        for bad in [
            "https://evil.com",
            "http://localhost.evil.com",
            "http://127.0.0.1.evil.com:80",
            "null",
            "http://box.lan:9090",
        ] {
            assert!(!o.origin_allowed(bad), "{bad}");
        }
        assert!(Origins::new("127.0.0.1".parse().unwrap(), &["*".into()])
            .origin_allowed("https://evil.com"));
    }
}
