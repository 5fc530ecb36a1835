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
//!                     headroom machine-manager (10.98.0.1:7400)
//! ```
//!
//! The namespaces and links are [`Topology::new_for_daemon`]'s (nat mode;
//! its backend namespaces are the nodes, each with its own address on its
//! own link to the balancer). In the balancer namespace run a private
//! [`RedisServer`], the `headroom lb run` daemon (scoreboard mode, XDP on
//! the balancer's veths, metrics and status on 127.0.0.1:9470 of that
//! namespace) and the `headroom container-manager` process. Each node
//! namespace runs a `headroom agent` process. Redis listens only on the
//! balancer's loopback and on 10.98.0.1 (an address on the balancer's `lo`,
//! reached through each node's default route), where the nodes' processes
//! find the scoreboard and the permission DB.
//!
//! Where new instances go ([`Options::placement`]):
//! - [`Placement::MachineManager`]: a `headroom machine-manager` process in
//!   the balancer namespace, listening on 10.98.0.1:7400, with the nodes as
//!   static nodes of one type (their addresses, a cost limit that allows
//!   them); the agents send it signed node reports every
//!   [`Options::node_report_interval`] (`--machine-manager`), and the
//!   container-manager asks it for every placement
//!   (`--machine-manager http://10.98.0.1:7400 --agent-port 7070`). Start
//!   returns once the machine-manager leads and has a report from every
//!   node newer than the agents' start.
//! - [`Placement::Static`]: the container-manager gets one
//!   `--agent NODE=http://10.91.<i>.2:7070` per node and spreads instances
//!   over them itself.
//!
//! The nodes are namespaces of one machine and read the same `/proc`, so
//! each reports the whole machine's cpu and memory use (other work on it
//! included). The node type is therefore declared far larger than the
//! machine ([`MM_NODE_CPU`], [`MM_NODE_RAM_MIB`]): the measured share
//! (`cpu_pct` × 64 cores) leaves room for a 0.1-core instance unless the
//! machine was busy for 99.8 % of a report interval. The placement still
//! runs on the reports.
//!
//! Keys are made with `headroom keys` (principal `container-manager` with
//! its grants on service `agent` and, with a machine-manager, on service
//! `machine-manager`; `node-<n>` per node, passed to the agents as their
//! signing key for the node reports), the service with
//! `headroom services register`.
//! Its start template runs `scale-instance` ([`Options::instance_bin`]): a
//! TCP server answering each line with its instance id, listening on the lb
//! port the manager chose, reporting the load in a file the caller controls
//! ([`ScaleEnv::set_load`]) to the scoreboard itself.
//!
//! Everything is torn down on drop, also on panic: the managers, agents and
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
pub use records::{AgentInstance, CmDecision, CmInstance, MmNode, SbEntries};

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
/// Where the machine-manager listens (on the balancer's loopback, like
/// the nodes' Redis address).
pub const MM_ADDR: SocketAddrV4 = SocketAddrV4::new(REDIS_NODE_ADDR, 7400);
/// The machine-manager's Redis key prefix (its default).
pub const MM_PREFIX: &str = "headroom:mm";
/// Declared cores of a node (see the module docs: far above the machine).
pub const MM_NODE_CPU: f64 = 64.0;
/// Declared memory of a node, MiB (far above the machine's).
pub const MM_NODE_RAM_MIB: u64 = 256 * 1024;

/// Where the container-manager puts new instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A static `--agent` list; the manager spreads instances itself.
    Static,
    /// A real machine-manager process places them (`--machine-manager`).
    MachineManager,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::Static => "static --agent list",
            Placement::MachineManager => "machine-manager",
        })
    }
}

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
    /// Where new instances go.
    pub placement: Placement,
    /// Agent `--interval` of the node reports (machine-manager mode).
    pub node_report_interval: Duration,
    /// The `headroom` binary ([`crate::bins::headroom_bin`]).
    pub headroom_bin: PathBuf,
    /// The `scale-instance` binary.
    pub instance_bin: PathBuf,
}

impl Options {
    /// Test-speed knobs (intervals of 100–200 ms, a 1 s window, node
    /// reports every 500 ms) for the given binaries, placement by a
    /// machine-manager; adjust the rest per caller.
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
            placement: Placement::MachineManager,
            node_report_interval: Duration::from_millis(500),
            headroom_bin,
            instance_bin,
        }
    }
}

/// The running environment. See the module docs.
///
/// Field order is drop order: managers, agents and daemon die first, then
/// Redis, then the namespaces (with the instances in them),
/// then the work directory.
pub struct ScaleEnv {
    cm: ChildGuard,
    agents: Vec<ChildGuard>,
    mm: Option<ChildGuard>,
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
    /// agent is ready, the machine-manager (if any) leads and has a fresh
    /// report from every node, and the container-manager has started.
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
        let mut conn = {
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
        let mm_mode = opts.placement == Placement::MachineManager;
        if mm_mode {
            lb.exec(&[
                &bin,
                "keys",
                "--redis",
                &url,
                "grant",
                "--principal",
                "container-manager",
                "--service",
                "machine-manager",
                "--method",
                "GET",
                "--method",
                "POST",
                "--method",
                "DELETE",
                "--prefix",
                "/v1/placements",
                "--prefix",
                "/v1/nodes",
            ])
            .context("granting the container-manager on the machine-manager")?;
        }
        // The nodes' keys (their node reports are signed as `node-<n>`),
        // made before the machine-manager starts so its first key snapshot
        // holds them.
        let mut node_keys = Vec::new();
        for i in 0..opts.nodes {
            node_keys.push(create_key(
                lb,
                &bin,
                &url,
                &format!("node-{}", node_name(i)),
            )?);
        }

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

        // The machine-manager.
        let mm_url = format!("http://{MM_ADDR}");
        let mut mm = None;
        if mm_mode {
            let path = dir.path().join("mm.toml");
            std::fs::write(&path, mm_toml(&opts, &url))?;
            let log = dir.path().join("mm.log");
            let mut child = spawn_logged(
                lb,
                &[&bin, "machine-manager", "--config", &path.to_string_lossy()],
                &[],
                &log,
            )?;
            wait_log(
                &mut child,
                &log,
                "machine-manager listening",
                "the machine-manager",
            )?;
            wait_leader(lb, &mut child).context("the machine-manager")?;
            mm = Some(child);
        }

        // The agents, one per node namespace.
        let agents_from = now_ms();
        let mut agents = Vec::new();
        for (i, key) in node_keys.iter().enumerate() {
            let node = node_name(i);
            let listen = SocketAddr::new(IpAddr::V4(backend_addr(i)), AGENT_PORT).to_string();
            let state = dir.path().join(format!("agent-{node}"));
            let interval = ms(opts.node_report_interval);
            let mut argv = vec![
                bin.as_str(),
                "agent",
                "--node",
                &node,
                "--listen",
                &listen,
                "--redis",
                &node_redis,
                "--state-dir",
                state.to_str().context("non-UTF-8 work directory")?,
            ];
            if mm_mode {
                argv.extend(["--machine-manager", &mm_url, "--interval", &interval]);
            }
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
        if let Some(child) = mm.as_mut() {
            wait_reports(&mut conn, opts.nodes, agents_from, child, &mut agents)?;
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
        if mm_mode {
            argv.extend([
                "--machine-manager".into(),
                mm_url.clone(),
                "--agent-port".into(),
                AGENT_PORT.to_string(),
            ]);
        } else {
            for i in 0..opts.nodes {
                argv.push("--agent".into());
                argv.push(format!(
                    "{}=http://{}:{AGENT_PORT}",
                    node_name(i),
                    backend_addr(i)
                ));
            }
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
            mm,
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

    /// The container-manager's log so far.
    pub fn cm_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cm.log")).unwrap_or_default()
    }

    /// Node `node` in the machine-manager's registry (none if it has no
    /// record, e.g. in static mode).
    pub fn mm_node(&self, node: &str) -> Result<Option<MmNode>> {
        records::mm_node(&mut self.conn(), MM_PREFIX, node)
    }

    /// The placements the machine-manager holds on `node`: id → when it
    /// made each (Unix ms).
    pub fn mm_placements(&self, node: &str) -> Result<std::collections::HashMap<String, i64>> {
        records::mm_placements(&mut self.conn(), MM_PREFIX, node)
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
        if let Some(mm) = self.mm.as_mut() {
            if let Some(s) = mm.try_wait()? {
                bail!("machine-manager exited ({s})");
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
        if self.mm.is_some() {
            files.push(self.dir.path().join("mm.log"));
        }
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

/// The machine-manager's config: every node a static node of one type
/// (declared far larger than the machine, see the module docs), at its
/// address, within the count and cost limits.
fn mm_toml(o: &Options, redis_url: &str) -> String {
    let mut s = format!(
        r#"id = "mm-scale-env"
listen = "{MM_ADDR}"
redis = "{redis_url}"
key_prefix = "{MM_PREFIX}"
monthly_cost_limit = 100.0
report_stale_ms = {stale}
lease_ttl_ms = 3000
tick_ms = 200

[[node_type]]
name = "nsnode"
cpu = {MM_NODE_CPU:?}
ram_mib = {MM_NODE_RAM_MIB}
disk_gib = 10
disk_kind = "ssd"
cost_per_hour = 0.01
# Static nodes only: nothing is ever started or stopped.
start = ["/bin/false"]
stop = ["/bin/false"]
max_count = {n}
"#,
        stale = (o.node_report_interval * 10).as_millis().max(2000),
        n = o.nodes,
    );
    for i in 0..o.nodes {
        s.push_str(&format!(
            "\n[[static_node]]\nname = \"{}\"\ntype = \"nsnode\"\naddress = \"{}\"\n",
            node_name(i),
            backend_addr(i)
        ));
    }
    s
}

/// Waits until the machine-manager at [`MM_ADDR`] says it leads
/// (`GET /v1/leader`, asked from `ns`): before that it refuses placements.
fn wait_leader(ns: &Netns, child: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        let got = {
            let _inside = ns.enter_thread()?;
            http_get(MM_ADDR.into(), "/v1/leader")
        };
        let leads = match &got {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("leader").and_then(serde_json::Value::as_bool))
                .unwrap_or(false),
            _ => false,
        };
        if leads {
            return Ok(());
        }
        if let Some(s) = child.try_wait()? {
            bail!("exited ({s})");
        }
        ensure!(
            Instant::now() < deadline,
            "not leading within {START_WAIT:?}: {got:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the machine-manager's registry has every node `ready` with
/// a report received after `since_ms` (so placements can use them).
fn wait_reports(
    conn: &mut redis::Connection,
    nodes: usize,
    since_ms: i64,
    mm: &mut ChildGuard,
    agents: &mut [ChildGuard],
) -> Result<()> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        let mut missing = Vec::new();
        for i in 0..nodes {
            let n = records::mm_node(conn, MM_PREFIX, &node_name(i))?;
            let fresh = n.as_ref().is_some_and(|n| {
                n.state == "ready" && n.last_report_ms.is_some_and(|t| t >= since_ms)
            });
            if !fresh {
                missing.push((node_name(i), n));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(s) = mm.try_wait()? {
            bail!("the machine-manager exited ({s})");
        }
        for (i, a) in agents.iter_mut().enumerate() {
            if let Some(s) = a.try_wait()? {
                bail!("the agent of {} exited ({s})", node_name(i));
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the machine-manager has no fresh report within {START_WAIT:?} from: {missing:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
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

    #[test]
    fn the_machine_manager_config_is_valid_with_every_node_static() {
        let mut o = Options::new("/bin/headroom".into(), "/bin/scale-instance".into());
        o.nodes = 3;
        let cfg = headroom_control::machine_manager::config::MachineManagerConfig::parse(&mm_toml(
            &o,
            "redis://127.0.0.1:6379",
        ))
        .expect("the machine-manager accepts the config");
        let nodes: Vec<(String, String)> = cfg
            .static_nodes
            .iter()
            .map(|n| (n.name.clone(), n.address.to_string()))
            .collect();
        assert_eq!(
            nodes,
            (0..3)
                .map(|i| (node_name(i), backend_addr(i).to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(cfg.listen, SocketAddr::from(MM_ADDR));
        assert_eq!(cfg.node_types.len(), 1);
        assert_eq!(cfg.node_types[0].max_count, 3);
    }
}
