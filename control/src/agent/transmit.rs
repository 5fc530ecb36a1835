//! The load transmitter: every interval, sample the node and POST a
//! SigV4-signed [`NodeReport`] to the machine-manager. A failed send is
//! logged and the next interval sends fresh values (no backlog).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::node_load;
use crate::node_report::{NodeReport, NODE_REPORT_PATH, NODE_REPORT_SERVICE};

/// Where and as whom to send reports.
#[derive(Debug, Clone)]
pub struct TransmitConfig {
    /// Node name in the report.
    pub node: String,
    /// Machine-manager base URL, `http://host:port`.
    pub url: Uri,
    /// Access key id of principal `node:<name>`.
    pub access_key_id: String,
    /// Its secret.
    pub secret: String,
    /// SigV4 region.
    pub region: String,
    /// Time between reports.
    pub interval: Duration,
    /// Directory whose filesystem is reported as the disk.
    pub disk_dir: PathBuf,
}

/// Why a report was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Building the request failed.
    #[error("bad request: {0}")]
    Build(String),
    /// Network error or timeout.
    #[error("transport: {0}")]
    Transport(String),
    /// The machine-manager answered with an error.
    #[error("machine-manager answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Its body (truncated).
        body: String,
    },
}

/// POST one signed report.
pub async fn send_report(cfg: &TransmitConfig, report: &NodeReport) -> Result<(), SendError> {
    let body = serde_json::to_vec(report).map_err(|e| SendError::Build(e.to_string()))?;
    let host = cfg
        .url
        .authority()
        .ok_or_else(|| SendError::Build("machine-manager URL has no host".into()))?
        .to_string();
    let hdrs = crate::sigv4::sign(
        "POST",
        NODE_REPORT_PATH,
        "",
        &[("host", &host), ("content-type", "application/json")],
        &body,
        &cfg.access_key_id,
        &cfg.secret,
        &cfg.region,
        NODE_REPORT_SERVICE,
        crate::sigv4::unix_now(),
    );
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{host}{NODE_REPORT_PATH}"))
        .header("host", &host)
        .header("content-type", "application/json");
    for (n, v) in &hdrs {
        b = b.header(n.as_str(), v.as_str());
    }
    let req = b
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| SendError::Build(e.to_string()))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| SendError::Transport("timed out".into()))?
        .map_err(|e| SendError::Transport(e.to_string()))?;
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(());
    }
    let bytes = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let body: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
    Err(SendError::Status { status, body })
}

/// Report every interval until `stop` turns true.
pub async fn run(cfg: TransmitConfig, mut stop: watch::Receiver<bool>) {
    let mut prev = match node_load::sample() {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot sample node load");
            None
        }
    };
    let mut failures: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
        let now = match node_load::sample() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot sample node load");
                continue;
            }
        };
        let Some(p) = prev.replace(now) else { continue };
        let report = match node_load::report(&cfg.node, &p, &now, &cfg.disk_dir) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot build node report");
                continue;
            }
        };
        match send_report(&cfg, &report).await {
            Ok(()) => {
                if failures > 0 {
                    warn!(after = failures, "node reports delivered again");
                }
                failures = 0;
                debug!(cpu = report.cpu_pct, "node report sent");
            }
            Err(e) => {
                failures += 1;
                // Log the first failure and then every 60th, not every tick.
                if failures == 1 || failures.is_multiple_of(60) {
                    warn!(error = %e, failures, "node report not delivered");
                }
            }
        }
    }
}
