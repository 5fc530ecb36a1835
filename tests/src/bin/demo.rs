//! `cargo xtask demo`: the balancer following its backends' load reports,
//! live. A client namespace, the balancer namespace and three backend
//! namespaces (TCP servers); in the balancer namespace a private
//! redis-server, the `headroom` daemon (XDP in nat mode, refresh 100 ms,
//! pins on a private bpffs) and a reporter writing the scoreboard with plain
//! Redis commands (docs/SCOREBOARD.md). The loads change in four phases of
//! `seconds / 4` each: 20/50/80 → 80/50/20 → backend-1 stops reporting (the
//! daemon drains it after the TTL) → 40/40/40. A client makes about 100 new
//! TCP connections a second through the VIP. Once a second a live view
//! shows per backend its reported load, its weight and table share from the
//! daemon's status and the share of the last second's new connections, plus
//! the Redis state. At the end, one verdict per phase: did the connection
//! shares follow the table's shares within ±10 points (over the seconds in
//! which the table did not change), with no failed connection, none to a
//! backend outside the table, and the silent backend drained? Exits
//! non-zero if not, so the demo doubles as a smoke check. Everything (daemon, bpffs, Redis, namespaces)
//! is removed on exit, also on an error or Ctrl-C/SIGTERM. Needs root.
//! Reads nothing from stdin.
//!
//! Usage: demo [--seconds N]   (default 40, 20..=600)
use std::{
    fmt::Write as _,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use headroom::{
    config::Config,
    daemon::{Daemon, DaemonHandle, RedisState, RunOptions, Status},
};
use headroom_tests::{
    is_root,
    topology::{backend_addr, backend_name, ClientLimits, Mode, Topology, VIP, VIP_PORT},
    PrivateBpffs, RedisServer,
};

/// The scoreboard service (and the config's service name).
const SERVICE: &str = "web";
const BACKENDS: usize = 3;
const MODE: Mode = Mode::Nat;
const REFRESH: Duration = Duration::from_millis(100);
/// A silent instance is drained this long after its last report.
const TTL: Duration = Duration::from_secs(2);
/// How often the reporter writes every reporting instance.
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// Pace of new client connections (100 a second).
const CONNECT_EVERY: Duration = Duration::from_millis(10);
/// Allowed distance of a phase's connection share from the table share.
const TOLERANCE_POINTS: f64 = 10.0;
const DEFAULT_SECONDS: u64 = 40;
/// Shortest run: each phase needs settled seconds after the drain's TTL.
const MIN_SECONDS: u64 = 20;
const MAX_SECONDS: u64 = 600;

/// One phase of the scenario: the loads reported (`None`: not reporting).
struct Phase {
    name: &'static str,
    loads: [Option<f64>; BACKENDS],
}

const PHASES: [Phase; 4] = [
    Phase {
        name: "loads 20/50/80",
        loads: [Some(20.0), Some(50.0), Some(80.0)],
    },
    Phase {
        name: "loads 80/50/20",
        loads: [Some(80.0), Some(50.0), Some(20.0)],
    },
    Phase {
        name: "backend-1 silent (drained after the TTL)",
        loads: [Some(80.0), None, Some(20.0)],
    },
    Phase {
        name: "loads 40/40/40",
        loads: [Some(40.0), Some(40.0), Some(40.0)],
    },
];

fn main() -> ExitCode {
    let stop = match watch_signals() {
        Ok(stop) => stop,
        Err(e) => return fail(&e),
    };
    match parse_args().and_then(|n| run(n, &stop)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("demo failed: {e:#}");
    ExitCode::FAILURE
}

/// The run's length, from `--seconds N` (or the default).
fn parse_args() -> Result<u64> {
    let usage = format!(
        "usage: demo [--seconds N]   (default {DEFAULT_SECONDS}, {MIN_SECONDS}..={MAX_SECONDS}; needs root)"
    );
    let mut args = std::env::args().skip(1);
    let mut seconds = DEFAULT_SECONDS;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" | "-s" => {
                let v = args.next().context("--seconds needs a value")?;
                seconds = v
                    .parse()
                    .with_context(|| format!("--seconds {v:?} is not a whole number"))?;
            }
            "--help" | "-h" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} ({usage})"),
        }
    }
    ensure!(
        (MIN_SECONDS..=MAX_SECONDS).contains(&seconds),
        "--seconds must be in {MIN_SECONDS}..={MAX_SECONDS}, got {seconds}"
    );
    Ok(seconds)
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag the demo polls, so it
/// stops at the next connection and unwinds normally, and the drops remove
/// the daemon, the bpffs, Redis and the namespaces. Must run before any
/// other thread starts: threads inherit the blocked mask, so only the
/// watcher receives them.
fn watch_signals() -> Result<Arc<AtomicBool>> {
    // SAFETY: plain sigset manipulation on a local, zero-initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    };
    // SAFETY: blocks the signals in this (the only) thread.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    ensure!(
        rc == 0,
        "blocking signals: {}",
        std::io::Error::from_raw_os_error(rc)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: waits for one of the blocked signals in `set`.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                if flag.swap(true, Ordering::SeqCst) {
                    eprintln!("signal {sig}: already stopping, cleaning up");
                } else {
                    eprintln!("signal {sig}: stopping, cleaning up");
                }
            }
        })
        .context("starting the signal watcher")?;
    Ok(stop)
}

/// Fails if a signal asked the demo to stop.
fn check_stop(stop: &AtomicBool) -> Result<()> {
    ensure!(!stop.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// The instance id (and address) of backend `i`: `ip:port`.
fn instance(i: usize) -> String {
    format!("{}:{}", backend_addr(i), MODE.server_port())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------- the environment

/// Topology, Redis and daemon. Field order is drop order: the daemon stops
/// first, its pins are detached and unmounted, the reporter's connection
/// closes, Redis dies, and the namespaces go.
struct Env {
    daemon: Option<DaemonHandle>,
    _pins: PrivateBpffs,
    board: Scoreboard,
    redis: RedisServer,
    topo: Topology,
}

impl Env {
    fn start(stop: &AtomicBool) -> Result<Env> {
        let topo = Topology::new_for_daemon(MODE, BACKENDS).context("building the topology")?;
        check_stop(stop)?;
        let redis = {
            // Redis listens on the balancer namespace's loopback.
            let _inside = topo.balancer_ns().enter_thread()?;
            RedisServer::start().context("starting redis-server")?
        };
        let mut board = Scoreboard::new(redis.url())?;
        // The first loads are on the scoreboard before the daemon starts,
        // so its first table already follows them.
        board
            .write(&topo, &PHASES[0].loads)
            .context("writing the first reports")?;
        let config = demo_config(&topo.balancer_interfaces(), &redis.url())?;
        let pins = PrivateBpffs::mount("demo")?;
        let daemon = {
            // The daemon's thread starts in this thread's namespace.
            let _inside = topo.balancer_ns().enter_thread()?;
            let opts = RunOptions {
                pin_root: Some(pins.root().to_path_buf()),
                ..RunOptions::default()
            };
            Daemon::start(config, opts).context("starting the daemon")?
        };
        Ok(Env {
            daemon: Some(daemon),
            _pins: pins,
            board,
            redis,
            topo,
        })
    }

    fn status(&self) -> Status {
        self.daemon
            .as_ref()
            .map(DaemonHandle::status)
            .unwrap_or_default()
    }

    /// Stops the daemon, reporting its error (drop would only print it).
    fn shutdown_daemon(&mut self) -> Result<()> {
        match self.daemon.take() {
            Some(d) => d.shutdown().context("stopping the daemon"),
            None => Ok(()),
        }
    }
}

/// The daemon's config: the balancer's interfaces, one service in nat mode
/// following the scoreboard. `ewma_alpha = 1` and no ramp-up, so a new
/// load shows in the weights at the next refresh.
fn demo_config(interfaces: &[String], redis_url: &str) -> Result<Config> {
    let text = headroom_tests::topology::scoreboard_daemon_config(
        "demo",
        None,
        redis_url,
        REFRESH,
        TTL,
        interfaces,
        SERVICE,
        &MODE.to_string(),
    );
    text.parse::<Config>()
        .map_err(|e| anyhow::anyhow!("demo config: {e}\n{text}"))
}

// ---------------------------------------------------------------- the reporter

/// The reporter's Redis connection: plain commands, as any service could
/// send them. Its socket is made inside the balancer namespace (where Redis
/// listens on loopback); once made, it works from any thread.
struct Scoreboard {
    client: redis::Client,
    conn: Option<redis::Connection>,
    failed: u64,
}

impl Scoreboard {
    fn new(url: String) -> Result<Scoreboard> {
        Ok(Scoreboard {
            client: redis::Client::open(url).context("redis URL")?,
            conn: None,
            failed: 0,
        })
    }

    fn conn(&mut self, topo: &Topology) -> Result<&mut redis::Connection> {
        if self.conn.is_none() {
            let _inside = topo.balancer_ns().enter_thread()?;
            let c = self
                .client
                .get_connection_with_timeout(Duration::from_millis(500))
                .context("connecting to redis")?;
            c.set_read_timeout(Some(Duration::from_millis(500)))?;
            c.set_write_timeout(Some(Duration::from_millis(500)))?;
            self.conn = Some(c);
        }
        self.conn.as_mut().context("no redis connection")
    }

    /// One MULTI/EXEC with every reporting instance: address, load, time.
    fn write(&mut self, topo: &Topology, loads: &[Option<f64>]) -> Result<()> {
        let now = now_ms();
        let mut p = redis::pipe();
        p.atomic();
        for (i, load) in loads.iter().enumerate() {
            let Some(load) = load else { continue };
            let id = instance(i);
            p.cmd("HSET")
                .arg(format!("headroom:sb:{{{SERVICE}}}:addr"))
                .arg(&id)
                .arg(&id)
                .ignore();
            p.cmd("ZADD")
                .arg(format!("headroom:sb:{{{SERVICE}}}:load"))
                .arg(*load)
                .arg(&id)
                .ignore();
            p.cmd("ZADD")
                .arg(format!("headroom:sb:{{{SERVICE}}}:seen"))
                .arg(now)
                .arg(&id)
                .ignore();
        }
        p.cmd("SADD").arg("headroom:services").arg(SERVICE).ignore();
        let r = self
            .conn(topo)
            .and_then(|c| p.query::<()>(c).context("writing the reports"));
        if r.is_err() {
            self.failed += 1;
            self.conn = None;
        }
        r
    }

    /// What Redis holds for the service: `(instance, load, seconds since
    /// its last report)`.
    fn read(&mut self, topo: &Topology) -> Result<Vec<(String, f64, f64)>> {
        let now = now_ms();
        let c = self.conn(topo)?;
        type Loads = Vec<(String, f64)>;
        type Seen = Vec<(String, i64)>;
        let (loads, seen): (Loads, Seen) = redis::pipe()
            .cmd("ZRANGE")
            .arg(format!("headroom:sb:{{{SERVICE}}}:load"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(format!("headroom:sb:{{{SERVICE}}}:seen"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(c)
            .context("reading the scoreboard")?;
        Ok(loads
            .into_iter()
            .map(|(id, load)| {
                let age = seen
                    .iter()
                    .find(|(s, _)| *s == id)
                    .map_or(f64::NAN, |(_, t)| (now - t) as f64 / 1000.0);
                (id, load, age)
            })
            .collect())
    }
}

// ---------------------------------------------------------------- the run

/// Connections of one phase, over the seconds in which the table did not
/// change: per backend the connections and the share the table gave it
/// (summed per connection, so the mean is the expected share).
#[derive(Default)]
struct PhaseTally {
    conns: [u64; BACKENDS],
    expected: [f64; BACKENDS],
    settled_seconds: u32,
    unsettled_seconds: u32,
    failures: u64,
    /// New connections that reached a backend outside the table.
    to_absent: u64,
    /// Settled seconds in which every silent backend was out of the table.
    drained_seconds: u32,
}

/// Table share of every backend (0 when not in the table).
fn table_shares(st: &Status) -> [f64; BACKENDS] {
    let mut out = [0.0; BACKENDS];
    if let Some(svc) = st.service(SERVICE) {
        for (id, share) in svc.shares() {
            if let Some(i) = (0..BACKENDS).find(|&i| instance(i) == id) {
                out[i] = share;
            }
        }
    }
    out
}

fn generation(st: &Status) -> u64 {
    st.service(SERVICE).map_or(0, |s| s.generation)
}

fn run(seconds: u64, stop: &AtomicBool) -> Result<()> {
    ensure!(
        is_root(),
        "the demo needs root (network namespaces, XDP, a private bpffs)"
    );
    println!(
        "headroom demo: client -> XDP balancer ({MODE}) -> {BACKENDS} backends, VIP {VIP}:{VIP_PORT}; \
         daemon following a private Redis scoreboard (refresh {REFRESH:?}, TTL {TTL:?}); {seconds} s"
    );
    let started = Instant::now();
    let mut env = Env::start(stop)?;
    println!(
        "ready in {:.1?}: namespaces {}, {}, {}; redis {}",
        started.elapsed(),
        env.topo.client_ns().name(),
        env.topo.balancer_ns().name(),
        (0..BACKENDS)
            .map(|i| env.topo.backend_ns(i).name())
            .collect::<Vec<_>>()
            .join(", "),
        env.redis.url()
    );
    let outcome = wait_first_table(&env, stop).and_then(|()| drive(&mut env, seconds, stop));
    let shutdown = env.shutdown_daemon();
    drop(env);
    println!("cleaned up; total {:.1?}", started.elapsed());
    let tallies = outcome?;
    shutdown?;
    check_stop(stop)?;
    verdicts(&tallies)
}

/// Waits (bounded) until the daemon has published a table with every
/// backend: connections before that have nowhere to go.
fn wait_first_table(env: &Env, stop: &AtomicBool) -> Result<()> {
    const WAIT: Duration = Duration::from_secs(15);
    let t = Instant::now();
    loop {
        check_stop(stop)?;
        let st = env.status();
        if table_shares(&st).iter().all(|&s| s > 0.0) {
            println!(
                "first table published {:.1?} after the daemon started (generation {})",
                t.elapsed(),
                generation(&st)
            );
            return Ok(());
        }
        ensure!(
            t.elapsed() < WAIT,
            "the daemon published no table with all {BACKENDS} backends within {WAIT:?}; status: {st:#?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The scenario: reports, connections and the live view, second by second.
fn drive(env: &mut Env, seconds: u64, stop: &AtomicBool) -> Result<Vec<PhaseTally>> {
    let phase_len = seconds / PHASES.len() as u64;
    let mut tallies: Vec<PhaseTally> = Vec::new();
    let limits = ClientLimits {
        per_connection: Duration::from_secs(2),
        total: Duration::from_secs(5),
    };
    let begin = Instant::now();
    let mut next_report = begin;
    let mut next_conn = begin;
    let mut phase = usize::MAX;
    for second in 0..seconds {
        let p = (second / phase_len.max(1)) as usize;
        let p = p.min(PHASES.len() - 1);
        if p != phase {
            phase = p;
            tallies.push(PhaseTally::default());
            println!(
                "\n=== t={second}s phase {}/{}: {} ===",
                p + 1,
                PHASES.len(),
                PHASES[p].name
            );
        }
        let st_before = env.status();
        let mut per_backend = [0u64; BACKENDS];
        let mut failures = 0u64;
        let end = begin + Duration::from_secs(second + 1);
        while Instant::now() < end {
            if stop.load(Ordering::SeqCst) {
                return Ok(tallies);
            }
            let now = Instant::now();
            if now >= next_report {
                // A failed write is shown in the view; the next one retries.
                let _ = env.board.write(&env.topo, &PHASES[p].loads);
                next_report = now + REPORT_EVERY;
            }
            if now >= next_conn {
                match env.topo.run_clients(1, limits, stop) {
                    Ok(t) => {
                        for (i, n) in t.per_backend.iter().enumerate().take(BACKENDS) {
                            per_backend[i] += n;
                        }
                    }
                    Err(e) => {
                        if failures == 0 {
                            eprintln!("connection failed: {e:#}");
                        }
                        failures += 1;
                    }
                }
                // Bounded rate: never catch up more than one interval.
                next_conn = (next_conn + CONNECT_EVERY).max(Instant::now() - CONNECT_EVERY);
            }
            let wake = next_conn.min(next_report).min(end);
            if let Some(d) = wake.checked_duration_since(Instant::now()) {
                thread::sleep(d.min(CONNECT_EVERY));
            }
        }
        let st = env.status();
        let settled = generation(&st_before) == generation(&st);
        let tally = tallies.last_mut().context("no phase")?;
        tally.failures += failures;
        if settled {
            let shares = table_shares(&st);
            let n: u64 = per_backend.iter().sum();
            for i in 0..BACKENDS {
                tally.conns[i] += per_backend[i];
                tally.expected[i] += shares[i] * n as f64;
            }
            tally.settled_seconds += 1;
            tally.to_absent += (0..BACKENDS)
                .filter(|&i| shares[i] == 0.0)
                .map(|i| per_backend[i])
                .sum::<u64>();
            if (0..BACKENDS).all(|i| PHASES[p].loads[i].is_some() || shares[i] == 0.0) {
                tally.drained_seconds += 1;
            }
        } else {
            tally.unsettled_seconds += 1;
        }
        let board = env.board.read(&env.topo);
        print_view(second + 1, p, &st, &per_backend, failures, settled, board);
    }
    Ok(tallies)
}

/// The live view of one second.
fn print_view(
    t: u64,
    phase: usize,
    st: &Status,
    per_backend: &[u64; BACKENDS],
    failures: u64,
    settled: bool,
    board: Result<Vec<(String, f64, f64)>>,
) {
    let svc = st.service(SERVICE);
    let detail = st.detail(SERVICE);
    let shares = table_shares(st);
    let total = per_backend.iter().sum::<u64>();
    let redis = match &st.redis {
        RedisState::Up => "up".to_string(),
        RedisState::Unknown => "unknown".to_string(),
        RedisState::Down { error, .. } => format!("DOWN ({error})"),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "--- t={t}s phase {} | generation {}{} | {total} new conns{} | daemon: redis {redis}, reads {} ok / {} failed",
        phase + 1,
        svc.map_or(0, |s| s.generation),
        if settled { "" } else { " (table changed)" },
        if failures > 0 {
            format!(", {failures} FAILED")
        } else {
            String::new()
        },
        st.reads_ok,
        st.reads_failed
    );
    let _ = writeln!(
        out,
        "  {:<10} {:<16} {:>9} {:>9} {:>7} {:>7} {:>6} {:>7}",
        "backend", "instance", "reported", "daemon", "weight", "table", "conns", "share"
    );
    for i in 0..BACKENDS {
        let id = instance(i);
        let reported = PHASES[phase].loads[i].map_or("silent".to_string(), |l| format!("{l:.0}"));
        let seen = detail
            .and_then(|d| d.backend(&id))
            .and_then(|b| b.load)
            .map_or("-".to_string(), |l| format!("{l:.0}"));
        let weight = svc.map_or(0, |s| s.weight(&id));
        let state = if svc.is_some_and(|s| s.is_draining(&id)) {
            " draining"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {:<10} {:<16} {:>9} {:>9} {:>7} {:>6.1}% {:>6} {:>6.1}%{state}",
            backend_name(i),
            id,
            reported,
            seen,
            weight,
            shares[i] * 100.0,
            per_backend[i],
            per_backend[i] as f64 / total.max(1) as f64 * 100.0
        );
    }
    let _ = match board {
        Ok(entries) => writeln!(
            out,
            "  redis {SERVICE}: {}",
            entries
                .iter()
                .map(|(id, load, age)| format!("{id} load {load:.0} seen {age:.1}s ago"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Err(e) => writeln!(out, "  redis: read failed: {e:#}"),
    };
    print!("{out}");
}

/// One line per phase; fails if any phase's shares missed the table's.
fn verdicts(tallies: &[PhaseTally]) -> Result<()> {
    println!("\nverdict (connection shares vs table shares, ±{TOLERANCE_POINTS} points, over seconds with an unchanged table):");
    let mut bad = Vec::new();
    for (p, t) in tallies.iter().enumerate() {
        let n: u64 = t.conns.iter().sum();
        let mut ok = n > 0 && t.failures == 0 && t.to_absent == 0 && t.drained_seconds > 0;
        let mut parts = Vec::new();
        for i in 0..BACKENDS {
            let got = t.conns[i] as f64 / n.max(1) as f64 * 100.0;
            let want = t.expected[i] / n.max(1) as f64 * 100.0;
            if (got - want).abs() > TOLERANCE_POINTS {
                ok = false;
            }
            parts.push(format!("{} {got:.1}% (table {want:.1}%)", backend_name(i)));
        }
        println!(
            "  phase {} {:<42} {}: {} conns in {} settled s ({} s with a table change), {} failed, {} to a backend outside the table{}: {}",
            p + 1,
            PHASES[p].name,
            if ok { "PASS" } else { "FAIL" },
            n,
            t.settled_seconds,
            t.unsettled_seconds,
            t.failures,
            t.to_absent,
            if PHASES[p].loads.iter().any(Option::is_none) {
                format!(", silent backend out of the table for {} s", t.drained_seconds)
            } else {
                String::new()
            },
            parts.join(", ")
        );
        if !ok {
            bad.push(p + 1);
        }
    }
    ensure!(
        tallies.len() == PHASES.len(),
        "only {} of {} phases ran",
        tallies.len(),
        PHASES.len()
    );
    ensure!(
        bad.is_empty(),
        "the connection shares did not follow the table in phase(s) {bad:?}"
    );
    Ok(())
}
