//! The scaling loop end to end, every part real: the environment of the
//! scale-in test (`tests/tests/cm_scale_in.rs`) and of `cargo xtask bench
//! scale` (`src/bin/bench-scale.rs`).
//!
//! ```text
//!  client ns            balancer ns                                  node ns i (n0, n1, …)
//!  c-lb 10.90.0.2 ─── lb-c   [XDP: headroom lb run]   lb-b<i> ─── b-lb 10.91.<i>.2
//!                     redis-server 127.0.0.1:P                         headroom agent :7070
//!                     (also on 10.98.0.1:P, on lo)                     instances (scale-instance)
//!                     headroom container-manager                         started by the agent
//! ```
//!
//! The namespaces and links are [`Topology::new_for_daemon`]'s (nat mode;
//! its backend namespaces are the nodes, each with its own address on its
//! own link to the balancer). In the balancer namespace run a private
//! [`RedisServer`], the `headroom lb run` daemon (scoreboard mode, XDP on
//! the balancer's veths, metrics and status on 127.0.0.1:9470 of that
//! namespace) and the `headroom container-manager` process with one
//! `--agent NODE=http://10.91.<i>.2:7070` per node. Each node namespace runs
//! a `headroom agent` process. Redis listens only on the balancer's
//! loopback and on 10.98.0.1 (an address on the balancer's `lo`, reached
//! through each node's default route), where the nodes' processes find the
//! scoreboard and the permission DB.
//!
//! Keys are made with `headroom keys` (principal `container-manager` with
//! its grant on service `agent`; `node-<n>` per node, passed to the agents
//! as their signing key), the service with `headroom services register`.
//! Its start template runs `scale-instance` ([`Options::instance_bin`]): a
//! TCP server answering each line with its instance id, listening on the lb
//! port the manager chose, reporting the load in a file the caller controls
//! ([`ScaleEnv::set_load`]) to the scoreboard itself.
//!
//! Everything is torn down on drop, also on panic: the manager, agents and
//! daemon are killed, Redis stops, the namespaces are deleted with every
//! process left in them (the instances), the work directory is removed.
pub mod conn;
pub mod records;

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use headroom::{admin_client::AdminClient, daemon::Status};

use crate::{
    process::ChildGuard,
    topology::{backend_addr, scoreboard_daemon_config, Mode, TcpStats, Topology, VIP, VIP_PORT},
    Netns, RedisServer,
};
pub use conn::LineConn;
pub use records::{AgentInstance, CmDecision, CmInstance, SbEntries};

/// The scaled service (registry name, scoreboard service and daemon service).
pub const SERVICE: &str = "web";
/// Where the nodes reach Redis: an address on the balancer's loopback.
pub const REDIS_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
/// Port of every node's agent.
pub const AGENT_PORT: u16 = 7070;
/// The daemon's admin endpoint (inside the balancer namespace).
pub const ADMIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9470);
/// The lb port range of the service (the manager takes the lowest free one
/// per node).
pub const PORTS: (u16, u16) = (9000, 9009);
/// Bound on waiting for a process to come up.
const START_WAIT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// What to build.
#[derive(Clone, Debug)]
pub struct Options {
    /// Node namespaces, each with an agent.
    pub nodes: usize,
    /// The service's `min` and `max`.
    pub min: u32,
    /// See `min`.
    pub max: u32,
    /// Registry `warm_up_secs`.
    pub warm_up_secs: u64,
    /// Registry `cool_down_secs`: how long a drained instance keeps its
    /// connections before it is stopped.
    pub cool_down_secs: u64,
    /// Registry `stop_grace_secs`.
    pub stop_grace_secs: u64,
    /// Container-manager `--interval`.
    pub interval: Duration,
    /// Container-manager `--window`.
    pub window: Duration,
    /// Container-manager `--stale`.
    pub stale: Duration,
    /// Daemon refresh interval.
    pub refresh: Duration,
    /// Daemon scoreboard TTL.
    pub ttl: Duration,
    /// How often each instance reports, ms.
    pub report_ms: u64,
    /// The load every instance reports at first.
    pub initial_load: f64,
    /// The `headroom` binary ([`crate::bins::headroom_bin`]).
    pub headroom_bin: PathBuf,
    /// The `scale-instance` binary.
    pub instance_bin: PathBuf,
}

impl Options {
    /// Test-speed knobs (intervals of 100–200 ms, a 1 s window) for the
    /// given binaries; adjust the rest per caller.
    pub fn new(headroom_bin: PathBuf, instance_bin: PathBuf) -> Options {
        Options {
            nodes: 2,
            min: 1,
            max: 2,
            warm_up_secs: 1,
            cool_down_secs: 1,
            stop_grace_secs: 1,
            interval: Duration::from_millis(200),
            window: Duration::from_secs(1),
            stale: Duration::from_secs(2),
            refresh: Duration::from_millis(100),
            ttl: Duration::from_secs(2),
            report_ms: 100,
            initial_load: 5.0,
            headroom_bin,
            instance_bin,
        }
    }
}

/// The running environment. See the module docs.
///
/// Field order is drop order: manager, agents and daemon die first, then
/// Redis, then the namespaces (with the instances in them),
/// then the work directory.
pub struct ScaleEnv {
    cm: ChildGuard,
    agents: Vec<ChildGuard>,
    daemon: ChildGuard,
    conn: Mutex<redis::Connection>,
    redis: RedisServer,
    topo: Topology,
    dir: WorkDir,
    opts: Options,
    tcp_before: TcpStats,
}

impl ScaleEnv {
    /// Builds and starts everything; returns once the daemon runs, every
    /// agent is ready and the manager has started.
    pub fn start(opts: Options) -> Result<ScaleEnv> {
        ensure!(
            (1..=8).contains(&opts.nodes),
            "1..=8 nodes, not {}",
            opts.nodes
        );
        for b in [&opts.headroom_bin, &opts.instance_bin] {
            ensure!(b.is_file(), "{} does not exist", b.display());
        }
        let dir = WorkDir::new()?;
        let topo = Topology::new_for_daemon(Mode::Nat, opts.nodes).context("the topology")?;
        let lb = topo.balancer_ns();
        lb.add_addr("lo", &format!("{REDIS_NODE_ADDR}/32"))?;
        let redis = {
            let _inside = lb.enter_thread()?;
            RedisServer::start_also_on(&[REDIS_NODE_ADDR.into()])?
        };
        let node_redis = format!("redis://{REDIS_NODE_ADDR}:{}", redis.port());
        let conn = {
            let _inside = lb.enter_thread()?;
            let c = redis::Client::open(redis.url())?
                .get_connection_with_timeout(Duration::from_secs(2))
                .context("connecting to the test's redis")?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.set_write_timeout(Some(Duration::from_secs(5)))?;
            c
        };
        let tcp_before = TcpStats::read(topo.client_ns())?;
        let bin = opts.headroom_bin.to_string_lossy().into_owned();
        let url = redis.url();

        // Keys and grants, with the real CLI.
        let cm_key = create_key(lb, &bin, &url, "container-manager")?;
        lb.exec(&[
            &bin,
            "keys",
            "--redis",
            &url,
            "grant",
            "--principal",
            "container-manager",
            "--service",
            "agent",
            "--method",
            "GET",
            "--method",
            "POST",
            "--method",
            "DELETE",
            "--prefix",
            "/v1/instances",
        ])
        .context("granting the container-manager")?;

        // The service.
        std::fs::write(dir.load_file(), format!("{}\n", opts.initial_load))?;
        let toml = service_toml(&opts, &dir, &node_redis);
        let services = dir.path().join("services.toml");
        std::fs::write(&services, &toml)?;
        lb.exec(&[
            &bin,
            "services",
            "--redis",
            &url,
            "register",
            &services.to_string_lossy(),
        ])
        .with_context(|| format!("registering\n{toml}"))?;

        // The balancer daemon.
        let name = format!("scale-{}-{}", std::process::id(), dir.n);
        let config = scoreboard_daemon_config(
            &name,
            Some(ADMIN.into()),
            &url,
            opts.refresh,
            opts.ttl,
            &topo.balancer_interfaces(),
            SERVICE,
            "nat",
        );
        let config_path = dir.path().join("lb.toml");
        std::fs::write(&config_path, config)?;
        let daemon_log = dir.path().join("lb.log");
        let mut daemon = spawn_logged(
            lb,
            &[
                &bin,
                "lb",
                "run",
                "--config",
                &config_path.to_string_lossy(),
            ],
            &[],
            &daemon_log,
        )?;
        wait_log(&mut daemon, &daemon_log, "running", "the lb daemon")?;

        // The agents, one per node namespace.
        let mut agents = Vec::new();
        for i in 0..opts.nodes {
            let node = node_name(i);
            let key = create_key(lb, &bin, &url, &format!("node-{node}"))?;
            let listen = SocketAddr::new(IpAddr::V4(backend_addr(i)), AGENT_PORT).to_string();
            let state = dir.path().join(format!("agent-{node}"));
            let argv = [
                bin.as_str(),
                "agent",
                "--node",
                &node,
                "--listen",
                &listen,
                "--redis",
                &node_redis,
                "--state-dir",
                &state.to_string_lossy(),
            ];
            let env = [
                ("HEADROOM_AGENT_ACCESS_KEY_ID", key.0.as_str()),
                ("HEADROOM_AGENT_SECRET", key.1.as_str()),
            ];
            let log = dir.path().join(format!("agent-{node}.log"));
            agents.push(spawn_logged(topo.backend_ns(i), &argv, &env, &log)?);
        }
        for (i, agent) in agents.iter_mut().enumerate() {
            let addr = SocketAddr::new(IpAddr::V4(backend_addr(i)), AGENT_PORT);
            wait_ready(lb, addr, agent).with_context(|| format!("agent of {}", node_name(i)))?;
        }

        // The container-manager.
        let mut argv: Vec<String> = [
            "container-manager",
            "--redis",
            &url,
            "--interval",
            &ms(opts.interval),
            "--window",
            &ms(opts.window),
            "--stale",
            &ms(opts.stale),
            "--lease-ttl",
            "2s",
            "--holder",
            "cm-scale-env",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for i in 0..opts.nodes {
            argv.push("--agent".into());
            argv.push(format!(
                "{}=http://{}:{AGENT_PORT}",
                node_name(i),
                backend_addr(i)
            ));
        }
        let mut full = vec![bin.as_str()];
        full.extend(argv.iter().map(String::as_str));
        let env = [
            ("HEADROOM_CM_ACCESS_KEY_ID", cm_key.0.as_str()),
            ("HEADROOM_CM_SECRET", cm_key.1.as_str()),
        ];
        let cm_log = dir.path().join("cm.log");
        let mut cm = spawn_logged(lb, &full, &env, &cm_log)?;
        wait_log(&mut cm, &cm_log, "container-manager started", "the manager")?;

        Ok(ScaleEnv {
            cm,
            agents,
            daemon,
            conn: Mutex::new(conn),
            redis,
            topo,
            dir,
            opts,
            tcp_before,
        })
    }

    /// The options it was built with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The topology (namespaces).
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The test's Redis (on the balancer namespace's loopback).
    pub fn redis(&self) -> &RedisServer {
        &self.redis
    }

    /// A Redis connection made inside the balancer namespace.
    pub fn conn(&self) -> MutexGuard<'_, redis::Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the load every instance reports from its next report on.
    pub fn set_load(&self, load: f64) -> Result<()> {
        // Written whole and renamed, so an instance never reads half of it.
        let tmp = self.dir.path().join("load.tmp");
        std::fs::write(&tmp, format!("{load}\n"))?;
        std::fs::rename(&tmp, self.dir.load_file())?;
        Ok(())
    }

    /// The manager's instance records.
    pub fn cm_instances(&self) -> Result<Vec<CmInstance>> {
        records::cm_instances(&mut self.conn(), SERVICE)
    }

    /// The manager's decisions, oldest first.
    pub fn decisions(&self) -> Result<Vec<CmDecision>> {
        records::decisions(&mut self.conn(), SERVICE)
    }

    /// Every instance every agent mirrors, with its node.
    pub fn agent_instances(&self) -> Result<Vec<(String, AgentInstance)>> {
        let mut out = Vec::new();
        for i in 0..self.opts.nodes {
            let node = node_name(i);
            for r in records::agent_instances(&mut self.conn(), &node)? {
                out.push((node.clone(), r));
            }
        }
        Ok(out)
    }

    /// Instance `id`'s scoreboard entries.
    pub fn sb_entries(&self, id: &str) -> Result<SbEntries> {
        records::sb_entries(&mut self.conn(), SERVICE, id)
    }

    /// The drain set.
    pub fn drain_set(&self) -> Result<Vec<String>> {
        records::drain_set(&mut self.conn(), SERVICE)
    }

    /// The daemon's status (from its admin endpoint).
    pub fn status(&self) -> Result<Status> {
        let _inside = self.topo.balancer_ns().enter_thread()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(AdminClient::from_listen(ADMIN.into()).status())
            .context("asking the daemon for its status")
    }

    /// `VIP:VIP_PORT`.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::from((VIP, VIP_PORT))
    }

    /// A new connection from the client namespace through the VIP.
    pub fn connect_vip(&self, tag: &str) -> Result<LineConn> {
        let _inside = self.topo.client_ns().enter_thread()?;
        LineConn::open(self.vip(), tag)
    }

    /// TCP counters of the client namespace since the environment started
    /// (only the caller's connections live there).
    pub fn client_tcp_since_start(&self) -> Result<TcpStats> {
        Ok(TcpStats::read(self.topo.client_ns())?.since(&self.tcp_before))
    }

    /// The agent's log of instance `id` on `node` (its stdout/stderr).
    pub fn instance_log(&self, node: &str, id: &str) -> String {
        let p = self
            .dir
            .path()
            .join(format!("agent-{node}"))
            .join("logs")
            .join(format!("{id}.log"));
        std::fs::read_to_string(p).unwrap_or_default()
    }

    /// The lb daemon's log so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lb.log")).unwrap_or_default()
    }

    /// True while the daemon, every agent and the manager run.
    pub fn check_alive(&mut self) -> Result<()> {
        let what = [
            ("lb daemon", &mut self.daemon),
            ("container-manager", &mut self.cm),
        ];
        for (name, c) in what {
            if let Some(s) = c.try_wait()? {
                bail!("{name} exited ({s})");
            }
        }
        for (i, a) in self.agents.iter_mut().enumerate() {
            if let Some(s) = a.try_wait()? {
                bail!("agent of {} exited ({s})", node_name(i));
            }
        }
        Ok(())
    }

    /// The last lines of every log (daemon, manager, agents, instances),
    /// for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut files = vec![
            self.dir.path().join("lb.log"),
            self.dir.path().join("cm.log"),
        ];
        for i in 0..self.opts.nodes {
            let node = node_name(i);
            files.push(self.dir.path().join(format!("agent-{node}.log")));
            if let Ok(rd) = std::fs::read_dir(self.dir.path().join(format!("agent-{node}/logs"))) {
                files.extend(rd.flatten().map(|e| e.path()));
            }
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("==== {} (last 25 lines)\n", f.display()));
            for l in &lines[lines.len().saturating_sub(25)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// Name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Unix time in ms.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The registry entry of [`SERVICE`].
fn service_toml(o: &Options, dir: &WorkDir, redis_url: &str) -> String {
    let inst = o.instance_bin.display();
    let load = dir.load_file();
    let load = load.display();
    format!(
        r#"[[service]]
name = "{SERVICE}"
min = {min}
max = {max}
load_balanced = true
lb = {{ service = "{SERVICE}", port_param = "port" }}
warm_up_secs = {warm}
cool_down_secs = {cool}
stop_grace_secs = {grace}
resources = {{ cpu = 0.1, ram_mib = 16 }}

[service.params]
port = {{ type = "port", min = {pmin}, max = {pmax} }}

[service.templates.start]
argv = ["{inst}", "--id", "{{instance_id}}", "--port", "{{port}}", "--redis", "{redis_url}", "--service", "{SERVICE}", "--load-file", "{load}", "--report-ms", "{report}"]
"#,
        min = o.min,
        max = o.max,
        warm = o.warm_up_secs,
        cool = o.cool_down_secs,
        grace = o.stop_grace_secs,
        pmin = PORTS.0,
        pmax = PORTS.1,
        report = o.report_ms,
    )
}

/// `headroom keys create --principal P`: (access key id, secret).
fn create_key(ns: &Netns, bin: &str, url: &str, principal: &str) -> Result<(String, String)> {
    let out = ns
        .exec(&[
            bin,
            "keys",
            "--redis",
            url,
            "create",
            "--principal",
            principal,
        ])
        .with_context(|| format!("creating a key for {principal}"))?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
            .with_context(|| format!("`keys create` printed no {name}: {out}"))
    };
    Ok((field("access_key_id")?, field("secret")?))
}

/// Starts `argv` in `ns` with `env`, stdout and stderr to `log`.
fn spawn_logged(ns: &Netns, argv: &[&str], env: &[(&str, &str)], log: &Path) -> Result<ChildGuard> {
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = ns.command(argv);
    cmd.envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {argv:?} in {}", ns.name()))?;
    Ok(ChildGuard::new(child))
}

/// Waits until `log` contains `needle`; fails if the process exits.
fn wait_log(child: &mut ChildGuard, log: &Path, needle: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(s) = child.try_wait()? {
            bail!("{what} exited ({s}):\n{text}");
        }
        ensure!(
            Instant::now() < deadline,
            "{what} did not log {needle:?} within {START_WAIT:?}:\n{text}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the agent at `addr` answers `GET /_headroom/ready` with 200
/// (asked from `ns`).
fn wait_ready(ns: &Netns, addr: SocketAddr, child: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        let got = {
            let _inside = ns.enter_thread()?;
            http_get(addr, "/_headroom/ready")
        };
        match got {
            Ok((200, _)) => return Ok(()),
            other => {
                if let Some(s) = child.try_wait()? {
                    bail!("the agent exited ({s})");
                }
                ensure!(
                    Instant::now() < deadline,
                    "not ready within {START_WAIT:?}: {other:?}"
                );
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A plain HTTP/1.1 GET; (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.take(1 << 20).read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

/// A private work directory (configs, logs, agent state, the load file),
/// removed on drop.
struct WorkDir {
    path: PathBuf,
    n: u32,
}

impl WorkDir {
    fn new() -> Result<WorkDir> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hr-scale-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir { path, n })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn load_file(&self) -> PathBuf {
        self.path.join("load")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_entry_is_valid_and_carries_the_knobs() {
        let mut o = Options::new("/bin/headroom".into(), "/bin/scale-instance".into());
        o.cool_down_secs = 8;
        let dir = WorkDir::new().expect("work dir");
        let specs = headroom_control::registry::parse_services(&service_toml(
            &o,
            &dir,
            "redis://10.98.0.1:6379",
        ))
        .expect("the registry accepts the entry");
        assert_eq!(specs.len(), 1);
        let s = &specs[0];
        assert_eq!((s.name.as_str(), s.min, s.max), (SERVICE, 1, 2));
        assert_eq!((s.warm_up_secs, s.cool_down_secs), (1, 8));
        assert!(s.load_balanced);
    }
}
