//! The service registry (paper §3.1, §3.3): what the container-manager may
//! run and how — name, min/max instances, start/stop command templates,
//! load-balanced flag, node requirements, resource need, warm-up, cool-down
//! and threshold steps. Stored in Redis; managed with
//! `headroom services register FILE | list | remove NAME`.
//!
//! Command templates are argv arrays (never a shell line) with `{param}`
//! placeholders; every parameter has a declared type, and a value is checked
//! against it before it is substituted (see `docs/AGENT.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

/// Redis set of registered service names.
pub const SERVICES_SET: &str = "headroom:services";

/// Redis hash holding one service's spec (field `spec`, JSON).
pub fn service_key(name: &str) -> String {
    format!("headroom:service:{name}")
}

/// The built-in parameter every template may use: the instance id.
pub const INSTANCE_ID_PARAM: &str = "instance_id";

/// Name of the template the agent runs to stop an instance.
pub const STOP_TEMPLATE: &str = "stop";

/// Name of the template started when a request names none.
pub const START_TEMPLATE: &str = "start";

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the expected shape.
    #[error("{0}")]
    Parse(String),
    /// A value is out of its allowed range or inconsistent.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// Path of the bad field, e.g. `service[0].templates.start.argv[1]`.
        field: String,
        /// What is wrong with it.
        detail: String,
    },
    /// No service of that name is registered.
    #[error("no service named {0:?} is registered")]
    NotFound(String),
    /// A stored spec could not be read back.
    #[error("stored spec of service {name:?} is unreadable: {detail}")]
    Corrupt {
        /// The service.
        name: String,
        /// The parse error.
        detail: String,
    },
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

fn invalid(field: impl Into<String>, detail: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field: field.into(),
        detail: detail.into(),
    }
}

/// A file of one or more `[[service]]` tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesFile {
    /// The services, in file order.
    pub service: Vec<ServiceSpec>,
}

/// One registered service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service name, `[A-Za-z0-9._-]{1,64}`.
    pub name: String,
    /// Fewest instances the container-manager keeps.
    pub min: u32,
    /// Most instances the container-manager starts.
    pub max: u32,
    /// Whether instances join a balancer service.
    #[serde(default)]
    pub load_balanced: bool,
    /// The balancer binding; required when `load_balanced`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbBinding>,
    /// Where instances may run.
    #[serde(default)]
    pub requirements: Requirements,
    /// What one instance needs.
    pub resources: Resources,
    /// Seconds a new instance needs before its load counts.
    #[serde(default)]
    pub warm_up_secs: u64,
    /// Seconds to drain an instance before it is stopped.
    #[serde(default)]
    pub cool_down_secs: u64,
    /// Scale-up thresholds per replica count (paper §3.3).
    #[serde(default)]
    pub thresholds: Thresholds,
    /// Seconds between the stop template (or SIGTERM) and SIGKILL.
    #[serde(default = "default_stop_grace")]
    pub stop_grace_secs: u64,
    /// Declared template parameters and their types.
    #[serde(default)]
    pub params: BTreeMap<String, ParamType>,
    /// Named command templates; `start` is required, `stop` optional.
    pub templates: BTreeMap<String, Template>,
}

fn default_stop_grace() -> u64 {
    10
}

/// Which balancer service instances join, and which parameter is their port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbBinding {
    /// The `headroom lb` service name.
    pub service: String,
    /// A declared parameter of type `port` giving the instance's port.
    pub port_param: String,
}

/// Node requirements; all given ones must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Node type name (machine-manager config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    /// A particular node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Labels the node must carry with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Resource need of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (fractions allowed).
    pub cpu: f64,
    /// Memory, MiB.
    pub ram_mib: u64,
}

/// Scale-up threshold: `base_pct` at one replica, `+ step_pct` per extra
/// replica, capped at `max_pct`; scale down below the threshold of one
/// replica fewer minus `down_band_pct`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Threshold at one replica, percent.
    #[serde(default = "default_base")]
    pub base_pct: f64,
    /// Increase per additional replica, percentage points.
    #[serde(default = "default_step")]
    pub step_pct: f64,
    /// Highest threshold, percent.
    #[serde(default = "default_max")]
    pub max_pct: f64,
    /// Hysteresis below the lower threshold before scaling down.
    #[serde(default = "default_band")]
    pub down_band_pct: f64,
}

fn default_base() -> f64 {
    60.0
}
fn default_step() -> f64 {
    5.0
}
fn default_max() -> f64 {
    80.0
}
fn default_band() -> f64 {
    20.0
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            base_pct: default_base(),
            step_pct: default_step(),
            max_pct: default_max(),
            down_band_pct: default_band(),
        }
    }
}

impl Thresholds {
    /// The scale-up threshold at `replicas` running instances.
    pub fn up_at(&self, replicas: u32) -> f64 {
        let extra = f64::from(replicas.saturating_sub(1));
        (self.base_pct + self.step_pct * extra).min(self.max_pct)
    }

    /// The scale-down threshold at `replicas` running instances.
    pub fn down_at(&self, replicas: u32) -> f64 {
        (self.up_at(replicas.saturating_sub(1).max(1)) - self.down_band_pct).max(0.0)
    }
}

/// How a template's command is run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// A plain process (argv\[0\] an absolute path).
    #[default]
    Process,
    /// A `docker` command (run the container in the foreground).
    Docker,
    /// A `podman` command (run the container in the foreground).
    Podman,
}

/// One command template: an argv array with `{param}` placeholders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Process, docker or podman.
    #[serde(default)]
    pub kind: TemplateKind,
    /// The command; each element substituted on its own, never via a shell.
    pub argv: Vec<String>,
}

/// A declared parameter type; values are checked before substitution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ParamType {
    /// A TCP/UDP port in `min..=max`.
    Port {
        /// Lowest allowed port.
        #[serde(default = "default_port_min")]
        min: u16,
        /// Highest allowed port.
        #[serde(default = "default_port_max")]
        max: u16,
    },
    /// An integer in `min..=max`.
    Int {
        /// Lowest allowed value.
        min: i64,
        /// Highest allowed value.
        max: i64,
    },
    /// One of a fixed list of strings.
    Enum {
        /// The allowed values.
        values: Vec<String>,
    },
    /// `[A-Za-z0-9_-]{1,64}`.
    Ident,
}

fn default_port_min() -> u16 {
    1
}
fn default_port_max() -> u16 {
    65535
}

/// Characters a shell would give meaning to; named in refusals.
const SHELL_META: &[char] = &[
    ';', '&', '|', '`', '$', '(', ')', '<', '>', '\\', '"', '\'', '*', '?', '[', ']', '{', '}',
    '~', '!', '#', '\n', '\r', '\t', ' ', '\0',
];

/// `[A-Za-z0-9][A-Za-z0-9_-]{0,63}`: instance ids and `ident` parameters.
/// The first character is alphanumeric so that a value substituted as a
/// whole argv element can never read as an option (`-rf`, `--privileged`).
pub fn valid_ident(s: &str) -> bool {
    s.len() <= 64
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a string is not an ident, in words naming the offending part.
pub fn ident_refusal(s: &str) -> String {
    if s.is_empty() {
        return "must not be empty".into();
    }
    if let Some(c) = s.chars().find(|c| SHELL_META.contains(c)) {
        return format!("contains shell metacharacter {c:?}");
    }
    if s.contains("..") || s.contains('/') {
        return "contains a path (`/` or `..`)".into();
    }
    if s.len() > 64 {
        return "longer than 64 bytes".into();
    }
    if s.starts_with('-') || s.starts_with('_') {
        return "starts with `-` or `_` (it could read as an option)".into();
    }
    "must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}".into()
}

impl ParamType {
    /// Check a request value; returns its string form for substitution.
    pub fn check(&self, v: &serde_json::Value) -> Result<String, String> {
        match self {
            ParamType::Port { min, max } => {
                let n = as_int(v)?;
                if n < i64::from(*min) || n > i64::from(*max) {
                    return Err(format!("{n} is outside the port range {min}..={max}"));
                }
                Ok(n.to_string())
            }
            ParamType::Int { min, max } => {
                let n = as_int(v)?;
                if n < *min || n > *max {
                    return Err(format!("{n} is outside {min}..={max}"));
                }
                Ok(n.to_string())
            }
            ParamType::Enum { values } => {
                let s = v.as_str().ok_or("must be a string")?;
                if values.iter().any(|x| x == s) {
                    Ok(s.to_string())
                } else {
                    Err(format!("must be one of {values:?}"))
                }
            }
            ParamType::Ident => {
                let s = v.as_str().ok_or("must be a string")?;
                if valid_ident(s) {
                    Ok(s.to_string())
                } else {
                    Err(ident_refusal(s))
                }
            }
        }
    }
}

/// An integer from a JSON number or a string of decimal digits.
fn as_int(v: &serde_json::Value) -> Result<i64, String> {
    match v {
        serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| "must be an integer".into()),
        serde_json::Value::String(s) => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                if let Some(c) = s.chars().find(|c| SHELL_META.contains(c)) {
                    return Err(format!("contains shell metacharacter {c:?}"));
                }
                return Err("must be an integer".into());
            }
            s.parse::<i64>().map_err(|_| "must be an integer".into())
        }
        _ => Err("must be an integer".into()),
    }
}

/// One piece of a template argv element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Text copied as is.
    Literal(&'a str),
    /// A `{name}` placeholder.
    Param(&'a str),
}

/// Split an argv element into literals and `{name}` placeholders.
pub fn parse_element(s: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                out.push(Piece::Literal(rest));
                break;
            }
            Some(i) if rest.as_bytes()[i] == b'}' => return Err("unmatched `}`".into()),
            Some(i) => {
                if i > 0 {
                    out.push(Piece::Literal(&rest[..i]));
                }
                let after = &rest[i + 1..];
                let end = after.find('}').ok_or("unmatched `{`")?;
                let name = &after[..end];
                let ok = name
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    return Err(format!(
                        "placeholder {{{name}}} must match [a-z_][a-z0-9_]*"
                    ));
                }
                out.push(Piece::Param(name));
                rest = &after[end + 1..];
            }
        }
    }
    Ok(out)
}

fn valid_param_name(s: &str) -> bool {
    s.len() <= 64 && parse_element(&format!("{{{s}}}")).is_ok()
}

impl ServiceSpec {
    /// Check everything serde cannot; `at` prefixes field paths.
    pub fn validate(&self, at: &str) -> Result<(), RegistryError> {
        if !crate::scoreboard::valid_service(&self.name) {
            return Err(invalid(
                format!("{at}name"),
                "must match [A-Za-z0-9._-]{1,64}",
            ));
        }
        if self.max == 0 {
            return Err(invalid(format!("{at}max"), "must be at least 1"));
        }
        if self.min > self.max {
            return Err(invalid(
                format!("{at}min"),
                format!("{} is greater than max {}", self.min, self.max),
            ));
        }
        if !(self.resources.cpu.is_finite() && self.resources.cpu > 0.0) {
            return Err(invalid(format!("{at}resources.cpu"), "must be > 0"));
        }
        if self.resources.ram_mib == 0 {
            return Err(invalid(format!("{at}resources.ram_mib"), "must be > 0"));
        }
        self.validate_thresholds(at)?;
        self.validate_requirements(at)?;
        for (name, ty) in &self.params {
            let f = format!("{at}params.{name}");
            if !valid_param_name(name) {
                return Err(invalid(f, "parameter names must match [a-z_][a-z0-9_]*"));
            }
            if name == INSTANCE_ID_PARAM {
                return Err(invalid(f, "instance_id is built in; do not declare it"));
            }
            validate_param_type(&f, ty)?;
        }
        if !self.templates.contains_key(START_TEMPLATE) {
            return Err(invalid(
                format!("{at}templates"),
                "a `start` template is required",
            ));
        }
        for (tname, t) in &self.templates {
            let f = format!("{at}templates.{tname}");
            if !valid_ident(tname) {
                return Err(invalid(f, "template names must match [A-Za-z0-9_-]{1,64}"));
            }
            self.validate_template(&f, t)?;
        }
        match (&self.lb, self.load_balanced) {
            (None, true) => {
                return Err(invalid(
                    format!("{at}lb"),
                    "required when load_balanced = true",
                ))
            }
            (Some(lb), _) => {
                if !crate::scoreboard::valid_service(&lb.service) {
                    return Err(invalid(
                        format!("{at}lb.service"),
                        "must match [A-Za-z0-9._-]{1,64}",
                    ));
                }
                if !matches!(
                    self.params.get(&lb.port_param),
                    Some(ParamType::Port { .. })
                ) {
                    return Err(invalid(
                        format!("{at}lb.port_param"),
                        format!(
                            "{:?} is not a declared parameter of type port",
                            lb.port_param
                        ),
                    ));
                }
            }
            (None, false) => {}
        }
        Ok(())
    }

    fn validate_thresholds(&self, at: &str) -> Result<(), RegistryError> {
        let t = &self.thresholds;
        let pct = |name: &str, v: f64| {
            if v.is_finite() && (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err(invalid(
                    format!("{at}thresholds.{name}"),
                    "must be within 0–100",
                ))
            }
        };
        pct("base_pct", t.base_pct)?;
        pct("step_pct", t.step_pct)?;
        pct("max_pct", t.max_pct)?;
        pct("down_band_pct", t.down_band_pct)?;
        if t.base_pct > t.max_pct {
            return Err(invalid(
                format!("{at}thresholds.base_pct"),
                "must not exceed max_pct",
            ));
        }
        if t.down_band_pct >= t.base_pct {
            return Err(invalid(
                format!("{at}thresholds.down_band_pct"),
                "must be below base_pct",
            ));
        }
        Ok(())
    }

    fn validate_requirements(&self, at: &str) -> Result<(), RegistryError> {
        let r = &self.requirements;
        for (name, v) in [("node_type", &r.node_type), ("node", &r.node)] {
            if let Some(v) = v {
                if !crate::keystore::valid_name(v) {
                    return Err(invalid(
                        format!("{at}requirements.{name}"),
                        "must match [A-Za-z0-9._-]{1,64}",
                    ));
                }
            }
        }
        for (k, v) in &r.labels {
            if !crate::keystore::valid_name(k) || !crate::keystore::valid_name(v) {
                return Err(invalid(
                    format!("{at}requirements.labels.{k}"),
                    "label names and values must match [A-Za-z0-9._-]{1,64}",
                ));
            }
        }
        Ok(())
    }

    fn validate_template(&self, f: &str, t: &Template) -> Result<(), RegistryError> {
        let Some(cmd) = t.argv.first() else {
            return Err(invalid(format!("{f}.argv"), "must not be empty"));
        };
        if t.argv.len() > 256 {
            return Err(invalid(format!("{f}.argv"), "more than 256 elements"));
        }
        if cmd.contains(['{', '}']) {
            return Err(invalid(
                format!("{f}.argv[0]"),
                "the program must be literal, not a placeholder",
            ));
        }
        let base = Path::new(cmd)
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("");
        match t.kind {
            TemplateKind::Process if !cmd.starts_with('/') => {
                return Err(invalid(
                    format!("{f}.argv[0]"),
                    "a process template needs an absolute program path",
                ))
            }
            TemplateKind::Docker if base != "docker" => {
                return Err(invalid(
                    format!("{f}.argv[0]"),
                    "a docker template runs `docker`",
                ))
            }
            TemplateKind::Podman if base != "podman" => {
                return Err(invalid(
                    format!("{f}.argv[0]"),
                    "a podman template runs `podman`",
                ))
            }
            _ => {}
        }
        for (i, el) in t.argv.iter().enumerate() {
            let ef = format!("{f}.argv[{i}]");
            if el.len() > 4096 || el.contains('\0') {
                return Err(invalid(ef, "longer than 4096 bytes or contains NUL"));
            }
            for p in parse_element(el).map_err(|d| invalid(&ef, d))? {
                if let Piece::Param(name) = p {
                    if name != INSTANCE_ID_PARAM && !self.params.contains_key(name) {
                        return Err(invalid(
                            ef,
                            format!("placeholder {{{name}}} is not a declared parameter"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn validate_param_type(f: &str, ty: &ParamType) -> Result<(), RegistryError> {
    match ty {
        ParamType::Port { min, max } if *min == 0 || min > max => {
            Err(invalid(format!("{f}.min"), "need 1 <= min <= max"))
        }
        ParamType::Int { min, max } if min > max => {
            Err(invalid(format!("{f}.min"), "must not exceed max"))
        }
        ParamType::Enum { values } => {
            if values.is_empty() {
                return Err(invalid(format!("{f}.values"), "must not be empty"));
            }
            // Enum values are the operator's, but they are substituted into
            // argv too: hold them to the same safe alphabet.
            for (i, v) in values.iter().enumerate() {
                if !crate::keystore::valid_name(v) || v.contains("..") {
                    return Err(invalid(
                        format!("{f}.values[{i}]"),
                        "must match [A-Za-z0-9._-]{1,64} without `..`",
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Parse and validate a services file's text.
pub fn parse_services(text: &str) -> Result<Vec<ServiceSpec>, RegistryError> {
    let file: ServicesFile =
        toml::from_str(text).map_err(|e| RegistryError::Parse(e.to_string()))?;
    if file.service.is_empty() {
        return Err(invalid("service", "the file declares no [[service]]"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in file.service.iter().enumerate() {
        s.validate(&format!("service[{i}]."))?;
        if !seen.insert(s.name.as_str()) {
            return Err(invalid(
                format!("service[{i}].name"),
                format!("{:?} appears twice in the file", s.name),
            ));
        }
    }
    Ok(file.service)
}

/// Read, parse and validate a services file.
pub fn load_services(path: &Path) -> Result<Vec<ServiceSpec>, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_services(&text)
}

/// Read access to the registry, and registration.
#[derive(Clone)]
pub struct Registry {
    conn: redis::aio::MultiplexedConnection,
}

impl Registry {
    /// Connect to the Redis holding the registry.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        Ok(Registry {
            conn: crate::keystore::connect(url, Duration::from_secs(5)).await?,
        })
    }

    /// Store (or replace) validated specs, each in one transaction.
    pub async fn register(&mut self, specs: &[ServiceSpec]) -> Result<(), RegistryError> {
        for s in specs {
            s.validate("")?;
            let json = serde_json::to_string(s).map_err(|e| invalid("spec", e.to_string()))?;
            let key = service_key(&s.name);
            let _: () = redis::pipe()
                .atomic()
                .del(&key)
                .hset_multiple(
                    &key,
                    &[
                        ("spec", json),
                        ("min", s.min.to_string()),
                        ("max", s.max.to_string()),
                        ("load_balanced", s.load_balanced.to_string()),
                        ("updated_ms", crate::sigv4::unix_now_ms().to_string()),
                    ],
                )
                .sadd(SERVICES_SET, &s.name)
                .query_async(&mut self.conn)
                .await?;
        }
        Ok(())
    }

    /// One service's spec, or `NotFound`.
    pub async fn get(&mut self, name: &str) -> Result<ServiceSpec, RegistryError> {
        let json: Option<String> = self.conn.hget(service_key(name), "spec").await?;
        let json = json.ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        let corrupt = |detail: String| RegistryError::Corrupt {
            name: name.to_string(),
            detail,
        };
        let spec: ServiceSpec = serde_json::from_str(&json).map_err(|e| corrupt(e.to_string()))?;
        // Redis is writable by more than `services register`: re-check, so
        // the agent never runs a spec that would not have been accepted.
        spec.validate("").map_err(|e| corrupt(e.to_string()))?;
        if spec.name != name {
            return Err(corrupt(format!(
                "stored under another name ({:?})",
                spec.name
            )));
        }
        Ok(spec)
    }

    /// All registered services, by name.
    pub async fn list(&mut self) -> Result<Vec<ServiceSpec>, RegistryError> {
        let mut names: Vec<String> = self.conn.smembers(SERVICES_SET).await?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            match self.get(&n).await {
                Ok(s) => out.push(s),
                // Removed between SMEMBERS and HGET.
                Err(RegistryError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Remove a service; `NotFound` if it was not registered.
    pub async fn remove(&mut self, name: &str) -> Result<(), RegistryError> {
        let (removed, _): (u64, u64) = redis::pipe()
            .atomic()
            .srem(SERVICES_SET, name)
            .del(service_key(name))
            .query_async(&mut self.conn)
            .await?;
        if removed == 0 {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        Ok(())
    }
}

/// `headroom services …`: manage the service registry.
#[derive(Debug, Clone, clap::Args)]
pub struct ServicesArgs {
    /// Redis holding the registry.
    #[arg(long, env = "HEADROOM_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// What to do.
    #[command(subcommand)]
    pub cmd: ServicesCmd,
}

/// Registry subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ServicesCmd {
    /// Register (or replace) every `[[service]]` of a TOML file.
    Register {
        /// The services file (docs/AGENT.md).
        file: PathBuf,
    },
    /// List registered services.
    List {
        /// Print the full specs as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a service from the registry.
    Remove {
        /// Service name.
        name: String,
    },
}

/// Entry point of `headroom services`.
pub async fn run_services(args: ServicesArgs) -> anyhow::Result<()> {
    if let ServicesCmd::Register { file } = &args.cmd {
        // Validate before touching Redis: a bad file changes nothing.
        let specs = load_services(file)?;
        let mut reg = Registry::connect(&args.redis).await?;
        reg.register(&specs).await?;
        for s in &specs {
            println!("registered {}", s.name);
        }
        return Ok(());
    }
    let mut reg = Registry::connect(&args.redis).await?;
    match args.cmd {
        ServicesCmd::Register { .. } => Ok(()),
        ServicesCmd::List { json } => {
            let specs = reg.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&specs)?);
            } else {
                for s in &specs {
                    let lb = s.lb.as_ref().map_or("-".to_string(), |l| l.service.clone());
                    let templates: Vec<&str> = s.templates.keys().map(|k| k.as_str()).collect();
                    println!(
                        "{}\tmin={}\tmax={}\tlb={}\tcpu={}\tram_mib={}\ttemplates={}",
                        s.name,
                        s.min,
                        s.max,
                        lb,
                        s.resources.cpu,
                        s.resources.ram_mib,
                        templates.join(",")
                    );
                }
            }
            Ok(())
        }
        ServicesCmd::Remove { name } => {
            reg.remove(&name).await?;
            println!("removed {name}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[service]]
name = "api"
min = 1
max = 4
load_balanced = true
lb = { service = "api", port_param = "port" }
resources = { cpu = 0.5, ram_mib = 256 }
warm_up_secs = 10
cool_down_secs = 20
params = { port = { type = "port", min = 8000, max = 8100 }, mode = { type = "enum", values = ["fast", "slow"] } }
[service.templates.start]
argv = ["/usr/bin/api", "--port={port}", "--id", "{instance_id}", "{mode}"]
[service.templates.stop]
kind = "docker"
argv = ["docker", "stop", "hr-{instance_id}"]
"#;

    #[test]
    fn good_file_parses_with_defaults() {
        let s = parse_services(GOOD).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].thresholds.base_pct, 60.0);
        assert_eq!(s[0].thresholds.up_at(1), 60.0);
        assert_eq!(s[0].thresholds.up_at(3), 70.0);
        assert_eq!(s[0].thresholds.up_at(10), 80.0);
        assert_eq!(s[0].stop_grace_secs, 10);
        assert_eq!(s[0].templates["stop"].kind, TemplateKind::Docker);
    }

    fn err_of(text: &str) -> String {
        parse_services(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let e = err_of(&GOOD.replace("warm_up_secs", "warmup_secs"));
        assert!(e.contains("warmup_secs"), "{e}");
        let e = err_of(&GOOD.replace("min = 1\n", "min = 9\n"));
        assert!(e.contains("service[0].min"), "{e}");
        let e = err_of(&GOOD.replace("\"{mode}\"", "\"{nope}\""));
        assert!(
            e.contains("service[0].templates.start.argv[4]") && e.contains("nope"),
            "{e}"
        );
        let e = err_of(&GOOD.replace("[\"/usr/bin/api\"", "[\"{mode}\""));
        assert!(e.contains("templates.start.argv[0]"), "{e}");
        let e = err_of(&GOOD.replace("[\"/usr/bin/api\"", "[\"api\""));
        assert!(e.contains("absolute"), "{e}");
        let e = err_of(&GOOD.replace("\"slow\"", "\"a;b\""));
        assert!(e.contains("params.mode.values[1]"), "{e}");
        let e = err_of(&GOOD.replace("type = \"port\"", "type = \"path\""));
        assert!(e.contains("path"), "{e}");
        let e = err_of(&GOOD.replace("port_param = \"port\"", "port_param = \"mode\""));
        assert!(e.contains("service[0].lb.port_param"), "{e}");
        let e = err_of(&GOOD.replace("--port={port}", "--port={port"));
        assert!(e.contains("unmatched"), "{e}");
        let e = err_of(&GOOD.replace("[service.templates.start]", "[service.templates.begin]"));
        assert!(
            e.contains("service[0].templates") && e.contains("start"),
            "{e}"
        );
    }

    #[test]
    fn param_types_refuse_hostile_values() {
        use serde_json::json;
        let id = ParamType::Ident;
        assert_eq!(id.check(&json!("web-1_a")).unwrap(), "web-1_a");
        for bad in [
            "a;b", "$(id)", "`id`", "a|b", "a&&b", "a\nb", "../x", "a/b", "",
        ] {
            assert!(id.check(&json!(bad)).is_err(), "{bad:?}");
        }
        assert!(id.check(&json!("../x")).unwrap_err().contains("path"));
        assert!(id.check(&json!("a;b")).unwrap_err().contains("';'"));
        // A whole argv element must not read as an option.
        for opt in ["-rf", "--privileged", "_x"] {
            assert!(
                id.check(&json!(opt)).unwrap_err().contains("option"),
                "{opt}"
            );
        }
        let port = ParamType::Port {
            min: 8000,
            max: 8100,
        };
        assert_eq!(port.check(&json!(8080)).unwrap(), "8080");
        assert_eq!(port.check(&json!("8080")).unwrap(), "8080");
        assert!(port.check(&json!(80)).is_err());
        assert!(port.check(&json!("8080;reboot")).is_err());
        assert!(port.check(&json!(8080.5)).is_err());
        let e = ParamType::Enum {
            values: vec!["a".into()],
        };
        assert!(e.check(&json!("b")).is_err());
    }

    #[test]
    fn placeholders_parse() {
        assert_eq!(
            parse_element("--p={port}x").unwrap(),
            vec![
                Piece::Literal("--p="),
                Piece::Param("port"),
                Piece::Literal("x")
            ]
        );
        assert!(parse_element("{Port}").is_err());
        assert!(parse_element("}").is_err());
        assert!(parse_element("{a").is_err());
    }
}
