//! The node load report: what a node's agent sends the machine-manager
//! every interval (paper §3.1, "load transmitter"). Shared by the sender
//! (`agent`) and the receiver (`machine_manager`) so the two cannot drift.
//!
//! Transport: `POST {NODE_REPORT_PATH}` with this struct as a JSON body,
//! SigV4-signed by the node's own principal (`node-<name>`, see
//! [`node_principal`]); the machine-manager answers 204, or 4xx with a reason.

use serde::{Deserialize, Serialize};

/// Path the machine-manager accepts node reports on.
pub const NODE_REPORT_PATH: &str = "/v1/node-reports";

/// SigV4 service name used in the credential scope of node reports.
pub const NODE_REPORT_SERVICE: &str = "machine-manager";

/// The principal a node signs its reports with (`node-<name>`: principal
/// names are `[A-Za-z0-9._-]`, keystore::valid_name).
pub fn node_principal(node: &str) -> String {
    format!("node-{node}")
}

/// One node's resource use at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    /// Node name as registered with the machine-manager.
    pub node: String,
    /// When it was measured, ms since the Unix epoch (sender's clock).
    pub ts_ms: i64,
    /// CPU busy over the last interval, all cores, 0–100.
    pub cpu_pct: f64,
    /// Memory in use (MemTotal − MemAvailable), bytes.
    pub mem_used_bytes: u64,
    /// MemTotal, bytes.
    pub mem_total_bytes: u64,
    /// Received bytes/s over the last interval, all non-loopback interfaces.
    pub net_rx_bps: f64,
    /// Transmitted bytes/s over the last interval, all non-loopback interfaces.
    pub net_tx_bps: f64,
    /// Used bytes of the filesystem holding the agent's data directory.
    pub disk_used_bytes: u64,
    /// Size of that filesystem, bytes.
    pub disk_total_bytes: u64,
}

impl NodeReport {
    /// Checks the values a receiver must not store: empty node name,
    /// percentages outside 0–100, negative or non-finite rates, used > total.
    pub fn validate(&self) -> Result<(), String> {
        if self.node.is_empty() || self.node.len() > 64 {
            return Err("node: must be 1 to 64 characters".into());
        }
        if !(self.cpu_pct.is_finite() && (0.0..=100.0).contains(&self.cpu_pct)) {
            return Err(format!("cpu_pct: {} is not within 0–100", self.cpu_pct));
        }
        for (name, v) in [
            ("net_rx_bps", self.net_rx_bps),
            ("net_tx_bps", self.net_tx_bps),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name}: {v} is not a finite rate ≥ 0"));
            }
        }
        if self.mem_used_bytes > self.mem_total_bytes {
            return Err("mem_used_bytes: exceeds mem_total_bytes".into());
        }
        if self.disk_used_bytes > self.disk_total_bytes {
            return Err("disk_used_bytes: exceeds disk_total_bytes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> NodeReport {
        NodeReport {
            node: "n1".into(),
            ts_ms: 1,
            cpu_pct: 12.5,
            mem_used_bytes: 1,
            mem_total_bytes: 2,
            net_rx_bps: 0.0,
            net_tx_bps: 3.0,
            disk_used_bytes: 4,
            disk_total_bytes: 5,
        }
    }

    #[test]
    fn json_round_trip_and_unknown_fields_refused() {
        let r = report();
        let json = serde_json::to_string(&r).expect("serialise");
        assert_eq!(serde_json::from_str::<NodeReport>(&json).expect("parse"), r);
        let extra = json.replacen('{', "{\"gpu\":1,", 1);
        let err = serde_json::from_str::<NodeReport>(&extra).expect_err("unknown field");
        assert!(err.to_string().contains("gpu"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert_eq!(report().validate(), Ok(()));
        let mut r = report();
        r.cpu_pct = 101.0;
        assert!(r.validate().unwrap_err().starts_with("cpu_pct"));
        let mut r = report();
        r.net_rx_bps = f64::NAN;
        assert!(r.validate().unwrap_err().starts_with("net_rx_bps"));
        let mut r = report();
        r.disk_used_bytes = 9;
        assert!(r.validate().unwrap_err().starts_with("disk_used_bytes"));
        let mut r = report();
        r.node.clear();
        assert!(r.validate().unwrap_err().starts_with("node"));
    }
}
