//! Test harness: a private redis-server per test (killed on Drop, also on
//! panic), an in-process upstream that echoes what it received, a SigV4
//! signing HTTP client, and polling with deadlines.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

use headroom_control::sigv4;

pub const REGION: &str = "headroom";

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = RedisServer {
            port: free_port(),
            dir,
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().expect("utf8 dir"),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = c.get_connection_with_timeout(Duration::from_millis(200)) {
                    if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port, empty.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll `f` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream that answers every request with a JSON description of it.
pub async fn start_echo_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let (p, b) = req.into_parts();
                        let body = b.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                        let principals: Vec<String> = p
                            .headers
                            .get_all("x-headroom-principal")
                            .iter()
                            .map(|v| v.to_str().unwrap_or("").to_string())
                            .collect();
                        let v = serde_json::json!({
                            "method": p.method.as_str(),
                            "path": p.uri.path(),
                            "query": p.uri.query().unwrap_or(""),
                            "principals": principals,
                            "body": String::from_utf8_lossy(&body),
                        });
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            v.to_string(),
                        ))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Credentials for signing.
#[derive(Clone, Debug)]
pub struct Creds {
    pub akid: String,
    pub secret: String,
}

/// A new key of `principal`, granted `methods` under `prefixes` of
/// `service`: its signing credentials.
pub async fn granted_key(
    ks: &mut headroom_control::keystore::KeyStore,
    principal: &str,
    service: &str,
    methods: &[&str],
    prefixes: &[&str],
) -> Creds {
    let k = ks.create_key(principal).await.unwrap();
    let grant = headroom_control::keystore::Grant {
        methods: methods.iter().map(|m| m.to_string()).collect(),
        prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
    };
    ks.set_grant(service, principal, &grant).await.unwrap();
    Creds {
        akid: k.access_key_id,
        secret: k.secret,
    }
}

/// Send a SigV4-signed request; returns (status, body).
pub async fn signed(
    c: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path_q: &str,
    body: &[u8],
    creds: &Creds,
    service: &str,
) -> (u16, String) {
    signed_at(
        c,
        addr,
        method,
        path_q,
        body,
        creds,
        service,
        sigv4::unix_now(),
        &[],
    )
    .await
}

#[allow(clippy::too_many_arguments)]
pub async fn signed_at(
    c: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path_q: &str,
    body: &[u8],
    creds: &Creds,
    service: &str,
    unix: i64,
    extra: &[(&str, &str)],
) -> (u16, String) {
    let (path, query) = path_q.split_once('?').unwrap_or((path_q, ""));
    let host = addr.to_string();
    let mut to_sign: Vec<(&str, &str)> = vec![("host", &host)];
    to_sign.extend_from_slice(extra);
    let hdrs = sigv4::sign(
        method,
        path,
        query,
        &to_sign,
        body,
        &creds.akid,
        &creds.secret,
        REGION,
        service,
        unix,
    );
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path_q}"))
        .header("host", &host);
    for (n, v) in extra {
        b = b.header(*n, *v);
    }
    for (n, v) in &hdrs {
        b = b.header(n.as_str(), v.as_str());
    }
    send(c, b.body(Full::new(Bytes::copy_from_slice(body))).unwrap()).await
}

pub async fn send(
    c: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (u16, String) {
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.as_str())
                .map(|s| s.to_string())
        })
        .unwrap_or_else(|| format!("<no error field: {body}>"))
}

pub fn snapshot_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;
