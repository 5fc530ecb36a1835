//! Load → weight: the policy that turns scoreboard snapshots into the
//! weights of a service's Maglev table. Pure and deterministic: the output
//! depends only on the [`Policy`], the sequence of snapshots and the `now`
//! values passed in (no clock, no randomness, no hash-map order).
//!
//! # The formula
//!
//! Loads are the services' own metric, `0..=100`. Knobs, with their
//! defaults: `floor` = 5, `alpha` = 0.5, `dead_band` = 0.05, `ttl` = 5 s,
//! `ramp_up` = 10 s, `ramp_from` = 0.1.
//!
//! 1. **Headroom with a floor**: `h(load) = max(100 − load, floor)`, in load
//!    points. The floor keeps a trickle of new flows on a fully loaded
//!    instance (so its metric keeps meaning something and it recovers).
//! 2. **EWMA, once per report**: when an instance enters the table,
//!    `s = h(load)`. On each later *new* report (its `:seen` time differs from
//!    the one last applied), `s ← s + alpha · (h(load) − s)`. Reading the same
//!    report again changes nothing, so smoothing is per report, independent
//!    of the refresh interval: after `n` reports of a new load, `s` is within
//!    `(1 − alpha)^n` of the way from the old value to `h`.
//! 3. **Ramp-up**: an instance that enters the table after the policy's
//!    first update (a new instance, or one coming back from draining) gets
//!    the factor `r = ramp_from + (1 − ramp_from) · min(1, (now − t0) / ramp_up)`,
//!    `t0` the update at which it entered; `r = 1` otherwise and when
//!    `ramp_up` is 0. Instances present at the first update (daemon start)
//!    and instances entering while the table is [held](#staleness-and-the-held-table)
//!    are not ramped: the policy cannot tell that they are new.
//! 4. **Integer weight**: `w = clamp(round(100 · s · r), 1, 10000)`
//!    ([`WEIGHT_SCALE`] = 10000 is full headroom, load 0).
//! 5. **Shares**: `share_i = w_i / Σ_j w_j` over the instances in the table.
//!    Weighted Maglev gives each backend `M · share_i` slots to within one
//!    slot, so for many flows with well-spread hashes that is also its share
//!    of new flows.
//! 6. **Dead-band**: the table is rebuilt only if its membership changes (an
//!    instance enters, leaves, is drained or undrained, or changes address)
//!    or if some instance's share moves by more than `dead_band` relative to
//!    its share in the published table: `|share_new − share_pub| >
//!    dead_band · share_pub`. On a rebuild every weight is republished; between
//!    rebuilds the published weights stay as they were, and slow drift
//!    accumulates against them until it crosses the band (no ratchet). Shares,
//!    not raw weights, are compared because a uniform change of all weights
//!    (every load rising together) leaves the table identical.
//!
//! Worked example with the defaults: loads 20 / 50 / 80 give `h` = 80 / 50 /
//! 20, weights 8000 / 5000 / 2000, shares 8000/15000 = 53.33 %, 33.33 %,
//! 13.33 %. A load of 97 (or 100) gives `h = 5`, weight 500.
//!
//! # Staleness
//!
//! An instance is **fresh** at `now` if its `:seen` time is within `ttl` of
//! `now` (`|now − seen| ≤ ttl`: a report more than `ttl` in the future is as
//! stale as one more than `ttl` in the past, so a skewed clock cannot keep a
//! dead instance in the table). An instance in the table stays in it, with
//! its last smoothed weight, until `ttl` after its last fresh report, even if
//! its load, its time or both are missing or malformed in the meantime: a
//! missing report never zeroes a weight by itself before the TTL. After that
//! it is **draining**: weight 0, out of new tables, but listed in
//! [`Decision::draining`] so the daemon keeps its backend entry active and
//! its existing flows continue. A draining instance that reports again
//! re-enters as a new one (smoothing restarts from `h(load)`, ramp-up
//! applies). An instance with an address but no fresh report that was never
//! in the table is draining too (after a daemon restart, pinned flows may
//! point at it). An instance without an address (unregistered, or never
//! registered) is not a backend: it is removed. An instance marked in the
//! scoreboard's `:drain` set (scale-in by the container-manager) is draining
//! at once, whatever it reports, until the mark or its address goes; if that
//! would leave no instance in the table, the table is held instead (below).
//!
//! # Staleness and the held table
//!
//! If no instance of a service is fresh, the policy never answers with an
//! empty table: [`Decision::held`] is set, `rebuild` is false and
//! [`Decision::weights`] is the last published table, unchanged (empty if
//! nothing was published yet: the daemon keeps whatever table it has,
//! including one pinned before a restart). All instances going stale together
//! is far more likely a failure of the reporting path (load-receiver down,
//! Redis emptied, the balancer's clock) than every backend dying, and an
//! empty table would drop every new flow; the scoreboard says nothing about
//! liveness. When some instance is fresh again, the held instances that are
//! still registered get a grace of `ttl` from that moment (reports resume
//! unevenly, and the first instance back must not take every new flow), and
//! no one is ramped.
//!
//! The same grace applies after a **blind gap**: if `update` was not called
//! for more than `ttl` (the daemon calls it only with successful reads, so a
//! Redis outage is such a gap), every instance in the table gets `ttl` from
//! that update, and no one is ramped. Reports that expired while the
//! scoreboard could not be read were never seen to expire; an instance that
//! does not report again is drained `ttl` after the gap.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use crate::scoreboard::{Address, ServiceSnapshot};

/// The weight of an instance at full headroom (load 0, no ramp).
pub const WEIGHT_SCALE: u32 = 10_000;

/// The knobs of the formula (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Minimum headroom in load points, `(0, 100]`. Default 5.
    pub floor: f64,
    /// EWMA factor applied per new report, `(0, 1]` (1 = no smoothing).
    /// Default 0.5.
    pub alpha: f64,
    /// Relative share change that rebuilds the table, `[0, 1)` (0 = any
    /// change). Default 0.05.
    pub dead_band: f64,
    /// Staleness limit of the last report, > 0. Default 5 s.
    pub ttl: Duration,
    /// Ramp-up duration of a new instance (0 = none). Default 10 s.
    pub ramp_up: Duration,
    /// Fraction of its weight a new instance starts the ramp with, `(0, 1]`.
    /// Default 0.1.
    pub ramp_from: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            floor: 5.0,
            alpha: 0.5,
            dead_band: 0.05,
            ttl: Duration::from_secs(5),
            ramp_up: Duration::from_secs(10),
            ramp_from: 0.1,
        }
    }
}

/// An invalid knob: its name and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The knob (`floor`, `alpha`, `dead_band`, `ttl`, `ramp_up`, `ramp_from`).
    pub field: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Policy {
    /// Checks every knob's range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field, reason: String| Err(PolicyError { field, reason });
        if !(self.floor > 0.0 && self.floor <= 100.0) {
            return bad("floor", format!("{} is not in (0, 100]", self.floor));
        }
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return bad("alpha", format!("{} is not in (0, 1]", self.alpha));
        }
        if !(self.dead_band >= 0.0 && self.dead_band < 1.0) {
            return bad("dead_band", format!("{} is not in [0, 1)", self.dead_band));
        }
        if self.ttl.is_zero() || self.ttl > Duration::from_secs(86_400) {
            return bad("ttl", format!("{:?} is not in (0, 1 day]", self.ttl));
        }
        if self.ramp_up > Duration::from_secs(86_400) {
            return bad("ramp_up", format!("{:?} is over 1 day", self.ramp_up));
        }
        if !(self.ramp_from > 0.0 && self.ramp_from <= 1.0) {
            return bad("ramp_from", format!("{} is not in (0, 1]", self.ramp_from));
        }
        Ok(())
    }

    /// `max(100 − load, floor)`, load clamped to `0..=100`.
    pub fn headroom(&self, load: f64) -> f64 {
        (100.0 - load.clamp(0.0, 100.0)).max(self.floor)
    }

    /// The steady-state weight of an instance reporting `load` (no ramp).
    pub fn target_weight(&self, load: f64) -> u32 {
        to_weight(self.headroom(load))
    }

    /// Whether a report made at `seen_ms` is fresh at `now_ms`.
    pub fn is_fresh(&self, seen_ms: i64, now_ms: i64) -> bool {
        now_ms.abs_diff(seen_ms) <= self.ttl.as_millis() as u64
    }

    fn ramp_factor(&self, start_ms: Option<i64>, now_ms: i64) -> f64 {
        match start_ms {
            Some(t0) if !self.ramp_up.is_zero() => {
                let done = ((now_ms - t0).max(0) as f64 / ms(self.ramp_up) as f64).min(1.0);
                self.ramp_from + (1.0 - self.ramp_from) * done
            }
            _ => 1.0,
        }
    }
}

/// Smoothed headroom × ramp factor (load points) → integer weight.
pub fn to_weight(points: f64) -> u32 {
    let w = (points * (WEIGHT_SCALE as f64) / 100.0).round();
    (w.clamp(1.0, WEIGHT_SCALE as f64)) as u32
}

/// `share_i = w_i / Σw` (all zero if the sum is zero).
pub fn shares(weights: &[u32]) -> Vec<f64> {
    let sum: u64 = weights.iter().map(|&w| w as u64).sum();
    weights
        .iter()
        .map(|&w| if sum == 0 { 0.0 } else { w as f64 / sum as f64 })
        .collect()
}

/// What the policy remembers of an instance in the table.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceState {
    /// Its address (from the last snapshot that had one).
    pub addr: Address,
    /// The load of the last applied report.
    pub load: f64,
    /// EWMA of the headroom, load points, `floor..=100`.
    pub smoothed: f64,
    /// `:seen` of the last applied report (a different value is a new report).
    pub last_seen_ms: i64,
    /// In the table until this time (last fresh report + ttl, or a grace).
    pub fresh_until_ms: i64,
    /// When it (last) entered the table.
    pub entered_ms: i64,
    /// Start of its ramp-up; `None` when not (or no longer) ramping.
    pub ramp_start_ms: Option<i64>,
    /// Its current target weight (what a rebuild would publish).
    pub target: u32,
}

/// One backend of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weighted {
    /// Instance id.
    pub instance: String,
    /// Its address.
    pub addr: Address,
    /// The weight in the published table (what Maglev gets), `1..=10000`.
    pub weight: u32,
    /// The weight the formula gives now (differs from `weight` within the
    /// dead-band, or for a held stale instance: equal to `weight`).
    pub target: u32,
}

/// An instance out of the table whose backend entry stays active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drained {
    /// Instance id.
    pub instance: String,
    /// Its address.
    pub addr: Address,
}

/// Why a table is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildReason {
    /// An instance entered or left the table (new, removed, drained, undrained).
    Membership,
    /// Same instances, but an address changed.
    Address,
    /// Some share moved by more than the dead-band.
    Weights,
}

/// The outcome of one update.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The table: every instance in it with its published weight, by id.
    /// Held or not rebuilt: the table as last published.
    pub weights: Vec<Weighted>,
    /// Registered instances not in the table, by id: weight 0, no new flows,
    /// backend entry kept active so their flows continue.
    pub draining: Vec<Drained>,
    /// Instances in the previous decision (table or draining) that are in
    /// neither now (unregistered): their backend entries can go.
    pub removed: Vec<String>,
    /// Publish `weights` as a new table. Never true with an empty table.
    pub rebuild: bool,
    /// Why, when `rebuild`.
    pub reason: Option<RebuildReason>,
    /// No instance is fresh: keep the current table (see the module docs).
    pub held: bool,
}

impl Decision {
    /// `(instance, share)` of the table, `share = weight / Σ weight`.
    pub fn shares(&self) -> Vec<(&str, f64)> {
        let s = shares(&self.weights.iter().map(|w| w.weight).collect::<Vec<_>>());
        self.weights
            .iter()
            .zip(s)
            .map(|(w, s)| (w.instance.as_str(), s))
            .collect()
    }
}

/// The policy's state for one service. Feed it every snapshot of the
/// service with [`ServiceWeights::update`].
#[derive(Debug, Clone)]
pub struct ServiceWeights {
    policy: Policy,
    states: BTreeMap<String, InstanceState>,
    /// The published table: instance → (address, weight).
    table: BTreeMap<String, (Address, u32)>,
    /// Table ∪ draining of the last decision.
    known: BTreeSet<String>,
    initialized: bool,
    holding: bool,
    /// `now` of the previous update.
    last_update_ms: Option<i64>,
}

impl ServiceWeights {
    /// Fresh state. `policy` should have passed [`Policy::validate`].
    pub fn new(policy: Policy) -> Self {
        ServiceWeights {
            policy,
            states: BTreeMap::new(),
            table: BTreeMap::new(),
            known: BTreeSet::new(),
            initialized: false,
            holding: false,
            last_update_ms: None,
        }
    }

    /// The knobs.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The state of an instance in the table.
    pub fn state(&self, instance: &str) -> Option<&InstanceState> {
        self.states.get(instance)
    }

    /// True while the table is held (no fresh instance).
    pub fn is_held(&self) -> bool {
        self.holding
    }

    /// Folds one snapshot of the service, read at `now_ms` (ms since the
    /// epoch, the balancer's clock), into the state and says what the table
    /// should be.
    pub fn update(&mut self, snap: &ServiceSnapshot, now_ms: i64) -> Decision {
        let p = self.policy;
        let ttl = ms(p.ttl);
        // Instances arriving now are not ramped at the first update and when
        // leaving a hold: they are not known to be new.
        // Blind gap: no update for more than the TTL (the scoreboard could not
        // be read). Reports that expired meanwhile were not seen to expire:
        // every instance in the table gets a grace of `ttl` from now, like
        // when leaving a hold, and instances arriving now are not ramped.
        let blind = self
            .last_update_ms
            .is_some_and(|last| now_ms.saturating_sub(last) > ttl);
        self.last_update_ms = Some(now_ms);
        if blind && !self.holding {
            for st in self.states.values_mut() {
                st.fresh_until_ms = st.fresh_until_ms.max(now_ms.saturating_add(ttl));
            }
        }
        let no_ramp = !self.initialized || self.holding || blind || p.ramp_up.is_zero();
        self.initialized = true;

        // 1. Fold the reports into the state of every registered instance.
        let mut registered: BTreeMap<&str, &Address> = BTreeMap::new();
        for (id, e) in &snap.instances {
            let Some(addr) = &e.addr else { continue };
            registered.insert(id.as_str(), addr);
            if e.drain {
                // Marked for draining (scale-in): out of the table whatever
                // it reports; unmarked, it re-enters as a new instance.
                self.states.remove(id.as_str());
                continue;
            }
            let sample = match (e.load, e.seen_ms) {
                (Some(l), Some(s)) if p.is_fresh(s, now_ms) => Some((l, s)),
                _ => None,
            };
            // Some(true): in the table and within its TTL.
            let state = self
                .states
                .get(id.as_str())
                .map(|st| now_ms <= st.fresh_until_ms);
            match (state, sample) {
                (Some(true), Some((load, seen))) => {
                    if let Some(st) = self.states.get_mut(id.as_str()) {
                        if seen != st.last_seen_ms {
                            st.smoothed += p.alpha * (p.headroom(load) - st.smoothed);
                            st.last_seen_ms = seen;
                            st.load = load;
                        }
                        st.fresh_until_ms = st.fresh_until_ms.max(seen.saturating_add(ttl));
                        st.addr = addr.clone();
                    }
                }
                (_, Some((load, seen))) => {
                    // New, or back from draining: start over.
                    self.states.insert(
                        id.clone(),
                        InstanceState {
                            addr: addr.clone(),
                            load,
                            smoothed: p.headroom(load),
                            last_seen_ms: seen,
                            fresh_until_ms: seen.saturating_add(ttl),
                            entered_ms: now_ms,
                            ramp_start_ms: (!no_ramp).then_some(now_ms),
                            target: 0,
                        },
                    );
                }
                // No usable report now: keep the last weight until the TTL.
                (Some(_), None) => {
                    if let Some(st) = self.states.get_mut(id.as_str()) {
                        st.addr = addr.clone();
                    }
                }
                (None, None) => {}
            }
        }

        // 2. Who is in the table: registered, with a report fresh enough.
        let mut active: BTreeSet<String> = self
            .states
            .iter()
            .filter(|(id, st)| registered.contains_key(id.as_str()) && now_ms <= st.fresh_until_ms)
            .map(|(id, _)| id.clone())
            .collect();

        if active.is_empty() {
            // 3a. Nobody fresh: hold the table as published. Keep the state of
            // its instances (for the grace when reports resume), drop the rest.
            self.holding = true;
            let table = &self.table;
            self.states.retain(|id, _| table.contains_key(id));
            let weights = self.weighted(|_, w| w);
            return self.finish(weights, &registered, false, None, true);
        }

        if self.holding {
            // 3b. Leaving a hold: held instances still registered get a grace.
            for id in self.table.keys() {
                if let (Some(st), Some(addr)) =
                    (self.states.get_mut(id), registered.get(id.as_str()))
                {
                    if now_ms > st.fresh_until_ms {
                        st.fresh_until_ms = now_ms.saturating_add(ttl);
                        st.addr = (*addr).clone();
                        active.insert(id.clone());
                    }
                }
            }
            self.holding = false;
        }
        self.states.retain(|id, _| active.contains(id));

        // 4. Target weights.
        let mut candidate: BTreeMap<String, (Address, u32)> = BTreeMap::new();
        for (id, st) in self.states.iter_mut() {
            let r = p.ramp_factor(st.ramp_start_ms, now_ms);
            if r >= 1.0 {
                st.ramp_start_ms = None;
            }
            st.target = to_weight(st.smoothed * r);
            candidate.insert(id.clone(), (st.addr.clone(), st.target));
        }

        // 5. Rebuild only on a real change.
        let reason = self.change(&candidate);
        if reason.is_some() {
            self.table = candidate;
        }
        let states = &self.states;
        let weights = self.weighted(|id, w| states.get(id).map_or(w, |s| s.target));
        self.finish(weights, &registered, reason.is_some(), reason, false)
    }

    /// The published table as [`Weighted`], with `target(id, weight)`.
    fn weighted(&self, target: impl Fn(&str, u32) -> u32) -> Vec<Weighted> {
        self.table
            .iter()
            .map(|(id, (addr, w))| Weighted {
                instance: id.clone(),
                addr: addr.clone(),
                weight: *w,
                target: target(id, *w),
            })
            .collect()
    }

    fn finish(
        &mut self,
        weights: Vec<Weighted>,
        registered: &BTreeMap<&str, &Address>,
        rebuild: bool,
        reason: Option<RebuildReason>,
        held: bool,
    ) -> Decision {
        let draining: Vec<Drained> = registered
            .iter()
            .filter(|(id, _)| !self.table.contains_key(**id))
            .map(|(id, addr)| Drained {
                instance: id.to_string(),
                addr: (*addr).clone(),
            })
            .collect();
        let known: BTreeSet<String> = self
            .table
            .keys()
            .cloned()
            .chain(draining.iter().map(|d| d.instance.clone()))
            .collect();
        let removed = self.known.difference(&known).cloned().collect();
        self.known = known;
        Decision {
            weights,
            draining,
            removed,
            rebuild,
            reason,
            held,
        }
    }

    /// How `candidate` differs from the published table, if enough to rebuild.
    fn change(&self, candidate: &BTreeMap<String, (Address, u32)>) -> Option<RebuildReason> {
        if !self.table.keys().eq(candidate.keys()) {
            return Some(RebuildReason::Membership);
        }
        if self
            .table
            .values()
            .zip(candidate.values())
            .any(|(a, b)| a.0 != b.0)
        {
            return Some(RebuildReason::Address);
        }
        let old = shares(&self.table.values().map(|v| v.1).collect::<Vec<_>>());
        let new = shares(&candidate.values().map(|v| v.1).collect::<Vec<_>>());
        old.iter()
            .zip(&new)
            .any(|(o, n)| (n - o).abs() > self.policy.dead_band * o)
            .then_some(RebuildReason::Weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::InstanceEntry;

    const T0: i64 = 1_764_270_000_000;
    const TTL: i64 = 5_000;

    fn addr(i: u8) -> Address {
        Address::parse(&format!("10.0.0.{i}:80")).unwrap()
    }

    /// (id, load, seen, address number)
    type Entry<'a> = (&'a str, Option<f64>, Option<i64>, Option<u8>);

    /// A snapshot of `entries`.
    fn snap(entries: &[Entry]) -> ServiceSnapshot {
        ServiceSnapshot {
            service: "api".into(),
            instances: entries
                .iter()
                .map(|&(id, load, seen_ms, a)| {
                    (
                        id.to_string(),
                        InstanceEntry {
                            load,
                            seen_ms,
                            addr: a.map(addr),
                            drain: false,
                        },
                    )
                })
                .collect(),
            skipped: vec![],
        }
    }

    /// Complete, fresh entries: (id, load) reported at `seen`.
    fn loads(entries: &[(&str, f64)], seen: i64) -> ServiceSnapshot {
        let v: Vec<_> = entries
            .iter()
            .enumerate()
            .map(|(i, &(id, l))| (id, Some(l), Some(seen), Some(i as u8 + 1)))
            .collect();
        snap(&v)
    }

    fn w(d: &Decision) -> Vec<(&str, u32)> {
        d.weights
            .iter()
            .map(|w| (w.instance.as_str(), w.weight))
            .collect()
    }
    fn draining(d: &Decision) -> Vec<&str> {
        d.draining.iter().map(|d| d.instance.as_str()).collect()
    }

    #[test]
    fn defaults_are_valid_and_bad_knobs_name_their_field() {
        Policy::default().validate().unwrap();
        let cases: [(&str, Policy); 8] = [
            (
                "floor",
                Policy {
                    floor: 0.0,
                    ..Default::default()
                },
            ),
            (
                "floor",
                Policy {
                    floor: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "alpha",
                Policy {
                    alpha: 0.0,
                    ..Default::default()
                },
            ),
            (
                "alpha",
                Policy {
                    alpha: 1.5,
                    ..Default::default()
                },
            ),
            (
                "dead_band",
                Policy {
                    dead_band: 1.0,
                    ..Default::default()
                },
            ),
            (
                "ttl",
                Policy {
                    ttl: Duration::ZERO,
                    ..Default::default()
                },
            ),
            (
                "ramp_up",
                Policy {
                    ramp_up: Duration::from_secs(100_000),
                    ..Default::default()
                },
            ),
            (
                "ramp_from",
                Policy {
                    ramp_from: 0.0,
                    ..Default::default()
                },
            ),
        ];
        for (field, p) in cases {
            assert_eq!(p.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn drain_mark_takes_a_fresh_instance_out_until_unmarked_but_never_empties() {
        let p = Policy::default();
        let mut sw = ServiceWeights::new(p);
        let base = loads(&[("a", 20.0), ("b", 50.0)], T0);
        let d = sw.update(&base, T0);
        assert_eq!(w(&d), vec![("a", 8000), ("b", 5000)]);
        // b marked: out of the table at once although fresh, still draining
        // (its backend entry stays, its flows continue).
        let mut marked = loads(&[("a", 20.0), ("b", 50.0)], T0 + 1000);
        marked.instances.get_mut("b").unwrap().drain = true;
        let d = sw.update(&marked, T0 + 1000);
        assert!(d.rebuild && !d.held);
        assert_eq!(d.reason, Some(RebuildReason::Membership));
        assert_eq!(w(&d), vec![("a", 8000)]);
        assert_eq!(draining(&d), vec!["b"]);
        assert!(d.removed.is_empty());
        // Unmarked: b re-enters as a new instance, ramped.
        let d = sw.update(&loads(&[("a", 20.0), ("b", 50.0)], T0 + 2000), T0 + 2000);
        assert!(d.rebuild);
        assert!(draining(&d).is_empty());
        let wb = d.weights.iter().find(|x| x.instance == "b").unwrap().weight;
        assert!(wb < 5000, "b ramps up again, weight {wb}");
        // Marking every instance would empty the table: held instead.
        let mut all = loads(&[("a", 20.0), ("b", 50.0)], T0 + 3000);
        for e in all.instances.values_mut() {
            e.drain = true;
        }
        let d = sw.update(&all, T0 + 3000);
        assert!(d.held && !d.rebuild);
        assert_eq!(d.weights.len(), 2);
        // Address gone: removed.
        let mut gone = loads(&[("a", 20.0), ("b", 50.0)], T0 + 4000);
        gone.instances.get_mut("b").unwrap().addr = None;
        let d = sw.update(&gone, T0 + 4000);
        assert_eq!(d.removed, vec!["b".to_string()]);
    }

    #[test]
    fn worked_example_and_floor() {
        let p = Policy::default();
        assert_eq!(p.target_weight(20.0), 8000);
        assert_eq!(p.target_weight(50.0), 5000);
        assert_eq!(p.target_weight(80.0), 2000);
        assert_eq!(p.target_weight(0.0), 10000);
        // The floor: 100 − load never below 5 points.
        assert_eq!(p.target_weight(95.0), 500);
        assert_eq!(p.target_weight(97.0), 500);
        assert_eq!(p.target_weight(100.0), 500);
        assert_eq!(p.target_weight(94.0), 600);
        assert_eq!(p.target_weight(42.5), 5750);

        let mut sw = ServiceWeights::new(p);
        let d = sw.update(&loads(&[("a", 20.0), ("b", 50.0), ("c", 80.0)], T0), T0);
        assert!(d.rebuild && !d.held);
        assert_eq!(d.reason, Some(RebuildReason::Membership));
        assert_eq!(w(&d), vec![("a", 8000), ("b", 5000), ("c", 2000)]);
        let s: Vec<f64> = d.shares().iter().map(|x| x.1).collect();
        for (got, want) in s.iter().zip([8.0 / 15.0, 5.0 / 15.0, 2.0 / 15.0]) {
            assert!((got - want).abs() < 1e-12);
        }
        assert_eq!(shares(&[0, 0]), vec![0.0, 0.0]);
    }

    #[test]
    fn ewma_converges_once_per_report() {
        let p = Policy::default();
        let mut sw = ServiceWeights::new(p);
        sw.update(&loads(&[("a", 20.0), ("b", 50.0)], T0), T0);
        assert_eq!(sw.state("a").unwrap().smoothed, 80.0);
        // a goes to load 80 (headroom 20): 80 → 50 → 35 → 27.5 → …
        let mut want = 80.0;
        for n in 1..=12 {
            let t = T0 + n * 1000;
            // Read ten times per report: only the new report counts.
            for k in 0..10 {
                sw.update(&loads(&[("a", 80.0), ("b", 50.0)], t), t + k * 100);
            }
            want += 0.5 * (20.0 - want);
            assert_eq!(sw.state("a").unwrap().smoothed, want, "after {n} reports");
        }
        assert!((sw.state("a").unwrap().smoothed - 20.0).abs() < 0.02);
        // alpha = 1: no smoothing.
        let mut sw = ServiceWeights::new(Policy { alpha: 1.0, ..p });
        sw.update(&loads(&[("a", 20.0)], T0), T0);
        sw.update(&loads(&[("a", 70.0)], T0 + 1), T0 + 1);
        assert_eq!(sw.state("a").unwrap().target, 3000);
    }

    #[test]
    fn dead_band_suppresses_noise_but_not_real_change() {
        let mut sw = ServiceWeights::new(Policy::default());
        let first = sw.update(&loads(&[("a", 50.0), ("b", 50.0), ("c", 50.0)], T0), T0);
        assert!(first.rebuild);
        // ±1.5 load points of noise: shares move < 5 % relative.
        let noise = [1.5, -1.0, 0.5, -1.5, 1.0, 0.0, -0.5, 1.5, -1.5, 0.5];
        for (n, x) in noise.iter().enumerate() {
            let t = T0 + (n as i64 + 1) * 1000;
            let d = sw.update(
                &loads(&[("a", 50.0 + x), ("b", 50.0 - x), ("c", 50.0)], t),
                t,
            );
            assert!(!d.rebuild, "noise rebuilt at report {n}: {d:?}");
            // The published table stays; the targets move.
            assert_eq!(w(&d), vec![("a", 5000), ("b", 5000), ("c", 5000)]);
        }
        // A real change: a to load 80. Rebuilt at the first report already
        // (smoothed ≈ 50 → ≈ 35: share 1/3 → ≈ 0.26).
        let t = T0 + 11_000;
        let d = sw.update(&loads(&[("a", 80.0), ("b", 50.0), ("c", 50.0)], t), t);
        assert!(d.rebuild);
        assert_eq!(d.reason, Some(RebuildReason::Weights));
        let a = sw.state("a").unwrap().target;
        assert!((3400..=3600).contains(&a), "{a}");
        assert_eq!(w(&d)[0], ("a", a));
        // Slow drift, each step under the band, accumulates and rebuilds.
        let mut sw = ServiceWeights::new(Policy {
            alpha: 1.0,
            ..Default::default()
        });
        sw.update(&loads(&[("a", 50.0), ("b", 50.0)], T0), T0);
        let mut rebuilt_at = None;
        for n in 1..=20 {
            let t = T0 + n * 1000;
            let d = sw.update(&loads(&[("a", 50.0 + n as f64 * 0.5), ("b", 50.0)], t), t);
            if d.rebuild {
                rebuilt_at = Some(n);
                break;
            }
        }
        // a's share 0.5 → below 0.475 once its headroom < 45.24: load > 54.76.
        assert_eq!(rebuilt_at, Some(10));
    }

    #[test]
    fn uniform_change_does_not_rebuild() {
        let mut sw = ServiceWeights::new(Policy {
            alpha: 1.0,
            ..Default::default()
        });
        sw.update(&loads(&[("a", 0.0), ("b", 50.0)], T0), T0);
        // Headroom 100/50 → 50/25: same shares.
        let d = sw.update(&loads(&[("a", 50.0), ("b", 75.0)], T0 + 1000), T0 + 1000);
        assert!(!d.rebuild);
        assert_eq!(d.weights[0].target, 5000);
        assert_eq!(d.weights[0].weight, 10000);
    }

    #[test]
    fn drained_exactly_after_ttl_and_undrained_on_report() {
        let mut sw = ServiceWeights::new(Policy::default());
        // a and b report at `t`, c last reported at `seen_c`.
        let all = |t: i64, seen_c: i64| {
            snap(&[
                ("a", Some(20.0), Some(t), Some(1)),
                ("b", Some(50.0), Some(t), Some(2)),
                ("c", Some(80.0), Some(seen_c), Some(3)),
            ])
        };
        sw.update(&all(T0, T0), T0);
        // c stops reporting at T0. At T0 + TTL it is still in, unchanged.
        let d = sw.update(&all(T0 + TTL, T0), T0 + TTL);
        assert!(!d.rebuild);
        assert_eq!(w(&d), vec![("a", 8000), ("b", 5000), ("c", 2000)]);
        assert!(d.draining.is_empty());
        // One ms later: draining, out of the table, not removed.
        let d = sw.update(&all(T0 + TTL + 1, T0), T0 + TTL + 1);
        assert!(d.rebuild);
        assert_eq!(d.reason, Some(RebuildReason::Membership));
        assert_eq!(w(&d), vec![("a", 8000), ("b", 5000)]);
        assert_eq!(draining(&d), vec!["c"]);
        assert_eq!(d.draining[0].addr, addr(3));
        assert!(d.removed.is_empty());
        assert!(sw.state("c").is_none());
        // Still draining later, no further rebuild.
        let d = sw.update(&all(T0 + 9_000, T0), T0 + 9_000);
        assert!(!d.rebuild);
        assert_eq!(draining(&d), vec!["c"]);
        // c reports again: back in, ramped (it is new to this table):
        // headroom 20 · 0.1 = 2 points.
        let d = sw.update(&all(T0 + 9_500, T0 + 9_500), T0 + 9_500);
        assert!(d.rebuild);
        assert_eq!(w(&d), vec![("a", 8000), ("b", 5000), ("c", 200)]);
        assert!(d.draining.is_empty());
    }

    #[test]
    fn missing_or_malformed_reports_do_not_zero_before_ttl() {
        let mut sw = ServiceWeights::new(Policy::default());
        sw.update(&loads(&[("a", 20.0), ("b", 50.0)], T0), T0);
        // b's load, then its time, then both vanish (or were skipped as
        // malformed); its address stays.
        let variants = [(None, Some(T0 + 1000)), (Some(50.0), None), (None, None)];
        for (load, seen) in variants {
            let mut sw = sw.clone();
            for t in [T0 + 1000, T0 + 3000, T0 + TTL] {
                let d = sw.update(
                    &snap(&[
                        ("a", Some(20.0), Some(t), Some(1)),
                        ("b", load, seen, Some(2)),
                    ]),
                    t,
                );
                assert!(!d.rebuild, "{load:?} {seen:?} at {t}");
                assert_eq!(w(&d), vec![("a", 8000), ("b", 5000)]);
            }
            // Drained TTL after its last *valid* report (T0), even though
            // its `seen` may be fresher.
            let t = T0 + TTL + 1;
            let d = sw.update(
                &snap(&[
                    ("a", Some(20.0), Some(t), Some(1)),
                    ("b", load, seen, Some(2)),
                ]),
                t,
            );
            assert!(d.rebuild);
            assert_eq!(w(&d), vec![("a", 8000)]);
            assert_eq!(draining(&d), vec!["b"]);
        }
    }

    #[test]
    fn ramp_up_of_a_new_instance() {
        let p = Policy::default(); // 10 s from 0.1
        let mut sw = ServiceWeights::new(p);
        sw.update(&loads(&[("a", 50.0)], T0), T0);
        let both = |t: i64| loads(&[("a", 50.0), ("b", 50.0)], t);
        let d = sw.update(&both(T0 + 1000), T0 + 1000);
        assert!(d.rebuild);
        assert_eq!(w(&d), vec![("a", 5000), ("b", 500)]);
        // Halfway: 0.1 + 0.9 · 0.5 = 0.55.
        let d = sw.update(&both(T0 + 6000), T0 + 6000);
        assert_eq!(d.weights[1].target, 2750);
        assert_eq!(w(&d)[1], ("b", 2750));
        // Done: full weight, ramp over.
        let d = sw.update(&both(T0 + 11_000), T0 + 11_000);
        assert_eq!(w(&d), vec![("a", 5000), ("b", 5000)]);
        assert_eq!(sw.state("b").unwrap().ramp_start_ms, None);
        // Present at the first update: no ramp. ramp_up 0: no ramp.
        let mut sw = ServiceWeights::new(Policy {
            ramp_up: Duration::ZERO,
            ..p
        });
        sw.update(&loads(&[("a", 50.0)], T0), T0);
        let d = sw.update(&both(T0 + 1000), T0 + 1000);
        assert_eq!(w(&d), vec![("a", 5000), ("b", 5000)]);
    }

    #[test]
    fn all_stale_holds_the_table_then_recovers_with_grace() {
        let mut sw = ServiceWeights::new(Policy::default());
        let d = sw.update(&loads(&[("a", 20.0), ("b", 50.0), ("c", 80.0)], T0), T0);
        let table = w(&d);
        // Nobody reports any more (read every second): past the TTL the table
        // is held as is.
        for t in (1..=60).map(|k| T0 + k * 1000) {
            let d = sw.update(&loads(&[("a", 20.0), ("b", 50.0), ("c", 80.0)], T0), t);
            assert!(!d.rebuild);
            assert_eq!(w(&d), table);
            assert!(d.draining.is_empty() && d.removed.is_empty());
            assert_eq!(d.held, t > T0 + TTL, "at {t}");
            assert_eq!(sw.is_held(), t > T0 + TTL);
        }
        // Even the scoreboard emptied (Redis restarted empty): held.
        let d = sw.update(&ServiceSnapshot::default(), T0 + 61_000);
        assert!(d.held && !d.rebuild);
        assert_eq!(w(&d), table);
        // Reports resume, a first: a, b and c all stay (grace), no ramp.
        let t = T0 + 62_000;
        let resume = snap(&[
            ("a", Some(20.0), Some(t), Some(1)),
            ("b", Some(50.0), Some(T0), Some(2)),
            ("c", Some(80.0), Some(T0), Some(3)),
        ]);
        let d = sw.update(&resume, t);
        assert!(!d.held && !d.rebuild, "{d:?}");
        assert_eq!(w(&d), table);
        // b reports again during the grace; c never comes back: drained
        // TTL after the resume.
        let d = sw.update(
            &snap(&[
                ("a", Some(20.0), Some(t + 1000), Some(1)),
                ("b", Some(50.0), Some(t + 1000), Some(2)),
                ("c", Some(80.0), Some(T0), Some(3)),
            ]),
            t + 1000,
        );
        assert!(!d.rebuild);
        let d = sw.update(
            &snap(&[
                ("a", Some(20.0), Some(t + TTL), Some(1)),
                ("b", Some(50.0), Some(t + TTL), Some(2)),
                ("c", Some(80.0), Some(T0), Some(3)),
            ]),
            t + TTL + 1,
        );
        assert!(d.rebuild);
        assert_eq!(w(&d), vec![("a", 8000), ("b", 5000)]);
        assert_eq!(draining(&d), vec!["c"]);
    }

    #[test]
    fn blind_gap_grants_grace_instead_of_draining() {
        let mut sw = ServiceWeights::new(Policy::default());
        let d = sw.update(&loads(&[("a", 20.0), ("b", 50.0), ("c", 80.0)], T0), T0);
        let table = w(&d);
        // No update for a minute (Redis down). Then a has reported again, b
        // and c not yet: nobody is drained, nobody ramped, no rebuild.
        let t = T0 + 60_000;
        // a and b report at the given times, c last reported at T0.
        let e = |seen_a: i64, seen_b: i64| {
            snap(&[
                ("a", Some(20.0), Some(seen_a), Some(1)),
                ("b", Some(50.0), Some(seen_b), Some(2)),
                ("c", Some(80.0), Some(T0), Some(3)),
            ])
        };
        let d = sw.update(&e(t, T0), t);
        assert!(!d.rebuild && !d.held, "{d:?}");
        assert_eq!(w(&d), table);
        assert_eq!(sw.state("a").unwrap().ramp_start_ms, None);
        // b reports in the grace; c never: drained TTL after the gap.
        let d = sw.update(&e(t + 1000, t + 1000), t + 1000);
        assert!(!d.rebuild);
        let d = sw.update(&e(t + TTL, t + TTL), t + TTL);
        assert!(!d.rebuild);
        let d = sw.update(&e(t + TTL, t + TTL), t + TTL + 1);
        assert!(d.rebuild);
        assert_eq!(w(&d), vec![("a", 8000), ("b", 5000)]);
        assert_eq!(draining(&d), vec!["c"]);
    }

    #[test]
    fn cold_start_with_nothing_fresh_holds_whatever_table_exists() {
        let mut sw = ServiceWeights::new(Policy::default());
        let d = sw.update(
            &snap(&[
                ("a", Some(20.0), Some(T0 - 60_000), Some(1)),
                ("b", None, None, Some(2)),
                ("x", Some(20.0), Some(T0), None),
            ]),
            T0,
        );
        assert!(d.held && !d.rebuild);
        assert!(d.weights.is_empty());
        // Registered ones are draining: pinned flows may point at them. x
        // has no address: not a backend.
        assert_eq!(draining(&d), vec!["a", "b"]);
    }

    #[test]
    fn removal_and_address_change() {
        let mut sw = ServiceWeights::new(Policy::default());
        sw.update(&loads(&[("a", 20.0), ("b", 50.0)], T0), T0);
        // b unregistered (all three keys gone).
        let d = sw.update(&loads(&[("a", 20.0)], T0 + 1000), T0 + 1000);
        assert!(d.rebuild);
        assert_eq!(w(&d), vec![("a", 8000)]);
        assert_eq!(d.removed, vec!["b".to_string()]);
        // a moves to another address: rebuild.
        let d = sw.update(
            &snap(&[("a", Some(20.0), Some(T0 + 2000), Some(9))]),
            T0 + 2000,
        );
        assert!(d.rebuild);
        assert_eq!(d.reason, Some(RebuildReason::Address));
        assert_eq!(d.weights[0].addr, addr(9));
        // A draining instance that disappears is removed without a rebuild.
        let mut sw = ServiceWeights::new(Policy::default());
        sw.update(
            &snap(&[
                ("a", Some(20.0), Some(T0), Some(1)),
                ("b", None, None, Some(2)),
            ]),
            T0,
        );
        let d = sw.update(&loads(&[("a", 20.0)], T0 + 1000), T0 + 1000);
        assert!(!d.rebuild);
        assert_eq!(d.removed, vec!["b".to_string()]);
    }

    #[test]
    fn reports_from_the_future_beyond_ttl_are_stale() {
        let p = Policy::default();
        assert!(p.is_fresh(T0 + TTL, T0));
        assert!(!p.is_fresh(T0 + TTL + 1, T0));
        assert!(p.is_fresh(T0 - TTL, T0));
        assert!(!p.is_fresh(T0 - TTL - 1, T0));
        let mut sw = ServiceWeights::new(p);
        let d = sw.update(
            &snap(&[
                ("a", Some(20.0), Some(T0), Some(1)),
                ("b", Some(20.0), Some(T0 + 3_600_000), Some(2)),
            ]),
            T0,
        );
        assert_eq!(w(&d), vec![("a", 8000)]);
        assert_eq!(draining(&d), vec!["b"]);
    }

    #[test]
    fn deterministic() {
        // A scripted run with every kind of event, twice: identical decisions.
        let run = || {
            let mut sw = ServiceWeights::new(Policy::default());
            let mut out = Vec::new();
            let mut x: u64 = 7;
            for n in 0..300i64 {
                let t = T0 + n * 100;
                let mut e = Vec::new();
                for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let load = (x >> 33) as f64 / (1u64 << 31) as f64 * 100.0;
                    // d stops reporting after 10 s; c joins after 5 s.
                    let seen = match *id {
                        "d" if n > 100 => Some(T0 + 10_000),
                        _ => Some(t - t % 1000),
                    };
                    if *id == "c" && n < 50 {
                        continue;
                    }
                    e.push((*id, Some(load), seen, Some(i as u8 + 1)));
                }
                out.push(sw.update(&snap(&e), t));
            }
            out
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert!(a.iter().filter(|d| d.rebuild).count() > 3);
        assert!(a.last().unwrap().draining.iter().any(|d| d.instance == "d"));
    }
}
