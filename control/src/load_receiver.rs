//! `headroom load-receiver`: accepts signed load reports (single or batch
//! JSON `{service, instance, load}`), checks that the caller may report for
//! each service, and writes the scoreboard in one atomic round trip. Bad
//! input → 400 naming the field, nothing written.
//!
//! The receiver is itself the service `load-receiver`: a principal may
//! report for service S iff it has a grant on `load-receiver` allowing
//! `POST` on path `/v1/report/S` (e.g. prefix `/v1/report/` for all).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use redis::aio::ConnectionManager;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tracing::{info, info_span, warn, Instrument};

use crate::gate::{json_error, json_response, reject, Body, Gate};
use crate::keysync::{KeySync, KeySyncConfig};
use crate::load_report::{RECEIVER_SERVICE, REPORT_PATH};
use crate::per_thread;
use crate::scoreboard::{self, LoadReport};
use crate::sigv4::VerifyPolicy;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadReceiverArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long, env = "HEADROOM_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    #[arg(long, default_value = "headroom")]
    pub region: String,
    #[arg(long, default_value_t = 300)]
    pub max_skew_secs: i64,
    /// Most reports in one batch.
    #[arg(long, default_value_t = 1000)]
    pub max_batch: usize,
    /// File for the last good key snapshot.
    #[arg(long, default_value = "/var/lib/headroom/keys-load-receiver.json")]
    pub snapshot: PathBuf,
    #[arg(long, default_value_t = 2000, hide = true)]
    pub sync_block_ms: u64,
}

impl LoadReceiverArgs {
    pub fn new(listen: SocketAddr, redis: &str, snapshot: PathBuf) -> Self {
        LoadReceiverArgs {
            listen,
            redis: redis.into(),
            region: "headroom".into(),
            max_skew_secs: 300,
            max_batch: 1000,
            snapshot,
            sync_block_ms: 2000,
        }
    }
}

/// A report that failed validation: `field` is e.g. `load` or `[3].service`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {detail}")]
pub struct FieldError {
    pub field: String,
    pub detail: String,
}

fn ferr(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        detail: detail.into(),
    }
}

/// Validate a body: one report object or a non-empty array of them.
pub fn parse_reports(body: &[u8], max_batch: usize) -> Result<Vec<LoadReport>, FieldError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ferr("body", format!("not JSON: {e}")))?;
    match v {
        serde_json::Value::Object(_) => Ok(vec![parse_one(&v, "")?]),
        serde_json::Value::Array(items) => {
            if items.is_empty() {
                return Err(ferr("body", "empty batch"));
            }
            if items.len() > max_batch {
                return Err(ferr("body", format!("batch larger than {max_batch}")));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, it)| parse_one(it, &format!("[{i}].")))
                .collect()
        }
        _ => Err(ferr("body", "must be an object or an array of objects")),
    }
}

fn parse_one(v: &serde_json::Value, at: &str) -> Result<LoadReport, FieldError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ferr(format!("{}report", at), "must be an object"))?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "service" | "instance" | "load") {
            return Err(ferr(format!("{at}{k}"), "unknown field"));
        }
    }
    let service = match obj.get("service") {
        None => return Err(ferr(format!("{at}service"), "missing")),
        Some(serde_json::Value::String(s)) if scoreboard::valid_service(s) => s.clone(),
        Some(serde_json::Value::String(_)) => {
            return Err(ferr(
                format!("{at}service"),
                "must match [A-Za-z0-9._-]{1,64}",
            ))
        }
        Some(_) => return Err(ferr(format!("{at}service"), "must be a string")),
    };
    let instance = match obj.get("instance") {
        None => return Err(ferr(format!("{at}instance"), "missing")),
        Some(serde_json::Value::String(s)) if scoreboard::valid_instance(s) => s.clone(),
        Some(serde_json::Value::String(_)) => {
            return Err(ferr(
                format!("{at}instance"),
                "must match [A-Za-z0-9._:@[]-]{1,128}",
            ))
        }
        Some(_) => return Err(ferr(format!("{at}instance"), "must be a string")),
    };
    let load = match obj.get("load") {
        None => return Err(ferr(format!("{at}load"), "missing")),
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() && (0.0..=100.0).contains(&x) => x,
            _ => return Err(ferr(format!("{at}load"), "must be between 0 and 100")),
        },
        Some(_) => return Err(ferr(format!("{at}load"), "must be a number")),
    };
    Ok(LoadReport {
        service,
        instance,
        load,
    })
}

struct Ctx {
    gate: Gate,
    redis: Mutex<Option<ConnectionManager>>,
    redis_url: String,
    max_batch: usize,
}

pub struct LoadReceiverHandle {
    pub local_addr: SocketAddr,
    pub keysync: KeySync,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl LoadReceiverHandle {
    /// Stop accepting, let the reports in flight finish and close idle
    /// keep-alive connections (at most [`DRAIN_GRACE`](per_thread::DRAIN_GRACE) in all), then stop
    /// key sync. A report cut here would be lost: its sender does not retry it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        per_thread::join_drained(self.server, "load-receiver").await;
        self.keysync.stop().await;
    }
}

pub async fn start_load_receiver(args: LoadReceiverArgs) -> anyhow::Result<LoadReceiverHandle> {
    let listener = TcpListener::bind(args.listen).await?;
    let local_addr = listener.local_addr()?;
    let mut kcfg = KeySyncConfig::new(&args.redis, RECEIVER_SERVICE);
    kcfg.snapshot_path = Some(args.snapshot.clone());
    kcfg.block = Duration::from_millis(args.sync_block_ms.max(10));
    let keysync = KeySync::start(kcfg).await;
    let policy = VerifyPolicy {
        service: RECEIVER_SERVICE.into(),
        region: args.region.clone(),
        max_skew_secs: args.max_skew_secs,
    };
    let ctx = Arc::new(Ctx {
        gate: Gate::new(keysync.state.clone(), policy, 4 << 20),
        redis: Mutex::new(None),
        redis_url: args.redis.clone(),
        max_batch: args.max_batch.max(1),
    });
    let (stop, stop_rx) = watch::channel(false);
    let span = info_span!("load_receiver");
    let server = tokio::spawn(
        crate::shim::serve_with(listener, stop_rx, move |req| {
            let ctx = ctx.clone();
            async move { handle(ctx, req).await }
        })
        .instrument(span.clone()),
    );
    span.in_scope(|| info!(%local_addr, "load-receiver listening"));
    Ok(LoadReceiverHandle {
        local_addr,
        keysync,
        stop,
        server,
    })
}

/// `headroom load-receiver …`: run until SIGINT/SIGTERM.
pub async fn run_load_receiver(args: LoadReceiverArgs) -> anyhow::Result<()> {
    let h = start_load_receiver(args).await?;
    crate::wait_for_shutdown_signal().await;
    h.shutdown().await;
    Ok(())
}

async fn conn(ctx: &Ctx) -> Result<ConnectionManager, redis::RedisError> {
    let mut g = ctx.redis.lock().await;
    if let Some(c) = g.as_ref() {
        return Ok(c.clone());
    }
    let client = redis::Client::open(ctx.redis_url.as_str())?;
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1);
    let c = tokio::time::timeout(
        Duration::from_secs(3),
        client.get_connection_manager_with_config(cfg),
    )
    .await
    .map_err(|_| redis::RedisError::from(std::io::Error::other("connect timeout")))??;
    *g = Some(c.clone());
    Ok(c)
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == crate::shim::READY_PATH {
        let ready = ctx.gate.state.is_ready();
        return json_response(
            if ready { 200 } else { 503 },
            &serde_json::json!({ "ready": ready }),
        );
    }
    if req.uri().path() != REPORT_PATH {
        return json_error(404, "not_found");
    }
    if req.method() != Method::POST {
        return json_error(405, "method_not_allowed");
    }
    let a = match ctx.gate.admit(req).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let reports = match parse_reports(&a.body, ctx.max_batch) {
        Ok(r) => r,
        Err(e) => {
            return json_response(
                400,
                &serde_json::json!({ "error": "invalid_report", "field": e.field, "detail": e.detail }),
            )
        }
    };
    for r in &reports {
        let vpath = format!("{REPORT_PATH}/{}", r.service);
        if let Err(rej) = ctx.gate.state.authorise(&a.principal, "POST", &vpath) {
            let mut resp = reject(&rej);
            if rej.status() == 403 {
                resp = json_response(
                    403,
                    &serde_json::json!({ "error": rej.reason(), "service": r.service }),
                );
            }
            return resp;
        }
    }
    let mut c = match conn(&ctx).await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "scoreboard unreachable");
            return json_error(503, "scoreboard_unavailable");
        }
    };
    match scoreboard::write_reports(&mut c, &reports, crate::sigv4::unix_now_ms()).await {
        Ok(()) => json_response(200, &serde_json::json!({ "accepted": reports.len() })),
        Err(e) => {
            warn!(error = %e, "scoreboard write failed");
            json_error(503, "scoreboard_unavailable")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn single_and_batch() {
        let r = parse_reports(
            br#"{"service":"api","instance":"10.0.0.1:80","load":42}"#,
            10,
        )
        .unwrap();
        assert_eq!(r[0].load, 42.0);
        let r = parse_reports(br#"[{"service":"a","instance":"i","load":0},{"service":"b","instance":"j","load":100}]"#, 10).unwrap();
        assert_eq!(r.len(), 2);
        let e = parse_reports(br#"[{"service":"a","instance":"i","load":0},{"service":"b","instance":"j","load":101}]"#, 10).unwrap_err();
        assert_eq!(e.field, "[1].load");
    }
}
