//! Placement: where a service instance should run, as a pure function of
//! the config, the registry and the request.
//!
//! Rule (docs/MACHINE_MANAGER.md):
//! 1. Candidates: `ready` nodes with a report newer than `report_stale_ms`
//!    that match the requirements (`node_type`, `node` name, every label).
//!    A node's labels are its type's labels plus its static labels plus
//!    `type=<type>` and `disk_kind=<kind>`.
//! 2. Free capacity: `cpu − max(committed cpu, measured cpu)`, likewise for
//!    RAM, where committed = Σ of its placements and measured = latest
//!    report (`cpu_pct` × cores, `mem_used_bytes`). A node fits if both
//!    free amounts cover the need.
//! 3. Best fit: the fitting node with the least capacity left after the
//!    placement (sum of CPU and RAM leftovers, each as a fraction of the
//!    node's size); ties by name.
//! 4. None fits: a matching `starting` node whose size minus its
//!    placements covers the need → "starting", retry later (no second start).
//! 5. Else start the cheapest matching type whose size covers the need,
//!    within its `max_count` and the monthly cost limit; if every fitting
//!    type is refused, the cheapest one's reason is given.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::{MachineManagerConfig, NodeType};
use super::costs::{dollars, monthly_cost, projected_monthly, running_count};
use super::registry::{NodeState, NodeView};

/// Constraints on where an instance may run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Only nodes of this type.
    #[serde(default)]
    pub node_type: Option<String>,
    /// Only this node.
    #[serde(default)]
    pub node: Option<String>,
    /// Only nodes carrying all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `POST /v1/placements` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementRequest {
    /// The service asking.
    pub service: String,
    /// Where it may run.
    #[serde(default)]
    pub requirements: Requirements,
    /// CPU cores needed.
    pub cpu: f64,
    /// Memory needed, MiB.
    pub ram_mib: u64,
}

impl PlacementRequest {
    /// Checks values serde cannot: the field named in the error.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::keystore::valid_name(&self.service) {
            return Err("service: must match [A-Za-z0-9._-]{1,64}".into());
        }
        if !(self.cpu.is_finite() && self.cpu >= 0.0) {
            return Err("cpu: must be a finite number ≥ 0".into());
        }
        Ok(())
    }
}

/// Why a placement was refused.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Refusal {
    /// HTTP status: 409 (limits, no room) or 422 (nothing could ever fit).
    pub status: u16,
    /// Stable reason code (also the metric label).
    pub code: &'static str,
    /// Human-readable reason with the numbers.
    pub reason: String,
}

/// What to do with a placement request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Place on this ready node.
    Place {
        /// Node name.
        node: String,
        /// Its address.
        address: String,
    },
    /// A node that will fit is starting: retry.
    Wait {
        /// The starting node.
        node: String,
    },
    /// Start a node of this type.
    Start {
        /// The node type.
        node_type: String,
    },
    /// Refused.
    Refuse(Refusal),
}

/// A node's labels as matched by requirements.
pub fn node_labels(cfg: &MachineManagerConfig, n: &NodeView) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    if let Some(t) = cfg.node_type(&n.record.node_type) {
        l.extend(t.labels.clone());
        l.insert("disk_kind".into(), t.disk_kind.clone());
    }
    if let Some(s) = cfg.static_node(&n.record.name) {
        l.extend(s.labels.clone());
    }
    l.insert("type".into(), n.record.node_type.clone());
    l
}

fn type_labels(t: &NodeType) -> BTreeMap<String, String> {
    let mut l = t.labels.clone();
    l.insert("disk_kind".into(), t.disk_kind.clone());
    l.insert("type".into(), t.name.clone());
    l
}

fn labels_match(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

fn matches(cfg: &MachineManagerConfig, req: &Requirements, n: &NodeView) -> bool {
    req.node.as_ref().is_none_or(|x| *x == n.record.name)
        && req
            .node_type
            .as_ref()
            .is_none_or(|t| *t == n.record.node_type)
        && labels_match(&req.labels, &node_labels(cfg, n))
}

/// Free (cpu, ram MiB) of a node: size − max(committed, measured).
pub fn free_capacity(t: &NodeType, n: &NodeView) -> (f64, f64) {
    let committed_cpu: f64 = n.placements.iter().map(|p| p.cpu).sum();
    let committed_ram: f64 = n.placements.iter().map(|p| p.ram_mib as f64).sum();
    let (used_cpu, used_ram) = n.latest.as_ref().map_or((0.0, 0.0), |r| {
        (
            t.cpu * r.cpu_pct / 100.0,
            r.mem_used_bytes as f64 / (1024.0 * 1024.0),
        )
    });
    (
        t.cpu - committed_cpu.max(used_cpu),
        t.ram_mib as f64 - committed_ram.max(used_ram),
    )
}

/// Decides a placement (rule in the module doc). `now_ms` judges report age.
pub fn decide(
    cfg: &MachineManagerConfig,
    nodes: &[NodeView],
    req: &PlacementRequest,
    now_ms: i64,
) -> Decision {
    let need_cpu = req.cpu;
    let need_ram = req.ram_mib as f64;
    let r = &req.requirements;
    let mut best: Option<(f64, &NodeView)> = None;
    for n in nodes.iter().filter(|n| matches(cfg, r, n)) {
        let Some(t) = cfg.node_type(&n.record.node_type) else {
            continue;
        };
        let fresh = n
            .record
            .last_report_ms
            .is_some_and(|at| now_ms - at <= cfg.report_stale_ms as i64);
        if n.record.state != NodeState::Ready || !fresh {
            continue;
        }
        let (fc, fr) = free_capacity(t, n);
        if fc + 1e-9 < need_cpu || fr + 1e-9 < need_ram {
            continue;
        }
        let left = (fc - need_cpu) / t.cpu + (fr - need_ram) / t.ram_mib as f64;
        let better = match best {
            None => true,
            Some((b, bn)) => {
                left < b - 1e-12 || (left <= b + 1e-12 && n.record.name < bn.record.name)
            }
        };
        if better {
            best = Some((left, n));
        }
    }
    if let Some((_, n)) = best {
        return Decision::Place {
            node: n.record.name.clone(),
            address: n.record.address.clone(),
        };
    }
    // A starting node that will have room: wait for it, start nothing.
    for n in nodes
        .iter()
        .filter(|n| n.record.state == NodeState::Starting && matches(cfg, r, n))
    {
        if let Some(t) = cfg.node_type(&n.record.node_type) {
            let committed_cpu: f64 = n.placements.iter().map(|p| p.cpu).sum();
            let committed_ram: u64 = n.placements.iter().map(|p| p.ram_mib).sum();
            if t.cpu - committed_cpu + 1e-9 >= need_cpu
                && t.ram_mib.saturating_sub(committed_ram) >= req.ram_mib
            {
                return Decision::Wait {
                    node: n.record.name.clone(),
                };
            }
        }
    }
    if let Some(name) = &r.node {
        let known = nodes.iter().any(|n| n.record.name == *name);
        return Decision::Refuse(Refusal {
            status: 409,
            code: if known { "node_full" } else { "no_such_node" },
            reason: if known {
                format!(
                    "node {name} is not ready or has no room for cpu {need_cpu} / ram {} MiB",
                    req.ram_mib
                )
            } else {
                format!("node {name} is not registered")
            },
        });
    }
    let mut types: Vec<&NodeType> = cfg
        .node_types
        .iter()
        .filter(|t| r.node_type.as_ref().is_none_or(|x| *x == t.name))
        .filter(|t| labels_match(&r.labels, &type_labels(t)))
        .filter(|t| t.cpu + 1e-9 >= need_cpu && t.ram_mib >= req.ram_mib)
        .collect();
    if types.is_empty() {
        return Decision::Refuse(Refusal {
            status: 422,
            code: "no_type_fits",
            reason: format!(
                "no node type fits cpu {need_cpu} / ram {} MiB with the requirements",
                req.ram_mib
            ),
        });
    }
    types.sort_by(|a, b| {
        a.cost_per_hour
            .total_cmp(&b.cost_per_hour)
            .then_with(|| a.name.cmp(&b.name))
    });
    let spend = projected_monthly(cfg, nodes);
    let mut first_refusal = None;
    for t in types {
        let count = running_count(nodes, &t.name);
        let refusal = if count >= t.max_count {
            Some(Refusal {
                status: 409,
                code: "max_count",
                reason: format!(
                    "max count reached for type {}: {count}/{}",
                    t.name, t.max_count
                ),
            })
        } else {
            let after = spend + monthly_cost(cfg, &t.name);
            (after > cfg.monthly_cost_limit + 1e-9).then(|| Refusal {
                status: 409,
                code: "monthly_cost_limit",
                reason: format!(
                    "starting a {} node: projected monthly spend would be {} > limit {}",
                    t.name,
                    dollars(after),
                    dollars(cfg.monthly_cost_limit)
                ),
            })
        };
        match refusal {
            None => {
                return Decision::Start {
                    node_type: t.name.clone(),
                }
            }
            Some(x) => {
                first_refusal.get_or_insert(x);
            }
        }
    }
    Decision::Refuse(first_refusal.unwrap_or(Refusal {
        status: 409,
        code: "no_capacity",
        reason: "no node can be started".into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::super::registry::{NodeRecord, Placement};
    use super::*;
    use crate::node_report::NodeReport;

    fn cfg() -> MachineManagerConfig {
        MachineManagerConfig::parse(
            r#"
listen = "127.0.0.1:0"
redis = "redis://127.0.0.1:1"
monthly_cost_limit = 100.0
[[node_type]]
name = "big"
cpu = 8
ram_mib = 16384
disk_gib = 100
disk_kind = "nvme"
cost_per_hour = 0.10
start = ["p"]
stop = ["p"]
max_count = 1
[[node_type]]
name = "small"
cpu = 2
ram_mib = 2048
disk_gib = 20
disk_kind = "ssd"
cost_per_hour = 0.05
start = ["p"]
stop = ["p"]
max_count = 2
"#,
        )
        .unwrap()
    }

    fn node(
        name: &str,
        t: &str,
        state: NodeState,
        cpu_pct: f64,
        placed: &[(f64, u64)],
    ) -> NodeView {
        NodeView {
            record: NodeRecord {
                name: name.into(),
                node_type: t.into(),
                address: format!("addr-{name}"),
                is_static: false,
                state,
                started_at_ms: 0,
                state_since_ms: 0,
                last_report_ms: Some(1000),
                idle_since_ms: None,
                reason: None,
            },
            latest: Some(NodeReport {
                node: name.into(),
                ts_ms: 1000,
                cpu_pct,
                mem_used_bytes: 0,
                mem_total_bytes: 1,
                net_rx_bps: 0.0,
                net_tx_bps: 0.0,
                disk_used_bytes: 0,
                disk_total_bytes: 1,
            }),
            placements: placed
                .iter()
                .enumerate()
                .map(|(i, (c, r))| Placement {
                    id: format!("p{i}"),
                    service: "s".into(),
                    cpu: *c,
                    ram_mib: *r,
                    at_ms: 0,
                })
                .collect(),
        }
    }

    fn req(cpu: f64, ram_mib: u64) -> PlacementRequest {
        PlacementRequest {
            service: "api".into(),
            requirements: Requirements::default(),
            cpu,
            ram_mib,
        }
    }

    #[test]
    fn best_fit_takes_the_tightest_node() {
        let c = cfg();
        let nodes = vec![
            node("big-1", "big", NodeState::Ready, 0.0, &[]),
            node("small-1", "small", NodeState::Ready, 50.0, &[]),
            node("small-2", "small", NodeState::Ready, 0.0, &[]),
        ];
        // small-1 has 1 core free (50 % measured): tightest for 1 core.
        assert_eq!(
            decide(&c, &nodes, &req(1.0, 512), 1500),
            Decision::Place {
                node: "small-1".into(),
                address: "addr-small-1".into()
            }
        );
        // 1.5 cores: small-1 no longer fits, small-2 is tighter than big-1.
        assert!(
            matches!(decide(&c, &nodes, &req(1.5, 512), 1500), Decision::Place { node, .. } if node == "small-2")
        );
        // Committed placements count even when measured use is low.
        let nodes = vec![node(
            "small-1",
            "small",
            NodeState::Ready,
            0.0,
            &[(1.5, 100)],
        )];
        assert!(
            matches!(decide(&c, &nodes, &req(1.0, 100), 1500), Decision::Start { node_type } if node_type == "small")
        );
        // Stale reports make a node ineligible.
        let nodes = vec![node("small-1", "small", NodeState::Ready, 0.0, &[])];
        assert!(matches!(
            decide(&c, &nodes, &req(1.0, 100), 1000 + 31_000),
            Decision::Start { .. }
        ));
    }

    #[test]
    fn starts_cheapest_fitting_type_then_waits_for_it() {
        let c = cfg();
        assert_eq!(
            decide(&c, &[], &req(1.0, 1024), 0),
            Decision::Start {
                node_type: "small".into()
            }
        );
        assert_eq!(
            decide(&c, &[], &req(4.0, 1024), 0),
            Decision::Start {
                node_type: "big".into()
            }
        );
        let nodes = vec![node("small-1", "small", NodeState::Starting, 0.0, &[])];
        assert_eq!(
            decide(&c, &nodes, &req(1.0, 1024), 0),
            Decision::Wait {
                node: "small-1".into()
            }
        );
        match decide(&c, &[], &req(16.0, 1024), 0) {
            Decision::Refuse(r) => assert_eq!((r.status, r.code), (422, "no_type_fits")),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn limits_refuse_with_numbers() {
        let c = cfg();
        let nodes = vec![
            node("small-1", "small", NodeState::Ready, 100.0, &[]),
            node("small-2", "small", NodeState::Ready, 100.0, &[]),
        ];
        let mut r = req(1.0, 512);
        r.requirements.node_type = Some("small".into());
        match decide(&c, &nodes, &r, 1000) {
            Decision::Refuse(x) => {
                assert_eq!(x.code, "max_count");
                assert_eq!(x.reason, "max count reached for type small: 2/2");
            }
            d => panic!("{d:?}"),
        }
        // big costs 73/month; with two smalls (2 × 36.5) spend would be 146 > 100.
        match decide(&c, &nodes, &req(4.0, 512), 1000) {
            Decision::Refuse(x) => {
                assert_eq!(x.code, "monthly_cost_limit");
                assert!(x.reason.contains("$146.00 > limit $100.00"), "{}", x.reason);
            }
            d => panic!("{d:?}"),
        }
        // Stopped nodes cost nothing and do not count.
        let nodes = vec![node("small-1", "small", NodeState::Stopped, 0.0, &[])];
        assert!(
            matches!(decide(&c, &nodes, &req(4.0, 512), 1000), Decision::Start { node_type } if node_type == "big")
        );
    }

    #[test]
    fn labels_and_names_restrict() {
        let c = cfg();
        let nodes = vec![
            node("big-1", "big", NodeState::Ready, 0.0, &[]),
            node("small-1", "small", NodeState::Ready, 0.0, &[]),
        ];
        let mut r = req(1.0, 100);
        r.requirements
            .labels
            .insert("disk_kind".into(), "nvme".into());
        assert!(
            matches!(decide(&c, &nodes, &r, 1000), Decision::Place { node, .. } if node == "big-1")
        );
        let mut r = req(1.0, 100);
        r.requirements.node = Some("nope".into());
        assert!(
            matches!(decide(&c, &nodes, &r, 1000), Decision::Refuse(x) if x.code == "no_such_node")
        );
    }
}
