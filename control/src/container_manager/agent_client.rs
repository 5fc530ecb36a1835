//! SigV4-signed calls from the container-manager to node agents
//! (docs/AGENT.md): start (idempotent by instance id), stop, and the list
//! of a node's instances (to notice ones that exited by themselves).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::signed_call::{refused, SignedClient};
use crate::agent::supervise::State;
use crate::agent::{AGENT_SERVICE, INSTANCES_PATH};

pub use super::signed_call::CallError as AgentCallError;

/// A stop waits for the instance's grace period: allow for it.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A list is a table read: an agent slower than this counts as unreachable
/// for the round (it delays every service's round).
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the manager reads of an agent's instance (`GET /v1/instances`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct AgentInstance {
    /// Instance id.
    pub instance_id: String,
    /// Service name.
    pub service: String,
    /// Life state at the agent.
    pub state: State,
    /// Exit code, when it ended normally.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Terminating signal, when it was killed.
    #[serde(default)]
    pub signal: Option<i32>,
}

impl AgentInstance {
    /// Why this instance is gone, or `None` while it may still run.
    pub fn gone_reason(&self) -> Option<String> {
        match self.state {
            State::Running | State::Stopping => None,
            State::Exited => Some(match (self.exit_code, self.signal) {
                (Some(c), _) => format!("exited with status {c}"),
                (None, Some(s)) => format!("exited, killed by signal {s}"),
                (None, None) => "exited with unknown status".into(),
            }),
            State::Stopped => Some("was stopped outside the manager".into()),
            State::Lost => Some("was lost by its agent (gone when the agent restarted)".into()),
        }
    }
}

#[derive(Deserialize)]
struct Listing {
    instances: Vec<AgentInstance>,
}

/// Signing identity and HTTP client for agent calls.
#[derive(Clone)]
pub struct AgentClient {
    inner: SignedClient,
}

impl AgentClient {
    /// A client signing as `access_key_id` in `region`.
    pub fn new(access_key_id: String, secret: String, region: String) -> Self {
        AgentClient {
            inner: SignedClient::new(access_key_id, secret, region),
        }
    }

    async fn call(
        &self,
        base: &hyper::Uri,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, String), AgentCallError> {
        self.inner
            .call(base, AGENT_SERVICE, method, path, body, AGENT_TIMEOUT)
            .await
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

    /// `GET /v1/instances`: every instance the agent knows, of all services.
    pub async fn list(&self, base: &hyper::Uri) -> Result<Vec<AgentInstance>, AgentCallError> {
        let (st, text) = self
            .inner
            .call(
                base,
                AGENT_SERVICE,
                "GET",
                INSTANCES_PATH,
                Vec::new(),
                LIST_TIMEOUT,
            )
            .await?;
        if st != 200 {
            return Err(refused(base, st, text));
        }
        serde_json::from_str::<Listing>(&text)
            .map(|l| l.instances)
            .map_err(|e| refused(base, st, format!("unreadable instance list: {e}")))
    }
}
