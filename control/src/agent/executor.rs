//! The executor's checks: parse a start request, find its template in the
//! registry spec, check every parameter against its declared type and build
//! the argv. Pure functions: nothing here runs anything.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::registry::{
    self, Piece, ServiceSpec, Template, TemplateKind, INSTANCE_ID_PARAM, START_TEMPLATE,
    STOP_TEMPLATE,
};

/// Body of `POST /v1/instances`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Caller-chosen id, `[A-Za-z0-9_-]{1,64}`; the idempotency key.
    pub instance_id: String,
    /// Registered service name.
    pub service: String,
    /// Template to run; `start` when absent.
    #[serde(default)]
    pub template: Option<String>,
    /// Values for the service's declared parameters.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// Why a request cannot be turned into a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The body is not a valid start request.
    #[error("invalid request body: {0}")]
    Body(String),
    /// A field is malformed (`field` names it).
    #[error("invalid {field}: {detail}")]
    Field {
        /// e.g. `instance_id` or `params.port`.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// The service has no such template (or it is the stop template).
    #[error("service has no start template {0:?}")]
    UnknownTemplate(String),
}

impl RenderError {
    /// HTTP status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            RenderError::UnknownTemplate(_) => 404,
            _ => 400,
        }
    }

    /// JSON body for this refusal.
    pub fn body(&self) -> serde_json::Value {
        match self {
            RenderError::Body(d) => serde_json::json!({"error": "invalid_request", "detail": d}),
            RenderError::Field { field, detail } => serde_json::json!({
                "error": if field.starts_with("params") { "invalid_param" } else { "invalid_request" },
                "field": field,
                "detail": detail,
            }),
            RenderError::UnknownTemplate(t) => {
                serde_json::json!({"error": "unknown_template", "template": t})
            }
        }
    }
}

fn field(f: impl Into<String>, d: impl Into<String>) -> RenderError {
    RenderError::Field {
        field: f.into(),
        detail: d.into(),
    }
}

/// Parse a start request body and check its instance id and service name
/// (before the registry is consulted).
pub fn parse_start(body: &[u8]) -> Result<StartRequest, RenderError> {
    let req: StartRequest =
        serde_json::from_slice(body).map_err(|e| RenderError::Body(e.to_string()))?;
    check_instance_id(&req.instance_id)?;
    if !crate::scoreboard::valid_service(&req.service) {
        return Err(field("service", "must match [A-Za-z0-9._-]{1,64}"));
    }
    if let Some(t) = &req.template {
        if !registry::valid_ident(t) {
            return Err(field("template", registry::ident_refusal(t)));
        }
    }
    Ok(req)
}

/// Instance ids are idents: they end up in argv, file names and Redis keys.
pub fn check_instance_id(id: &str) -> Result<(), RenderError> {
    if registry::valid_ident(id) {
        Ok(())
    } else {
        Err(field("instance_id", registry::ident_refusal(id)))
    }
}

/// A checked request: which template, and every value in string form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The start template's name.
    pub template: String,
    /// Declared parameter values (without `instance_id`).
    pub params: BTreeMap<String, String>,
}

/// Check the request against the service's spec: the template exists and is
/// not `stop`, every declared parameter is given and valid, none is extra.
pub fn check(spec: &ServiceSpec, req: &StartRequest) -> Result<Checked, RenderError> {
    let tname = req.template.as_deref().unwrap_or(START_TEMPLATE);
    if tname == STOP_TEMPLATE || !spec.templates.contains_key(tname) {
        return Err(RenderError::UnknownTemplate(tname.to_string()));
    }
    for k in req.params.keys() {
        if !spec.params.contains_key(k) {
            let shown: String = k.chars().take(64).collect();
            return Err(field(format!("params.{shown}"), "not a declared parameter"));
        }
    }
    let mut params = BTreeMap::new();
    for (name, ty) in &spec.params {
        let v = req
            .params
            .get(name)
            .ok_or_else(|| field(format!("params.{name}"), "missing"))?;
        let s = ty
            .check(v)
            .map_err(|d| field(format!("params.{name}"), d))?;
        params.insert(name.clone(), s);
    }
    Ok(Checked {
        template: tname.to_string(),
        params,
    })
}

/// A command ready to spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Process, docker or podman (informational: all run the same way).
    pub kind: TemplateKind,
    /// argv, fully substituted.
    pub argv: Vec<String>,
}

/// Substitute checked values into a template, element by element.
pub fn render(
    t: &Template,
    instance_id: &str,
    params: &BTreeMap<String, String>,
) -> Result<Launch, RenderError> {
    let mut argv = Vec::with_capacity(t.argv.len());
    for (i, el) in t.argv.iter().enumerate() {
        let pieces =
            registry::parse_element(el).map_err(|d| field(format!("template.argv[{i}]"), d))?;
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Literal(s) => out.push_str(s),
                Piece::Param(INSTANCE_ID_PARAM) => out.push_str(instance_id),
                Piece::Param(name) => out.push_str(params.get(name).ok_or_else(|| {
                    field(
                        format!("template.argv[{i}]"),
                        format!("no value for {{{name}}}"),
                    )
                })?),
            }
        }
        argv.push(out);
    }
    Ok(Launch { kind: t.kind, argv })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        registry::parse_services(
            r#"
[[service]]
name = "w"
min = 0
max = 2
resources = { cpu = 1, ram_mib = 1 }
params = { tag = { type = "ident" }, port = { type = "port" } }
templates.start = { argv = ["/bin/echo", "{instance_id}", "--tag={tag}", "{port}"] }
templates.stop = { argv = ["/bin/true"] }
"#,
        )
        .unwrap()
        .remove(0)
    }

    #[test]
    fn renders_per_element_and_refuses_stop_and_extras() {
        let s = spec();
        let req =
            parse_start(br#"{"instance_id":"i-1","service":"w","params":{"tag":"a b","port":80}}"#)
                .unwrap();
        let e = check(&s, &req).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("params.tag"), "{e}");
        let req =
            parse_start(br#"{"instance_id":"i-1","service":"w","params":{"tag":"ab","port":80}}"#)
                .unwrap();
        let c = check(&s, &req).unwrap();
        let l = render(&s.templates["start"], &req.instance_id, &c.params).unwrap();
        assert_eq!(l.argv, ["/bin/echo", "i-1", "--tag=ab", "80"]);
        let req =
            parse_start(br#"{"instance_id":"i-1","service":"w","template":"stop","params":{}}"#)
                .unwrap();
        assert_eq!(check(&s, &req).unwrap_err().status(), 404);
        let req = parse_start(
            br#"{"instance_id":"i-1","service":"w","params":{"tag":"a","port":1,"x":1}}"#,
        )
        .unwrap();
        assert!(check(&s, &req)
            .unwrap_err()
            .to_string()
            .contains("params.x"));
        assert!(parse_start(br#"{"instance_id":"../i","service":"w"}"#).is_err());
        assert!(parse_start(br#"{"instance_id":"i","service":"w","cmd":"rm"}"#).is_err());
    }
}
