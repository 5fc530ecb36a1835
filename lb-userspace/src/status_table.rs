//! `headroom lb status`: the terminal table of two status snapshots taken
//! an interval apart (rates come from their difference).

use std::{fmt::Write, time::Duration};

use crate::daemon::{RedisState, Status};

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Service name.
    pub service: String,
    /// Instance id (scoreboard) or configured address (static).
    pub instance: String,
    /// Backend address.
    pub addr: String,
    /// Last reported load (scoreboard services).
    pub load: Option<f64>,
    /// Published weight (0 while draining).
    pub weight: u32,
    /// Share of the service's weight, percent.
    pub share_pct: f64,
    /// New flows counted so far.
    pub flows: u64,
    /// Packets per second over the interval.
    pub pps: f64,
    /// Out of the table, flows continue.
    pub draining: bool,
}

/// The rows of `after`, with rates against `before` taken `interval` earlier.
pub fn rows(before: &Status, after: &Status, interval: Duration) -> Vec<Row> {
    let secs = interval.as_secs_f64().max(1e-3);
    let mut out = Vec::new();
    for s in &after.services {
        let detail = after.detail(&s.name);
        let prev = before.detail(&s.name);
        let shares = s.shares();
        for (i, b) in s.table.iter().chain(&s.draining).enumerate() {
            let draining = i >= s.table.len();
            let find = |d: Option<&crate::daemon::status::ServiceDetail>| {
                d.and_then(|d| {
                    d.backends
                        .iter()
                        .find(|x| x.instance == b.instance && x.draining == draining)
                        .cloned()
                })
            };
            let now = find(detail).unwrap_or_default();
            let then = find(prev).unwrap_or_default();
            out.push(Row {
                service: s.name.clone(),
                instance: b.instance.clone(),
                addr: b.addr.to_string(),
                load: now.load,
                weight: b.weight,
                share_pct: shares.get(i).map_or(0.0, |(_, v)| v * 100.0),
                flows: now.traffic.new_flows,
                pps: now.traffic.packets.saturating_sub(then.traffic.packets) as f64 / secs,
                draining,
            });
        }
    }
    out
}

/// The table as printed: a Redis line, then one line per backend.
pub fn render(before: &Status, after: &Status, interval: Duration) -> String {
    let mut out = String::new();
    let redis = match &after.redis {
        RedisState::Up => "up".to_string(),
        RedisState::Unknown => "unknown (not read yet, or no scoreboard service)".to_string(),
        RedisState::Down { since, error } => {
            let ago = std::time::SystemTime::now()
                .duration_since(*since)
                .unwrap_or_default();
            format!("DOWN for {:.0?}: {error} (tables held)", ago)
        }
    };
    let _ = writeln!(
        out,
        "redis: {redis}; reads ok {} failed {}; refreshes {}",
        after.reads_ok, after.reads_failed, after.refreshes
    );
    let header = [
        "SERVICE", "BACKEND", "ADDRESS", "LOAD", "WEIGHT", "SHARE", "FLOWS", "PKTS/S",
    ];
    let mut lines: Vec<[String; 8]> = vec![header.map(str::to_string)];
    for r in rows(before, after, interval) {
        let instance = if r.draining {
            format!("{} (draining)", r.instance)
        } else {
            r.instance
        };
        lines.push([
            r.service,
            instance,
            r.addr,
            r.load.map_or("-".into(), |l| format!("{l:.1}")),
            r.weight.to_string(),
            format!("{:.1}%", r.share_pct),
            r.flows.to_string(),
            format!("{:.1}", r.pps),
        ]);
    }
    let mut widths = [0usize; 8];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    for l in &lines {
        let mut line = String::new();
        for (i, (c, w)) in l.iter().zip(widths).enumerate() {
            // Text left, numbers right.
            if i < 3 {
                let _ = write!(line, "{c:<w$}  ");
            } else {
                let _ = write!(line, "{c:>w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if after
        .services
        .iter()
        .all(|s| s.table.is_empty() && s.draining.is_empty())
    {
        let _ = writeln!(out, "(no backend published yet)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::{
        BackendDetail, BackendStatus, ServiceDetail, ServiceStatus, Traffic,
    };

    fn snap(packets: u64) -> Status {
        let b = |i: &str, a: &str, w| BackendStatus {
            instance: i.into(),
            addr: a.parse().unwrap(),
            id: Some(0),
            weight: w,
            target: w,
        };
        Status {
            redis: RedisState::Up,
            services: vec![ServiceStatus {
                name: "web".into(),
                table: vec![b("i1", "10.0.0.1:80", 3000), b("i2", "10.0.0.2:80", 1000)],
                draining: vec![b("i3", "10.0.0.3:80", 0)],
                ..ServiceStatus::default()
            }],
            details: vec![ServiceDetail {
                name: "web".into(),
                backends: vec![BackendDetail {
                    instance: "i1".into(),
                    load: Some(70.0),
                    traffic: Traffic {
                        packets,
                        bytes: 0,
                        new_flows: 4,
                    },
                    ..BackendDetail::default()
                }],
                ..ServiceDetail::default()
            }],
            ..Status::default()
        }
    }

    #[test]
    fn table_shows_rates_shares_and_draining() {
        let t = render(&snap(100), &snap(300), Duration::from_secs(2));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("redis: up"), "{t}");
        assert!(lines[1].starts_with("SERVICE"), "{t}");
        let i1: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            i1,
            [
                "web",
                "i1",
                "10.0.0.1:80",
                "70.0",
                "3000",
                "75.0%",
                "4",
                "100.0"
            ]
        );
        assert!(
            lines[3].contains("25.0%") && lines[3].contains(" - "),
            "{t}"
        );
        assert!(lines[4].contains("i3 (draining)"), "{t}");
    }
}
