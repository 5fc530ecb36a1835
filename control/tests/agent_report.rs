//! The agent's load transmitter: signed NodeReports reach a tiny HTTP
//! endpoint that verifies the SigV4 signature with the node's secret, and
//! the values match what the kernel says independently.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use headroom_control::agent::{start_agent, AgentArgs};
use headroom_control::node_report::{NodeReport, NODE_REPORT_PATH, NODE_REPORT_SERVICE};
use headroom_control::sigv4::{self, CachedSecret, RequestParts, VerifyPolicy};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

const AKID: &str = "AKNODEN1";
const SECRET: &str = "node-secret-for-test";

/// An endpoint that answers 204 to a correctly signed report and 401 to
/// anything else, forwarding what it decided.
async fn receiver(
    secret: &'static str,
) -> (
    std::net::SocketAddr,
    mpsc::Receiver<Result<NodeReport, String>>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let verdict = verify(&parts, &body, secret);
                        let status = if verdict.is_ok() { 204 } else { 401 };
                        let _ = tx.send(verdict).await;
                        let mut r = Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

fn verify(
    parts: &hyper::http::request::Parts,
    body: &[u8],
    secret: &str,
) -> Result<NodeReport, String> {
    if parts.method != "POST" || parts.uri.path() != NODE_REPORT_PATH {
        return Err(format!("wrong target {} {}", parts.method, parts.uri));
    }
    let rp = RequestParts::from_http(parts, body);
    let policy = VerifyPolicy {
        service: NODE_REPORT_SERVICE.into(),
        region: REGION.into(),
        max_skew_secs: 300,
    };
    let (parsed, _) =
        sigv4::precheck(&rp, &policy, sigv4::unix_now()).map_err(|e| e.to_string())?;
    if parsed.access_key_id != AKID {
        return Err(format!("unknown key {}", parsed.access_key_id));
    }
    sigv4::verify_signature(&rp, &parsed, &[&CachedSecret::new(secret.into())])
        .map_err(|e| e.to_string())?;
    let r: NodeReport = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    r.validate()?;
    Ok(r)
}

fn meminfo_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Filesystem size by `stat -f`, independent of the agent's statvfs call.
fn fs_total_bytes(dir: &std::path::Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%b %S"])
        .arg(dir)
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}

async fn agent_reporting_to(
    redis: &RedisServer,
    state: &std::path::Path,
    addr: std::net::SocketAddr,
) -> headroom_control::agent::AgentHandle {
    let mut args = AgentArgs::new(
        "n1",
        "127.0.0.1:0".parse().unwrap(),
        &redis.url(),
        state.to_path_buf(),
    );
    args.machine_manager = Some(format!("http://{addr}"));
    args.access_key_id = Some(AKID.into());
    args.secret = Some(SECRET.into());
    args.interval = Duration::from_millis(200);
    start_agent(args).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reports_arrive_signed_with_plausible_values() {
    let redis = RedisServer::start();
    let state = tempfile::tempdir().unwrap();
    let (addr, mut rx) = receiver(SECRET).await;
    let agent = agent_reporting_to(&redis, state.path(), addr).await;
    let started = sigv4::unix_now_ms();
    let mut reports = Vec::new();
    while reports.len() < 3 {
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a node report within 20 s")
            .expect("channel open");
        reports.push(got.expect("report verified"));
    }
    agent.shutdown().await;
    let total = meminfo_total_bytes();
    let disk = fs_total_bytes(state.path());
    for r in &reports {
        assert_eq!(r.node, "n1");
        assert_eq!(r.mem_total_bytes, total);
        assert!(r.mem_used_bytes > 0 && r.mem_used_bytes < total, "{r:?}");
        assert_eq!(r.disk_total_bytes, disk);
        assert!(r.disk_used_bytes > 0, "{r:?}");
        assert!(
            (started - 1000..started + 60_000).contains(&r.ts_ms),
            "{r:?}"
        );
    }
    assert!(
        reports.windows(2).all(|w| w[1].ts_ms > w[0].ts_ms),
        "fresh samples"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_report_is_retried_next_interval_not_fatal() {
    let redis = RedisServer::start();
    let state = tempfile::tempdir().unwrap();
    // This endpoint knows a different secret: every report is refused.
    let (addr, mut rx) = receiver("some-other-secret").await;
    let agent = agent_reporting_to(&redis, state.path(), addr).await;
    for _ in 0..3 {
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("the agent keeps sending")
            .expect("channel open");
        assert_eq!(got.unwrap_err(), "signature does not match");
    }
    agent.shutdown().await;
}
