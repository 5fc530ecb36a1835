//! What the daemon knows about itself, for tests now and for the metrics
//! endpoint and `lb status` later: one snapshot, replaced after every
//! refresh (cheap to clone, never holds the lock across an await).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

/// Whether the scoreboard could be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// One backend of a service as the daemon last wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// The daemon's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
}

impl Status {
    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceStatus> {
        self.services.iter().find(|s| s.name == name)
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

    pub(crate) fn set(&self, s: Status) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = s;
    }
}
