//! Restarting `headroom lb run` keeps every established flow (issue 4).
//!
//! The real binary runs in the balancer namespace of a test topology
//! (`headroom_tests::topology`, client — balancer — three backends) and in
//! a private mount namespace the test keeps alive (`unshare --mount`, a
//! sleeping holder; each daemon run enters it with `nsenter`): the bpffs the
//! daemon mounts on `/sys/fs/bpf` and its pins live there, never on the
//! host, and die with the holder even if the test fails. The test reads the
//! pinned maps through `/proc/<holder>/root/...`.
//!
//! A private redis-server and a reporter thread (balancer namespace) keep
//! loads on the scoreboard for two services: `web` (VIP:80, the topology's
//! echo servers) and `stream` (VIP:81, stream servers started here that
//! echo every byte). 50 long-lived connections to `stream` exchange data
//! continuously (write 256 bytes, read them back, every 20 ms). Then:
//!
//! 1. SIGTERM: the daemon exits, XDP stays on the veths (same program), the
//!    streams go on for ~1 s with no daemon at all;
//! 2. a new daemon starts on the pins, takes the state over and replaces the
//!    program on the links (new program id), runs a few refreshes;
//! 3. a second restart with no pause (SIGTERM, start at once: again a new
//!    program), then the loads change and the new daemon follows them.
//!
//! Checked: no stream failed or was reset (client errors, `/proc/net/snmp`
//! of client and backends), no stream stalled more than 1 s (a correctness
//! property of the handover, not a speed target), every byte echoed intact
//! and counted by the backend the stream started on, every stream's
//! connection-table entry is the same backend id with the same address
//! after the restarts as before, the data path never dropped or re-selected
//! a flow (pinned counters), and 600 new `web` connections follow the new
//! loads. Finally `headroom lb detach` removes XDP from the veths and the
//! pin directory, and a second one reports that nothing is left.
//!
//! `root_lb_restart_with_redis_down_keeps_tables` (in-process daemon, pins
//! in a private bpffs): a restart while Redis is down keeps the pinned
//! `web` table (same backend ids, nothing published, new connections split
//! by the old loads), and a service dropped from the config loses its
//! kernel entry.
//!
//! The binary: `HEADROOM_BIN`, else `headroom` in the target directory of
//! this test executable (built by `cargo xtask test` / `cargo test
//! --workspace --release`; else `cargo build --release -p lb-userspace --bin
//! headroom`), which must be newer than the sources: a missing or stale one
//! fails the test with that command.
use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use headroom_tests::{
    bins::headroom_bin,
    mountns::MountNs,
    require_root,
    topology::{backend_addr, backend_name, ClientLimits, Mode, Topology, VIP, VIP_PORT},
    ChildGuard, Netns, RedisServer,
};
use lb_common::{counter, maps, Backend, Flow, FlowKey, BACKEND_ACTIVE};

const BACKENDS: usize = 3;
const STREAMS: usize = 50;
/// The VIP port of the streaming service.
const STREAM_VIP_PORT: u16 = 81;
const CHUNK: usize = 256;
const STREAM_PERIOD: Duration = Duration::from_millis(20);
/// The property under test: no stream waits longer than this for its data.
const MAX_STALL: Duration = Duration::from_secs(1);
/// Bound on any wait for the daemon or the network.
const WAIT: Duration = Duration::from_secs(20);
/// Upper bound on a stream's life, whatever happens.
const STREAM_LIFETIME: Duration = Duration::from_secs(240);
const REPORT_EVERY: Duration = Duration::from_millis(200);
const LOADS_BEFORE: [f64; BACKENDS] = [20.0, 50.0, 80.0];
const LOADS_AFTER: [f64; BACKENDS] = [80.0, 50.0, 20.0];
const NEW_CONNECTIONS: usize = 600;
const TOLERANCE: f64 = 0.06;

/// One topology at a time: on two cores, parallel ones only add noise.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn root_lb_restart_keeps_streams_nat() {
    if !require_root("root_lb_restart_keeps_streams_nat") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    restart_keeps_streams(Mode::Nat).expect("nat");
}

#[test]
fn root_lb_restart_keeps_streams_dsr() {
    if !require_root("root_lb_restart_keeps_streams_dsr") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    restart_keeps_streams(Mode::Dsr).expect("dsr");
}

fn restart_keeps_streams(mode: Mode) -> Result<()> {
    let bin = headroom_bin()?;
    let topo = Topology::new_for_daemon(mode, BACKENDS).context("building the topology")?;
    let tcp_before = topo.tcp_stats()?;
    let redis = {
        let _inside = topo.balancer_ns().enter_thread()?;
        RedisServer::start()?
    };
    let servers = (0..BACKENDS)
        .map(|i| StreamServer::start(&topo, i, stream_port(mode)))
        .collect::<Result<Vec<_>>>()?;
    let name = format!("restart-{}-{mode}", std::process::id());
    let config = write_config(&name, mode, &topo.balancer_interfaces(), &redis.url())?;
    let holder = MountNs::new()?;
    let pins = holder.root().join("sys/fs/bpf/headroom").join(&name);
    let loads = Mutex::new(LOADS_BEFORE);
    let stop = AtomicBool::new(false);
    let url = redis.url();
    let (stop_ref, lb_ns) = (&stop, topo.balancer_ns());

    let outcome = thread::scope(|s| -> Result<()> {
        let reporter = s.spawn(|| report_loop(lb_ns, &url, mode, &loads, stop_ref));
        let result = (|| -> Result<()> {
            let mut daemon = Daemon::start(&bin, &holder, &topo, config.path(), "first")?;
            daemon.wait_published(&["web", "stream"])?;
            let streams = Streams::open(&topo, &stop)?;
            let mut handles = Vec::new();
            for st in streams.conns {
                handles.push(s.spawn(move || run_stream(st, stop_ref)));
            }
            thread::sleep(Duration::from_secs(2));

            let ifaces = topo.balancer_interfaces();
            let ct_before = stream_flows(&pins, &streams.locals)?;
            let prog_first = xdp_prog_ids(&topo, &ifaces)?;

            // 1. SIGTERM, then ~1 s without any daemon.
            daemon.terminate()?;
            ensure!(
                daemon.log().contains("the balancer stays attached"),
                "no 'the balancer stays attached' logged on stop:\n{}",
                daemon.log()
            );
            ensure!(
                xdp_prog_ids(&topo, &ifaces)? == prog_first,
                "the program on the veths changed while no daemon ran"
            );
            thread::sleep(Duration::from_secs(1));

            // 2. A new daemon on the pins: new program on the same links.
            let mut daemon = Daemon::start(&bin, &holder, &topo, config.path(), "second")?;
            daemon.wait_log("pinned state taken over")?;
            let prog_second = xdp_prog_ids(&topo, &ifaces)?;
            for (a, b) in prog_first.iter().zip(&prog_second) {
                ensure!(a != b, "the second daemon did not load a new program: {prog_first:?} → {prog_second:?}");
            }
            thread::sleep(Duration::from_millis(1500));

            // 3. Restart with no pause, then new loads.
            daemon.terminate()?;
            let mut daemon = Daemon::start(&bin, &holder, &topo, config.path(), "third")?;
            daemon.wait_log("pinned state taken over")?;
            let prog_third = xdp_prog_ids(&topo, &ifaces)?;
            for (a, b) in prog_second.iter().zip(&prog_third) {
                ensure!(a != b, "the third daemon did not load a new program");
            }
            *loads.lock().unwrap_or_else(PoisonError::into_inner) = LOADS_AFTER;
            let expected: Vec<String> = (0..BACKENDS)
                .map(|i| {
                    format!(
                        "{}={}",
                        instance(mode, i, mode.server_port()),
                        formula_weight(LOADS_AFTER[i])
                    )
                })
                .collect();
            daemon.wait_log_all(&expected)?;
            let tally = run_clients(&topo, NEW_CONNECTIONS)?;
            check_shares(&tally, &expected_shares(&LOADS_AFTER), "after the restarts")?;

            // The streams' connection-table entries: same backend id, same address.
            let ct_after = stream_flows(&pins, &streams.locals)?;
            for (local, before) in &ct_before {
                let after = ct_after.get(local).with_context(|| {
                    format!("stream from {local}: entry gone after the restarts")
                })?;
                ensure!(
                    after == before,
                    "stream from {local}: entry {before:?} before the restarts, {after:?} after"
                );
            }
            eprintln!(
                "{mode}: {} stream entries unchanged across the restarts",
                ct_after.len()
            );
            stop.store(true, Ordering::SeqCst);
            let mut results = Vec::new();
            for h in handles {
                results.push(h.join().map_err(|_| anyhow!("a stream thread panicked"))?);
            }
            check_streams(&results, &ct_before, &servers)?;
            check_counters(&pins, mode)?;
            daemon.terminate()?;
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        let rep = reporter
            .join()
            .map_err(|_| anyhow!("the reporter panicked"))?;
        result.and(rep)
    });
    for srv in &servers {
        srv.stop();
    }
    outcome?;
    for ((name, after), (_, before)) in topo.tcp_stats()?.iter().zip(&tcp_before) {
        let d = after.since(before);
        ensure!(
            d.attempt_fails == 0 && d.estab_resets == 0,
            "{mode}: {name}: TCP failures or resets: {d:?}"
        );
    }

    // `lb detach`: XDP off, pins gone; a second one finds nothing.
    let out = holder.run(
        &topo.balancer_ns().path(),
        &[
            &bin.to_string_lossy(),
            "lb",
            "detach",
            "--config",
            &config.path().to_string_lossy(),
        ],
    )?;
    eprintln!("{mode}: {}", out.trim());
    ensure!(out.contains("detached"), "lb detach said: {out}");
    for i in topo.balancer_interfaces() {
        let link = topo
            .balancer_ns()
            .exec(&["ip", "-d", "link", "show", "dev", &i])?;
        ensure!(
            !link.contains("prog/xdp"),
            "{i} still has XDP after lb detach: {link}"
        );
    }
    ensure!(
        !pins.exists(),
        "{} still exists after lb detach",
        pins.display()
    );
    let again = holder.run(
        &topo.balancer_ns().path(),
        &[
            &bin.to_string_lossy(),
            "lb",
            "detach",
            "--config",
            &config.path().to_string_lossy(),
        ],
    )?;
    ensure!(
        again.contains("nothing to detach"),
        "second lb detach said: {again}"
    );
    Ok(())
}

#[test]
fn root_lb_restart_with_redis_down_keeps_tables() {
    if !require_root("root_lb_restart_with_redis_down_keeps_tables") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    restart_with_redis_down().expect("restart with Redis down");
}

/// The in-process daemon ([`headroom::daemon::Daemon::start`], pins in a
/// private bpffs): it publishes both services from the scoreboard and
/// stops; Redis dies; a daemon started with a config that no longer has
/// `stream` removes that service's entry, cannot read Redis, and keeps
/// forwarding `web` with the pinned table (same backend ids, nothing
/// published): new connections split as before the restart.
fn restart_with_redis_down() -> Result<()> {
    use headroom::daemon::{RedisState, RunOptions};
    let mode = Mode::Nat;
    let topo = Topology::new_for_daemon(mode, BACKENDS).context("building the topology")?;
    let mut redis = {
        let _inside = topo.balancer_ns().enter_thread()?;
        RedisServer::start()?
    };
    let pins = headroom_tests::PrivateBpffs::mount("restart")?;
    let opts = RunOptions {
        pin_root: Some(pins.root().to_path_buf()),
        ..RunOptions::default()
    };
    let name = format!("redis-down-{}", std::process::id());
    let ifaces = topo.balancer_interfaces();
    let both = write_config(&name, mode, &ifaces, &redis.url())?;
    let web_only = write_config_with(&name, mode, &ifaces, &redis.url(), &BOTH[..1])?;
    let web_ids = |st: &headroom::daemon::Status| -> Vec<(SocketAddr, Option<u32>)> {
        let mut v: Vec<_> = st
            .services
            .iter()
            .filter(|s| s.name == "web")
            .flat_map(|s| s.table.iter().map(|b| (b.addr, b.id)))
            .collect();
        v.sort();
        v
    };

    let loads = Mutex::new(LOADS_BEFORE);
    let stop = AtomicBool::new(false);
    let url = redis.url();
    let lb_ns = topo.balancer_ns();
    let before = thread::scope(|s| -> Result<Vec<(SocketAddr, Option<u32>)>> {
        let reporter = s.spawn(|| report_loop(lb_ns, &url, mode, &loads, &stop));
        let result = (|| {
            let d = start_in_process(&topo, both.path(), &opts)?;
            let want = formula_weight(LOADS_BEFORE[0]);
            let st = wait_status(&d, "tables from the scoreboard", &|st| {
                st.services
                    .iter()
                    .all(|s| s.generation >= 1 && s.table.iter().any(|b| b.weight == want))
            })?;
            d.shutdown()?;
            Ok(web_ids(&st))
        })();
        stop.store(true, Ordering::SeqCst);
        let rep = reporter
            .join()
            .map_err(|_| anyhow!("the reporter panicked"))?;
        result.and_then(|r| rep.map(|()| r))
    })?;
    ensure!(before.len() == BACKENDS, "web table before: {before:?}");

    redis.kill()?;
    let d = start_in_process(&topo, web_only.path(), &opts)?;
    let st = wait_status(&d, "failed reads", &|st| {
        st.reads_failed >= 2 && matches!(st.redis, RedisState::Down { .. })
    })?;
    let web = st
        .services
        .iter()
        .find(|s| s.name == "web")
        .context("web service")?;
    ensure!(
        web.generation == 0,
        "a table was published without Redis: {web:?}"
    );
    ensure!(
        web_ids(&st) == before,
        "web's backends changed over the restart: {before:?} → {:?}",
        web_ids(&st)
    );
    let services: BpfHashMap<MapData, lb_common::ServiceKey, lb_common::ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(pinned(
            &pins.root().join(&name),
            maps::SERVICES,
        )?))?;
    let ports: Vec<u16> = services
        .keys()
        .map(|k| k.map(|k| u16::from_be(k.port)))
        .collect::<Result<_, _>>()?;
    ensure!(
        ports == [VIP_PORT],
        "services in the kernel after removing stream: ports {ports:?}"
    );
    let tally = run_clients(&topo, NEW_CONNECTIONS)?;
    check_shares(
        &tally,
        &expected_shares(&LOADS_BEFORE),
        "restarted with Redis down",
    )?;
    d.shutdown()?;
    Ok(())
}

#[test]
fn root_lb_restart_gives_a_draining_backend_back_to_its_own_service() {
    if !require_root("root_lb_restart_gives_a_draining_backend_back_to_its_own_service") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    draining_backend_keeps_its_owner().expect("draining backend across a restart");
}

/// The kernel does not record which service a backend id belongs to. A
/// `stream` instance drained (scale-in mark) before a restart is in no
/// table, so the new daemon must not hand its id to `web` (listed first,
/// also nat, same family), which would retire it at its first refresh and
/// re-balance (reset) the drained instance's connections: the id waits for
/// `stream` to claim it, and stays `ACTIVE | DRAINING`.
fn draining_backend_keeps_its_owner() -> Result<()> {
    use headroom::daemon::{RunOptions, Status};
    use lb_common::BACKEND_DRAINING;
    let mode = Mode::Nat;
    let topo = Topology::new_for_daemon(mode, BACKENDS).context("building the topology")?;
    let redis = {
        let _inside = topo.balancer_ns().enter_thread()?;
        RedisServer::start()?
    };
    let pins = headroom_tests::PrivateBpffs::mount("owners")?;
    let opts = RunOptions {
        pin_root: Some(pins.root().to_path_buf()),
        ..RunOptions::default()
    };
    let name = format!("owners-{}", std::process::id());
    let config = write_config(&name, mode, &topo.balancer_interfaces(), &redis.url())?;
    let drained = instance(mode, 2, stream_port(mode));
    let drained_id = |st: &Status| -> Option<u32> {
        st.services
            .iter()
            .find(|s| s.name == "stream")?
            .draining
            .iter()
            .find(|b| b.instance == drained)?
            .id
    };
    let owned_by_web = |st: &Status, id: u32| {
        st.services
            .iter()
            .filter(|s| s.name == "web")
            .flat_map(|s| s.table.iter().chain(&s.draining))
            .any(|b| b.id == Some(id))
    };

    let loads = Mutex::new(LOADS_BEFORE);
    let stop = AtomicBool::new(false);
    let url = redis.url();
    let lb_ns = topo.balancer_ns();
    thread::scope(|s| -> Result<()> {
        let reporter = s.spawn(|| report_loop(lb_ns, &url, mode, &loads, &stop));
        let result = (|| -> Result<()> {
            let d = start_in_process(&topo, config.path(), &opts)?;
            wait_status(&d, "tables from the scoreboard", &|st| {
                st.services
                    .iter()
                    .all(|s| s.generation >= 1 && s.table.len() == BACKENDS)
            })?;
            {
                let _inside = lb_ns.enter_thread()?;
                let mut c = redis::Client::open(url.as_str())?.get_connection()?;
                redis::cmd("SADD")
                    .arg("headroom:sb:{stream}:drain")
                    .arg(&drained)
                    .query::<()>(&mut c)?;
            }
            let st = wait_status(&d, "the drain mark applied", &|st| drained_id(st).is_some())?;
            let id = drained_id(&st).context("drained id")?;
            d.shutdown()?;

            let d = start_in_process(&topo, config.path(), &opts)?;
            let first = d.status().refreshes;
            let st = wait_status(&d, "a few refreshes after the restart", &|st| {
                st.refreshes >= first + 5 && st.reads_ok >= 5
            })?;
            ensure!(
                drained_id(&st) == Some(id),
                "the drained stream instance lost its backend id {id} over the restart: {st:?}"
            );
            ensure!(
                !owned_by_web(&st, id),
                "web took stream's draining backend {id}: {st:?}"
            );
            let backends: Array<MapData, Backend> = Array::try_from(Map::Array(pinned(
                &pins.root().join(&name),
                maps::BACKENDS,
            )?))?;
            let b = backends.get(&id, 0)?;
            ensure!(
                b.flags == BACKEND_ACTIVE | BACKEND_DRAINING,
                "backend {id} after the restart: {b:?} (want ACTIVE | DRAINING)"
            );
            d.shutdown()?;
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        let rep = reporter
            .join()
            .map_err(|_| anyhow!("the reporter panicked"))?;
        result.and(rep)
    })
}

/// The in-process daemon on `config`, started in the balancer namespace.
fn start_in_process(
    topo: &Topology,
    config: &Path,
    opts: &headroom::daemon::RunOptions,
) -> Result<headroom::daemon::DaemonHandle> {
    let config = headroom::config::Config::load(config)?;
    let _inside = topo.balancer_ns().enter_thread()?;
    headroom::daemon::Daemon::start(config, opts.clone())
}

/// Waits (bounded by [`WAIT`]) until the daemon's status meets `cond`.
fn wait_status(
    d: &headroom::daemon::DaemonHandle,
    what: &str,
    cond: &dyn Fn(&headroom::daemon::Status) -> bool,
) -> Result<headroom::daemon::Status> {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = d.status();
        if cond(&st) {
            return Ok(st);
        }
        ensure!(
            Instant::now() < deadline,
            "no {what} within {WAIT:?}: {st:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- the binary and its namespace

/// One `headroom lb run`, its stderr in a file.
struct Daemon {
    child: ChildGuard,
    log: PathBuf,
    what: &'static str,
}

impl Daemon {
    fn start(
        bin: &Path,
        ns: &MountNs,
        topo: &Topology,
        config: &Path,
        what: &'static str,
    ) -> Result<Daemon> {
        let log = std::env::temp_dir().join(format!(
            "hr-restart-{}-{}-{what}.log",
            std::process::id(),
            topo.balancer_ns().name()
        ));
        let file = File::create(&log)?;
        let child = ns
            .command(
                &topo.balancer_ns().path(),
                &[
                    &bin.to_string_lossy(),
                    "lb",
                    "run",
                    "--config",
                    &config.to_string_lossy(),
                ],
            )
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting headroom lb run")?;
        let mut d = Daemon {
            child: ChildGuard::new(child),
            log,
            what,
        };
        d.wait_log("running")?;
        Ok(d)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until every one of `needles` appears in one log line.
    fn wait_log_all(&mut self, needles: &[String]) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log
                .lines()
                .any(|l| needles.iter().all(|n| l.contains(n.as_str())))
            {
                return Ok(());
            }
            if let Some(s) = self.child.try_wait()? {
                bail!("the {} daemon exited ({s}):\n{log}", self.what);
            }
            ensure!(
                Instant::now() < deadline,
                "the {} daemon did not log {needles:?} within {WAIT:?}:\n{log}",
                self.what
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_log(&mut self, needle: &str) -> Result<()> {
        self.wait_log_all(&[needle.to_string()])
    }

    /// Waits for a published table of each of `services`.
    fn wait_published(&mut self, services: &[&str]) -> Result<()> {
        for s in services {
            self.wait_log_all(&["published table".into(), format!("service={s}")])?;
        }
        Ok(())
    }

    /// SIGTERM; waits for a clean exit.
    fn terminate(&mut self) -> Result<()> {
        // nsenter execs the daemon: the pid is the daemon's.
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        ensure!(rc == 0, "SIGTERM: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait()? {
                ensure!(
                    s.success(),
                    "the {} daemon exited with {s}:\n{}",
                    self.what,
                    self.log()
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the {} daemon ignored SIGTERM",
                self.what
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The XDP program ids on `ifaces` of the balancer namespace.
fn xdp_prog_ids(topo: &Topology, ifaces: &[String]) -> Result<Vec<u32>> {
    ifaces
        .iter()
        .map(|i| {
            let out = topo
                .balancer_ns()
                .exec(&["ip", "-d", "link", "show", "dev", i])?;
            out.split("prog/xdp id ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|id| id.parse().ok())
                .with_context(|| format!("no XDP program on {i}: {out}"))
        })
        .collect()
}

/// Both services, as the restart test runs them.
const BOTH: [(&str, u16); 2] = [("web", VIP_PORT), ("stream", STREAM_VIP_PORT)];

fn write_config(
    name: &str,
    mode: Mode,
    ifaces: &[String],
    redis_url: &str,
) -> Result<tempfile_path::TempPath> {
    write_config_with(name, mode, ifaces, redis_url, &BOTH)
}

fn write_config_with(
    name: &str,
    mode: Mode,
    ifaces: &[String],
    redis_url: &str,
    services: &[(&str, u16)],
) -> Result<tempfile_path::TempPath> {
    let mut text = format!(
        "name = \"{name}\"\n\
         [scoreboard]\nredis_url = \"{redis_url}\"\nrefresh_interval = \"100ms\"\nttl = \"2s\"\n\
         [weights]\newma_alpha = 1\ndead_band = 0.01\nramp_up = \"0s\"\n\
         [datapath]\nconntrack_size = 65536\nmax_services = 4\nmax_backends = 64\n\
         [[group]]\nname = \"g\"\n"
    );
    for i in ifaces {
        text.push_str(&format!(
            "[[group.interface]]\nname = \"{i}\"\nmode = \"native\"\n"
        ));
    }
    for (svc, port) in services {
        text.push_str(&format!(
            "[[group.service]]\nname = \"{svc}\"\nvip = \"{VIP}\"\nport = {port}\nmode = \"{mode}\"\n"
        ));
    }
    tempfile_path::TempPath::write(&text)
}

/// A config file removed on drop (the tests crate has no tempfile).
mod tempfile_path {
    use std::path::{Path, PathBuf};

    use anyhow::{Context, Result};

    pub struct TempPath(PathBuf);

    impl TempPath {
        pub fn write(text: &str) -> Result<Self> {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "hr-restart-{}-{}.toml",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(TempPath(p))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

// ---------------------------------------------------------------- scoreboard

/// Backend port of the streaming service (nat: its own; dsr: the VIP's).
fn stream_port(mode: Mode) -> u16 {
    match mode {
        Mode::Nat => 9081,
        Mode::Dsr => STREAM_VIP_PORT,
    }
}

fn instance(_mode: Mode, i: usize, port: u16) -> String {
    format!("{}:{port}", backend_addr(i))
}

/// The documented formula with the test's knobs (floor 5, no smoothing).
fn formula_weight(load: f64) -> u32 {
    (100.0 * (100.0 - load).max(5.0)).round() as u32
}

fn expected_shares(loads: &[f64]) -> Vec<f64> {
    let w: Vec<f64> = loads
        .iter()
        .map(|&l| f64::from(formula_weight(l)))
        .collect();
    let sum: f64 = w.iter().sum();
    w.iter().map(|w| w / sum).collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Writes both services' instances every [`REPORT_EVERY`] from inside the
/// balancer namespace until `stop` (bounded by a lifetime cap).
fn report_loop(
    lb_ns: &Netns,
    url: &str,
    mode: Mode,
    loads: &Mutex<[f64; BACKENDS]>,
    stop: &AtomicBool,
) -> Result<()> {
    let _inside = lb_ns.enter_thread()?;
    let client = redis::Client::open(url)?;
    let mut conn: Option<redis::Connection> = None;
    let born = Instant::now();
    let mut failures = 0u32;
    while !stop.load(Ordering::SeqCst) && born.elapsed() < STREAM_LIFETIME {
        let started = Instant::now();
        let l = *loads.lock().unwrap_or_else(PoisonError::into_inner);
        let res = (|| -> redis::RedisResult<()> {
            if conn.is_none() {
                conn = Some(client.get_connection_with_timeout(Duration::from_secs(1))?);
            }
            let Some(c) = conn.as_mut() else {
                return Ok(());
            };
            let now = now_ms();
            let mut p = redis::pipe();
            p.atomic();
            for (svc, port) in [("web", mode.server_port()), ("stream", stream_port(mode))] {
                for (i, load) in l.iter().enumerate() {
                    let id = instance(mode, i, port);
                    p.cmd("HSET")
                        .arg(format!("headroom:sb:{{{svc}}}:addr"))
                        .arg(&id)
                        .arg(&id)
                        .ignore();
                    p.cmd("ZADD")
                        .arg(format!("headroom:sb:{{{svc}}}:load"))
                        .arg(*load)
                        .arg(&id)
                        .ignore();
                    p.cmd("ZADD")
                        .arg(format!("headroom:sb:{{{svc}}}:seen"))
                        .arg(now)
                        .arg(&id)
                        .ignore();
                }
                p.cmd("SADD").arg("headroom:services").arg(svc).ignore();
            }
            p.query::<()>(c)
        })();
        if res.is_err() {
            conn = None;
            failures += 1;
            ensure!(failures < 50, "the reporter failed 50 times: {res:?}");
        }
        while started.elapsed() < REPORT_EVERY && !stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- streams

/// Echoes every byte of every connection on `port` in backend `i`'s
/// namespace, after a first line with its name; counts bytes per peer.
struct StreamServer {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    /// Bytes received (and echoed) per client address, when the connection ended.
    received: Arc<Mutex<HashMap<SocketAddr, u64>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl StreamServer {
    fn start(topo: &Topology, i: usize, port: u16) -> Result<Self> {
        let listener = {
            let _inside = topo.backend_ns(i).enter_thread()?;
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .with_context(|| format!("{}: listening on {port}", backend_name(i)))?
        };
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(HashMap::new()));
        let (l, st, rec, name) = (
            listener.clone(),
            stop.clone(),
            received.clone(),
            backend_name(i),
        );
        let thread = thread::Builder::new()
            .name(format!("{name}-stream"))
            .spawn(move || {
                thread::scope(|s| loop {
                    let accepted = l.accept();
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok((conn, peer)) = accepted {
                        let (name, st, rec) = (&name, &st, &rec);
                        s.spawn(move || {
                            let n = echo(conn, name, st);
                            rec.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(peer, n);
                        });
                    }
                })
            })?;
        Ok(StreamServer {
            listener,
            stop,
            received,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept (EINVAL); the loop then sees `stop`.
        // SAFETY: the fd is valid while `self.listener` lives.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }

    fn received(&self, peer: &SocketAddr) -> Option<u64> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(peer)
            .copied()
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Name line, then echo until EOF (or `stop`); bytes echoed.
fn echo(mut conn: TcpStream, name: &str, stop: &AtomicBool) -> u64 {
    let mut n = 0u64;
    if conn.write_all(format!("{name}\n").as_bytes()).is_err() {
        return n;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4096];
    let born = Instant::now();
    while born.elapsed() < STREAM_LIFETIME {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                if conn.write_all(&buf[..k]).is_err() {
                    break;
                }
                n += k as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    n
}

struct StreamConn {
    k: usize,
    stream: TcpStream,
    backend: usize,
}

struct Streams {
    conns: Vec<StreamConn>,
    /// Local (client) address of every stream, by index.
    locals: Vec<SocketAddr>,
}

impl Streams {
    fn open(topo: &Topology, stop: &AtomicBool) -> Result<Streams> {
        let vip = SocketAddr::from((VIP, STREAM_VIP_PORT));
        let names: Vec<String> = (0..BACKENDS).map(backend_name).collect();
        let _inside = topo.client_ns().enter_thread()?;
        let mut conns = Vec::new();
        let mut locals = Vec::new();
        for k in 0..STREAMS {
            ensure!(!stop.load(Ordering::SeqCst), "stopped");
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
                .with_context(|| format!("stream {k}: connecting"))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.len() < 64 {
                s.read_exact(&mut b)
                    .with_context(|| format!("stream {k}: name line"))?;
                if b[0] == b'\n' {
                    break;
                }
                line.push(b[0]);
            }
            let name = String::from_utf8_lossy(&line).to_string();
            let backend = names
                .iter()
                .position(|n| *n == name)
                .with_context(|| format!("stream {k}: unknown backend {name:?}"))?;
            locals.push(s.local_addr()?);
            conns.push(StreamConn {
                k,
                stream: s,
                backend,
            });
        }
        let mut per = [0usize; BACKENDS];
        for c in &conns {
            per[c.backend] += 1;
        }
        eprintln!("{STREAMS} streams open, per backend {per:?}");
        Ok(Streams { conns, locals })
    }
}

#[derive(Debug)]
struct StreamResult {
    k: usize,
    local: SocketAddr,
    backend: usize,
    sent: u64,
    max_gap: Duration,
    error: Option<String>,
}

fn pattern(k: usize, off: u64) -> u8 {
    ((k as u64 * 31 + off) % 251) as u8
}

/// Writes a chunk, reads it back, checks it, every [`STREAM_PERIOD`], until
/// `stop`; then half-closes and reads to the end.
fn run_stream(c: StreamConn, stop: &AtomicBool) -> StreamResult {
    let StreamConn {
        k,
        mut stream,
        backend,
    } = c;
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut r = StreamResult {
        k,
        local,
        backend,
        sent: 0,
        max_gap: Duration::ZERO,
        error: None,
    };
    let born = Instant::now();
    let mut last_ok = Instant::now();
    let mut out = [0u8; CHUNK];
    let mut back = [0u8; CHUNK];
    let res = (|| -> Result<()> {
        while !stop.load(Ordering::SeqCst) && born.elapsed() < STREAM_LIFETIME {
            for (j, b) in out.iter_mut().enumerate() {
                *b = pattern(k, r.sent + j as u64);
            }
            stream.write_all(&out).context("write")?;
            stream.read_exact(&mut back).context("read")?;
            ensure!(back == out, "echo differs at offset {}", r.sent);
            r.sent += CHUNK as u64;
            let now = Instant::now();
            r.max_gap = r.max_gap.max(now - last_ok);
            last_ok = now;
            thread::sleep(STREAM_PERIOD);
        }
        stream.shutdown(Shutdown::Write).context("half-close")?;
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .context("reading to the end")?;
        ensure!(
            rest.is_empty(),
            "{} unexpected bytes at the end",
            rest.len()
        );
        Ok(())
    })();
    if let Err(e) = res {
        r.error = Some(format!("{e:#}"));
    }
    r
}

fn check_streams(
    results: &[StreamResult],
    ct_before: &HashMap<SocketAddr, (u32, Backend)>,
    servers: &[StreamServer],
) -> Result<()> {
    let worst = results.iter().map(|r| r.max_gap).max().unwrap_or_default();
    let bytes: u64 = results.iter().map(|r| r.sent).sum();
    eprintln!(
        "{} streams: {bytes} bytes echoed, largest gap between reads {worst:.2?}",
        results.len()
    );
    // The servers record a connection when it ends.
    let deadline = Instant::now() + WAIT;
    for r in results {
        ensure!(
            r.error.is_none(),
            "stream {} ({}): {}",
            r.k,
            r.local,
            r.error.as_deref().unwrap_or("")
        );
        ensure!(
            r.max_gap <= MAX_STALL,
            "stream {} stalled {:.2?} (> {MAX_STALL:?})",
            r.k,
            r.max_gap
        );
        ensure!(
            ct_before.contains_key(&r.local),
            "stream {} was not in the connection table",
            r.k
        );
        let got = loop {
            if let Some(n) = servers[r.backend].received(&r.local) {
                break n;
            }
            ensure!(
                Instant::now() < deadline,
                "stream {}: {} never saw its end",
                r.k,
                backend_name(r.backend)
            );
            thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            got == r.sent,
            "stream {}: {} echoed {got} bytes, the client sent {}",
            r.k,
            backend_name(r.backend),
            r.sent
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- pinned maps

fn pinned(pins: &Path, name: &str) -> Result<MapData> {
    MapData::from_pin(pins.join(name)).with_context(|| format!("opening pinned {name}"))
}

/// The connection-table entry (backend id, and what that id holds) of
/// every stream, by client address.
fn stream_flows(pins: &Path, locals: &[SocketAddr]) -> Result<HashMap<SocketAddr, (u32, Backend)>> {
    let ct: BpfHashMap<MapData, FlowKey, Flow> =
        BpfHashMap::try_from(Map::LruHashMap(pinned(pins, maps::CONNTRACK)?))?;
    let backends: Array<MapData, Backend> =
        Array::try_from(Map::Array(pinned(pins, maps::BACKENDS)?))?;
    let mut out = HashMap::new();
    for e in ct.iter() {
        let (k, f) = e?;
        if u16::from_be(k.dport) != STREAM_VIP_PORT {
            continue;
        }
        let src = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(k.src[0].to_ne_bytes())),
            u16::from_be(k.sport),
        );
        if locals.contains(&src) {
            let b = backends.get(&f.backend, 0)?;
            ensure!(
                b.flags & BACKEND_ACTIVE != 0,
                "stream from {src}: backend {} is not active: {b:?}",
                f.backend
            );
            out.insert(src, (f.backend, b));
        }
    }
    ensure!(
        out.len() == locals.len(),
        "{} of {} streams in the connection table",
        out.len(),
        locals.len()
    );
    Ok(out)
}

/// Over the whole test (the counters live in the pinned maps, across every
/// daemon run): nothing dropped, missed or re-selected.
fn check_counters(pins: &Path, mode: Mode) -> Result<()> {
    let global: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned(pins, maps::GLOBAL_STATS)?))?;
    let get = |c: u32| -> Result<u64> { Ok(global.get(&c, 0)?.iter().sum()) };
    let mut summary = Vec::new();
    for (i, n) in counter::NAMES.iter().enumerate() {
        let v = get(i as u32)?;
        if v != 0 {
            summary.push(format!("{n}={v}"));
        }
    }
    eprintln!("{mode}: balancer counters: {}", summary.join(" "));
    for c in [
        counter::DROP_NO_BACKEND,
        counter::DROP_REDIRECT,
        counter::PASS_FIB,
        counter::MISS_NON_SYN,
        counter::CT_RESELECT,
    ] {
        ensure!(
            get(c)? == 0,
            "{mode}: {} = {}",
            counter::NAMES[c as usize],
            get(c)?
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- new connections

fn run_clients(topo: &Topology, count: usize) -> Result<Vec<u64>> {
    let never = AtomicBool::new(false);
    let limits = ClientLimits {
        per_connection: Duration::from_secs(3),
        total: Duration::from_secs(120),
    };
    Ok(topo.run_clients(count, limits, &never)?.per_backend)
}

fn check_shares(tally: &[u64], expected: &[f64], what: &str) -> Result<()> {
    let total: u64 = tally.iter().sum();
    ensure!(total > 0, "{what}: no connection");
    for (i, (&n, e)) in tally.iter().zip(expected).enumerate() {
        let g = n as f64 / total as f64;
        eprintln!(
            "{what}: {} {:.1} % (expected {:.1} %)",
            backend_name(i),
            g * 100.0,
            e * 100.0
        );
        ensure!(
            (g - e).abs() <= TOLERANCE,
            "{what}: {} got {:.1} % of {total}, expected {:.1} % ± {:.0} points ({tally:?})",
            backend_name(i),
            g * 100.0,
            e * 100.0,
            TOLERANCE * 100.0
        );
    }
    Ok(())
}
