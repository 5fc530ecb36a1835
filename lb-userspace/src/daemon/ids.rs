//! Backend ids: slots of the `BACKENDS` array.
//!
//! - **Stable.** A backend keeps its id while it exists: per service, one id
//!   per backend address (`ip:port`). Two instance ids with the same address
//!   share it; an instance that moves to a new address gets a new id (flows
//!   pinned to the old address must not follow it there).
//! - **Retired, then quarantined.** A backend that is gone (its address left
//!   the service: unregistered, or moved) is written with flags 0: flows
//!   still pinned to it re-select on their next packet (`ct_reselect`). Its id
//!   is reused only after a quarantine (see [`quarantine_for`]), and only
//!   when no never-used id is left, oldest retired first. Until then a
//!   lingering connection-table entry pointing at the id keeps meaning "gone"
//!   instead of silently landing on whichever backend got the id next (and
//!   the id's counters are not mixed between two backends within that time).
//! - **Recovered.** After a restart on pinned maps ([`BackendIds::recovered`])
//!   the ids the kernel holds keep their meaning: in-use ids are never handed
//!   out, ids found retired (flags 0) start a fresh quarantine, and only
//!   empty slots are free.

use std::{
    collections::{BTreeSet, VecDeque},
    time::Duration,
};

use tokio::time::Instant;

/// The quarantine of a retired id: ten TTLs, at least a minute. A flow can
/// only still point at a retired id if it was idle since the retirement
/// (TCP entries age out by LRU, UDP ones re-select after their idle
/// timeout); after a minute such a flow is dead in practice, and with the
/// default `max_backends` (4096) ids run out long after that anyway.
pub fn quarantine_for(ttl: Duration) -> Duration {
    ttl.saturating_mul(10).max(Duration::from_secs(60))
}

/// Allocates and recycles backend ids in `0..max`.
#[derive(Debug)]
pub struct BackendIds {
    max: u32,
    /// Ids `next..max` were never used.
    next: u32,
    /// Empty ids below `next` (found so after a restart), lowest first.
    free: BTreeSet<u32>,
    /// Retired ids with the time they may be reused, oldest first.
    quarantine: VecDeque<(u32, Instant)>,
    quarantine_for: Duration,
}

impl BackendIds {
    /// Ids `0..max`, retired ones reusable after `quarantine_for`.
    pub fn new(max: u32, quarantine_for: Duration) -> Self {
        BackendIds {
            max,
            next: 0,
            free: BTreeSet::new(),
            quarantine: VecDeque::new(),
            quarantine_for,
        }
    }

    /// Ids `0..max` as an earlier run left them: `in_use` are taken,
    /// `retired` are quarantined from `now` (a lingering flow may still
    /// point at them), every other id is free.
    pub fn recovered(
        max: u32,
        quarantine_for: Duration,
        in_use: &BTreeSet<u32>,
        retired: &BTreeSet<u32>,
        now: Instant,
    ) -> Self {
        let next = in_use
            .iter()
            .chain(retired)
            .filter(|&&id| id < max)
            .max()
            .map_or(0, |&m| m + 1);
        BackendIds {
            max,
            next,
            free: (0..next)
                .filter(|id| !in_use.contains(id) && !retired.contains(id))
                .collect(),
            quarantine: retired
                .iter()
                .filter(|&&id| id < max)
                .map(|&id| (id, now + quarantine_for))
                .collect(),
            quarantine_for,
        }
    }

    /// A free id: a never-used one if any, else the oldest retired one whose
    /// quarantine is over. `None` when every id is in use or quarantined.
    pub fn allocate(&mut self, now: Instant) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        if self.next < self.max {
            self.next += 1;
            return Some(self.next - 1);
        }
        match self.quarantine.front() {
            Some(&(id, at)) if at <= now => {
                self.quarantine.pop_front();
                Some(id)
            }
            _ => None,
        }
    }

    /// Gives `id` back; it is reused no earlier than the quarantine after `now`.
    pub fn retire(&mut self, id: u32, now: Instant) {
        self.quarantine.push_back((id, now + self.quarantine_for));
    }

    /// Ids in quarantine.
    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    /// Ids never used so far.
    pub fn never_used(&self) -> u32 {
        self.max - self.next + self.free.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_first_then_quarantined_oldest_first() {
        let t0 = Instant::now();
        let q = Duration::from_secs(60);
        let mut ids = BackendIds::new(3, q);
        assert_eq!(ids.allocate(t0), Some(0));
        assert_eq!(ids.allocate(t0), Some(1));
        ids.retire(1, t0);
        ids.retire(0, t0 + Duration::from_secs(1));
        // A never-used id before any retired one.
        assert_eq!(ids.allocate(t0), Some(2));
        // Exhausted; retired ones are still in quarantine.
        assert_eq!(ids.allocate(t0 + Duration::from_secs(59)), None);
        assert_eq!(ids.allocate(t0 + q), Some(1));
        assert_eq!(ids.allocate(t0 + q), None);
        assert_eq!(ids.allocate(t0 + q + Duration::from_secs(1)), Some(0));
        assert_eq!(ids.quarantined(), 0);
        assert_eq!(ids.never_used(), 0);
    }

    #[test]
    fn recovered_ids_keep_their_meaning() {
        let t0 = Instant::now();
        let q = Duration::from_secs(60);
        let in_use = BTreeSet::from([1, 4]);
        let retired = BTreeSet::from([2]);
        let mut ids = BackendIds::recovered(6, q, &in_use, &retired, t0);
        assert_eq!(ids.quarantined(), 1);
        assert_eq!(ids.never_used(), 3, "0, 3 and 5 are free");
        // Empty slots first, never an id in use, the retired one only
        // after its quarantine.
        assert_eq!(ids.allocate(t0), Some(0));
        assert_eq!(ids.allocate(t0), Some(3));
        assert_eq!(ids.allocate(t0), Some(5));
        assert_eq!(ids.allocate(t0 + Duration::from_secs(59)), None);
        assert_eq!(ids.allocate(t0 + q), Some(2));
        assert_eq!(ids.allocate(t0 + q), None);
    }

    #[test]
    fn quarantine_is_ten_ttls_at_least_a_minute() {
        assert_eq!(
            quarantine_for(Duration::from_secs(2)),
            Duration::from_secs(60)
        );
        assert_eq!(
            quarantine_for(Duration::from_secs(30)),
            Duration::from_secs(300)
        );
    }
}
