//! The daemon's admin HTTP endpoint on `metrics_listen`:
//!
//! - `GET /metrics` — Prometheus text ([`crate::metrics`]);
//! - `GET /status` — the [`Status`] snapshot as JSON (for `lb status`);
//! - `POST /trace` — a [`TraceRequest`] as JSON in, a [`TraceAnswer`] out
//!   (for `lb trace`).
//!
//! Unknown paths get 404, other methods 405, bad bodies 400 with the reason
//! as `{"error": ...}`. Metrics and status are served from the snapshot the
//! refresh loop publishes (no lock is held across an await); traces go to
//! the refresh loop, which owns the balancer, through a channel, and are
//! answered within [`TRACE_TIMEOUT`] or get 504.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    daemon::StatusHandle,
    metrics,
    trace::{TraceAnswer, TraceError, TraceRequest},
};

/// How long `POST /trace` waits for the refresh loop's answer.
pub const TRACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body accepted, bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// Traces waiting for the refresh loop at most; more get 503.
pub const TRACE_QUEUE: usize = 16;

/// One trace for the refresh loop to run, and where to answer.
pub struct TraceJob {
    /// What to trace.
    pub request: TraceRequest,
    /// The answer goes here.
    pub reply: oneshot::Sender<Result<TraceAnswer, TraceError>>,
}

/// Why the admin endpoint could not start.
#[derive(Debug, Error)]
pub enum AdminError {
    /// The listening socket could not be bound.
    #[error("metrics_listen {addr}: cannot listen for the admin endpoint: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr` (the config's `metrics_listen`). Synchronous, so the daemon
/// binds before it touches the kernel: a taken port fails the start with
/// nothing attached.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, AdminError> {
    let l =
        std::net::TcpListener::bind(addr).map_err(|source| AdminError::Bind { addr, source })?;
    l.set_nonblocking(true)
        .map_err(|source| AdminError::Bind { addr, source })?;
    Ok(l)
}

/// The running endpoint; dropping it stops accepting.
pub struct AdminServer {
    task: JoinHandle<()>,
    /// The address it listens on.
    pub local_addr: Option<SocketAddr>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the endpoint on `listener` (from [`bind`]) until the returned
/// value is dropped. Must be called inside a tokio runtime.
pub fn spawn(
    listener: std::net::TcpListener,
    status: StatusHandle,
    traces: mpsc::Sender<TraceJob>,
) -> std::io::Result<AdminServer> {
    let listener = TcpListener::from_std(listener)?;
    let local_addr = listener.local_addr().ok();
    if let Some(a) = local_addr {
        info!(listen = %a, "admin endpoint: /metrics /status /trace");
    }
    let task = tokio::spawn(accept_loop(listener, Ctx { status, traces }));
    Ok(AdminServer { task, local_addr })
}

#[derive(Clone)]
struct Ctx {
    status: StatusHandle,
    traces: mpsc::Sender<TraceJob>,
}

async fn accept_loop(listener: TcpListener, ctx: Ctx) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("admin endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(ctx, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!("admin connection: {e}");
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(ctx: Ctx, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let allowed = match path.as_str() {
        "/metrics" | "/status" => Method::GET,
        "/trace" => Method::POST,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no such path {path:?}: try /metrics, /status or POST /trace"),
            )
        }
    };
    if req.method() != allowed {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} {path}: only {allowed} is allowed", req.method()),
        );
        if let Ok(v) = header::HeaderValue::from_str(allowed.as_str()) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    }
    match path.as_str() {
        "/metrics" => {
            let body = metrics::render(&ctx.status.get(), crate::daemon::now_ms());
            respond(StatusCode::OK, metrics::CONTENT_TYPE, body.into_bytes())
        }
        "/status" => json(StatusCode::OK, &ctx.status.get()),
        _ => trace(ctx, req).await,
    }
}

async fn trace(ctx: Ctx, req: Request<Incoming>) -> Resp {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("reading the body (at most {MAX_BODY} bytes): {e}"),
            )
        }
    };
    // The path names the field that was wrong (`src: invalid socket address`).
    let mut de = serde_json::Deserializer::from_slice(&body);
    let request: TraceRequest = match serde_path_to_error::deserialize(&mut de) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad trace request: {e} (expected {{\"src\": \"IP:PORT\", \"dst\": \"VIP:PORT\", \"proto\": \"tcp\"|\"udp\"}})"
                ),
            )
        }
    };
    if let Err(e) = request.validate() {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let (tx, rx) = oneshot::channel();
    let job = TraceJob { request, reply: tx };
    if ctx.traces.try_send(job).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many traces waiting, or the daemon is stopping".into(),
        );
    }
    match tokio::time::timeout(TRACE_TIMEOUT, rx).await {
        Ok(Ok(Ok(answer))) => json(StatusCode::OK, &answer),
        Ok(Ok(Err(TraceError::Input(m)))) => error(StatusCode::BAD_REQUEST, m),
        Ok(Ok(Err(TraceError::Unavailable(m)))) => error(StatusCode::SERVICE_UNAVAILABLE, m),
        Ok(Ok(Err(e))) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("trace failed: {e}"),
        ),
        Ok(Err(_)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon dropped the trace (stopping?)".into(),
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the daemon did not answer within {TRACE_TIMEOUT:?}"),
        ),
    }
}

fn respond(code: StatusCode, content_type: &'static str, body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json<T: Serialize>(code: StatusCode, v: &T) -> Resp {
    match serde_json::to_vec(v) {
        Ok(b) => respond(code, "application/json", b),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        ),
    }
}

/// Body of every error response.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// What was wrong.
    pub error: String,
}

fn error(code: StatusCode, message: String) -> Resp {
    let b = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    respond(code, "application/json", b)
}

/// Milliseconds since the Unix epoch (the scoreboard's clock).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_failure_names_metrics_listen() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind(addr).unwrap_err().to_string();
        assert!(e.starts_with(&format!("metrics_listen {addr}: ")), "{e}");
    }
}
