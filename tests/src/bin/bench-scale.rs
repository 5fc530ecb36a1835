//! `cargo xtask bench scale`: reaction time of the scaling loop, from the
//! load crossing the scale-up threshold to the new instance receiving
//! traffic through the VIP, split into phases (docs/BENCHMARKS.md, "Scale
//! reaction").
//!
//! The environment is the scale-in test's, every part real
//! (`headroom_tests::scale_env`): redis-server, `headroom lb run` with XDP
//! in the balancer namespace, two node namespaces each running
//! `headroom agent`, `headroom container-manager`, instances
//! (`scale-instance`) reporting the load the benchmark writes to a file.
//! Service: min 1, max 2, warm-up 1 s, cool-down 1 s. `--placement mm`
//! (default): a `headroom machine-manager` process places every instance
//! from its node registry and the agents' node reports
//! (`container-manager --machine-manager`); `--placement static`: the
//! container-manager picks from its `--agent` list itself.
//!
//! Each run starts from one instance at load 5 whose window is covered
//! (the manager has recorded "within the band"), then at `t0` the load
//! becomes 90 and a client opens a new connection through the VIP every
//! `--probe-ms` until one is answered by the new instance. Phases:
//!
//! | phase | from → to | source |
//! |---|---|---|
//! | detect | t0 → the manager's `up` decision | `ts_ms` in `headroom:cm:decisions` |
//! | place | decision → node chosen | mm: the manager's `placed by the machine-manager` log line (its placement id); static: `created_ms` of the instance record |
//! | start | → the agent started the process (intent write + signed start call) | `started_ms` in the agent's mirror |
//! | warm-up | started → the instance accepts connections | the instance's `listening at_ms` |
//! | first report | → its first load report in the scoreboard | the instance's `first report seen_ms` |
//! | in table | → the daemon publishes a table with it | the daemon's `published table` log line |
//! | first traffic | → a new connection through the VIP is answered by it | the client |
//!
//! The intent's `created_ms` is stamped before the placement call, so in
//! mm mode it cannot end *place*. Also printed in mm mode, not part of the
//! sum: decision → the machine-manager recorded the placement (`at_ms` in
//! `headroom:mm:placements:{node}`).
//!
//! Then the load drops back to 5, the manager drains and stops the new (or
//! the old) instance, and the next run waits for the steady state again.
//! Bounded by `--max-secs`. Needs root.
use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use headroom_control::agent::parse_duration;
use headroom_tests::{
    is_root,
    scale_env::{now_ms, Options, Placement, ScaleEnv},
};

/// `--placement`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum PlacementArg {
    /// A `headroom machine-manager` process places each instance.
    Mm,
    /// The container-manager's static `--agent` list.
    Static,
}

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Reaction time of the container-manager + balancer to a load step")]
struct Args {
    /// Measured scale-ups.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Container-manager `--interval`.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    interval: Duration,
    /// Container-manager `--window`.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    window: Duration,
    /// Balancer daemon refresh interval.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    refresh: Duration,
    /// How often each instance reports its load, ms.
    #[arg(long, default_value_t = 100)]
    report_ms: u64,
    /// Who chooses the node of a new instance.
    #[arg(long, value_enum, default_value_t = PlacementArg::Mm)]
    placement: PlacementArg,
    /// Time between the client's new connections while waiting, ms.
    #[arg(long, default_value_t = 10)]
    probe_ms: u64,
    /// Give up after this many seconds in all.
    #[arg(long, default_value_t = 900)]
    max_secs: u64,
    /// Use the binaries as they are (HEADROOM_BIN, or next to this one)
    /// instead of building `headroom` and `scale-instance` first.
    #[arg(long)]
    no_build: bool,
}

/// The load before the step and between runs.
const LOW: f64 = 5.0;
/// The load of the step (above the 60 % threshold of one replica).
const HIGH: f64 = 90.0;
/// Bound on one run's scale-up or scale-in.
const RUN_WAIT: Duration = Duration::from_secs(60);

/// Phase names, in order.
const PHASES: [&str; 7] = [
    "detect",
    "place",
    "start",
    "warm-up",
    "first report",
    "in table",
    "first traffic",
];

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        is_root(),
        "bench-scale needs root (network namespaces, XDP)"
    );
    let (headroom, instance) = binaries(args.no_build)?;
    let mut opts = Options::new(headroom, instance);
    opts.interval = args.interval;
    opts.window = args.window;
    opts.refresh = args.refresh;
    opts.report_ms = args.report_ms;
    opts.initial_load = LOW;
    opts.placement = match args.placement {
        PlacementArg::Mm => Placement::MachineManager,
        PlacementArg::Static => Placement::Static,
    };
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let mut env = ScaleEnv::start(opts).context("starting the scale environment")?;
    println!(
        "bench-scale: placement by {}; {} runs; container-manager --interval {:?} --window {:?}; \
         daemon refresh {:?}; reports every {} ms; client probe every {} ms; load {LOW} → {HIGH}",
        env.options().placement,
        args.runs,
        args.interval,
        args.window,
        args.refresh,
        args.report_ms,
        args.probe_ms
    );
    let mut rows: Vec<[i64; 7]> = Vec::new();
    let mut mm_at: Vec<i64> = Vec::new();
    for run in 1..=args.runs {
        let Run {
            phases: row,
            mm_at: at,
            nodes,
        } = one_run(&mut env, &args, deadline)
            .with_context(|| format!("run {run}"))
            .map_err(|e| anyhow::anyhow!("{e:#}\n\n{}", env.logs()))?;
        let total: i64 = row.iter().sum();
        let at_text = at.map_or(String::new(), |a| {
            format!(" (mm recorded the placement at +{a})")
        });
        println!(
            "run {run:>2}: {}{at_text} | total {total} ms | {nodes}",
            PHASES
                .iter()
                .zip(row)
                .map(|(p, v)| format!("{p} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rows.push(row);
        mm_at.extend(at);
    }
    print_summary(&rows, &mm_at);
    Ok(())
}

/// One scale-up from the steady state, then back to it: the phases, and
/// in mm mode when (after the decision) the machine-manager recorded the
/// placement.
fn one_run(env: &mut ScaleEnv, args: &Args, deadline: Instant) -> Result<Run> {
    let old = steady(env, deadline)?;
    let t0 = now_ms();
    env.set_load(HIGH)?;
    let until = Instant::now() + RUN_WAIT;
    let mut n = 0u64;
    let (new, answered) = loop {
        let c = env.connect_vip(&format!("probe{n}"))?;
        let at = now_ms();
        let id = c.instance.clone();
        c.close()?;
        n += 1;
        if id != old {
            break (id, at);
        }
        env.check_alive()?;
        ensure!(
            Instant::now() < until.min(deadline),
            "no connection answered by a new instance within {RUN_WAIT:?}"
        );
        thread::sleep(Duration::from_millis(args.probe_ms));
    };
    let decision = env
        .decisions()?
        .into_iter()
        .find(|d| d.action == "up" && d.ts_ms >= t0)
        .context("no up decision after t0")?;
    let recs = env.cm_instances()?;
    let old_node = recs
        .iter()
        .find(|r| r.id == old)
        .map_or("?".to_string(), |r| r.node.clone());
    let rec = recs
        .into_iter()
        .find(|r| r.id == new)
        .with_context(|| format!("no record of {new}"))?;
    let (node, agent) = env
        .agent_instances()?
        .into_iter()
        .find(|(_, r)| r.id == new)
        .with_context(|| format!("no agent runs {new}"))?;
    let log = env.instance_log(&node, &new);
    let listening = log_value(&log, "listening at_ms=")?;
    let first_report = log_value(&log, "first report seen_ms=")?;
    let published = published_at(&env.daemon_log(), &new)?;
    let (placed, mm_at) = match env.options().placement {
        Placement::Static => (rec.created_ms, None),
        Placement::MachineManager => {
            let id = rec
                .placement
                .as_deref()
                .with_context(|| format!("no placement id in the record of {new}"))?;
            let at = env
                .mm_placements(&rec.node)?
                .get(id)
                .copied()
                .with_context(|| format!("the machine-manager holds no placement {id}"))?;
            (placed_at(&env.cm_log(), id)?, Some(at - decision.ts_ms))
        }
    };
    // Back to the steady state for the next run.
    env.set_load(LOW)?;
    Ok(Run {
        phases: [
            decision.ts_ms - t0,
            placed - decision.ts_ms,
            agent.started_ms - placed,
            listening - agent.started_ms,
            first_report - listening,
            published - first_report,
            answered - published,
        ],
        mm_at,
        nodes: format!("new on {}, old on {old_node}", rec.node),
    })
}

/// What one run measured.
struct Run {
    /// The phases, ms.
    phases: [i64; 7],
    /// Decision → the machine-manager recorded the placement, ms (mm mode).
    mm_at: Option<i64>,
    /// Where the new and the old instance run.
    nodes: String,
}

/// Waits for one running instance, in the table alone, with the manager's
/// window covered at the low load (its last decision a hold "within the
/// band" after the last scaling action); returns the instance's id.
fn steady(env: &mut ScaleEnv, deadline: Instant) -> Result<String> {
    let until = Instant::now() + RUN_WAIT;
    loop {
        let recs = env.cm_instances()?;
        let decisions = env.decisions()?;
        let last_action = decisions
            .iter()
            .rev()
            .find(|d| d.action != "hold")
            .map_or(0, |d| d.ts_ms);
        let settled = decisions.last().is_some_and(|d| {
            d.action == "hold" && d.reason.contains("within the band") && d.ts_ms > last_action
        });
        if settled && recs.len() == 1 && recs[0].phase == "running" {
            let st = env.status()?;
            let table: Vec<String> = st
                .service(headroom_tests::scale_env::SERVICE)
                .map(|s| s.table.iter().map(|b| b.instance.clone()).collect())
                .unwrap_or_default();
            if table == [recs[0].id.clone()] {
                return Ok(recs[0].id.clone());
            }
        }
        env.check_alive()?;
        ensure!(
            Instant::now() < until.min(deadline),
            "no steady state (one instance, window covered) within {RUN_WAIT:?}: {recs:?}, \
             last decision {:?}",
            decisions.last()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The number after `key` in the instance's log.
fn log_value(log: &str, key: &str) -> Result<i64> {
    log.lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in the instance log:\n{log}"))
}

/// When the daemon first published a table holding `id` (Unix ms, from the
/// log line's RFC 3339 time).
fn published_at(log: &str, id: &str) -> Result<i64> {
    let needle = format!("{id}=");
    log.lines()
        .find(|l| l.contains("published table") && l.contains(&needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(rfc3339_ms)
        .with_context(|| format!("the daemon never logged a table with {id}"))
}

/// When the container-manager logged that the machine-manager answered
/// placement `id` (Unix ms, from the log line's time).
fn placed_at(log: &str, id: &str) -> Result<i64> {
    let needle = format!("placement={id}");
    log.lines()
        .find(|l| {
            l.contains("placed by the machine-manager") && l.split_whitespace().any(|w| w == needle)
        })
        .and_then(|l| l.split_whitespace().next())
        .and_then(rfc3339_ms)
        .with_context(|| format!("the container-manager never logged placement {id}"))
}

/// `2026-11-28T01:15:50.832957Z` → Unix ms (UTC only, as tracing writes).
fn rfc3339_ms(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (h, min, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60_000 + sec * 1000 + ms)
}

/// Median, p99 (nearest rank), min and max of each phase and the total
/// (and of the machine-manager's placement time, if any).
fn print_summary(rows: &[[i64; 7]], mm_at: &[i64]) {
    println!();
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>8}   (ms, {} runs)",
        "phase",
        "median",
        "p99",
        "min",
        "max",
        rows.len()
    );
    let mut columns: Vec<(&str, Vec<i64>)> = PHASES
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, rows.iter().map(|r| r[i]).collect()))
        .collect();
    columns.push(("total", rows.iter().map(|r| r.iter().sum()).collect()));
    if !mm_at.is_empty() {
        columns.push(("(mm recorded)", mm_at.to_vec()));
    }
    for (name, mut v) in columns {
        v.sort_unstable();
        println!(
            "{name:<14} {:>8} {:>8} {:>8} {:>8}",
            median(&v),
            rank(&v, 0.99),
            v[0],
            v[v.len() - 1]
        );
    }
}

/// Median of sorted `v` (mean of the middle two for an even count).
fn median(v: &[i64]) -> String {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2].to_string()
    } else {
        format!("{:.1}", (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0)
    }
}

/// Nearest-rank percentile `q` of sorted `v`.
fn rank(v: &[i64], q: f64) -> i64 {
    let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[k - 1]
}

/// The `headroom` and `scale-instance` binaries: built first (cargo in the
/// target directory of this binary, same profile) unless `no_build`;
/// `HEADROOM_BIN` overrides the first.
fn binaries(no_build: bool) -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("locating the target directory")?;
    if !no_build {
        build(dir)?;
    }
    let headroom = match std::env::var_os("HEADROOM_BIN") {
        Some(p) => PathBuf::from(p),
        None => dir.join("headroom"),
    };
    let instance = dir.join("scale-instance");
    for b in [&headroom, &instance] {
        ensure!(b.is_file(), "{} is missing", b.display());
    }
    Ok((headroom, instance))
}

/// `cargo build` of both binaries into `dir`'s target directory.
fn build(dir: &Path) -> Result<()> {
    let target = dir.parent().context("locating the target directory")?;
    let profile = dir
        .file_name()
        .and_then(|p| p.to_str())
        .context("profile directory")?;
    // target/debug is the output of cargo's `dev` profile.
    let profile = if profile == "debug" { "dev" } else { profile };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["build", "--profile", profile])
        .arg("--target-dir")
        .arg(target)
        .args(["-p", "lb-userspace", "--bin", "headroom"])
        .args(["-p", "headroom-tests", "--bin", "scale-instance"]);
    eprintln!("bench-scale: building the binaries: {cmd:?}");
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("building headroom and scale-instance failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ranks() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            rfc3339_ms("2026-11-28T01:15:50.832957Z"),
            Some(1_795_828_550_832)
        );
        assert_eq!(rfc3339_ms("2026-11-28 01:15:50Z"), None);
        let v = [1, 2, 3, 4];
        assert_eq!(median(&v), "2.5");
        assert_eq!(rank(&v, 0.99), 4);
        assert_eq!(rank(&[7], 0.5), 7);
        let log = "2026-11-28T01:15:50.832957Z  INFO headroom_control::container_manager: \
                   placed by the machine-manager service=web node=n1 placement=p12\n\
                   2026-11-28T01:15:51.000000Z  INFO headroom_control::container_manager: \
                   placed by the machine-manager service=web node=n0 placement=p1";
        assert_eq!(placed_at(log, "p1").ok(), Some(1_795_828_551_000));
        assert_eq!(placed_at(log, "p12").ok(), Some(1_795_828_550_832));
        assert!(placed_at(log, "p2").is_err());
    }
}
