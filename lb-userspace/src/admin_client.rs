//! The client side of the admin endpoint ([`crate::admin`]), for
//! `headroom lb status` and `headroom lb trace`: one HTTP/1.1 request per
//! call, bounded by a timeout.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;

use crate::{
    admin::ErrorBody,
    daemon::Status,
    trace::{TraceAnswer, TraceRequest},
};

/// Bound on one request (connect, send, whole answer).
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer accepted, bytes.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Why a request to the daemon failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The URL is not `http://HOST:PORT`.
    #[error("bad URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection (daemon not running, wrong address or namespace).
    #[error("cannot reach the daemon at {url}: {reason}")]
    Unreachable {
        /// Where we tried.
        url: String,
        /// The error.
        reason: String,
    },
    /// The daemon did not answer in time.
    #[error("the daemon at {url} did not answer within {TIMEOUT:?}")]
    Timeout {
        /// Where we asked.
        url: String,
    },
    /// The daemon answered with an error.
    #[error("the daemon refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// Its reason.
        message: String,
    },
    /// The answer could not be decoded.
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
}

/// Where the admin endpoint is.
#[derive(Clone, Debug)]
pub struct AdminClient {
    host: String,
    port: u16,
}

impl AdminClient {
    /// From a URL `http://HOST:PORT` (a path, if any, is ignored).
    pub fn from_url(url: &str) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(s) => return Err(bad(&format!("scheme {s}: only http is served"))),
            None => return Err(bad("no scheme: write http://HOST:PORT")),
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(80);
        Ok(AdminClient { host, port })
    }

    /// From the config's `metrics_listen`: a wildcard address is reached
    /// through the loopback of the same family.
    pub fn from_listen(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(a) if a.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        AdminClient {
            host: ip.to_string(),
            port: addr.port(),
        }
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }

    /// `GET /status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        let body = self.request(Method::GET, "/status", None).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(format!("/status: {e}")))
    }

    /// `GET /metrics` (the Prometheus text).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let body = self.request(Method::GET, "/metrics", None).await?;
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::Decode(format!("/metrics: {e}")))
    }

    /// `POST /trace`.
    pub async fn trace(&self, req: &TraceRequest) -> Result<TraceAnswer, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let answer = self.request(Method::POST, "/trace", Some(body)).await?;
        serde_json::from_slice(&answer).map_err(|e| ClientError::Decode(format!("/trace: {e}")))
    }

    /// One request; a non-2xx answer becomes [`ClientError::Refused`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let url = self.url();
        match tokio::time::timeout(TIMEOUT, self.request_inner(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout { url }),
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let url = self.url();
        let unreachable = |reason: String| ClientError::Unreachable {
            url: url.clone(),
            reason,
        };
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, format!("{}:{}", self.host, self.port));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        conn.abort();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused { status, message });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let c = AdminClient::from_url("http://127.0.0.1:9470").unwrap();
        assert_eq!(c.url(), "http://127.0.0.1:9470");
        let c = AdminClient::from_url("http://[::1]:9470/").unwrap();
        assert_eq!(c.url(), "http://[::1]:9470");
        assert!(AdminClient::from_url("https://127.0.0.1:9470").is_err());
        assert!(AdminClient::from_url("127.0.0.1:9470").is_err());
        let c = AdminClient::from_listen("0.0.0.0:9470".parse().unwrap());
        assert_eq!(c.url(), "http://127.0.0.1:9470");
        let c = AdminClient::from_listen("[::]:9471".parse().unwrap());
        assert_eq!(c.url(), "http://[::1]:9471");
    }
}
