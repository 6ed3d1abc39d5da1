//! Connections, bounded: how many are open at once, how long a client may take to send a
//! request's headers or its body or to send the next request on a kept-alive connection, and
//! how many bytes of bodies are being read at once. A client that sends one byte a second, or
//! holds a body short of its last byte, or opens connections until the process runs out of
//! descriptors, costs a slot for at most the read timeout and never starves the others.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::ApiError;

/// Request bodies above this are refused (413) before they are read whole.
pub const MAX_BODY: usize = 16 << 20;
/// Bodies being read at once hold at most this many bytes; more wait (up to the read timeout).
const BODY_BUDGET: usize = 4 * MAX_BODY;
/// Descriptors kept for everything but connections (the model file, logs, saved prompts, …).
const RESERVED_FDS: usize = 64;

pub struct Limits {
    /// For a request's headers, its body, and the wait for the next request on a connection.
    pub read_timeout: Duration,
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    body_budget: Arc<Semaphore>,
}

impl Limits {
    /// Limits for this process: connections up to its descriptor limit, less a reserve.
    pub fn new(read_timeout: Duration) -> Limits {
        let fds = open_files_limit().unwrap_or(1024);
        Limits {
            read_timeout,
            max_connections: fds.saturating_sub(RESERVED_FDS).clamp(4, 4096),
            body_budget: Arc::new(Semaphore::new(BODY_BUDGET)),
        }
    }

    /// The request with its body read whole (at most [`MAX_BODY`] bytes): within the read
    /// timeout (else 408) and within the budget of bytes being read at once (else, after the
    /// read timeout, 503).
    pub async fn read_body(
        &self,
        req: Request,
        declared: Option<u64>,
    ) -> Result<Request, ApiError> {
        let (parts, body) = req.into_parts();
        if declared == Some(0) || body.size_hint().exact() == Some(0) {
            return Ok(Request::from_parts(parts, body));
        }
        let reserve = declared.map_or(MAX_BODY, |n| n as usize).min(MAX_BODY) as u32;
        let budget = self.body_budget.clone().acquire_many_owned(reserve);
        let _reserved = tokio::time::timeout(self.read_timeout, budget)
            .await
            .map_err(|_| ApiError::busy())?
            .map_err(|_| ApiError::busy())?;
        let bytes = tokio::time::timeout(self.read_timeout, axum::body::to_bytes(body, MAX_BODY))
            .await
            .map_err(|_| ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                message: format!(
                    "the request body did not arrive within {} s",
                    self.read_timeout.as_secs_f32()
                ),
            })?
            .map_err(|e| ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("request body: {e}"),
            })?;
        Ok(Request::from_parts(parts, Body::from(bytes)))
    }
}

/// The soft limit of open descriptors of this process.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Serve `router` on `listener` until `shutdown` completes, then let the requests in progress
/// finish. Each connection takes a slot of `limits.max_connections` (none free: closed at
/// once); hyper closes one whose request headers, or whose next request on a kept-alive
/// connection, do not come within the read timeout.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors (or a connection reset before it was accepted): wait for
                // some to be freed, as every busy server must.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed
        };
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = conn.await;
        });
    }
    graceful.shutdown().await;
}
