//! SigV4-signed calls from the container-manager to node agents
//! (docs/AGENT.md): start (idempotent by instance id) and stop.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::agent::{AGENT_SERVICE, INSTANCES_PATH};

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// The agent could not be reached or did not answer in time.
    #[error("agent {url}: {detail}")]
    Unreachable {
        /// Agent base URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The agent answered with a refusal.
    #[error("agent {url}: HTTP {status}: {body}")]
    Refused {
        /// Agent base URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Answer body.
        body: String,
    },
}

/// Signing identity and HTTP client for agent calls.
#[derive(Clone)]
pub struct AgentClient {
    access_key_id: String,
    secret: String,
    region: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AgentClient {
    /// A client signing as `access_key_id` in `region`.
    pub fn new(access_key_id: String, secret: String, region: String) -> Self {
        AgentClient {
            access_key_id,
            secret,
            region,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `POST /v1/instances`: starts `instance_id` (or returns the running
    /// one with that id). Returns the agent's instance record.
    pub async fn start(
        &self,
        base: &hyper::Uri,
        instance_id: &str,
        service: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<serde_json::Value, AgentCallError> {
        let body = serde_json::json!({
            "instance_id": instance_id,
            "service": service,
            "params": params,
        })
        .to_string();
        let (st, text) = self
            .call(base, "POST", INSTANCES_PATH, body.into_bytes())
            .await?;
        if st == 200 || st == 201 {
            Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
        } else {
            Err(refused(base, st, text))
        }
    }

    /// `DELETE /v1/instances/{id}`: stops it and waits; an unknown id
    /// counts as stopped (it never started, or the node lost it).
    pub async fn stop(&self, base: &hyper::Uri, instance_id: &str) -> Result<(), AgentCallError> {
        let path = format!("{INSTANCES_PATH}/{instance_id}");
        let (st, text) = self.call(base, "DELETE", &path, Vec::new()).await?;
        if st == 200 || st == 404 {
            Ok(())
        } else {
            Err(refused(base, st, text))
        }
    }

    async fn call(
        &self,
        base: &hyper::Uri,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, String), AgentCallError> {
        let url = base.to_string();
        let unreachable = |detail: String| AgentCallError::Unreachable {
            url: url.clone(),
            detail,
        };
        let host = base
            .authority()
            .map(|a| a.to_string())
            .ok_or_else(|| unreachable("no host in the agent URL".into()))?;
        let hdrs = crate::sigv4::sign(
            method,
            path,
            "",
            &[("host", &host)],
            &body,
            &self.access_key_id,
            &self.secret,
            &self.region,
            AGENT_SERVICE,
            crate::sigv4::unix_now(),
        );
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{host}{path}"))
            .header("host", &host);
        for (n, v) in &hdrs {
            b = b.header(n.as_str(), v.as_str());
        }
        let req = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(e.to_string()))?;
        // A stop waits for the instance's grace period: allow for it.
        let resp = tokio::time::timeout(Duration::from_secs(60), self.client.request(req))
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

fn refused(base: &hyper::Uri, status: u16, body: String) -> AgentCallError {
    AgentCallError::Refused {
        url: base.to_string(),
        status,
        body: body.chars().take(300).collect(),
    }
}
