//! The container-manager's scaling policy (paper §3.3), as a pure function
//! of what it observed: no Redis, no clock of its own, so every rule is
//! tested with exact inputs.
//!
//! - Scale-up threshold for `n` replicas: `up_base + up_step · (n − 1)`,
//!   capped at `up_max` (60 % at one replica rising toward 80 %).
//! - Up: when the windowed average load `L` of `n` live instances is above
//!   that threshold, to the smallest `k > n` with `L · n / k ≤ up(k)` (the
//!   work is assumed to spread over the new instances), capped at `max`.
//! - Down: when `L · n / (n − 1) < up(n − 1) − down_band`: one fewer
//!   instance would stay clearly below the threshold it would then have, so
//!   a removal does not trigger the next scale-up. One instance at a time.
//! - `[min, max]` always holds, whatever the metrics say.
//! - No action during warm-up (after a start) or cool-down (after a stop),
//!   never down on missing or stale metrics, and nothing before the window
//!   has been covered by reports.

use std::{collections::VecDeque, fmt, time::Duration};

use serde::{Deserialize, Serialize};

/// The knobs of one service's scaling (part of its registry entry).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingPolicy {
    /// Fewest instances, held even at zero load.
    pub min: u32,
    /// Most instances, never exceeded.
    pub max: u32,
    /// Scale-up threshold at one replica, percent.
    pub up_base: f64,
    /// Added to the threshold per extra replica, percent.
    pub up_step: f64,
    /// Highest threshold, percent.
    pub up_max: f64,
    /// Scale down only this many points below the smaller count's threshold.
    pub down_band: f64,
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        Self {
            min: 1,
            max: 10,
            up_base: 60.0,
            up_step: 5.0,
            up_max: 80.0,
            down_band: 20.0,
        }
    }
}

impl ScalingPolicy {
    /// Checks the knobs; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max == 0 {
            return Err("max: must be at least 1".into());
        }
        if self.min > self.max {
            return Err(format!("min: {} is above max {}", self.min, self.max));
        }
        for (name, v) in [
            ("up_base", self.up_base),
            ("up_max", self.up_max),
            ("down_band", self.down_band),
        ] {
            if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                return Err(format!("{name}: {v} is not within 0–100"));
            }
        }
        if !(self.up_step.is_finite() && self.up_step >= 0.0) {
            return Err(format!(
                "up_step: {} is not a finite value ≥ 0",
                self.up_step
            ));
        }
        if self.up_max < self.up_base {
            return Err(format!(
                "up_max: {} is below up_base {}",
                self.up_max, self.up_base
            ));
        }
        Ok(())
    }

    /// Scale-up threshold with `n` replicas (percent).
    pub fn up_threshold(&self, n: u32) -> f64 {
        let extra = f64::from(n.max(1) - 1);
        (self.up_base + self.up_step * extra).min(self.up_max)
    }

    /// The replica count the policy settles on for a total work of `total`
    /// (sum of the instances' loads, in percent-instances), ignoring timing:
    /// the smallest `k` in `[min, max]` with `total / k ≤ up(k)`.
    pub fn predicted_replicas(&self, total: f64) -> u32 {
        (self.min.max(1)..=self.max)
            .find(|&k| total / f64::from(k) <= self.up_threshold(k))
            .unwrap_or(self.max)
            .max(self.min)
    }
}

/// Windowed mean of the service's average load: one sample per report
/// round, kept for `window`.
#[derive(Clone, Debug)]
pub struct LoadWindow {
    window: Duration,
    samples: VecDeque<(Duration, f64)>,
}

impl LoadWindow {
    /// An empty window of length `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Adds the average load seen at `at` (a monotonic time) and forgets
    /// samples older than the window.
    pub fn push(&mut self, at: Duration, avg: f64) {
        self.samples.push_back((at, avg));
        // Keep the newest sample at or before the window's start: dropping
        // it would leave the samples spanning less than the window whenever
        // the report spacing exceeds the 10 % coverage slack in `mean`.
        while self.samples.len() >= 2 && at.saturating_sub(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
    }

    /// Forgets every sample (after a scaling action the old samples
    /// describe another replica count).
    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// Mean over the window, once the samples span at least the window
    /// (minus 10 %, for report jitter); `None` before.
    pub fn mean(&self) -> Option<f64> {
        let (first, _) = *self.samples.front()?;
        let (last, _) = *self.samples.back()?;
        if last.saturating_sub(first) < self.window.mul_f64(0.9) {
            return None;
        }
        let sum: f64 = self.samples.iter().map(|&(_, v)| v).sum();
        Some(sum / self.samples.len() as f64)
    }
}

/// What the manager knows about the service right now.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Instances running (started and not stopped), whatever their reports.
    pub running: u32,
    /// Of those, instances whose last report is within the staleness TTL.
    pub fresh: u32,
    /// Windowed mean load of the fresh instances (`LoadWindow::mean`).
    pub window_mean: Option<f64>,
    /// Time since the last start, if any instance was started by us.
    pub since_start: Option<Duration>,
    /// Time since the last stop, if any.
    pub since_stop: Option<Duration>,
}

/// Timing knobs of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// After a start: no decision until the new instance takes its share.
    pub warm_up: Duration,
    /// After a stop: no decision until the drained instance's work is done.
    pub cool_down: Duration,
}

/// Why the policy holds.
#[derive(Clone, Debug, PartialEq)]
pub enum HoldReason {
    /// Inside the warm-up after a start.
    WarmingUp,
    /// Inside the cool-down after a stop.
    CoolingDown,
    /// The window is not covered by reports yet.
    WindowNotCovered,
    /// Some running instances have no fresh report: never down on that.
    StaleMetrics {
        /// Instances with a fresh report.
        fresh: u32,
        /// Instances running.
        running: u32,
    },
    /// Load within the band.
    WithinBand {
        /// The windowed mean load.
        load: f64,
    },
    /// Above the threshold, but `max` is reached.
    AtMax,
    /// Below the down band, but `min` is reached.
    AtMin,
}

/// The policy's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Do nothing.
    Hold(HoldReason),
    /// Start instances until `to` run.
    Up {
        /// Target count.
        to: u32,
        /// The load that asked for it (`None`: below `min`).
        load: Option<f64>,
    },
    /// Drain and stop instances until `to` run.
    Down {
        /// Target count.
        to: u32,
        /// The load that allowed it (`None`: above `max`).
        load: Option<f64>,
    },
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Hold(HoldReason::WarmingUp) => write!(f, "hold: warming up"),
            Decision::Hold(HoldReason::CoolingDown) => write!(f, "hold: cooling down"),
            Decision::Hold(HoldReason::WindowNotCovered) => {
                write!(f, "hold: not enough reports in the window yet")
            }
            Decision::Hold(HoldReason::StaleMetrics { fresh, running }) => write!(
                f,
                "hold: only {fresh} of {running} instances reported recently"
            ),
            Decision::Hold(HoldReason::WithinBand { load }) => {
                write!(f, "hold: load {load:.1} within the band")
            }
            Decision::Hold(HoldReason::AtMax) => write!(f, "hold: at max"),
            Decision::Hold(HoldReason::AtMin) => write!(f, "hold: at min"),
            Decision::Up { to, load: Some(l) } => write!(f, "up to {to} (load {l:.1})"),
            Decision::Up { to, load: None } => write!(f, "up to {to} (below min)"),
            Decision::Down { to, load: Some(l) } => write!(f, "down to {to} (load {l:.1})"),
            Decision::Down { to, load: None } => write!(f, "down to {to} (above max)"),
        }
    }
}

/// Decides for one service. See the module docs for the rules.
pub fn decide(p: &ScalingPolicy, t: &Timing, o: &Observation) -> Decision {
    let n = o.running;
    // The bounds hold first: no metric is needed to know they are broken.
    if n < p.min {
        return Decision::Up {
            to: p.min,
            load: None,
        };
    }
    if n > p.max {
        return Decision::Down {
            to: p.max,
            load: None,
        };
    }
    if o.since_start.is_some_and(|d| d < t.warm_up) {
        return Decision::Hold(HoldReason::WarmingUp);
    }
    if o.since_stop.is_some_and(|d| d < t.cool_down) {
        return Decision::Hold(HoldReason::CoolingDown);
    }
    let Some(load) = o.window_mean else {
        return Decision::Hold(HoldReason::WindowNotCovered);
    };
    if load > p.up_threshold(n) {
        if n >= p.max {
            return Decision::Hold(HoldReason::AtMax);
        }
        // Fresh instances carry the work the mean describes.
        let total = load * f64::from(o.fresh.max(1));
        let to = (n + 1..=p.max)
            .find(|&k| total / f64::from(k) <= p.up_threshold(k))
            .unwrap_or(p.max);
        return Decision::Up {
            to,
            load: Some(load),
        };
    }
    if o.fresh < n {
        return Decision::Hold(HoldReason::StaleMetrics {
            fresh: o.fresh,
            running: n,
        });
    }
    if n >= 2 && load * f64::from(n) / f64::from(n - 1) < p.up_threshold(n - 1) - p.down_band {
        if n <= p.min {
            return Decision::Hold(HoldReason::AtMin);
        }
        return Decision::Down {
            to: n - 1,
            load: Some(load),
        };
    }
    Decision::Hold(HoldReason::WithinBand { load })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        warm_up: Duration::from_secs(10),
        cool_down: Duration::from_secs(20),
    };

    fn obs(running: u32, load: f64) -> Observation {
        Observation {
            running,
            fresh: running,
            window_mean: Some(load),
            since_start: None,
            since_stop: None,
        }
    }

    #[test]
    fn thresholds_rise_from_60_to_80() {
        let p = ScalingPolicy::default();
        let got: Vec<f64> = (1..=7).map(|n| p.up_threshold(n)).collect();
        assert_eq!(got, [60.0, 65.0, 70.0, 75.0, 80.0, 80.0, 80.0]);
    }

    #[test]
    fn up_goes_to_the_count_that_absorbs_the_load() {
        let p = ScalingPolicy::default();
        // 1 replica at 61 %: 2 replicas would be at 30.5 % ≤ 65.
        assert_eq!(
            decide(&p, &T, &obs(1, 61.0)),
            Decision::Up {
                to: 2,
                load: Some(61.0)
            }
        );
        // 1 replica at 100 % (saturated) still asks for 2 only: 50 ≤ 65.
        assert_eq!(
            decide(&p, &T, &obs(1, 100.0)),
            Decision::Up {
                to: 2,
                load: Some(100.0)
            }
        );
        // 2 at 95 %: 190 work; 3 → 63.3 ≤ 70.
        assert_eq!(
            decide(&p, &T, &obs(2, 95.0)),
            Decision::Up {
                to: 3,
                load: Some(95.0)
            }
        );
        // 4 at 99: 396 work; 5 → 79.2 ≤ 80.
        assert_eq!(
            decide(&p, &T, &obs(4, 99.0)),
            Decision::Up {
                to: 5,
                load: Some(99.0)
            }
        );
        // Exactly at the threshold is not above it.
        assert_eq!(
            decide(&p, &T, &obs(1, 60.0)),
            Decision::Hold(HoldReason::WithinBand { load: 60.0 })
        );
    }

    #[test]
    fn predicted_replicas_matches_repeated_decisions() {
        let p = ScalingPolicy {
            max: 8,
            ..ScalingPolicy::default()
        };
        for total in [10.0, 59.0, 61.0, 130.0, 250.0, 390.0, 700.0] {
            // Run the loop with the work spread evenly, as the balancer does.
            let mut n = p.min;
            for _ in 0..20 {
                match decide(&p, &T, &obs(n, total / f64::from(n))) {
                    Decision::Up { to, .. } | Decision::Down { to, .. } => n = to,
                    Decision::Hold(_) => break,
                }
            }
            assert_eq!(n, p.predicted_replicas(total), "total work {total}");
        }
    }

    #[test]
    fn down_only_below_the_band_of_the_smaller_count() {
        let p = ScalingPolicy::default();
        // 3 at 25: on 2 it would be 37.5; up(2) − band = 45 → down.
        assert_eq!(
            decide(&p, &T, &obs(3, 25.0)),
            Decision::Down {
                to: 2,
                load: Some(25.0)
            }
        );
        // 3 at 31: on 2 it would be 46.5 > 45 → hold.
        assert_eq!(
            decide(&p, &T, &obs(3, 31.0)),
            Decision::Hold(HoldReason::WithinBand { load: 31.0 })
        );
        // After a down step, the new count does not scale straight back up.
        let after = 25.0 * 3.0 / 2.0;
        assert!(matches!(decide(&p, &T, &obs(2, after)), Decision::Hold(_)));
    }

    #[test]
    fn bounds_hold_whatever_the_metrics() {
        let p = ScalingPolicy {
            min: 2,
            max: 4,
            ..ScalingPolicy::default()
        };
        let mut o = obs(1, 0.0);
        o.window_mean = None;
        o.fresh = 0;
        o.since_start = Some(Duration::ZERO);
        assert_eq!(decide(&p, &T, &o), Decision::Up { to: 2, load: None });
        assert_eq!(
            decide(&p, &T, &obs(5, 99.0)),
            Decision::Down { to: 4, load: None }
        );
        assert_eq!(
            decide(&p, &T, &obs(4, 99.0)),
            Decision::Hold(HoldReason::AtMax)
        );
        assert_eq!(
            decide(&p, &T, &obs(2, 1.0)),
            Decision::Hold(HoldReason::AtMin)
        );
        // Up never overshoots max.
        let p = ScalingPolicy {
            max: 3,
            ..ScalingPolicy::default()
        };
        assert_eq!(
            decide(&p, &T, &obs(1, 100.0)),
            Decision::Up {
                to: 2,
                load: Some(100.0)
            }
        );
        assert_eq!(
            decide(&p, &T, &obs(2, 100.0)),
            Decision::Up {
                to: 3,
                load: Some(100.0)
            }
        );
    }

    #[test]
    fn no_action_in_warm_up_or_cool_down() {
        let p = ScalingPolicy::default();
        let mut o = obs(2, 99.0);
        o.since_start = Some(Duration::from_secs(9));
        assert_eq!(decide(&p, &T, &o), Decision::Hold(HoldReason::WarmingUp));
        o.since_start = Some(Duration::from_secs(10));
        assert!(matches!(decide(&p, &T, &o), Decision::Up { .. }));
        let mut o = obs(3, 1.0);
        o.since_stop = Some(Duration::from_secs(19));
        assert_eq!(decide(&p, &T, &o), Decision::Hold(HoldReason::CoolingDown));
        o.since_stop = Some(Duration::from_secs(20));
        assert!(matches!(decide(&p, &T, &o), Decision::Down { .. }));
    }

    #[test]
    fn never_down_on_stale_or_missing_metrics() {
        let p = ScalingPolicy::default();
        let mut o = obs(3, 1.0);
        o.fresh = 2;
        assert_eq!(
            decide(&p, &T, &o),
            Decision::Hold(HoldReason::StaleMetrics {
                fresh: 2,
                running: 3
            })
        );
        o.window_mean = None;
        assert_eq!(
            decide(&p, &T, &o),
            Decision::Hold(HoldReason::WindowNotCovered)
        );
        // Up still works on the instances that do report: 2 × 90 = 180 → 3 at 60 ≤ 70.
        let mut o = obs(3, 90.0);
        o.fresh = 2;
        assert!(matches!(decide(&p, &T, &o), Decision::Up { .. }));
    }

    #[test]
    fn window_mean_needs_coverage_and_forgets_old_samples() {
        let mut w = LoadWindow::new(Duration::from_secs(10));
        let s = Duration::from_secs;
        w.push(s(0), 100.0);
        assert_eq!(w.mean(), None);
        for t in 1..=9 {
            w.push(s(t), 100.0);
        }
        assert_eq!(w.mean(), Some(100.0));
        // 11 s later the 100 % samples are gone.
        for t in 20..=30 {
            w.push(s(t), 10.0);
        }
        assert_eq!(w.mean(), Some(10.0));
        w.clear();
        assert_eq!(w.mean(), None);
    }

    #[test]
    fn window_is_covered_when_rounds_are_a_large_part_of_it() {
        // Rounds every 260 ms with a 1 s window: the samples must still
        // cover the window once a second of reports exists.
        let mut w = LoadWindow::new(Duration::from_secs(1));
        let mut covered = false;
        for i in 0..20u64 {
            w.push(Duration::from_millis(i * 260), 50.0);
            covered |= w.mean().is_some();
            if i >= 4 {
                assert_eq!(w.mean(), Some(50.0), "round {i}");
            }
        }
        assert!(covered);
    }

    #[test]
    fn validate_names_the_field() {
        assert_eq!(ScalingPolicy::default().validate(), Ok(()));
        let bad = ScalingPolicy {
            min: 3,
            max: 2,
            ..ScalingPolicy::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("min"));
        let bad = ScalingPolicy {
            up_max: 50.0,
            ..ScalingPolicy::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("up_max"));
        let bad = ScalingPolicy {
            up_base: f64::NAN,
            ..ScalingPolicy::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("up_base"));
        let bad = ScalingPolicy {
            max: 0,
            min: 0,
            ..ScalingPolicy::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("max"));
    }
}
