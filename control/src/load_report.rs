//! The shim's custom-metric reporter (paper §3.3): utilisation = in-flight
//! requests / capacity (averaged over samples within the interval), or the
//! value the service gives on a local endpoint; sent as a signed report to
//! the load-receiver every interval.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::sigv4;

/// The load-receiver's own service name (credential scope and grants).
pub const RECEIVER_SERVICE: &str = "load-receiver";
/// The report endpoint.
pub const REPORT_PATH: &str = "/v1/report";

#[derive(Debug, Clone)]
pub struct ReportConfig {
    pub receiver_url: String,
    pub service: String,
    pub instance: String,
    pub interval: Duration,
    pub capacity: u32,
    pub load_url: Option<String>,
    pub access_key_id: String,
    pub secret: String,
    pub region: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("bad URL {0}")]
    BadUrl(String),
    #[error("http: {0}")]
    Http(String),
    #[error("receiver answered {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("load endpoint gave no number")]
    BadLoad,
}

pub struct LoadReporter {
    cfg: ReportConfig,
    receiver: hyper::Uri,
    authority: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl LoadReporter {
    pub fn new(cfg: ReportConfig) -> Result<Self, ReportError> {
        let base = cfg.receiver_url.trim_end_matches('/');
        let receiver: hyper::Uri = format!("{base}{REPORT_PATH}")
            .parse()
            .map_err(|_| ReportError::BadUrl(cfg.receiver_url.clone()))?;
        let authority = receiver
            .authority()
            .map(|a| a.to_string())
            .ok_or_else(|| ReportError::BadUrl(cfg.receiver_url.clone()))?;
        Ok(LoadReporter {
            cfg,
            receiver,
            authority,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Send one signed report.
    pub async fn send(&self, load: f64) -> Result<(), ReportError> {
        let body = serde_json::json!({
            "service": self.cfg.service,
            "instance": self.cfg.instance,
            "load": (load * 100.0).round() / 100.0,
        })
        .to_string();
        let signed = sigv4::sign(
            "POST",
            REPORT_PATH,
            "",
            &[
                ("host", &self.authority),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
            &self.cfg.access_key_id,
            &self.cfg.secret,
            &self.cfg.region,
            RECEIVER_SERVICE,
            sigv4::unix_now(),
        );
        let mut b = Request::post(self.receiver.clone())
            .header("host", &self.authority)
            .header("content-type", "application/json");
        for (n, v) in &signed {
            b = b.header(n.as_str(), v.as_str());
        }
        let req = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ReportError::Http(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req))
            .await
            .map_err(|_| ReportError::Http("timeout".into()))?
            .map_err(|e| ReportError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(ReportError::Rejected { status, body });
        }
        Ok(())
    }

    async fn service_load(&self, url: &str) -> Result<f64, ReportError> {
        let uri: hyper::Uri = url.parse().map_err(|_| ReportError::BadUrl(url.into()))?;
        let resp = tokio::time::timeout(Duration::from_secs(2), self.client.get(uri))
            .await
            .map_err(|_| ReportError::Http("timeout".into()))?
            .map_err(|e| ReportError::Http(e.to_string()))?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ReportError::Http(e.to_string()))?
            .to_bytes();
        parse_load(&bytes).ok_or(ReportError::BadLoad)
    }

    /// Report every interval until `stop` turns true (a report in progress
    /// is finished first, so nothing is written after the caller unregisters).
    pub async fn run(self, in_flight: Arc<AtomicI64>, mut stop: watch::Receiver<bool>) {
        let samples = 10u32;
        let tick = self.cfg.interval / samples;
        loop {
            let mut sum = 0i64;
            for _ in 0..samples {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = stop.changed() => return,
                }
                if *stop.borrow() {
                    return;
                }
                sum += in_flight.load(Ordering::Relaxed).max(0);
            }
            let load = match &self.cfg.load_url {
                Some(u) => match self.service_load(u).await {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(error = %e, "service load endpoint failed; skipping report");
                        continue;
                    }
                },
                None => utilisation(sum as f64 / samples as f64, self.cfg.capacity),
            };
            match self.send(load).await {
                Ok(()) => debug!(load, "load reported"),
                Err(e) => warn!(error = %e, "load report failed"),
            }
        }
    }
}

/// in-flight / capacity as a percentage, clamped to 0–100.
pub fn utilisation(avg_in_flight: f64, capacity: u32) -> f64 {
    (avg_in_flight * 100.0 / capacity.max(1) as f64).clamp(0.0, 100.0)
}

/// A plain number or `{"load": N}`, clamped to 0–100.
pub fn parse_load(body: &[u8]) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let n = match &v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::Object(m) => m.get("load")?.as_f64()?,
        _ => return None,
    };
    n.is_finite().then_some(n.clamp(0.0, 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn utilisation_and_parse() {
        assert_eq!(utilisation(5.0, 10), 50.0);
        assert_eq!(utilisation(50.0, 10), 100.0);
        assert_eq!(parse_load(b"42.5"), Some(42.5));
        assert_eq!(parse_load(br#"{"load": 7}"#), Some(7.0));
        assert_eq!(parse_load(b"x"), None);
    }
}
