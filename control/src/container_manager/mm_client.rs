//! SigV4-signed calls from the container-manager to the machine-manager
//! (docs/MACHINE_MANAGER.md, API): ask where a new instance runs
//! (`POST /v1/placements`), give the place back
//! (`DELETE /v1/placements/{id}`), and list what it holds (`GET /v1/nodes`)
//! to find placements no instance record owns.

use std::time::Duration;

use serde::Deserialize;

use super::signed_call::{refused, CallError, SignedClient};
use crate::machine_manager::api::{NODES_PATH, PLACEMENTS_PATH};
use crate::node_report::NODE_REPORT_SERVICE;
use crate::registry::ServiceSpec;

/// Placement calls are bookkeeping at the machine-manager: answer fast.
const MM_TIMEOUT: Duration = Duration::from_secs(10);

/// The machine-manager's answer to a placement request.
#[derive(Clone, Debug, PartialEq)]
pub enum Placement {
    /// Placed: run it on `node` at `address`; `id` is to be released.
    Placed {
        /// Node name.
        node: String,
        /// The node's address (an IP).
        address: String,
        /// Placement id.
        id: String,
    },
    /// A node is starting for it: ask again later.
    Starting {
        /// The starting node.
        node: String,
    },
    /// Refused (no fit, max count, cost limit, not leader, …).
    Refused {
        /// HTTP status.
        status: u16,
        /// The machine-manager's code (`max_count`, `no_type_fits`, …).
        code: String,
        /// Its reason in words.
        reason: String,
    },
}

/// One placement as `GET /v1/nodes` lists it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Held {
    /// Placement id.
    pub id: String,
    /// The service it was asked for.
    pub service: String,
    /// When it was made, Unix ms.
    pub at_ms: i64,
}

#[derive(Deserialize)]
struct NodeEntry {
    #[serde(default)]
    placements: Vec<Held>,
}

#[derive(Deserialize)]
struct NodeList {
    nodes: Vec<NodeEntry>,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    placement: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    leader: Option<String>,
}

/// Client of one machine-manager.
#[derive(Clone)]
pub struct MmClient {
    base: hyper::Uri,
    inner: SignedClient,
}

impl MmClient {
    /// A client of the machine-manager at `base`, signing as `access_key_id`.
    pub fn new(base: hyper::Uri, access_key_id: String, secret: String, region: String) -> Self {
        MmClient {
            base,
            inner: SignedClient::new(access_key_id, secret, region),
        }
    }

    /// The machine-manager's base URL.
    pub fn base(&self) -> &hyper::Uri {
        &self.base
    }

    /// Asks where one instance of `spec` runs (its requirements and
    /// resources). An error means the outcome is unknown (unreachable).
    pub async fn place(&self, spec: &ServiceSpec) -> Result<Placement, CallError> {
        let body = serde_json::json!({
            "service": spec.name,
            "requirements": spec.requirements,
            "cpu": spec.resources.cpu,
            "ram_mib": spec.resources.ram_mib,
        })
        .to_string();
        let (st, text) = self
            .inner
            .call(
                &self.base,
                NODE_REPORT_SERVICE,
                "POST",
                PLACEMENTS_PATH,
                body.into_bytes(),
                MM_TIMEOUT,
            )
            .await?;
        let a: Option<Answer> = serde_json::from_str(&text).ok();
        match (st, a) {
            (200, Some(a)) => match (a.node, a.address, a.placement) {
                (Some(node), Some(address), Some(id)) => {
                    Ok(Placement::Placed { node, address, id })
                }
                _ => Err(refused(&self.base, st, text)),
            },
            (202, Some(a)) => Ok(Placement::Starting {
                node: a.node.unwrap_or_default(),
            }),
            (400..=599, Some(a)) if a.error.is_some() => {
                let code = a.error.unwrap_or_default();
                let reason = a
                    .reason
                    .or(a.detail)
                    .or(a.leader.map(|l| format!("the leader is {l}")))
                    .unwrap_or_else(|| format!("HTTP {st}"));
                Ok(Placement::Refused {
                    status: st,
                    code,
                    reason,
                })
            }
            _ => Err(refused(&self.base, st, text)),
        }
    }

    /// Every placement the machine-manager holds, on all nodes
    /// (`GET /v1/nodes`).
    pub async fn held(&self) -> Result<Vec<Held>, CallError> {
        let (st, text) = self
            .inner
            .call(
                &self.base,
                NODE_REPORT_SERVICE,
                "GET",
                NODES_PATH,
                Vec::new(),
                MM_TIMEOUT,
            )
            .await?;
        if st != 200 {
            return Err(refused(&self.base, st, text));
        }
        serde_json::from_str::<NodeList>(&text)
            .map(|l| l.nodes.into_iter().flat_map(|n| n.placements).collect())
            .map_err(|e| refused(&self.base, st, format!("unreadable node list: {e}")))
    }

    /// Gives placement `id` back; an unknown id counts as released.
    pub async fn release(&self, id: &str) -> Result<(), CallError> {
        let path = format!("{PLACEMENTS_PATH}/{id}");
        let (st, text) = self
            .inner
            .call(
                &self.base,
                NODE_REPORT_SERVICE,
                "DELETE",
                &path,
                Vec::new(),
                MM_TIMEOUT,
            )
            .await?;
        if st == 200 || st == 404 {
            Ok(())
        } else {
            Err(refused(&self.base, st, text))
        }
    }
}
