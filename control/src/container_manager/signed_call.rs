//! One SigV4-signed HTTP call from the container-manager, shared by its
//! agent client (service `agent`) and its machine-manager client (service
//! `machine-manager`), so signing and timeouts are written once.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// Why a signed call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The peer could not be reached or did not answer in time.
    #[error("{url}: {detail}")]
    Unreachable {
        /// Peer base URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The peer answered with a refusal.
    #[error("{url}: HTTP {status}: {body}")]
    Refused {
        /// Peer base URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Answer body (shortened).
        body: String,
    },
}

/// Builds the refusal error for an unexpected answer.
pub fn refused(base: &hyper::Uri, status: u16, body: String) -> CallError {
    CallError::Refused {
        url: base.to_string(),
        status,
        body: body.chars().take(300).collect(),
    }
}

/// Longest wait for a TCP connection: a node that drops SYNs must not
/// stall a round for the OS's connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
    c
}

/// Signing identity and HTTP client.
#[derive(Clone)]
pub struct SignedClient {
    access_key_id: String,
    secret: String,
    region: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl SignedClient {
    /// A client signing as `access_key_id` in `region`.
    pub fn new(access_key_id: String, secret: String, region: String) -> Self {
        SignedClient {
            access_key_id,
            secret,
            region,
            client: Client::builder(TokioExecutor::new()).build(connector()),
        }
    }

    /// Sends `method path` with `body` to `base`, signed for `service`;
    /// returns status and body text. `timeout` bounds the wait for the
    /// answer's head (the body gets 10 s more).
    pub async fn call(
        &self,
        base: &hyper::Uri,
        service: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(u16, String), CallError> {
        let url = base.to_string();
        let unreachable = |detail: String| CallError::Unreachable {
            url: url.clone(),
            detail,
        };
        let host = base
            .authority()
            .map(|a| a.to_string())
            .ok_or_else(|| unreachable("no host in the URL".into()))?;
        let mut hdrs = vec![("host", host.as_str())];
        if !body.is_empty() {
            hdrs.push(("content-type", "application/json"));
        }
        let signed = crate::sigv4::sign(
            method,
            path,
            "",
            &hdrs,
            &body,
            &self.access_key_id,
            &self.secret,
            &self.region,
            service,
            crate::sigv4::unix_now(),
        );
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{host}{path}"));
        for (n, v) in &hdrs {
            b = b.header(*n, *v);
        }
        for (n, v) in &signed {
            b = b.header(n.as_str(), v.as_str());
        }
        let req = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .map_err(|_| unreachable("body timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}
