//! Projected monthly spend and the cost-limit check.
//!
//! Rule: projected monthly spend = Σ `cost_per_hour` × 730 over every node
//! that is not `stopped` — started and static nodes alike (a static node
//! is billed too; give its type `cost_per_hour = 0` if it is owned
//! hardware). A node still `starting` or `stopping` counts: it is billed.

use super::config::{MachineManagerConfig, HOURS_PER_MONTH};
use super::registry::{NodeState, NodeView};

/// Monthly cost of one node of type `node_type` (0 for an unknown type).
pub fn monthly_cost(cfg: &MachineManagerConfig, node_type: &str) -> f64 {
    cfg.node_type(node_type)
        .map_or(0.0, |t| t.cost_per_hour * HOURS_PER_MONTH)
}

/// Projected monthly spend of the nodes that are not stopped.
pub fn projected_monthly(cfg: &MachineManagerConfig, nodes: &[NodeView]) -> f64 {
    nodes
        .iter()
        .filter(|n| n.record.state != NodeState::Stopped)
        .map(|n| monthly_cost(cfg, &n.record.node_type))
        .fold(0.0, |a, b| a + b)
}

/// Nodes of `node_type` that are not stopped.
pub fn running_count(nodes: &[NodeView], node_type: &str) -> u32 {
    nodes
        .iter()
        .filter(|n| n.record.state != NodeState::Stopped && n.record.node_type == node_type)
        .count() as u32
}

/// Formats money as `$12.34`.
pub fn dollars(x: f64) -> String {
    format!("${x:.2}")
}
