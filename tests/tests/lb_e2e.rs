//! `headroom lb` end to end: the daemon follows a real Redis scoreboard and
//! real TCP connections follow its tables.
//!
//! Topology (`headroom_tests::topology`, built with `new_for_daemon`): a
//! client namespace, the balancer namespace and three backend namespaces
//! running TCP servers. In the balancer namespace run a private
//! redis-server (on that namespace's loopback) and the daemon
//! ([`Daemon::start`] on a thread that starts inside the namespace: XDP on
//! its veths, Redis through its loopback). A reporter thread (also inside)
//! writes the scoreboard with plain Redis commands, as docs/SCOREBOARD.md
//! says any language can: `HSET …:addr`, `ZADD …:load`, `ZADD …:seen`,
//! `SADD headroom:services`, in one MULTI/EXEC, every 200 ms.
//!
//! Knobs of the test config: refresh 100 ms, TTL 2 s, `ewma_alpha = 1` (a
//! new load applies at its first report), `dead_band = 0.01`, no ramp-up.
//! With those, loads L give weights `round(100 · max(100 − L, 5))` and
//! shares `w_i / Σw` (docs/SCOREBOARD.md, "The formula"), computed here
//! independently of the weights module.
//!
//! - `root_lb_shares_follow_loads_{nat,dsr}`: loads 20/50/80 → the daemon
//!   publishes 8000/5000/2000 and 2000 new connections split 53.3/33.3/13.3 %
//!   within ±5 points; loads 80/50/20 → the table follows and so do the next
//!   2000 connections.
//! - `root_lb_drains_silent_instance`: an instance that stops reporting is
//!   drained no earlier than TTL after its last report and within TTL + one
//!   refresh (+ scheduling slack); connections held open to it across the
//!   drain still exchange data; of 2000 new connections it gets none, the
//!   others split by the formula; it comes back when it reports again.
//! - `root_lb_redis_outage`: Redis killed after 600 of 2000 connections: every
//!   connection succeeds, shares unchanged, no table published, also after
//!   the TTL has passed; Redis restarted empty and rewritten with new loads:
//!   the table follows again.
//!
//! Every test ends with `Env::check_clean`: over the whole test no flow was
//! dropped for want of a backend, no next hop was missing, no packet of an
//! unknown flow arrived, no tracked flow was re-selected, and no TCP
//! connection failed or was reset (client and backends).
use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use headroom::{
    config::Config,
    daemon::{Daemon, DaemonHandle, RedisState, RunOptions, ServiceStatus, Status},
};
use headroom_tests::{
    require_root,
    topology::{backend_addr, backend_name, ClientLimits, Mode, TcpStats, Topology, VIP, VIP_PORT},
    PrivateBpffs, RedisServer,
};
use lb_common::counter;

/// The scoreboard service (and the config's service name).
const SERVICE: &str = "web";
const BACKENDS: usize = 3;
/// New connections per share measurement.
const CONNECTIONS: usize = 2000;
/// Allowed distance of a measured share from the formula's, in points.
const TOLERANCE: f64 = 0.05;
const REFRESH: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_secs(2);
/// How often the reporter writes every reporting instance.
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// Bound on waiting for the daemon to reach a state.
const WAIT: Duration = Duration::from_secs(15);
/// Scheduling slack on a busy 2-core VM for "within TTL + one refresh".
const DRAIN_SLACK: Duration = Duration::from_millis(1000);

/// One topology at a time: on two cores, parallel ones only add noise.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------- the tests

#[test]
fn root_lb_shares_follow_loads_nat() {
    if !require_root("root_lb_shares_follow_loads_nat") {
        return;
    }
    shares_follow_loads(Mode::Nat).expect("nat");
}

#[test]
fn root_lb_shares_follow_loads_dsr() {
    if !require_root("root_lb_shares_follow_loads_dsr") {
        return;
    }
    shares_follow_loads(Mode::Dsr).expect("dsr");
}

#[test]
fn root_lb_drains_silent_instance() {
    if !require_root("root_lb_drains_silent_instance") {
        return;
    }
    drains_silent_instance(Mode::Nat).expect("drain");
}

#[test]
fn root_lb_redis_outage() {
    if !require_root("root_lb_redis_outage") {
        return;
    }
    redis_outage(Mode::Dsr).expect("redis outage");
}

fn shares_follow_loads(mode: Mode) -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let env = Env::start(mode, &[20.0, 50.0, 80.0])?;
    eprintln!("{mode}: environment up in {:.2?}", started.elapsed());

    env.wait_weights(&[20.0, 50.0, 80.0])?;
    env.measure_shares(&[20.0, 50.0, 80.0], "loads 20/50/80")?;

    let generation = env.service().generation;
    let changed = Instant::now();
    env.reporter.set_loads(&[80.0, 50.0, 20.0]);
    let st = env.wait_weights(&[80.0, 50.0, 20.0])?;
    eprintln!(
        "{mode}: table followed the new loads in {:.2?} (generation {generation} -> {})",
        changed.elapsed(),
        st.generation
    );
    env.measure_shares(&[80.0, 50.0, 20.0], "loads 80/50/20")?;
    env.check_clean()?;
    drop(env);
    eprintln!("{mode}: total {:.2?}", started.elapsed());
    Ok(())
}

fn drains_silent_instance(mode: Mode) -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let loads = [20.0, 50.0, 80.0];
    let env = Env::start(mode, &loads)?;
    env.wait_weights(&loads)?;

    // Connections held open across the drain: the request is sent in two
    // halves, the second after the drain. Instance 0 has 53 % of the slots,
    // so 24 connections reach it with near certainty (1 − 0.47^24).
    let held = HeldConnections::open(&env.topo, 24)?;

    // Instance 0 goes silent.
    let last_seen = env.reporter.stop_reporting(0)?;
    let drained = env.wait_for("instance 0 draining", |s| {
        s.is_draining(&instance(mode, 0)) && s.weight(&instance(mode, 0)) == 0
    })?;
    let drained_at = now_ms();
    let after = Duration::from_millis((drained_at - last_seen).max(0) as u64);
    eprintln!(
        "{mode}: drained {after:.2?} after its last report (TTL {TTL:?}, refresh {REFRESH:?}); table {:?}",
        drained.shares()
    );
    ensure!(
        after >= TTL,
        "drained {after:?} after its last report, before the TTL of {TTL:?}"
    );
    ensure!(
        after <= TTL + REFRESH + DRAIN_SLACK,
        "drained {after:?} after its last report, later than TTL + refresh (+{DRAIN_SLACK:?} slack)"
    );
    ensure!(
        drained
            .draining
            .iter()
            .any(|b| b.instance == instance(mode, 0) && b.id.is_some()),
        "instance 0 should keep its backend id while draining: {drained:?}"
    );

    // No new connection reaches it; the others share by the formula
    // (50/80 → 5000/2000).
    let tally = env.run_clients(CONNECTIONS)?;
    ensure!(
        tally[0] == 0,
        "the drained backend got {} new connections",
        tally[0]
    );
    check_shares(
        &tally,
        &expected_shares(&[None, Some(50.0), Some(80.0)]),
        "drained",
    )?;

    // The held connections still work, also those on the drained backend.
    let per_backend = held.finish()?;
    eprintln!("{mode}: held connections finished per backend: {per_backend:?}");
    ensure!(
        per_backend[0] > 0,
        "no held connection reached instance 0: {per_backend:?}"
    );

    // Reporting again: it returns to the table.
    env.reporter.resume_reporting(0);
    env.wait_weights(&loads)?;
    env.check_clean()?;
    drop(env);
    eprintln!("{mode}: total {:.2?}", started.elapsed());
    Ok(())
}

fn redis_outage(mode: Mode) -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let loads = [20.0, 50.0, 80.0];
    let mut env = Env::start(mode, &loads)?;
    let before = env.wait_weights(&loads)?;

    // Kill Redis once the client has opened 600 of the run's connections:
    // the others run without it.
    let ns = env.topo.balancer_ns().path();
    let Env { redis, topo, .. } = &mut env;
    let topo = &*topo;
    // Connections the client opened so far (its namespace's TCP counters).
    let client_ns = topo.client_ns();
    let opened = move || TcpStats::read(client_ns).map(|t| t.active_opens);
    let opened_before = opened()?;
    let (tally, killed_at) = thread::scope(|s| -> Result<(Vec<u64>, u64)> {
        let killer = s.spawn(move || -> Result<u64> {
            let deadline = Instant::now() + WAIT;
            while opened()? < opened_before + 600 {
                ensure!(Instant::now() < deadline, "the run did not get going");
                thread::sleep(Duration::from_millis(5));
            }
            let at = opened()? - opened_before;
            let _inside = EnteredPath::enter(&ns)?;
            redis.kill()?;
            Ok(at)
        });
        let tally = run_clients_on(topo, CONNECTIONS);
        let at = killer
            .join()
            .map_err(|_| anyhow::anyhow!("killer thread panicked"))??;
        Ok((tally?, at))
    })?;
    ensure!(
        killed_at < CONNECTIONS as u64 - 500,
        "Redis was killed only after {killed_at} of {CONNECTIONS} connections"
    );
    let st = env.wait_status("the daemon sees Redis down", |s| {
        matches!(s.redis, RedisState::Down { .. })
    })?;
    eprintln!(
        "{mode}: Redis killed after {killed_at} of {CONNECTIONS} connections; per backend {tally:?}; redis {:?}",
        st.redis
    );
    check_shares(&tally, &expected_shares_of(&loads), "Redis killed mid-run")?;

    // Beyond the TTL without Redis: still the same table.
    let down_since = Instant::now();
    while down_since.elapsed() < TTL + Duration::from_millis(500) {
        thread::sleep(Duration::from_millis(100));
    }
    let tally = env.run_clients(1000)?;
    check_shares(
        &tally,
        &expected_shares_of(&loads),
        "Redis down beyond the TTL",
    )?;
    let st = env.service();
    ensure!(
        st.generation == before.generation && !st.held,
        "the table changed during the outage: before {before:?}, now {st:?}"
    );
    let status = env.daemon().status();
    ensure!(
        status.reads_failed > 0,
        "no failed read counted: {status:?}"
    );
    eprintln!(
        "{mode}: Redis down {:.2?}: 1000 more connections per backend {tally:?}, generation still {}",
        down_since.elapsed(),
        st.generation
    );

    // Redis back, empty; the reporter writes everything again, with new loads.
    let new_loads = [80.0, 50.0, 20.0];
    env.reporter.set_loads(&new_loads);
    {
        let _inside = env.topo.balancer_ns().enter_thread()?;
        env.redis.restart()?;
    }
    let back = Instant::now();
    env.wait_weights(&new_loads)?;
    eprintln!(
        "{mode}: Redis restarted empty: table follows the new loads {:.2?} later",
        back.elapsed()
    );
    ensure!(
        env.daemon().status().redis == RedisState::Up,
        "Redis state not up"
    );
    env.measure_shares(&new_loads, "after Redis came back")?;
    env.check_clean()?;
    drop(env);
    eprintln!("{mode}: total {:.2?}", started.elapsed());
    Ok(())
}

// ---------------------------------------------------------------- the environment

/// The instance id (and address) of backend `i`: `ip:port`.
fn instance(mode: Mode, i: usize) -> String {
    format!("{}:{}", backend_addr(i), mode.server_port())
}

/// The weight the documented formula gives a load (floor 5, no smoothing,
/// no ramp).
fn formula_weight(load: f64) -> u32 {
    (100.0 * (100.0 - load).max(5.0)).round() as u32
}

/// `share_i = w_i / Σw`; `None` = not in the table.
fn expected_shares(loads: &[Option<f64>]) -> Vec<f64> {
    let w: Vec<f64> = loads
        .iter()
        .map(|l| l.map_or(0.0, |l| f64::from(formula_weight(l))))
        .collect();
    let sum: f64 = w.iter().sum();
    w.iter().map(|w| w / sum).collect()
}

fn expected_shares_of(loads: &[f64]) -> Vec<f64> {
    expected_shares(&loads.iter().map(|&l| Some(l)).collect::<Vec<_>>())
}

/// Every backend's share of `tally` within [`TOLERANCE`] of `expected`.
fn check_shares(tally: &[u64], expected: &[f64], what: &str) -> Result<()> {
    let total: u64 = tally.iter().sum();
    ensure!(total > 0, "{what}: no connection");
    let got: Vec<f64> = tally.iter().map(|&n| n as f64 / total as f64).collect();
    let show = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{:.1} %", s * 100.0))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    eprintln!(
        "{what}: shares {} (expected {})",
        show(&got),
        show(expected)
    );
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        ensure!(
            (g - e).abs() <= TOLERANCE,
            "{what}: {} got {:.1} % of {total} connections, expected {:.1} % ± {:.0} points (all: {})",
            backend_name(i),
            g * 100.0,
            e * 100.0,
            TOLERANCE * 100.0,
            show(&got)
        );
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Topology, Redis, reporter and daemon. Field order is drop order: the
/// daemon stops first, its pins are detached, then the reporter stops,
/// Redis dies, and the namespaces go.
struct Env {
    daemon: Option<DaemonHandle>,
    /// The daemon's pin root, detached and unmounted once it stopped.
    _pins: PrivateBpffs,
    reporter: Reporter,
    redis: RedisServer,
    topo: Topology,
    mode: Mode,
    /// TCP counters of the client and the backends at the start.
    tcp_before: Vec<(String, TcpStats)>,
}

impl Env {
    /// Builds everything; `loads` are on the scoreboard before the daemon
    /// starts (so its first table already has the formula's weights).
    fn start(mode: Mode, loads: &[f64]) -> Result<Env> {
        let topo = Topology::new_for_daemon(mode, BACKENDS).context("building the topology")?;
        let tcp_before = topo.tcp_stats()?;
        let redis = {
            // Redis listens on the balancer namespace's loopback.
            let _inside = topo.balancer_ns().enter_thread()?;
            RedisServer::start()?
        };
        let instances = (0..BACKENDS)
            .map(|i| (instance(mode, i), loads[i]))
            .collect();
        let reporter = Reporter::start(topo.balancer_ns().path(), redis.url(), instances)?;
        reporter.wait_written(Instant::now())?;
        let config = config_for(mode, &topo.balancer_interfaces(), &redis.url())?;
        let pins = PrivateBpffs::mount("e2e")?;
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
            reporter,
            redis,
            topo,
            mode,
            tcp_before,
        })
    }

    /// Over the whole test: the data path never dropped a flow for want of
    /// a backend, never missed a next hop, never saw a packet of an unknown
    /// flow and never re-selected a tracked flow's backend (draining keeps
    /// flows where they are); no TCP connection failed or was reset.
    fn check_clean(&self) -> Result<()> {
        // Counters are read at every refresh: wait for a fresh reading.
        let n = self.daemon().status().refreshes;
        let st = self.wait_status("a refresh", |s| s.refreshes > n + 1)?;
        let summary: Vec<String> = counter::NAMES
            .iter()
            .zip(&st.global)
            .filter(|(_, &v)| v != 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        eprintln!("{}: balancer counters: {}", self.mode, summary.join(" "));
        for c in [
            counter::DROP_NO_BACKEND,
            counter::DROP_REDIRECT,
            counter::PASS_FIB,
            counter::MISS_NON_SYN,
            counter::CT_RESELECT,
        ] {
            ensure!(
                st.counter(c) == 0,
                "{}: {} = {} ({})",
                self.mode,
                counter::NAMES[c as usize],
                st.counter(c),
                summary.join(" ")
            );
        }
        if self.mode == Mode::Nat {
            ensure!(st.counter(counter::NAT_REPLY) > 0, "no nat reply counted");
        }
        for ((name, after), (_, before)) in self.topo.tcp_stats()?.iter().zip(&self.tcp_before) {
            let d = after.since(before);
            ensure!(
                d.attempt_fails == 0 && d.estab_resets == 0,
                "{}: {name}: TCP failures or resets: {d:?}",
                self.mode
            );
        }
        Ok(())
    }

    fn daemon(&self) -> &DaemonHandle {
        self.daemon.as_ref().expect("the daemon runs until drop")
    }

    fn service(&self) -> ServiceStatus {
        self.daemon()
            .status()
            .service(SERVICE)
            .cloned()
            .unwrap_or_default()
    }

    /// Polls the daemon's status until `cond` holds, within [`WAIT`].
    fn wait_status(&self, what: &str, cond: impl Fn(&Status) -> bool) -> Result<Status> {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.daemon().status();
            if cond(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("waiting {WAIT:?} for {what}; status: {s:#?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for(&self, what: &str, cond: impl Fn(&ServiceStatus) -> bool) -> Result<ServiceStatus> {
        let s = self.wait_status(what, |s| s.service(SERVICE).is_some_and(&cond))?;
        s.service(SERVICE).cloned().context("service vanished")
    }

    /// Waits until the published table has the formula's weights for
    /// `loads` (instance i ↔ backend i), nothing draining.
    fn wait_weights(&self, loads: &[f64]) -> Result<ServiceStatus> {
        let want: BTreeMap<String, u32> = loads
            .iter()
            .enumerate()
            .map(|(i, &l)| (instance(self.mode, i), formula_weight(l)))
            .collect();
        self.wait_for(&format!("weights {want:?}"), |s| {
            let got: BTreeMap<String, u32> = s
                .table
                .iter()
                .map(|b| (b.instance.clone(), b.weight))
                .collect();
            got == want && s.draining.is_empty() && !s.held
        })
    }

    /// `count` new connections; connections per backend.
    fn run_clients(&self, count: usize) -> Result<Vec<u64>> {
        let t = Instant::now();
        let tally = run_clients_on(&self.topo, count)?;
        eprintln!(
            "{}: {count} connections in {:.2?}: {tally:?}",
            self.mode,
            t.elapsed()
        );
        Ok(tally)
    }

    /// [`CONNECTIONS`] new connections split by the formula for `loads`.
    fn measure_shares(&self, loads: &[f64], what: &str) -> Result<()> {
        let tally = self.run_clients(CONNECTIONS)?;
        check_shares(
            &tally,
            &expected_shares_of(loads),
            &format!("{}: {what}", self.mode),
        )
    }
}

/// `count` new connections from the client namespace; connections per backend.
fn run_clients_on(topo: &Topology, count: usize) -> Result<Vec<u64>> {
    let never = AtomicBool::new(false);
    let limits = ClientLimits {
        per_connection: Duration::from_secs(3),
        total: Duration::from_secs(60),
    };
    Ok(topo.run_clients(count, limits, &never)?.per_backend)
}

fn config_for(mode: Mode, interfaces: &[String], redis_url: &str) -> Result<Config> {
    let text = headroom_tests::topology::scoreboard_daemon_config(
        "e2e",
        None,
        redis_url,
        REFRESH,
        TTL,
        interfaces,
        SERVICE,
        &mode.to_string(),
    );
    text.parse::<Config>()
        .map_err(|e| anyhow::anyhow!("test config: {e}\n{text}"))
}

/// Enters a network namespace by path for the rest of the calling
/// thread's life, or until dropped.
struct EnteredPath {
    original: File,
}

impl EnteredPath {
    fn enter(ns: &PathBuf) -> Result<EnteredPath> {
        let original =
            File::open("/proc/thread-self/ns/net").context("opening this thread's namespace")?;
        let target = File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        // SAFETY: setns only reads the fd; CLONE_NEWNET affects this thread only.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering {}", ns.display()));
        }
        Ok(EnteredPath { original })
    }
}

impl Drop for EnteredPath {
    fn drop(&mut self) {
        // SAFETY: as above.
        if unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "returning to the original namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

// ---------------------------------------------------------------- the reporter

/// One instance as the reporter writes it.
#[derive(Clone, Debug)]
struct Inst {
    id: String,
    load: f64,
    reporting: bool,
    /// `:seen` of its last successful write.
    last_seen_ms: Option<i64>,
}

#[derive(Debug, Default)]
struct RepState {
    instances: Vec<Inst>,
    /// When the last successful write (of all reporting instances) started.
    last_write: Option<Instant>,
    failed: u64,
}

struct RepShared {
    stop: AtomicBool,
    state: Mutex<RepState>,
}

/// Writes the scoreboard every [`REPORT_EVERY`] from inside the balancer
/// namespace, reconnecting after failures. Stopped on drop.
struct Reporter {
    shared: Arc<RepShared>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    fn start(ns: PathBuf, url: String, instances: Vec<(String, f64)>) -> Result<Reporter> {
        let shared = Arc::new(RepShared {
            stop: AtomicBool::new(false),
            state: Mutex::new(RepState {
                instances: instances
                    .into_iter()
                    .map(|(id, load)| Inst {
                        id,
                        load,
                        reporting: true,
                        last_seen_ms: None,
                    })
                    .collect(),
                ..RepState::default()
            }),
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("reporter".into())
            .spawn(move || {
                if let Err(e) = report_loop(&ns, &url, &s) {
                    eprintln!("reporter: {e:#}");
                }
            })
            .context("starting the reporter")?;
        Ok(Reporter {
            shared,
            thread: Some(thread),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RepState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set_loads(&self, loads: &[f64]) {
        for (inst, &l) in self.state().instances.iter_mut().zip(loads) {
            inst.load = l;
        }
    }

    /// Stops writing instance `i`; returns the `:seen` of its last write
    /// (after the next write, so no write in flight can still report it).
    fn stop_reporting(&self, i: usize) -> Result<i64> {
        self.state().instances[i].reporting = false;
        self.wait_written(Instant::now())?;
        self.state().instances[i]
            .last_seen_ms
            .context("instance was never written")
    }

    fn resume_reporting(&self, i: usize) {
        self.state().instances[i].reporting = true;
    }

    /// Waits until a write that started after `after` succeeded.
    fn wait_written(&self, after: Instant) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let st = self.state();
                if st.last_write.is_some_and(|t| t >= after) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!(
                        "the reporter did not write within {WAIT:?} ({} failures)",
                        st.failed
                    );
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reporter's loop: bounded by the stop flag and by a lifetime cap.
fn report_loop(ns: &PathBuf, url: &str, shared: &RepShared) -> Result<()> {
    const LIFETIME: Duration = Duration::from_secs(300);
    let _inside = EnteredPath::enter(ns)?;
    let client = redis::Client::open(url).context("redis URL")?;
    let mut conn: Option<redis::Connection> = None;
    let born = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) && born.elapsed() < LIFETIME {
        let started = Instant::now();
        let (instances, ok) = {
            let insts: Vec<Inst> = shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .instances
                .iter()
                .filter(|i| i.reporting)
                .cloned()
                .collect();
            let now = now_ms();
            let ok = write_reports(&client, &mut conn, &insts, now);
            (
                insts.into_iter().map(|i| (i.id, now)).collect::<Vec<_>>(),
                ok,
            )
        };
        {
            let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            match ok {
                Ok(()) => {
                    for (id, seen) in instances {
                        if let Some(i) = st.instances.iter_mut().find(|i| i.id == id) {
                            i.last_seen_ms = Some(seen);
                        }
                    }
                    st.last_write = Some(started);
                }
                Err(_) => {
                    st.failed += 1;
                    conn = None;
                }
            }
        }
        while started.elapsed() < REPORT_EVERY && !shared.stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// One MULTI/EXEC with every reporting instance: address, load, time.
fn write_reports(
    client: &redis::Client,
    conn: &mut Option<redis::Connection>,
    insts: &[Inst],
    now: i64,
) -> redis::RedisResult<()> {
    if conn.is_none() {
        let c = client.get_connection_with_timeout(Duration::from_millis(500))?;
        c.set_read_timeout(Some(Duration::from_millis(500)))?;
        c.set_write_timeout(Some(Duration::from_millis(500)))?;
        *conn = Some(c);
    }
    let Some(c) = conn.as_mut() else {
        return Ok(());
    };
    let mut p = redis::pipe();
    p.atomic();
    for i in insts {
        p.cmd("HSET")
            .arg(format!("headroom:sb:{{{SERVICE}}}:addr"))
            .arg(&i.id)
            .arg(&i.id)
            .ignore();
        p.cmd("ZADD")
            .arg(format!("headroom:sb:{{{SERVICE}}}:load"))
            .arg(i.load)
            .arg(&i.id)
            .ignore();
        p.cmd("ZADD")
            .arg(format!("headroom:sb:{{{SERVICE}}}:seen"))
            .arg(now)
            .arg(&i.id)
            .ignore();
    }
    p.cmd("SADD").arg("headroom:services").arg(SERVICE).ignore();
    p.query::<()>(c)
}

// ---------------------------------------------------------------- held connections

/// Connections to the VIP that sent half of their request and wait.
struct HeldConnections {
    conns: Vec<(TcpStream, String)>,
    names: Vec<String>,
}

impl HeldConnections {
    /// Opens `n` connections from the client namespace, each sending the
    /// first half of its request.
    fn open(topo: &Topology, n: usize) -> Result<HeldConnections> {
        let vip = SocketAddr::from((VIP, VIP_PORT));
        let _inside = topo.client_ns().enter_thread()?;
        let mut conns = Vec::with_capacity(n);
        for k in 0..n {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                .with_context(|| format!("held connection {k}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            let first = format!("held {k} first half;");
            s.write_all(first.as_bytes())?;
            conns.push((s, first));
        }
        Ok(HeldConnections {
            conns,
            names: (0..BACKENDS).map(backend_name).collect(),
        })
    }

    /// Sends the second halves, half-closes, reads every answer and checks
    /// it echoes the whole request. Connections per backend.
    fn finish(self) -> Result<Vec<u64>> {
        let mut per_backend = vec![0u64; self.names.len()];
        for (k, (mut s, first)) in self.conns.into_iter().enumerate() {
            let second = format!("held {k} second half");
            s.write_all(second.as_bytes())
                .with_context(|| format!("held connection {k}: second half"))?;
            s.shutdown(Shutdown::Write)?;
            let mut reply = String::new();
            (&mut s)
                .take(4096)
                .read_to_string(&mut reply)
                .with_context(|| format!("held connection {k}: reading the reply"))?;
            let (name, echoed) = reply
                .split_once('\n')
                .with_context(|| format!("held connection {k}: reply {reply:?}"))?;
            ensure!(
                echoed == format!("{first}{second}"),
                "held connection {k}: reply {reply:?}"
            );
            let i = self
                .names
                .iter()
                .position(|n| n == name)
                .with_context(|| format!("held connection {k}: unknown backend {name:?}"))?;
            per_backend[i] += 1;
        }
        Ok(per_backend)
    }
}
