//! What the daemon knows about itself, for tests, the metrics endpoint and
//! `lb status` (served as JSON by [`crate::admin`]): one snapshot, replaced
//! after every refresh (cheap to clone, never holds the lock across an await).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Whether the scoreboard could be read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RedisState {
    /// No read attempted yet (or no service follows the scoreboard).
    #[default]
    Unknown,
    /// The last read succeeded.
    Up,
    /// The last read failed; the tables stay as they are.
    Down {
        /// When the outage started (first failed read).
        since: SystemTime,
        /// The last error.
        error: String,
    },
}

/// Traffic counters of a service or backend, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (frame length as received).
    pub bytes: u64,
    /// Flows assigned (conntrack misses that selected this backend).
    pub new_flows: u64,
}

impl From<lb_common::Counters> for Traffic {
    fn from(c: lb_common::Counters) -> Self {
        Traffic {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        }
    }
}

/// One backend of a service as the daemon last wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Instance id (scoreboard) or address (static backend).
    pub instance: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Its backend id, if it has one (a draining instance that never was in
    /// a table has none).
    pub id: Option<u32>,
    /// Weight in the published table (0 for draining).
    pub weight: u32,
    /// What the formula gives now (differs within the dead-band).
    pub target: u32,
}

/// One service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Its group.
    pub group: String,
    /// Service id (index of its counters and table buffers).
    pub id: u32,
    /// The scoreboard service it follows; `None` for static backends.
    pub scoreboard: Option<String>,
    /// Tables published since the daemon started (0: none yet).
    pub generation: u64,
    /// No instance is fresh: the table is held as published.
    pub held: bool,
    /// The service's scoreboard data could not be used in the last read.
    pub malformed: Option<String>,
    /// A publication failed and is retried on the next refresh.
    pub publish_pending: bool,
    /// Scoreboard entries skipped as invalid in the last read.
    pub skipped_entries: usize,
    /// The table as published (kernel), by instance.
    pub table: Vec<BackendStatus>,
    /// Instances out of the table whose flows continue.
    pub draining: Vec<BackendStatus>,
    /// Build + swap time of the last publication.
    pub last_publish: Option<Duration>,
}

impl ServiceStatus {
    /// `(instance, share)` of the published table (`weight / Σ weight`).
    pub fn shares(&self) -> Vec<(String, f64)> {
        let sum: u64 = self.table.iter().map(|b| u64::from(b.weight)).sum();
        self.table
            .iter()
            .map(|b| {
                let s = if sum == 0 {
                    0.0
                } else {
                    f64::from(b.weight) / sum as f64
                };
                (b.instance.clone(), s)
            })
            .collect()
    }

    /// The published weight of `instance` (0 if not in the table).
    pub fn weight(&self, instance: &str) -> u32 {
        self.table
            .iter()
            .find(|b| b.instance == instance)
            .map_or(0, |b| b.weight)
    }

    /// Whether `instance` is draining.
    pub fn is_draining(&self, instance: &str) -> bool {
        self.draining.iter().any(|b| b.instance == instance)
    }
}

/// What the data path and the scoreboard say about one backend (kept next
/// to [`BackendStatus`], matched by instance).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendDetail {
    /// Instance id (scoreboard) or address (static backend).
    pub instance: String,
    /// Its backend id, if it has one.
    pub id: Option<u32>,
    /// Whether it is draining (out of the table, flows continue).
    pub draining: bool,
    /// The load it last reported (0–100); `None` for static backends.
    pub load: Option<f64>,
    /// The smoothed load its weight follows; `None` for static backends.
    pub smoothed_load: Option<f64>,
    /// Scoreboard time (ms since the Unix epoch) of its last report.
    pub last_report_ms: Option<i64>,
    /// Its data-path counters (zero without an id or if the read failed).
    pub traffic: Traffic,
    /// Slots it holds in the service's active table.
    pub slots: u64,
}

impl BackendDetail {
    /// Seconds from its last report to `now_ms` (scoreboard clock).
    pub fn report_age(&self, now_ms: i64) -> Option<f64> {
        self.last_report_ms
            .map(|t| now_ms.saturating_sub(t).max(0) as f64 / 1000.0)
    }
}

/// What the data path says about one service, and its VIP (kept next to
/// [`ServiceStatus`], same order).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceDetail {
    /// Service name.
    pub name: String,
    /// The VIP and port clients connect to.
    pub vip: Option<SocketAddr>,
    /// `tcp` or `udp`.
    pub proto: String,
    /// `nat` or `dsr`.
    pub mode: String,
    /// The service's data-path counters.
    pub traffic: Traffic,
    /// Slots (M) of its active table (0: none published).
    pub table_size: u64,
    /// Table members, then draining instances.
    pub backends: Vec<BackendDetail>,
}

impl ServiceDetail {
    /// The detail of `instance`.
    pub fn backend(&self, instance: &str) -> Option<&BackendDetail> {
        self.backends.iter().find(|b| b.instance == instance)
    }
}

/// A cumulative histogram of durations in seconds (Prometheus style: each
/// bucket counts observations `<=` its bound; `+Inf` is `count`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Upper bounds of the buckets, seconds, ascending.
    pub bounds: Vec<f64>,
    /// Observations `<=` each bound (same length as `bounds`).
    pub cumulative: Vec<u64>,
    /// Sum of all observations, seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

/// Bucket bounds of the refresh-latency histogram, seconds: a refresh is
/// one Redis round trip plus table builds (ms), up to a read timeout (s).
pub const REFRESH_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&REFRESH_BUCKETS)
    }
}

impl Histogram {
    /// An empty histogram with `bounds` (ascending, seconds).
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            cumulative: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Adds one observation.
    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(self.cumulative.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// The daemon's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The scoreboard's state.
    pub redis: RedisState,
    /// Successful scoreboard reads.
    pub reads_ok: u64,
    /// Failed scoreboard reads.
    pub reads_failed: u64,
    /// Refreshes done (read + apply).
    pub refreshes: u64,
    /// Duration of the last refresh (read, weights, publications).
    pub last_refresh: Option<Duration>,
    /// Backend ids in quarantine after retirement.
    pub ids_quarantined: usize,
    /// Backend ids never used so far.
    pub ids_free: u32,
    /// The data path's global counters, indexed by `lb_common::counter`
    /// (read at every status update; empty if the read failed).
    pub global: Vec<u64>,
    /// Every service, in config order.
    pub services: Vec<ServiceStatus>,
    /// Counters, loads and VIPs of every service, in config order (same
    /// order as `services`).
    #[serde(default)]
    pub details: Vec<ServiceDetail>,
    /// Durations of the refreshes (one observation per refresh).
    #[serde(default)]
    pub refresh_latency: Histogram,
    /// Scoreboard-clock time (ms since the Unix epoch) of this snapshot.
    #[serde(default)]
    pub taken_ms: i64,
}

impl Status {
    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceStatus> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The detail of the service called `name`.
    pub fn detail(&self, name: &str) -> Option<&ServiceDetail> {
        self.details.iter().find(|s| s.name == name)
    }

    /// Global counter `c` (`lb_common::counter::*`), 0 if unknown.
    pub fn counter(&self, c: u32) -> u64 {
        self.global.get(c as usize).copied().unwrap_or(0)
    }
}

/// A shared view of the daemon's [`Status`].
#[derive(Clone, Debug, Default)]
pub struct StatusHandle(Arc<Mutex<Status>>);

impl StatusHandle {
    /// A copy of the current status.
    pub fn get(&self) -> Status {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the snapshot with `s`, carrying the refresh histogram over
    /// and adding `s.last_refresh` to it when `s` counts a refresh the
    /// histogram has not seen yet (the status is also updated between
    /// refreshes).
    pub(crate) fn set_observing(&self, mut s: Status) {
        let mut cur = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut h = std::mem::take(&mut cur.refresh_latency);
        if s.refreshes > h.count {
            if let Some(d) = s.last_refresh {
                h.observe(d);
            }
        }
        s.refresh_latency = h;
        *cur = s;
    }
}
