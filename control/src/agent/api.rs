//! The executor's HTTP API: authenticate (gate), check the principal and
//! its grant, then start / stop / list instances. Every refusal is a 4xx
//! with a reason and happens before anything is run.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tokio::sync::Mutex;
use tracing::warn;

use super::executor::{self, RenderError};
use super::supervise::{NewInstance, StartError, Supervisor};
use super::INSTANCES_PATH;
use crate::gate::{json_error, json_response, reject, Body, Gate};
use crate::registry::{Registry, RegistryError, STOP_TEMPLATE};

/// Everything a request handler needs.
pub struct Ctx {
    gate: Gate,
    allowed: String,
    redis_url: String,
    registry: Mutex<Option<Registry>>,
    sup: Arc<Supervisor>,
}

impl Ctx {
    /// Handler state for one agent.
    pub fn new(gate: Gate, allowed: String, redis_url: String, sup: Arc<Supervisor>) -> Self {
        Ctx {
            gate,
            allowed,
            redis_url,
            registry: Mutex::new(None),
            sup,
        }
    }

    async fn service(&self, name: &str) -> Result<crate::registry::ServiceSpec, RegistryError> {
        let mut g = self.registry.lock().await;
        if g.is_none() {
            *g = Some(Registry::connect(&self.redis_url).await?);
        }
        let Some(reg) = g.as_mut() else {
            return Err(RegistryError::NotFound(name.into()));
        };
        let r = reg.get(name).await;
        if matches!(r, Err(RegistryError::Redis(_))) {
            // Reconnect on the next request.
            *g = None;
        }
        r
    }
}

fn record_json(r: &super::supervise::InstanceRecord) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or(serde_json::Value::Null)
}

/// Serve one request.
pub async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == crate::shim::READY_PATH {
        let ready = ctx.gate.state.is_ready();
        return json_response(
            if ready { 200 } else { 503 },
            &serde_json::json!({ "ready": ready }),
        );
    }
    let method = req.method().clone();
    let a = match ctx.gate.admit(req).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if a.principal != ctx.allowed {
        warn!(principal = %a.principal, "request from a principal that may not use the agent");
        return json_error(403, "principal_not_allowed");
    }
    if let Err(rej) = ctx
        .gate
        .state
        .authorise(&a.principal, method.as_str(), &a.path)
    {
        return reject(&rej);
    }
    if a.path == INSTANCES_PATH {
        return match method {
            Method::GET => {
                let list: Vec<_> = ctx.sup.list().iter().map(record_json).collect();
                json_response(200, &serde_json::json!({ "instances": list }))
            }
            Method::POST => start(&ctx, &a.body).await,
            _ => json_error(405, "method_not_allowed"),
        };
    }
    let Some(id) = a
        .path
        .strip_prefix(INSTANCES_PATH)
        .and_then(|p| p.strip_prefix('/'))
    else {
        return json_error(404, "not_found");
    };
    if let Err(e) = executor::check_instance_id(id) {
        return json_response(e.status(), &e.body());
    }
    match method {
        Method::GET => match ctx.sup.get(id) {
            Some(r) => json_response(200, &record_json(&r)),
            None => json_error(404, "unknown_instance"),
        },
        Method::DELETE => match ctx.sup.stop(id).await {
            Some(r) => json_response(200, &record_json(&r)),
            None => json_error(404, "unknown_instance"),
        },
        _ => json_error(405, "method_not_allowed"),
    }
}

fn refuse(e: RenderError) -> Response<Body> {
    json_response(e.status(), &e.body())
}

async fn start(ctx: &Ctx, body: &[u8]) -> Response<Body> {
    let req = match executor::parse_start(body) {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    let spec = match ctx.service(&req.service).await {
        Ok(s) => s,
        Err(RegistryError::NotFound(_)) => {
            return json_response(
                404,
                &serde_json::json!({"error": "unknown_service", "service": req.service}),
            )
        }
        Err(e @ RegistryError::Corrupt { .. }) => {
            warn!(error = %e, "refusing an invalid stored spec");
            return json_error(500, "service_spec_invalid");
        }
        Err(e) => {
            warn!(error = %e, "service registry unavailable");
            return json_error(503, "registry_unavailable");
        }
    };
    let checked = match executor::check(&spec, &req) {
        Ok(c) => c,
        Err(e) => return refuse(e),
    };
    let Some(t) = spec.templates.get(&checked.template) else {
        return refuse(RenderError::UnknownTemplate(checked.template));
    };
    let launch = match executor::render(t, &req.instance_id, &checked.params) {
        Ok(l) => l,
        Err(e) => return refuse(e),
    };
    let stop = match spec.templates.get(STOP_TEMPLATE) {
        None => None,
        Some(st) => match executor::render(st, &req.instance_id, &checked.params) {
            Ok(l) => Some(l),
            Err(e) => return refuse(e),
        },
    };
    let n = NewInstance {
        instance_id: req.instance_id.clone(),
        service: req.service.clone(),
        template: checked.template,
        params: checked.params,
        launch,
        stop,
        stop_grace_secs: spec.stop_grace_secs,
    };
    match ctx.sup.start(n) {
        Ok((true, r)) => json_response(201, &record_json(&r)),
        Ok((false, r)) => json_response(200, &record_json(&r)),
        Err(StartError::Conflict(id)) => json_response(
            409,
            &serde_json::json!({"error": "instance_id_conflict", "instance_id": id}),
        ),
        Err(StartError::Full) => json_error(503, "too_many_instances"),
        Err(e @ StartError::Spawn { .. }) => {
            warn!(error = %e, "start failed");
            json_response(
                500,
                &serde_json::json!({"error": "spawn_failed", "detail": e.to_string()}),
            )
        }
    }
}
