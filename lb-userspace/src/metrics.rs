//! The Prometheus text format (0.0.4) of a [`Status`] snapshot: what
//! `GET /metrics` on the admin endpoint serves. Metric names and labels are
//! listed in docs/METRICS.md.

use std::fmt::Write;

use lb_common::counter;

use crate::daemon::{RedisState, Status};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders `st` as Prometheus text; `now_ms` (Unix ms) dates report ages.
pub fn render(st: &Status, now_ms: i64) -> String {
    let mut m = Metrics::default();

    // The scoreboard and the refresh loop.
    m.family(
        "headroom_redis_up",
        "gauge",
        "1 if the last scoreboard read succeeded, else 0 (down, or not read yet).",
    );
    m.sample("headroom_redis_up", &[], bool_f(st.redis == RedisState::Up));
    m.family(
        "headroom_redis_state",
        "gauge",
        "The scoreboard connection state: 1 on the current state's series.",
    );
    for s in ["unknown", "up", "down"] {
        let cur = match st.redis {
            RedisState::Unknown => "unknown",
            RedisState::Up => "up",
            RedisState::Down { .. } => "down",
        };
        m.sample("headroom_redis_state", &[("state", s)], bool_f(cur == s));
    }
    m.family(
        "headroom_scoreboard_reads_total",
        "counter",
        "Scoreboard reads by result.",
    );
    m.sample(
        "headroom_scoreboard_reads_total",
        &[("result", "ok")],
        st.reads_ok as f64,
    );
    m.sample(
        "headroom_scoreboard_reads_total",
        &[("result", "failed")],
        st.reads_failed as f64,
    );
    m.family(
        "headroom_refreshes_total",
        "counter",
        "Refreshes done (scoreboard read, weights, publications).",
    );
    m.sample("headroom_refreshes_total", &[], st.refreshes as f64);
    m.family(
        "headroom_refresh_duration_seconds",
        "histogram",
        "Duration of one refresh (read, weights, publications).",
    );
    let h = &st.refresh_latency;
    for (b, c) in h.bounds.iter().zip(&h.cumulative) {
        m.sample(
            "headroom_refresh_duration_seconds_bucket",
            &[("le", &fmt_f(*b))],
            *c as f64,
        );
    }
    m.sample(
        "headroom_refresh_duration_seconds_bucket",
        &[("le", "+Inf")],
        h.count as f64,
    );
    m.sample("headroom_refresh_duration_seconds_sum", &[], h.sum);
    m.sample(
        "headroom_refresh_duration_seconds_count",
        &[],
        h.count as f64,
    );
    m.family(
        "headroom_backend_ids_free",
        "gauge",
        "Backend ids never used so far.",
    );
    m.sample("headroom_backend_ids_free", &[], f64::from(st.ids_free));
    m.family(
        "headroom_backend_ids_quarantined",
        "gauge",
        "Retired backend ids waiting before reuse.",
    );
    m.sample(
        "headroom_backend_ids_quarantined",
        &[],
        st.ids_quarantined as f64,
    );

    // The data path's global counters.
    m.family(
        "headroom_verdicts_total",
        "counter",
        "Frames by verdict: action (pass/drop/tx/redirect) and reason (the counter name).",
    );
    for c in 0..counter::VERDICTS {
        let name = counter::NAMES[c as usize];
        let action = name.split('_').next().unwrap_or(name);
        m.sample(
            "headroom_verdicts_total",
            &[("action", action), ("reason", name)],
            st.counter(c) as f64,
        );
    }
    m.family(
        "headroom_datapath_events_total",
        "counter",
        "What happened on the way (ct_hit, ct_miss, miss_syn, nat_reply, ...).",
    );
    for c in counter::VERDICTS..counter::COUNT {
        m.sample(
            "headroom_datapath_events_total",
            &[("event", counter::NAMES[c as usize])],
            st.counter(c) as f64,
        );
    }
    m.family(
        "headroom_conntrack_lookups_total",
        "counter",
        "Connection-table results of packets to a VIP: hit (tracked backend) or miss (selected).",
    );
    m.sample(
        "headroom_conntrack_lookups_total",
        &[("result", "hit")],
        st.counter(counter::CT_HIT) as f64,
    );
    m.sample(
        "headroom_conntrack_lookups_total",
        &[("result", "miss")],
        st.counter(counter::CT_MISS) as f64,
    );

    // Services.
    type SvcFn = fn(
        &crate::daemon::status::ServiceStatus,
        Option<&crate::daemon::status::ServiceDetail>,
    ) -> f64;
    let svc_metrics: [(&str, &str, &str, SvcFn); 7] = [
        (
            "headroom_service_packets_total",
            "counter",
            "Packets forwarded to the service's backends.",
            |_, d| d.map_or(0.0, |d| d.traffic.packets as f64),
        ),
        (
            "headroom_service_bytes_total",
            "counter",
            "Bytes forwarded to the service's backends (frames as received).",
            |_, d| d.map_or(0.0, |d| d.traffic.bytes as f64),
        ),
        (
            "headroom_service_new_flows_total",
            "counter",
            "Flows assigned to a backend of the service.",
            |_, d| d.map_or(0.0, |d| d.traffic.new_flows as f64),
        ),
        (
            "headroom_table_generation",
            "gauge",
            "Tables published for the service since the daemon started.",
            |s, _| s.generation as f64,
        ),
        (
            "headroom_service_held",
            "gauge",
            "1 while no instance is fresh and the table is held as published.",
            |s, _| bool_f(s.held),
        ),
        (
            "headroom_service_publish_pending",
            "gauge",
            "1 while a failed publication waits for its retry.",
            |s, _| bool_f(s.publish_pending),
        ),
        (
            "headroom_service_table_size",
            "gauge",
            "Slots (M) of the service's table.",
            |_, d| d.map_or(0.0, |d| d.table_size as f64),
        ),
    ];
    for (name, kind, help, f) in svc_metrics {
        m.family(name, kind, help);
        for s in &st.services {
            let d = st.details.iter().find(|d| d.name == s.name);
            m.sample(name, &[("service", &s.name), ("group", &s.group)], f(s, d));
        }
    }

    // Backends: table members, then draining instances.
    struct Row<'a> {
        service: &'a str,
        group: &'a str,
        addr: String,
        instance: &'a str,
        weight: u32,
        target: u32,
        weight_share: f64,
        draining: bool,
        detail: Option<&'a crate::daemon::status::BackendDetail>,
        table_size: u64,
    }
    let mut rows: Vec<Row> = Vec::new();
    for s in &st.services {
        let d = st.details.iter().find(|d| d.name == s.name);
        let shares = s.shares();
        for (i, b) in s.table.iter().chain(&s.draining).enumerate() {
            let draining = i >= s.table.len();
            rows.push(Row {
                service: &s.name,
                group: &s.group,
                addr: b.addr.to_string(),
                instance: &b.instance,
                weight: b.weight,
                target: b.target,
                weight_share: shares.get(i).map_or(0.0, |(_, s)| *s),
                draining,
                detail: d.and_then(|d| {
                    d.backends
                        .iter()
                        .find(|x| x.instance == b.instance && x.draining == draining)
                }),
                table_size: d.map_or(0, |d| d.table_size),
            });
        }
    }
    type RowFn = fn(&Row, i64) -> Option<f64>;
    let backend_metrics: [(&str, &str, &str, RowFn); 11] = [
        (
            "headroom_backend_packets_total",
            "counter",
            "Packets forwarded to the backend.",
            |r, _| Some(r.detail.map_or(0, |d| d.traffic.packets) as f64),
        ),
        (
            "headroom_backend_bytes_total",
            "counter",
            "Bytes forwarded to the backend (frames as received).",
            |r, _| Some(r.detail.map_or(0, |d| d.traffic.bytes) as f64),
        ),
        (
            "headroom_backend_new_flows_total",
            "counter",
            "Flows assigned to the backend (includes one per `lb trace` of an untracked flow).",
            |r, _| Some(r.detail.map_or(0, |d| d.traffic.new_flows) as f64),
        ),
        (
            "headroom_backend_load",
            "gauge",
            "The load (0-100) the instance last reported to the scoreboard.",
            |r, _| r.detail.and_then(|d| d.load),
        ),
        (
            "headroom_backend_load_smoothed",
            "gauge",
            "The smoothed load the weight follows.",
            |r, _| r.detail.and_then(|d| d.smoothed_load),
        ),
        (
            "headroom_backend_report_age_seconds",
            "gauge",
            "Seconds since the instance's last report (scoreboard clock).",
            |r, now| r.detail.and_then(|d| d.report_age(now)),
        ),
        (
            "headroom_backend_weight",
            "gauge",
            "Weight in the published table (0 while draining).",
            |r, _| Some(f64::from(r.weight)),
        ),
        (
            "headroom_backend_target_weight",
            "gauge",
            "Weight the formula gives now (differs from the published one within the dead-band).",
            |r, _| Some(f64::from(r.target)),
        ),
        (
            "headroom_backend_weight_share",
            "gauge",
            "Weight / sum of the service's published weights: the intended share of new flows.",
            |r, _| Some(r.weight_share),
        ),
        (
            "headroom_backend_slot_share",
            "gauge",
            "Share of the table's slots the backend holds in the active table.",
            |r, _| {
                let slots = r.detail.map_or(0, |d| d.slots);
                Some(if r.table_size == 0 {
                    0.0
                } else {
                    slots as f64 / r.table_size as f64
                })
            },
        ),
        (
            "headroom_backend_draining",
            "gauge",
            "1 while the instance drains (out of the table, its flows continue).",
            |r, _| Some(bool_f(r.draining)),
        ),
    ];
    for (name, kind, help, f) in backend_metrics {
        m.family(name, kind, help);
        for r in &rows {
            if let Some(v) = f(r, now_ms) {
                let labels = [
                    ("service", r.service),
                    ("group", r.group),
                    ("backend", r.addr.as_str()),
                    ("instance", r.instance),
                ];
                m.sample(name, &labels, v);
            }
        }
    }
    m.out
}

/// The text being built.
#[derive(Default)]
struct Metrics {
    out: String,
}

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", fmt_f(v));
    }
}

fn bool_f(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// A sample value as Prometheus writes it (`+Inf`, `NaN`, shortest form).
fn fmt_f(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::{
        BackendDetail, BackendStatus, ServiceDetail, ServiceStatus, Traffic,
    };

    fn status() -> Status {
        let mut st = Status {
            redis: RedisState::Up,
            refreshes: 3,
            global: vec![0; counter::COUNT as usize],
            ..Status::default()
        };
        st.global[counter::TX as usize] = 7;
        st.global[counter::CT_HIT as usize] = 5;
        for d in [0.0004, 0.003, 0.2] {
            st.refresh_latency
                .observe(std::time::Duration::from_secs_f64(d));
        }
        st.services.push(ServiceStatus {
            name: "we\"b".into(),
            group: "g".into(),
            generation: 2,
            table: vec![
                BackendStatus {
                    instance: "a".into(),
                    addr: "10.0.0.1:80".parse().unwrap(),
                    id: Some(0),
                    weight: 3,
                    target: 3,
                },
                BackendStatus {
                    instance: "b".into(),
                    addr: "10.0.0.2:80".parse().unwrap(),
                    id: Some(1),
                    weight: 1,
                    target: 1,
                },
            ],
            ..ServiceStatus::default()
        });
        st.details.push(ServiceDetail {
            name: "we\"b".into(),
            table_size: 7,
            backends: vec![BackendDetail {
                instance: "a".into(),
                id: Some(0),
                load: Some(25.0),
                last_report_ms: Some(1_000),
                slots: 5,
                traffic: Traffic {
                    packets: 9,
                    bytes: 900,
                    new_flows: 2,
                },
                ..BackendDetail::default()
            }],
            ..ServiceDetail::default()
        });
        st
    }

    #[test]
    fn renders_families_and_samples() {
        let t = render(&status(), 3_500);
        assert!(t.contains("# TYPE headroom_refresh_duration_seconds histogram\n"));
        assert!(t.contains("headroom_refresh_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(t.contains("headroom_refresh_duration_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(t.contains("headroom_refresh_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(t.contains("headroom_refresh_duration_seconds_count 3\n"));
        assert!(t.contains("headroom_verdicts_total{action=\"tx\",reason=\"tx\"} 7\n"));
        assert!(t.contains("headroom_conntrack_lookups_total{result=\"hit\"} 5\n"));
        assert!(t.contains("headroom_redis_up 1\n"));
        let labels = "service=\"we\\\"b\",group=\"g\",backend=\"10.0.0.1:80\",instance=\"a\"";
        assert!(t.contains(&format!("headroom_backend_packets_total{{{labels}}} 9\n")));
        assert!(t.contains(&format!("headroom_backend_load{{{labels}}} 25\n")));
        assert!(t.contains(&format!(
            "headroom_backend_report_age_seconds{{{labels}}} 2.5\n"
        )));
        assert!(t.contains(&format!("headroom_backend_weight_share{{{labels}}} 0.75\n")));
        assert!(t.contains(&format!(
            "headroom_backend_slot_share{{{labels}}} {}\n",
            5.0 / 7.0
        )));
        // No detail for b: no load sample, zero counters.
        assert!(!t.contains(
            "headroom_backend_load{service=\"we\\\"b\",group=\"g\",backend=\"10.0.0.2:80\""
        ));
        assert!(t.contains("headroom_table_generation{service=\"we\\\"b\",group=\"g\"} 2\n"));
        // Every sample line belongs to a family announced before it.
        let mut families = Vec::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    families.iter().any(|f| name == f
                        || name
                            .strip_prefix(f.as_str())
                            .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))),
                    "{name} has no TYPE"
                );
            }
        }
    }
}
