//! `headroom machine-manager` configuration (TOML): node types with their
//! provider commands and limits, static nodes, the monthly cost limit, and
//! the loops' timings. Serde rejects unknown fields; [`MachineManagerConfig::validate`]
//! then reports every bad value with its field path. Reference:
//! docs/MACHINE_MANAGER.md; example: docs/machine-manager.example.toml.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::keystore::valid_name;

/// Placeholders allowed in start/stop argv items.
pub const PLACEHOLDERS: [&str; 3] = ["{node}", "{type}", "{addr}"];

/// Hours per month used for projected spend (365 × 24 / 12).
pub const HOURS_PER_MONTH: f64 = 730.0;

/// A config that could not be loaded: every problem, each with its field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type, or an unknown/missing field.
    #[error("{0}")]
    Parse(String),
    /// Values that parse but are invalid, each `field.path: why`.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// The whole machine-manager configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineManagerConfig {
    /// This manager's id in the leader lease (default: hostname-pid).
    #[serde(default)]
    pub id: Option<String>,
    /// Address of the HTTP API (placements, node reports, /metrics).
    pub listen: SocketAddr,
    /// Redis holding the node registry, stats, lease and permission DB.
    pub redis: String,
    /// SigV4 region expected in signatures.
    #[serde(default = "default_region")]
    pub region: String,
    /// Largest accepted clock skew of signed requests, seconds.
    #[serde(default = "default_skew")]
    pub max_skew_secs: i64,
    /// Prefix of every Redis key the manager owns.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// File for the last good key snapshot (keys survive a Redis outage).
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
    /// Most projected spend per month (currency of `cost_per_hour`).
    pub monthly_cost_limit: f64,
    /// How long a non-static node must be idle before it is stopped, ms.
    #[serde(default = "default_idle_grace")]
    pub idle_grace_ms: u64,
    /// A node with no placements and CPU below this percentage is idle.
    #[serde(default = "default_idle_cpu")]
    pub idle_cpu_pct: f64,
    /// How long node stats are kept, ms.
    #[serde(default = "default_retention")]
    pub stats_retention_ms: u64,
    /// A ready node whose last report is older than this gets no placements, ms.
    #[serde(default = "default_stale")]
    pub report_stale_ms: u64,
    /// A started node that has not reported within this is stopped, ms.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_ms: u64,
    /// Longest a provider start/stop command may run, ms.
    #[serde(default = "default_command_timeout")]
    pub command_timeout_ms: u64,
    /// Leader lease time-to-live, ms.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_ms: u64,
    /// Period of the leader's idle/timeout/retention loop, ms.
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    /// Node types (`[[node_type]]`).
    #[serde(rename = "node_type", default)]
    pub node_types: Vec<NodeType>,
    /// Static nodes (`[[static_node]]`), never stopped.
    #[serde(rename = "static_node", default)]
    pub static_nodes: Vec<StaticNode>,
}

/// A kind of compute node the provider can start.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeType {
    /// `[A-Za-z0-9._-]{1,48}`; started nodes are named `<name>-<n>`.
    pub name: String,
    /// CPU cores.
    pub cpu: f64,
    /// Memory, MiB.
    pub ram_mib: u64,
    /// Disk size, GiB.
    pub disk_gib: u64,
    /// Disk kind, e.g. `ssd`, `hdd`, `nvme` (matched by `labels.disk_kind`).
    pub disk_kind: String,
    /// Price per running hour.
    pub cost_per_hour: f64,
    /// Provider command that starts a node: argv, no shell; `{node}`,
    /// `{type}`, `{addr}` are replaced.
    pub start: Vec<String>,
    /// Provider command that stops a node (same placeholders).
    pub stop: Vec<String>,
    /// Most nodes of this type not stopped (static ones included).
    pub max_count: u32,
    /// Labels that placement requirements can ask for.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Addresses handed to started nodes as `{addr}`; required if a
    /// command uses `{addr}`.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
}

/// A node that always exists and is never stopped.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticNode {
    /// Node name (its agent signs as `node-<name>`).
    pub name: String,
    /// Its node type (capacity, cost).
    #[serde(rename = "type")]
    pub node_type: String,
    /// Its address.
    pub address: IpAddr,
    /// Labels in addition to its type's.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_region() -> String {
    "headroom".into()
}
fn default_skew() -> i64 {
    300
}
fn default_prefix() -> String {
    "headroom:mm".into()
}
fn default_idle_grace() -> u64 {
    600_000
}
fn default_idle_cpu() -> f64 {
    10.0
}
fn default_retention() -> u64 {
    86_400_000
}
fn default_stale() -> u64 {
    30_000
}
fn default_start_timeout() -> u64 {
    600_000
}
fn default_command_timeout() -> u64 {
    120_000
}
fn default_lease_ttl() -> u64 {
    10_000
}
fn default_tick() -> u64 {
    1_000
}

impl MachineManagerConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: MachineManagerConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Every invalid value, each as `field.path: why`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        if let Some(id) = &self.id {
            if !valid_name(id) {
                errs.push(format!("id: {id:?} must match [A-Za-z0-9._-]{{1,64}}"));
            }
        }
        if redis::Client::open(self.redis.as_str()).is_err() {
            errs.push(format!("redis: {:?} is not a redis:// URL", self.redis));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            errs.push("key_prefix: must be non-empty without whitespace".into());
        }
        if !(self.monthly_cost_limit.is_finite() && self.monthly_cost_limit >= 0.0) {
            errs.push("monthly_cost_limit: must be a finite number ≥ 0".into());
        }
        if !(self.idle_cpu_pct.is_finite() && (0.0..=100.0).contains(&self.idle_cpu_pct)) {
            errs.push("idle_cpu_pct: must be within 0–100".into());
        }
        if self.max_skew_secs <= 0 {
            errs.push("max_skew_secs: must be > 0".into());
        }
        for (name, v) in [
            ("stats_retention_ms", self.stats_retention_ms),
            ("report_stale_ms", self.report_stale_ms),
            ("start_timeout_ms", self.start_timeout_ms),
            ("command_timeout_ms", self.command_timeout_ms),
            ("tick_ms", self.tick_ms),
        ] {
            if v == 0 {
                errs.push(format!("{name}: must be > 0"));
            }
        }
        if self.lease_ttl_ms < 300 {
            errs.push("lease_ttl_ms: must be ≥ 300".into());
        }
        if self.node_types.is_empty() {
            errs.push("node_type: at least one [[node_type]] is required".into());
        }
        let mut seen = BTreeMap::new();
        for (i, t) in self.node_types.iter().enumerate() {
            let at = format!("node_type[{i}]");
            validate_type(&at, t, &mut errs);
            if seen.insert(t.name.clone(), i).is_some() {
                errs.push(format!("{at}.name: {:?} is defined twice", t.name));
            }
        }
        let mut names = BTreeMap::new();
        for (i, s) in self.static_nodes.iter().enumerate() {
            let at = format!("static_node[{i}]");
            if !valid_name(&s.name) {
                errs.push(format!(
                    "{at}.name: {:?} must match [A-Za-z0-9._-]{{1,64}}",
                    s.name
                ));
            }
            if names.insert(s.name.clone(), i).is_some() {
                errs.push(format!("{at}.name: {:?} is defined twice", s.name));
            }
            if self.node_type(&s.node_type).is_none() {
                errs.push(format!("{at}.type: no node_type named {:?}", s.node_type));
            }
            // Started nodes are named `<type>-<n>`: a static node must not
            // be able to collide with one.
            for t in &self.node_types {
                if let Some(rest) = s.name.strip_prefix(&format!("{}-", t.name)) {
                    if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                        errs.push(format!(
                            "{at}.name: {:?} is reserved for nodes started of type {:?}",
                            s.name, t.name
                        ));
                    }
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }

    /// The node type called `name`.
    pub fn node_type(&self, name: &str) -> Option<&NodeType> {
        self.node_types.iter().find(|t| t.name == name)
    }

    /// The static node called `name`.
    pub fn static_node(&self, name: &str) -> Option<&StaticNode> {
        self.static_nodes.iter().find(|s| s.name == name)
    }

    /// `idle_grace_ms` as a duration.
    pub fn idle_grace(&self) -> Duration {
        Duration::from_millis(self.idle_grace_ms)
    }

    /// `command_timeout_ms` as a duration.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }
}

fn validate_type(at: &str, t: &NodeType, errs: &mut Vec<String>) {
    if !(valid_name(&t.name) && t.name.len() <= 48) {
        errs.push(format!(
            "{at}.name: {:?} must match [A-Za-z0-9._-]{{1,48}}",
            t.name
        ));
    }
    if !(t.cpu.is_finite() && t.cpu > 0.0) {
        errs.push(format!("{at}.cpu: must be > 0"));
    }
    if t.ram_mib == 0 {
        errs.push(format!("{at}.ram_mib: must be > 0"));
    }
    if t.disk_kind.is_empty() {
        errs.push(format!("{at}.disk_kind: must not be empty"));
    }
    if !(t.cost_per_hour.is_finite() && t.cost_per_hour >= 0.0) {
        errs.push(format!("{at}.cost_per_hour: must be a finite number ≥ 0"));
    }
    for (field, argv) in [("start", &t.start), ("stop", &t.stop)] {
        if argv.is_empty() || argv[0].is_empty() {
            errs.push(format!("{at}.{field}: must name a program"));
            continue;
        }
        for (j, a) in argv.iter().enumerate() {
            let mut rest = a.as_str();
            while let Some(open) = rest.find('{') {
                let tail = &rest[open..];
                match PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) {
                    Some(p) => {
                        if *p == "{addr}" && t.addresses.is_empty() {
                            errs.push(format!(
                                "{at}.{field}[{j}]: uses {{addr}} but {at}.addresses is empty"
                            ));
                        }
                        rest = &tail[p.len()..];
                    }
                    None => {
                        errs.push(format!(
                            "{at}.{field}[{j}]: unknown placeholder in {a:?} (allowed: {{node}} {{type}} {{addr}})"
                        ));
                        break;
                    }
                }
            }
        }
    }
}

/// `argv` with `{node}`, `{type}` and `{addr}` replaced.
pub fn expand(argv: &[String], node: &str, node_type: &str, addr: &str) -> Vec<String> {
    argv.iter()
        .map(|a| {
            a.replace("{node}", node)
                .replace("{type}", node_type)
                .replace("{addr}", addr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:0"
redis = "redis://127.0.0.1:6379"
monthly_cost_limit = 100.0
[[node_type]]
name = "small"
cpu = 2
ram_mib = 2048
disk_gib = 20
disk_kind = "ssd"
cost_per_hour = 0.05
start = ["/usr/bin/provider", "start", "{node}", "{addr}"]
stop = ["/usr/bin/provider", "stop", "{node}"]
max_count = 2
addresses = ["10.0.0.2"]
[[static_node]]
name = "db"
type = "small"
address = "10.0.0.1"
"#;

    #[test]
    fn good_config_loads() {
        let c = MachineManagerConfig::parse(GOOD).unwrap();
        assert_eq!(c.node_types[0].max_count, 2);
        assert_eq!(c.static_nodes[0].node_type, "small");
        assert_eq!(
            expand(&c.node_types[0].start, "small-1", "small", "10.0.0.2"),
            ["/usr/bin/provider", "start", "small-1", "10.0.0.2"]
        );
    }

    #[test]
    fn the_documented_example_is_valid() {
        let c =
            MachineManagerConfig::parse(include_str!("../../../docs/machine-manager.example.toml"))
                .unwrap();
        assert_eq!(c.static_nodes[0].name, "pg-main");
    }

    #[test]
    fn unknown_field_is_named() {
        let bad = GOOD.replace("max_count = 2", "max_count = 2\nmax_cnt = 3");
        let e = MachineManagerConfig::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("max_cnt"), "{e}");
    }

    #[test]
    fn invalid_values_name_their_field() {
        let bad = GOOD
            .replace("cost_per_hour = 0.05", "cost_per_hour = -1")
            .replace("type = \"small\"", "type = \"huge\"")
            .replace("\"{addr}\"]", "\"{address}\"]")
            .replace("name = \"db\"", "name = \"small-7\"");
        let e = MachineManagerConfig::parse(&bad).unwrap_err().to_string();
        for want in [
            "node_type[0].cost_per_hour",
            "static_node[0].type: no node_type named \"huge\"",
            "node_type[0].start[3]: unknown placeholder",
            "static_node[0].name: \"small-7\" is reserved",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let no_pool = GOOD.replace("addresses = [\"10.0.0.2\"]", "");
        let e = MachineManagerConfig::parse(&no_pool)
            .unwrap_err()
            .to_string();
        assert!(e.contains("node_type[0].start[3]: uses {addr}"), "{e}");
    }
}
