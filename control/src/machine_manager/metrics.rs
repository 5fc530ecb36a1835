//! A few counters and gauges, served as Prometheus text on `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Named counters (`name` or `name{label="v"}`) and gauges.
#[derive(Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<String, f64>>,
}

impl Metrics {
    /// Adds one to `name`.
    pub fn inc(&self, name: &str) {
        if let Ok(mut m) = self.values.lock() {
            *m.entry(name.to_string()).or_insert(0.0) += 1.0;
        }
    }

    /// Sets gauge `name`.
    pub fn set(&self, name: &str, v: f64) {
        if let Ok(mut m) = self.values.lock() {
            m.insert(name.to_string(), v);
        }
    }

    /// The current value of `name` (0 if never touched).
    pub fn get(&self, name: &str) -> f64 {
        self.values
            .lock()
            .ok()
            .and_then(|m| m.get(name).copied())
            .unwrap_or(0.0)
    }

    /// Prometheus text exposition.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if let Ok(m) = self.values.lock() {
            for (k, v) in m.iter() {
                out.push_str(&format!("{k} {v}\n"));
            }
        }
        out
    }
}
