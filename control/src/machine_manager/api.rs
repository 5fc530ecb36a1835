//! The HTTP API: `POST /v1/placements`, `DELETE /v1/placements/{id}`,
//! `GET /v1/nodes` (signed, grant on service `machine-manager`),
//! `POST /v1/node-reports` (signed by `node-<name>` of the report's node),
//! `GET /metrics`, `GET /v1/leader` and the readiness probe (unsigned).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tracing::{info, warn};

use super::lifecycle::{self, StartError};
use super::placement::{decide, Decision, PlacementRequest, Refusal};
use super::registry::{self, Ingested, RegistryError};
use super::Manager;
use crate::gate::{full, json_error, json_response, reject, Body};
use crate::lease::{LeaseError, Role};
use crate::node_report::{node_principal, NodeReport, NODE_REPORT_PATH};
use crate::sigv4::unix_now_ms;

/// Path of placement requests.
pub const PLACEMENTS_PATH: &str = "/v1/placements";
/// Path of the node listing.
pub const NODES_PATH: &str = "/v1/nodes";
/// Path of the leader status.
pub const LEADER_PATH: &str = "/v1/leader";

/// Routes one request.
pub async fn handle(mgr: Arc<Manager>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/metrics") => {
            let mut r = Response::new(full(mgr.metrics.text()));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (Method::GET, LEADER_PATH) => leader_status(&mgr),
        (Method::GET, crate::shim::READY_PATH) => {
            let ready = mgr.gate.state.is_ready();
            json_response(
                if ready { 200 } else { 503 },
                &serde_json::json!({ "ready": ready }),
            )
        }
        (Method::POST, NODE_REPORT_PATH) => node_report(&mgr, req).await,
        (Method::POST, PLACEMENTS_PATH) => placement(&mgr, req).await,
        (Method::GET, NODES_PATH) => nodes(&mgr, req).await,
        (Method::DELETE, p) if p.starts_with("/v1/placements/") => release(&mgr, req).await,
        (_, NODE_REPORT_PATH | PLACEMENTS_PATH | NODES_PATH | LEADER_PATH | "/metrics") => {
            json_error(405, "method_not_allowed")
        }
        _ => json_error(404, "not_found"),
    }
}

fn leader_status(mgr: &Manager) -> Response<Body> {
    let role = mgr.role.borrow().clone();
    let v = match (&role, role.fence()) {
        (_, Some(f)) => serde_json::json!({ "id": mgr.id, "leader": true, "token": f.token }),
        (Role::Follower { leader }, None) => {
            serde_json::json!({ "id": mgr.id, "leader": false, "current": leader })
        }
        (Role::Leader { .. }, None) => {
            serde_json::json!({ "id": mgr.id, "leader": false, "current": null })
        }
    };
    json_response(200, &v)
}

/// 503 naming the leader, for a follower (or a leader past its deadline).
fn not_leader(mgr: &Manager) -> Response<Body> {
    let leader = match &*mgr.role.borrow() {
        Role::Follower { leader } => leader.clone(),
        Role::Leader { .. } => None,
    };
    json_response(
        503,
        &serde_json::json!({ "error": "not_leader", "leader": leader }),
    )
}

fn refusal_response(mgr: &Manager, service: &str, r: &Refusal) -> Response<Body> {
    mgr.metrics.inc(&format!(
        "headroom_mm_placement_refusals_total{{reason=\"{}\"}}",
        r.code
    ));
    warn!(service, code = r.code, reason = %r.reason, "placement refused");
    json_response(
        r.status,
        &serde_json::json!({ "error": r.code, "reason": r.reason }),
    )
}

fn registry_failure(mgr: &Manager, e: &RegistryError) -> Response<Body> {
    if let RegistryError::Lease(LeaseError::Fenced { .. }) = e {
        mgr.metrics.inc("headroom_mm_fenced_writes_total");
        warn!(error = %e, "write fenced: no longer leader");
        return not_leader(mgr);
    }
    warn!(error = %e, "registry unavailable");
    json_error(503, "registry_unavailable")
}

async fn node_report(mgr: &Arc<Manager>, req: Request<Incoming>) -> Response<Body> {
    let a = match mgr.gate.admit(req).await {
        Ok(a) => a,
        Err(resp) => {
            mgr.metrics.inc("headroom_mm_node_reports_rejected_total");
            return resp;
        }
    };
    let bad = |field: String| {
        mgr.metrics.inc("headroom_mm_node_reports_rejected_total");
        json_response(
            400,
            &serde_json::json!({ "error": "invalid_report", "detail": field }),
        )
    };
    let report: NodeReport = match serde_json::from_slice(&a.body) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    if let Err(e) = report.validate() {
        return bad(e);
    }
    if a.principal != node_principal(&report.node) {
        mgr.metrics.inc("headroom_mm_node_reports_rejected_total");
        warn!(principal = %a.principal, node = %report.node, "report signed by another principal");
        return json_response(
            403,
            &serde_json::json!({ "error": "principal_mismatch", "detail": format!("node {} reports as {}", report.node, node_principal(&report.node)) }),
        );
    }
    let mut conn = mgr.conn.clone();
    match registry::ingest_report(
        &mut conn,
        &mgr.keys,
        &report,
        unix_now_ms(),
        mgr.cfg.stats_retention_ms,
    )
    .await
    {
        Ok(Ingested::UnknownNode) => {
            mgr.metrics.inc("headroom_mm_node_reports_rejected_total");
            json_error(404, "unknown_node")
        }
        Ok(Ingested::Stopped) => {
            mgr.metrics.inc("headroom_mm_node_reports_rejected_total");
            json_error(409, "node_stopped")
        }
        Ok(x) => {
            if x == Ingested::BecameReady {
                info!(node = %report.node, "node ready");
            }
            mgr.metrics.inc("headroom_mm_node_reports_total");
            let mut r = Response::new(full(""));
            *r.status_mut() = hyper::StatusCode::NO_CONTENT;
            r
        }
        Err(e) => registry_failure(mgr, &e),
    }
}

/// Admits a signed request and checks the caller's grant on this path.
async fn admit_granted(
    mgr: &Manager,
    req: Request<Incoming>,
) -> Result<crate::gate::Admitted, Response<Body>> {
    let a = mgr.gate.admit(req).await?;
    mgr.gate
        .state
        .authorise(&a.principal, a.parts.method.as_str(), &a.path)
        .map_err(|r| reject(&r))?;
    Ok(a)
}

async fn placement(mgr: &Arc<Manager>, req: Request<Incoming>) -> Response<Body> {
    let a = match admit_granted(mgr, req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let fence = mgr.role.borrow().fence().cloned();
    let Some(fence) = fence else {
        return not_leader(mgr);
    };
    let preq: PlacementRequest = match serde_json::from_slice(&a.body) {
        Ok(p) => p,
        Err(e) => {
            return json_response(
                400,
                &serde_json::json!({ "error": "invalid_request", "detail": e.to_string() }),
            )
        }
    };
    if let Err(e) = preq.validate() {
        return json_response(
            400,
            &serde_json::json!({ "error": "invalid_request", "detail": e }),
        );
    }
    // One decision at a time: two concurrent requests must not both see
    // room for one more node.
    let _g = mgr.decide_lock.lock().await;
    let mut conn = mgr.conn.clone();
    let nodes = match registry::load_all(&mut conn, &mgr.keys).await {
        Ok(n) => n,
        Err(e) => return registry_failure(mgr, &e),
    };
    let now = unix_now_ms();
    match decide(&mgr.cfg, &nodes, &preq, now) {
        Decision::Place { node, address } => {
            match registry::add_placement(
                &mut conn,
                &mgr.keys,
                &fence,
                &node,
                &preq.service,
                preq.cpu,
                preq.ram_mib,
                now,
            )
            .await
            {
                Ok(p) => {
                    mgr.metrics.inc("headroom_mm_placements_total");
                    info!(service = %preq.service, %node, placement = %p.id, "placed");
                    json_response(
                        200,
                        &serde_json::json!({ "node": node, "address": address, "placement": p.id }),
                    )
                }
                Err(e) => registry_failure(mgr, &e),
            }
        }
        Decision::Wait { node } => json_response(
            202,
            &serde_json::json!({ "status": "starting", "node": node }),
        ),
        Decision::Start { node_type } => {
            let Some(t) = mgr.cfg.node_type(&node_type) else {
                return json_error(500, "node_type_vanished");
            };
            match lifecycle::start_node(mgr, &fence, t, &nodes).await {
                Ok(rec) => json_response(
                    202,
                    &serde_json::json!({ "status": "starting", "node": rec.name, "node_type": node_type, "address": rec.address }),
                ),
                Err(StartError::NoAddress(t)) => refusal_response(
                    mgr,
                    &preq.service,
                    &Refusal {
                        status: 409,
                        code: "no_free_address",
                        reason: format!("no free address in the pool of node type {t}"),
                    },
                ),
                Err(StartError::Registry(e)) => registry_failure(mgr, &e),
            }
        }
        Decision::Refuse(r) => refusal_response(mgr, &preq.service, &r),
    }
}

async fn release(mgr: &Arc<Manager>, req: Request<Incoming>) -> Response<Body> {
    let a = match admit_granted(mgr, req).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let fence = mgr.role.borrow().fence().cloned();
    let Some(fence) = fence else {
        return not_leader(mgr);
    };
    let id = a.path.trim_start_matches("/v1/placements/");
    let mut conn = mgr.conn.clone();
    match registry::remove_placement(&mut conn, &mgr.keys, &fence, id).await {
        Ok(Some(node)) => json_response(200, &serde_json::json!({ "released": id, "node": node })),
        Ok(None) => json_error(404, "no_such_placement"),
        Err(e) => registry_failure(mgr, &e),
    }
}

async fn nodes(mgr: &Arc<Manager>, req: Request<Incoming>) -> Response<Body> {
    if let Err(r) = admit_granted(mgr, req).await {
        return r;
    }
    let mut conn = mgr.conn.clone();
    match registry::load_all(&mut conn, &mgr.keys).await {
        Ok(nodes) => {
            let list: Vec<serde_json::Value> = nodes
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "node": n.record,
                        "latest": n.latest,
                        "placements": n.placements,
                    })
                })
                .collect();
            json_response(200, &serde_json::json!({ "nodes": list }))
        }
        Err(e) => registry_failure(mgr, &e),
    }
}
