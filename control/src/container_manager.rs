//! `headroom container-manager`: the scaling loop (paper §3.3). While it
//! holds the lease, once per interval and per registered service it reads
//! the instances' custom-metric reports from the scoreboard, keeps a
//! [`LoadWindow`], asks [`decide`] and acts:
//!
//! - **up**: picks a node (the least-used static `--agent`, or the one the
//!   machine-manager places it on with `--machine-manager`), records the
//!   instance (id, node, params, placement) in Redis as an *intent* under
//!   the fence, then asks that node's agent to start it. Agent starts are
//!   idempotent by instance id, so a manager restarted after a crash
//!   completes a recorded intent with the same id (and placement) instead
//!   of starting a duplicate or asking for a second placement. Once started, a load-balanced
//!   instance enters the balancer's backends (scoreboard `addr` hash).
//! - **down**: picks the least-loaded (then newest) instance, marks it in
//!   the scoreboard's drain set (the balancer sends it no new flow; existing
//!   flows continue), waits the cool-down, then stops it through its agent
//!   and forgets it (and releases its placement).
//! - **replace**: a running instance its agent reports ended (exited,
//!   stopped, lost, unknown) is forgotten, so the policy's `min` brings a
//!   new one. An unreachable agent is no evidence: nothing is dropped.
//!
//! Every decision is logged and recorded in `headroom:cm:decisions`.
//! See docs/CONTAINER_MANAGER.md.

pub mod agent_client;
pub mod mm_client;
pub mod observe;
pub mod signed_call;
pub mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::agent::parse_duration;
use crate::lease::{Fence, Lease, LeaseKeeper, Role};
use crate::registry::{ParamType, Registry, ServiceSpec, INSTANCE_ID_PARAM};
use crate::scaling::{decide, Decision, LoadWindow, Observation, ScalingPolicy, Timing};
use crate::scoreboard::{addr_key, drain_key};
use agent_client::{AgentCallError, AgentClient, AgentInstance};
use mm_client::{MmClient, Placement};
use state::{DecisionRecord, InstanceRecord, Phase};

/// One agent the manager may start instances on: `NODE=http://IP:PORT`.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentTarget {
    /// Node name.
    pub node: String,
    /// Agent base URL.
    pub url: hyper::Uri,
    /// The node's IP, used for balancer addresses.
    pub ip: std::net::IpAddr,
}

/// Parses `NODE=http://IP:PORT`.
pub fn parse_agent(s: &str) -> Result<AgentTarget, String> {
    let (node, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NODE=http://IP:PORT"))?;
    if !crate::keystore::valid_name(node) {
        return Err(format!("node {node:?} must match [A-Za-z0-9._-]{{1,64}}"));
    }
    let uri: hyper::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?} must start with http://"));
    }
    let ip = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse().ok())
        .ok_or_else(|| format!("{url:?}: the host must be an IP address"))?;
    if uri.port_u16().is_none() {
        return Err(format!("{url:?}: a port is required"));
    }
    Ok(AgentTarget {
        node: node.to_string(),
        url: uri,
        ip,
    })
}

/// Parses the machine-manager's base URL `http://HOST:PORT`.
pub fn parse_mm_url(s: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = s.parse().map_err(|_| format!("{s:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{s:?} must start with http://"));
    }
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(format!(
            "{s:?}: host and port are required (http://HOST:PORT)"
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{s:?}: give the base URL only, without a path"));
    }
    Ok(uri)
}

/// The agent of a node the machine-manager chose: `http://ADDRESS:PORT`.
fn placed_target(node: &str, address: &str, port: u16) -> Result<AgentTarget, String> {
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| format!("node {node}: address {address:?} is not an IP address"))?;
    parse_agent(&format!(
        "{node}=http://{}",
        std::net::SocketAddr::new(ip, port)
    ))
}

/// `headroom container-manager …` options.
#[derive(Debug, Clone, clap::Args)]
#[command(group(
    clap::ArgGroup::new("placement")
        .required(true)
        .multiple(false)
        .args(["agents", "machine_manager"])
))]
pub struct ContainerManagerArgs {
    /// Redis: registry, scoreboard, lease, instance records.
    #[arg(long, env = "HEADROOM_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// A static node's agent to start instances on, `NODE=http://IP:PORT`
    /// (repeat). Exclusive with `--machine-manager`.
    #[arg(long = "agent", value_name = "NODE=URL", value_parser = parse_agent)]
    pub agents: Vec<AgentTarget>,
    /// Machine-manager that places every new instance, `http://HOST:PORT`
    /// (requirements and resources checked there). Exclusive with `--agent`.
    #[arg(long, value_name = "URL", value_parser = parse_mm_url)]
    pub machine_manager: Option<hyper::Uri>,
    /// Port of the agent on nodes the machine-manager chooses: their agent
    /// is `http://NODE_ADDRESS:PORT`.
    #[arg(long, value_name = "PORT", default_value_t = 7070)]
    pub agent_port: u16,
    /// Access key id of principal `container-manager` (signs agent and
    /// machine-manager calls).
    #[arg(long, env = "HEADROOM_CM_ACCESS_KEY_ID")]
    pub access_key_id: String,
    /// Its secret.
    #[arg(long, env = "HEADROOM_CM_SECRET", hide_env_values = true)]
    pub secret: String,
    /// SigV4 region.
    #[arg(long, default_value = "headroom")]
    pub region: String,
    /// Time between scaling rounds.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Length of the load window the policy averages over.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub window: Duration,
    /// A report older than this is stale (never scale down on it).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub stale: Duration,
    /// Leader lease time-to-live.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// This manager's name in the lease (default: cm-PID).
    #[arg(long)]
    pub holder: Option<String>,
    /// Only manage these services (repeat; default: all registered).
    #[arg(long = "service")]
    pub services: Vec<String>,
    /// An agent that has not answered its instance list for this long is
    /// taken as a dead node: its instances are forgotten and replaced.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub node_timeout: Duration,
}

/// A running container-manager.
pub struct ContainerManagerHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    keeper: LeaseKeeper,
}

impl ContainerManagerHandle {
    /// Finish the current round, stop and release the lease.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.keeper.stop().await;
    }

    /// Stop at once without releasing anything, as if the process died.
    pub fn kill(self) {
        self.task.abort();
        self.keeper.abort();
    }
}

/// Connects to Redis and starts the loop.
pub async fn start_container_manager(
    args: ContainerManagerArgs,
) -> anyhow::Result<ContainerManagerHandle> {
    match (args.agents.is_empty(), &args.machine_manager) {
        (true, None) => anyhow::bail!(
            "give either --agent NODE=URL (static nodes) or --machine-manager URL (placement)"
        ),
        (false, Some(_)) => anyhow::bail!("--agent and --machine-manager exclude each other"),
        _ => {}
    }
    let conn = crate::lease::connect(&args.redis)
        .await
        .with_context(|| format!("--redis {}", args.redis))?;
    let registry = Registry::connect(&args.redis)
        .await
        .with_context(|| format!("--redis {}", args.redis))?;
    let holder = args
        .holder
        .clone()
        .unwrap_or_else(|| format!("cm-{}", std::process::id()));
    let keeper = LeaseKeeper::start(
        Lease::new(state::LEASE_PREFIX, &holder, args.lease_ttl),
        conn.clone(),
    );
    let role = keeper.subscribe();
    let (stop, stop_rx) = watch::channel(false);
    let mm = args.machine_manager.clone().map(|base| {
        MmClient::new(
            base,
            args.access_key_id.clone(),
            args.secret.clone(),
            args.region.clone(),
        )
    });
    let mgr = Manager {
        role: role.clone(),
        mm,
        polls: HashMap::new(),
        poll_failing: HashMap::new(),
        last_orphan_sweep: None,
        client: AgentClient::new(
            args.access_key_id.clone(),
            args.secret.clone(),
            args.region.clone(),
        ),
        args,
        conn,
        registry,
        windows: HashMap::new(),
        epoch: Instant::now(),
    };
    info!(%holder, "container-manager started");
    let task = tokio::spawn(mgr.run(role, stop_rx));
    Ok(ContainerManagerHandle { stop, task, keeper })
}

/// `headroom container-manager …`: run until SIGINT/SIGTERM.
pub async fn run_container_manager(args: ContainerManagerArgs) -> anyhow::Result<()> {
    let h = start_container_manager(args).await?;
    crate::wait_for_shutdown_signal().await;
    h.shutdown().await;
    Ok(())
}

/// Per-service memory of this manager (rebuilt after a restart).
struct ServiceLoop {
    window: LoadWindow,
    last_hold: Option<String>,
    /// After a placement shortfall, no new ask before this (monotonic).
    place_retry_at: Option<Duration>,
}

/// What one poll of an agent said: when, and its instances by id; `None`
/// when the agent could not be asked (no evidence of anything).
type Poll = Option<(i64, HashMap<String, AgentInstance>)>;

/// A scale-up that placed fewer instances than decided.
struct Shortfall {
    placed: usize,
    reason: String,
}

/// Why planning one new instance stopped.
enum PlanError {
    /// No place now (refused, node starting, machine-manager down): retry
    /// in a later round.
    Short(String),
    /// The service cannot be planned at all.
    Round(RoundError),
}

struct Manager {
    args: ContainerManagerArgs,
    conn: ConnectionManager,
    registry: Registry,
    client: AgentClient,
    windows: HashMap<String, ServiceLoop>,
    epoch: Instant,
    /// The lease role, looked at again right before every agent call: a
    /// round can outlast the leadership it started with.
    role: watch::Receiver<Role>,
    /// Placement through the machine-manager (`None`: static `--agent`s).
    mm: Option<MmClient>,
    /// This loop iteration's agent listings, by agent URL: one poll per
    /// agent per iteration, shared by all services.
    polls: HashMap<String, Poll>,
    /// Agents whose polls fail, since when (logged once per outage; past
    /// `--node-timeout` their node is taken as dead).
    poll_failing: HashMap<String, Instant>,
    /// When orphaned placements were last looked for.
    last_orphan_sweep: Option<Instant>,
}

/// Why a round for one service failed (it is retried next round).
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Lease(#[from] crate::lease::LeaseError),
    #[error("service {service}: {detail}")]
    Spec { service: String, detail: String },
}

fn policy_of(s: &ServiceSpec) -> ScalingPolicy {
    ScalingPolicy {
        min: s.min,
        max: s.max,
        up_base: s.thresholds.base_pct,
        up_step: s.thresholds.step_pct,
        up_max: s.thresholds.max_pct,
        down_band: s.thresholds.down_band_pct,
    }
}

fn timing_of(s: &ServiceSpec) -> Timing {
    Timing {
        warm_up: Duration::from_secs(s.warm_up_secs),
        cool_down: Duration::from_secs(s.cool_down_secs),
    }
}

fn since(now_ms: i64, at: Option<i64>) -> Option<Duration> {
    at.map(|t| Duration::from_millis(now_ms.saturating_sub(t).max(0) as u64))
}

/// A short random suffix for instance ids.
fn random_suffix() -> String {
    let mut b = [0u8; 5];
    if getrandom::fill(&mut b).is_err() {
        // Fall back to the clock: ids only need to be unique per service.
        let t = crate::sigv4::unix_now_ms().to_le_bytes();
        b.copy_from_slice(&t[..5]);
    }
    hex::encode(b)
}

impl Manager {
    async fn run(mut self, role: watch::Receiver<Role>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(self.args.interval) => {}
            }
            if *stop.borrow() {
                break;
            }
            let fence = role.borrow().fence().cloned();
            let Some(fence) = fence else {
                // Not leading: another manager acts; our windows go stale.
                self.windows.clear();
                continue;
            };
            self.polls.clear();
            let specs = match self.registry.list().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "reading the service registry failed");
                    continue;
                }
            };
            let mut managed = Vec::new();
            for spec in specs {
                if !self.args.services.is_empty() && !self.args.services.contains(&spec.name) {
                    continue;
                }
                if let Err(e) = self.round(&fence, &spec).await {
                    warn!(service = %spec.name, error = %e, "scaling round failed");
                }
                managed.push(spec.name);
            }
            let period = self.orphan_age();
            if self.mm.is_some() && self.last_orphan_sweep.is_none_or(|t| t.elapsed() >= period) {
                self.last_orphan_sweep = Some(Instant::now());
                if let Err(e) = self.sweep_orphans(&fence, &managed).await {
                    warn!(error = %e, "looking for orphaned placements failed");
                }
            }
        }
        info!("container-manager stopped");
    }

    /// How old a placement no record owns must be before it counts as
    /// orphaned: older than any write a superseded leader could still be
    /// about to make (its lease ran out by then).
    fn orphan_age(&self) -> Duration {
        (self.args.lease_ttl * 3).max(self.args.interval * 10)
    }

    /// Releases placements of managed services that no instance record
    /// owns: left by a manager that died between the placement answer and
    /// its intent write. The list is read before the records, so a
    /// placement recorded meanwhile is seen as owned.
    async fn sweep_orphans(
        &mut self,
        fence: &Fence,
        services: &[String],
    ) -> Result<(), RoundError> {
        let Some(mm) = self.mm.clone() else {
            return Ok(());
        };
        let held = match mm.held().await {
            Ok(h) => h,
            Err(e) => {
                debug!(error = %e, "machine-manager placements not listed");
                return Ok(());
            }
        };
        let cutoff = crate::sigv4::unix_now_ms() - self.orphan_age().as_millis() as i64;
        for svc in services {
            let old: Vec<&mm_client::Held> = held
                .iter()
                .filter(|h| h.service == *svc && h.at_ms < cutoff)
                .collect();
            if old.is_empty() {
                continue;
            }
            let (recs, bad) = state::load_instances(&mut self.conn, svc).await?;
            if !bad.is_empty() {
                // An unreadable record may own one of them: release nothing.
                continue;
            }
            let owned: HashSet<&str> = recs.iter().filter_map(|r| r.placement.as_deref()).collect();
            for h in old.into_iter().filter(|h| !owned.contains(h.id.as_str())) {
                if !self.leading_with(fence) {
                    return Ok(());
                }
                match mm.release(&h.id).await {
                    Ok(()) => {
                        warn!(service = %svc, placement = %h.id, "orphaned placement (no instance record) released")
                    }
                    Err(e) => {
                        warn!(service = %svc, placement = %h.id, error = %e, "orphaned placement not released")
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether we still lead with `fence` (checked before side effects
    /// outside Redis, which the fence cannot guard).
    fn leading_with(&self, fence: &Fence) -> bool {
        self.role.borrow().fence() == Some(fence)
    }

    /// One scaling round for one service.
    async fn round(&mut self, fence: &Fence, spec: &ServiceSpec) -> Result<(), RoundError> {
        let svc = spec.name.clone();
        let (mut recs, bad) = state::load_instances(&mut self.conn, &svc).await?;
        for id in bad {
            warn!(service = %svc, instance = %id, "unreadable instance record ignored");
        }
        // Give back the placements of instances that ended earlier.
        for r in recs.iter().filter(|r| r.phase == Phase::Gone) {
            self.release_gone(fence, &svc, r).await?;
        }
        recs.retain(|r| r.phase != Phase::Gone);
        // Instances that ended by themselves leave before counting, so
        // `min` brings replacements in this same round.
        let ended = self.ended_instances(&recs).await;
        let mut counted = recs.iter().filter(|r| r.phase != Phase::Draining).count() as u32;
        for (r, why) in recs.iter().filter_map(|r| ended.get(&r.id).map(|w| (r, w))) {
            let reason = format!("replace: instance {} on {} {why}", r.id, r.node);
            warn!(service = %svc, instance = %r.id, node = %r.node, %reason, "instance ended");
            let rec = DecisionRecord {
                ts_ms: crate::sigv4::unix_now_ms(),
                service: svc.clone(),
                action: "replace".into(),
                running: counted,
                to: counted.saturating_sub(1),
                load: None,
                reason,
            };
            counted = counted.saturating_sub(1);
            self.forget(fence, &svc, r, state::decision_cmds(&rec))
                .await?;
        }
        recs.retain(|r| !ended.contains_key(&r.id));
        // Finish what a previous round (or a crashed manager) began.
        let mut dropped = Vec::new();
        for r in recs.iter_mut().filter(|r| r.phase == Phase::Starting) {
            if !self.complete_start(fence, spec, r).await? {
                dropped.push(r.id.clone());
            }
        }
        recs.retain(|r| !dropped.contains(&r.id));
        let now_ms = crate::sigv4::unix_now_ms();
        let cool_ms = (spec.cool_down_secs * 1000) as i64;
        let mut gone = Vec::new();
        for r in recs.iter().filter(|r| r.phase == Phase::Draining) {
            if now_ms - r.drain_since_ms.unwrap_or(0) >= cool_ms
                && self.finish_drain(fence, &svc, r).await?
            {
                gone.push(r.id.clone());
            }
        }
        recs.retain(|r| !gone.contains(&r.id));

        let active: Vec<&InstanceRecord> =
            recs.iter().filter(|r| r.phase != Phase::Draining).collect();
        let ids: Vec<String> = active.iter().map(|r| r.id.clone()).collect();
        let reports = observe::read_reports(&mut self.conn, &svc, &ids).await?;
        let stale_ms = self.args.stale.as_millis() as i64;
        let (fresh, mean) = observe::fresh_mean(&reports, now_ms, stale_ms);
        let window = self.args.window;
        let mono = self.epoch.elapsed();
        let sl = self
            .windows
            .entry(svc.clone())
            .or_insert_with(|| ServiceLoop {
                window: LoadWindow::new(window),
                last_hold: None,
                place_retry_at: None,
            });
        if let Some(m) = mean {
            sl.window.push(mono, m);
        }
        let (last_start, last_stop) = state::load_timing(&mut self.conn, &svc).await?;
        let obs = Observation {
            running: active.len() as u32,
            fresh,
            window_mean: sl.window.mean(),
            since_start: since(now_ms, last_start),
            since_stop: since(now_ms, last_stop),
        };
        let decision = decide(&policy_of(spec), &timing_of(spec), &obs);
        match decision {
            Decision::Hold(_) => {
                let text = decision.to_string();
                let kind = text.split(" load").next().unwrap_or("").to_string();
                if sl.last_hold.as_deref() != Some(kind.as_str()) {
                    info!(service = %svc, running = obs.running, %decision, "decision");
                    sl.last_hold = Some(kind);
                    let rec = record(&svc, "hold", &obs, obs.running, None, &decision);
                    state::fenced(fence, &mut self.conn, &state::decision_cmds(&rec)).await?;
                } else {
                    debug!(service = %svc, %decision, "decision");
                }
                Ok(())
            }
            Decision::Up { to, load } => {
                if sl.place_retry_at.is_some_and(|t| mono < t) {
                    debug!(service = %svc, %decision, "placement retry not due yet");
                    return Ok(());
                }
                let rec = record(&svc, "up", &obs, to, load, &decision);
                let short = self
                    .scale_up(fence, spec, &recs, obs.running, to, rec)
                    .await?;
                let retry = self.args.interval * 5;
                let Some(sl) = self.windows.get_mut(&svc) else {
                    return Ok(());
                };
                match short {
                    None => {
                        sl.window.clear();
                        sl.last_hold = None;
                        sl.place_retry_at = None;
                    }
                    Some(s) if s.placed > 0 => {
                        sl.window.clear();
                        sl.last_hold = None;
                        sl.place_retry_at = Some(mono + retry);
                    }
                    Some(s) => {
                        sl.place_retry_at = Some(mono + retry);
                        let kind = format!("hold: {}", s.reason);
                        if sl.last_hold.as_deref() != Some(kind.as_str()) {
                            warn!(service = %svc, running = obs.running, %decision, reason = %s.reason, "nothing placed");
                            sl.last_hold = Some(kind.clone());
                            let mut rec = record(&svc, "hold", &obs, obs.running, None, &decision);
                            rec.reason = format!("{decision}: nothing started: {}", s.reason);
                            state::fenced(fence, &mut self.conn, &state::decision_cmds(&rec))
                                .await?;
                        } else {
                            debug!(service = %svc, reason = %s.reason, "nothing placed");
                        }
                    }
                }
                Ok(())
            }
            Decision::Down { to, load } => {
                sl.window.clear();
                sl.last_hold = None;
                info!(service = %svc, running = obs.running, %decision, "decision");
                let rec = record(&svc, "down", &obs, to, load, &decision);
                let running: Vec<InstanceRecord> = recs
                    .iter()
                    .filter(|r| r.phase == Phase::Running)
                    .cloned()
                    .collect();
                self.scale_down(fence, &svc, running, &reports, obs.running, to, rec)
                    .await
            }
        }
    }

    /// The `running` records whose agent reports them ended, and the
    /// `running` and `starting` records of a dead node (its agent silent for
    /// `--node-timeout`), with why. One poll per agent per loop iteration;
    /// a shorter silence proves nothing, so those instances are kept.
    async fn ended_instances(&mut self, recs: &[InstanceRecord]) -> HashMap<String, String> {
        let mut ended = HashMap::new();
        for r in recs
            .iter()
            .filter(|r| matches!(r.phase, Phase::Running | Phase::Starting))
        {
            if !self.polls.contains_key(&r.agent) {
                let poll = self.poll_agent(&r.agent).await;
                self.polls.insert(r.agent.clone(), poll);
            }
            if let Some(since) = self.dead_since(&r.agent) {
                ended.insert(
                    r.id.clone(),
                    format!(
                        "is on a dead node: its agent has not answered for {:.0?}",
                        since.elapsed()
                    ),
                );
                continue;
            }
            if r.phase != Phase::Running {
                continue;
            }
            let Some(Some((at_ms, list))) = self.polls.get(&r.agent) else {
                continue;
            };
            match list.get(&r.id) {
                Some(i) => {
                    if let Some(why) = i.gone_reason() {
                        ended.insert(r.id.clone(), why);
                    }
                }
                // Recorded as started before the poll, yet unknown there.
                None if r.created_ms < *at_ms => {
                    ended.insert(r.id.clone(), "is unknown to its agent".to_string());
                }
                None => {}
            }
        }
        ended
    }

    /// When `agent` stopped answering, if that is `--node-timeout` ago.
    fn dead_since(&self, agent: &str) -> Option<Instant> {
        self.poll_failing
            .get(agent)
            .copied()
            .filter(|t| t.elapsed() >= self.args.node_timeout)
    }

    async fn poll_agent(&mut self, agent: &str) -> Poll {
        let Ok(url) = agent.parse::<hyper::Uri>() else {
            return None;
        };
        let at_ms = crate::sigv4::unix_now_ms();
        match self.client.list(&url).await {
            Ok(list) => {
                if self.poll_failing.remove(agent).is_some() {
                    info!(%agent, "agent answers its instance list again");
                }
                Some((
                    at_ms,
                    list.into_iter()
                        .map(|i| (i.instance_id.clone(), i))
                        .collect(),
                ))
            }
            Err(e) => {
                if let std::collections::hash_map::Entry::Vacant(v) =
                    self.poll_failing.entry(agent.to_string())
                {
                    v.insert(Instant::now());
                    warn!(%agent, error = %e, "agent's instance list unavailable; its instances are kept");
                } else {
                    debug!(%agent, error = %e, "agent's instance list unavailable");
                }
                None
            }
        }
    }

    /// Takes an ended instance out of the balancer and the scoreboard
    /// (with `extra` commands, in one fenced step), then gives its
    /// placement back and forgets it. If the release cannot be confirmed,
    /// the record stays as `gone` and the release is retried next round.
    async fn forget(
        &mut self,
        fence: &Fence,
        svc: &str,
        r: &InstanceRecord,
        mut cmds: Vec<Vec<String>>,
    ) -> Result<(), RoundError> {
        cmds.extend(state::scoreboard_forget_cmds(svc, &r.id));
        if r.placement.is_none() {
            cmds.push(vec!["HDEL".into(), state::instances_key(svc), r.id.clone()]);
            state::fenced(fence, &mut self.conn, &cmds).await?;
            return Ok(());
        }
        let mut g = r.clone();
        g.phase = Phase::Gone;
        cmds.push(state::put_cmd(svc, &g));
        state::fenced(fence, &mut self.conn, &cmds).await?;
        self.release_gone(fence, svc, &g).await
    }

    /// Releases a `gone` record's placement, then deletes the record.
    async fn release_gone(
        &mut self,
        fence: &Fence,
        svc: &str,
        r: &InstanceRecord,
    ) -> Result<(), RoundError> {
        if let (Some(mm), Some(p)) = (&self.mm, &r.placement) {
            if !self.leading_with(fence) {
                return Ok(());
            }
            if let Err(e) = mm.release(p).await {
                warn!(service = %svc, instance = %r.id, placement = %p, error = %e, "placement release not confirmed; will retry");
                return Ok(());
            }
            info!(service = %svc, instance = %r.id, placement = %p, "placement released");
        } else if let Some(p) = &r.placement {
            // Placed while a machine-manager was configured, which this
            // manager is not given: it cannot release it, and keeping the
            // record would not either.
            warn!(service = %svc, instance = %r.id, placement = %p, "no --machine-manager: placement not released; record forgotten");
        }
        state::fenced(
            fence,
            &mut self.conn,
            &[vec!["HDEL".into(), state::instances_key(svc), r.id.clone()]],
        )
        .await?;
        Ok(())
    }

    /// Places (machine-manager mode), records `to − running` intents (with
    /// the decision, atomically and fenced), then starts each through its
    /// agent. Returns what could not be placed.
    async fn scale_up(
        &mut self,
        fence: &Fence,
        spec: &ServiceSpec,
        existing: &[InstanceRecord],
        running: u32,
        to: u32,
        mut rec: DecisionRecord,
    ) -> Result<Option<Shortfall>, RoundError> {
        let svc = &spec.name;
        let now_ms = crate::sigv4::unix_now_ms();
        let mut planned: Vec<InstanceRecord> = Vec::new();
        let mut short = None;
        for _ in running..to {
            let all: Vec<&InstanceRecord> = existing.iter().chain(planned.iter()).collect();
            match self.plan_instance(fence, spec, &all, now_ms).await {
                Ok(p) => planned.push(p),
                Err(PlanError::Short(reason)) => {
                    short = Some(reason);
                    break;
                }
                Err(PlanError::Round(e)) => {
                    self.release_unrecorded(svc, &planned).await;
                    return Err(e);
                }
            }
        }
        let short = short.map(|reason| Shortfall {
            placed: planned.len(),
            reason,
        });
        if planned.is_empty() {
            return Ok(short);
        }
        rec.to = running + planned.len() as u32;
        if let Some(s) = &short {
            rec.reason = format!(
                "{}; placed {} only: {}",
                rec.reason,
                planned.len(),
                s.reason
            );
        }
        info!(service = %svc, running, to = rec.to, reason = %rec.reason, "decision");
        let mut cmds = state::decision_cmds(&rec);
        for p in &planned {
            cmds.push(state::put_cmd(svc, p));
        }
        cmds.push(vec![
            "HSET".into(),
            state::timing_key(svc),
            "last_start_ms".into(),
            now_ms.to_string(),
        ]);
        if let Err(e) = state::fenced(fence, &mut self.conn, &cmds).await {
            // Only a refused write surely recorded nothing; after a lost
            // reply the intents may exist (the orphan sweep checks later).
            if matches!(e, crate::lease::LeaseError::Fenced { .. }) {
                self.release_unrecorded(svc, &planned).await;
            }
            return Err(e.into());
        }
        for mut p in planned {
            self.complete_start(fence, spec, &mut p).await?;
        }
        Ok(short)
    }

    /// Best-effort release of placements no intent records (a failed
    /// write): otherwise they would hold capacity at the machine-manager.
    async fn release_unrecorded(&self, svc: &str, planned: &[InstanceRecord]) {
        let Some(mm) = &self.mm else { return };
        for p in planned {
            if let Some(id) = &p.placement {
                if let Err(e) = mm.release(id).await {
                    warn!(service = %svc, placement = %id, error = %e, "releasing an unrecorded placement failed");
                }
            }
        }
    }

    /// Where a new instance runs: the least-used static agent, or the node
    /// the machine-manager places it on (with the placement id).
    async fn choose_node(
        &self,
        fence: &Fence,
        spec: &ServiceSpec,
        existing: &[&InstanceRecord],
    ) -> Result<(AgentTarget, Option<String>), PlanError> {
        let Some(mm) = &self.mm else {
            // Spread: the eligible agent running the fewest of this service,
            // answering ones first (a silent node may be dead).
            return self
                .args
                .agents
                .iter()
                .filter(|a| spec.requirements.node.as_ref().is_none_or(|n| *n == a.node))
                .min_by_key(|a| {
                    let silent = self.poll_failing.contains_key(&a.url.to_string());
                    (silent, existing.iter().filter(|r| r.node == a.node).count())
                })
                .map(|a| (a.clone(), None))
                .ok_or_else(|| {
                    PlanError::Round(RoundError::Spec {
                        service: spec.name.clone(),
                        detail: "no configured agent meets requirements.node".into(),
                    })
                });
        };
        if !self.leading_with(fence) {
            return Err(PlanError::Short("lease lost: no placement asked".into()));
        }
        match mm.place(spec).await {
            Ok(Placement::Placed { node, address, id }) => {
                match placed_target(&node, &address, self.args.agent_port) {
                    Ok(t) => {
                        info!(service = %spec.name, %node, placement = %id, "placed by the machine-manager");
                        Ok((t, Some(id)))
                    }
                    Err(e) => {
                        if let Err(re) = mm.release(&id).await {
                            warn!(service = %spec.name, placement = %id, error = %re, "releasing an unusable placement failed");
                        }
                        Err(PlanError::Short(format!("placement unusable: {e}")))
                    }
                }
            }
            Ok(Placement::Starting { node }) => Err(PlanError::Short(format!(
                "waiting for node {node}, which the machine-manager is starting"
            ))),
            Ok(Placement::Refused { code, reason, .. }) => Err(PlanError::Short(format!(
                "placement refused by the machine-manager ({code}): {reason}"
            ))),
            Err(e) => Err(PlanError::Short(format!("machine-manager: {e}"))),
        }
    }

    /// Chooses node, id and parameters for a new instance.
    async fn plan_instance(
        &self,
        fence: &Fence,
        spec: &ServiceSpec,
        existing: &[&InstanceRecord],
        now_ms: i64,
    ) -> Result<InstanceRecord, PlanError> {
        let (agent, placement) = self.choose_node(fence, spec, existing).await?;
        match fill_params(spec, &agent, existing) {
            Ok((params, addr)) => Ok(InstanceRecord {
                id: format!("{}-{}", prefix_of(&spec.name), random_suffix()),
                node: agent.node.clone(),
                agent: agent.url.to_string(),
                addr: if spec.load_balanced { addr } else { None },
                params,
                phase: Phase::Starting,
                created_ms: now_ms,
                drain_since_ms: None,
                placement,
            }),
            Err(detail) => {
                if let (Some(mm), Some(id)) = (&self.mm, &placement) {
                    if let Err(e) = mm.release(id).await {
                        warn!(service = %spec.name, placement = %id, error = %e, "releasing a placement failed");
                    }
                }
                Err(PlanError::Round(RoundError::Spec {
                    service: spec.name.clone(),
                    detail,
                }))
            }
        }
    }

    /// Starts a recorded intent (idempotent at the agent) and marks it
    /// running; a load-balanced instance joins the balancer's backends.
    /// False if the intent was dropped (the agent refused it).
    async fn complete_start(
        &mut self,
        fence: &Fence,
        spec: &ServiceSpec,
        r: &mut InstanceRecord,
    ) -> Result<bool, RoundError> {
        let svc = &spec.name;
        let url: hyper::Uri = match r.agent.parse() {
            Ok(u) => u,
            Err(_) => {
                warn!(service = %svc, instance = %r.id, agent = %r.agent, "bad agent URL in record");
                return Ok(true);
            }
        };
        if !self.leading_with(fence) {
            warn!(service = %svc, instance = %r.id, "lease lost: not calling the agent; the next leader completes the intent");
            return Ok(true);
        }
        match self.client.start(&url, &r.id, svc, &r.params).await {
            Ok(_) => {
                r.phase = Phase::Running;
                let mut cmds = vec![state::put_cmd(svc, r)];
                if let Some(a) = &r.addr {
                    cmds.push(vec![
                        "HSET".into(),
                        addr_key(svc),
                        r.id.clone(),
                        format!("{a};node={}", r.node),
                    ]);
                }
                state::fenced(fence, &mut self.conn, &cmds).await?;
                info!(service = %svc, instance = %r.id, node = %r.node, "instance started");
                Ok(true)
            }
            Err(AgentCallError::Refused { status, body, .. }) if (400..500).contains(&status) => {
                // The agent will never run this request: drop the intent (and
                // its placement) so the policy can try again with a fresh one.
                warn!(service = %svc, instance = %r.id, status, %body, "start refused; intent dropped");
                self.forget(fence, svc, r, Vec::new()).await?;
                Ok(false)
            }
            Err(e) => {
                // Unknown outcome (or the node's agent is not up yet): keep
                // the intent; the next round retries with the same id,
                // which cannot start a second copy.
                warn!(service = %svc, instance = %r.id, error = %e, "start not confirmed; will retry");
                Ok(true)
            }
        }
    }

    /// Drains the least-loaded (then newest) running instances.
    #[allow(clippy::too_many_arguments)]
    async fn scale_down(
        &mut self,
        fence: &Fence,
        svc: &str,
        mut running: Vec<InstanceRecord>,
        reports: &[observe::Report],
        count: u32,
        to: u32,
        rec: DecisionRecord,
    ) -> Result<(), RoundError> {
        let load_of = |id: &str| {
            reports
                .iter()
                .find(|r| r.id == id)
                .and_then(|r| r.load)
                .unwrap_or(0.0)
        };
        running.sort_by(|a, b| {
            load_of(&a.id)
                .total_cmp(&load_of(&b.id))
                .then(b.created_ms.cmp(&a.created_ms))
        });
        let now_ms = crate::sigv4::unix_now_ms();
        let mut cmds = state::decision_cmds(&rec);
        let n = count.saturating_sub(to) as usize;
        for mut r in running.into_iter().take(n) {
            r.phase = Phase::Draining;
            r.drain_since_ms = Some(now_ms);
            info!(service = %svc, instance = %r.id, "draining");
            cmds.push(state::put_cmd(svc, &r));
            // Keep the address: without it the balancer retires the backend
            // and its open connections break; the mark drains it instead.
            cmds.push(vec!["SADD".into(), drain_key(svc), r.id.clone()]);
        }
        cmds.push(vec![
            "HSET".into(),
            state::timing_key(svc),
            "last_stop_ms".into(),
            now_ms.to_string(),
        ]);
        state::fenced(fence, &mut self.conn, &cmds).await?;
        Ok(())
    }

    /// Stops a drained instance and forgets it (address, drain mark,
    /// reports, placement); false if the agent could not confirm (retried
    /// next round).
    async fn finish_drain(
        &mut self,
        fence: &Fence,
        svc: &str,
        r: &InstanceRecord,
    ) -> Result<bool, RoundError> {
        let Ok(url) = r.agent.parse::<hyper::Uri>() else {
            warn!(service = %svc, instance = %r.id, "bad agent URL in record");
            return Ok(false);
        };
        if !self.leading_with(fence) {
            warn!(service = %svc, instance = %r.id, "lease lost: not stopping; the next leader does");
            return Ok(false);
        }
        if let Err(e) = self.client.stop(&url, &r.id).await {
            warn!(service = %svc, instance = %r.id, error = %e, "stop not confirmed; will retry");
            return Ok(false);
        }
        self.forget(fence, svc, r, Vec::new()).await?;
        info!(service = %svc, instance = %r.id, "instance stopped");
        Ok(true)
    }
}

/// The start parameters of a new instance on `agent`'s node (the lb port:
/// the lowest of its range not used there) and its balancer address.
fn fill_params(
    spec: &ServiceSpec,
    agent: &AgentTarget,
    existing: &[&InstanceRecord],
) -> Result<(BTreeMap<String, String>, Option<String>), String> {
    let mut params = BTreeMap::new();
    let mut addr = None;
    for (name, ty) in &spec.params {
        let port_param = spec.lb.as_ref().map(|l| l.port_param.as_str());
        match ty {
            ParamType::Port { min, max } if Some(name.as_str()) == port_param => {
                let used: Vec<String> = existing
                    .iter()
                    .filter(|r| r.node == agent.node)
                    .filter_map(|r| r.params.get(name).cloned())
                    .collect();
                let port = (*min..=*max)
                    .find(|p| !used.contains(&p.to_string()))
                    .ok_or_else(|| format!("params.{name}: no free port left"))?;
                params.insert(name.clone(), port.to_string());
                addr = Some(std::net::SocketAddr::new(agent.ip, port).to_string());
            }
            _ => {
                return Err(format!(
                    "params.{name}: the container-manager fills only {INSTANCE_ID_PARAM} \
                     and the lb port parameter"
                ))
            }
        }
    }
    Ok((params, addr))
}

/// Instance ids are `[A-Za-z0-9_-]{1,64}`: keep the service name's allowed
/// characters, shortened, as a readable prefix.
fn prefix_of(service: &str) -> String {
    service
        .chars()
        .map(|c| if c == '.' { '_' } else { c })
        .take(40)
        .collect()
}

fn record(
    svc: &str,
    action: &str,
    obs: &Observation,
    to: u32,
    load: Option<f64>,
    d: &Decision,
) -> DecisionRecord {
    DecisionRecord {
        ts_ms: crate::sigv4::unix_now_ms(),
        service: svc.to_string(),
        action: action.to_string(),
        running: obs.running,
        to,
        load: load.or(obs.window_mean),
        reason: d.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_targets_parse_and_refuse_with_reasons() {
        let a = parse_agent("n1=http://127.0.0.1:7070").unwrap();
        assert_eq!(a.node, "n1");
        assert_eq!(a.ip.to_string(), "127.0.0.1");
        assert!(parse_agent("http://127.0.0.1:7070")
            .unwrap_err()
            .contains("NODE="));
        assert!(parse_agent("n1=http://host:7070")
            .unwrap_err()
            .contains("IP address"));
        assert!(parse_agent("n1=http://127.0.0.1")
            .unwrap_err()
            .contains("port"));
        assert!(parse_agent("n 1=http://127.0.0.1:1")
            .unwrap_err()
            .contains("node"));
    }

    #[test]
    fn machine_manager_urls_and_placed_agents() {
        assert!(parse_mm_url("http://127.0.0.1:7400").is_ok());
        assert!(parse_mm_url("http://mm.example:7400/").is_ok());
        assert!(parse_mm_url("https://127.0.0.1:7400")
            .unwrap_err()
            .contains("http://"));
        assert!(parse_mm_url("http://127.0.0.1")
            .unwrap_err()
            .contains("port"));
        assert!(parse_mm_url("http://127.0.0.1:1/v1")
            .unwrap_err()
            .contains("path"));
        let t = placed_target("n2", "10.0.0.7", 7070).unwrap();
        assert_eq!(t.node, "n2");
        assert_eq!(t.url.to_string(), "http://10.0.0.7:7070/");
        let t6 = placed_target("n3", "fd00::7", 7070).unwrap();
        assert_eq!(t6.ip.to_string(), "fd00::7");
        assert!(placed_target("n2", "", 7070)
            .unwrap_err()
            .contains("not an IP"));
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        cm: ContainerManagerArgs,
    }

    #[test]
    fn exactly_one_placement_mode_is_required() {
        use clap::Parser;
        let base = ["cm", "--access-key-id", "AK", "--secret", "S"];
        let with = |extra: &[&str]| {
            Cli::try_parse_from(base.iter().chain(extra.iter()).copied()).map_err(|e| e.to_string())
        };
        let neither = with(&[]).unwrap_err();
        assert!(
            neither.contains("--agent") && neither.contains("--machine-manager"),
            "{neither}"
        );
        let both = with(&[
            "--agent",
            "n1=http://127.0.0.1:7070",
            "--machine-manager",
            "http://127.0.0.1:7400",
        ])
        .unwrap_err();
        assert!(
            both.contains("--agent") && both.contains("--machine-manager"),
            "{both}"
        );
        let a = with(&[
            "--agent",
            "n1=http://127.0.0.1:7070",
            "--agent",
            "n2=http://127.0.0.2:7070",
        ])
        .unwrap();
        assert_eq!(a.cm.agents.len(), 2);
        let m = with(&[
            "--machine-manager",
            "http://127.0.0.1:7400",
            "--agent-port",
            "7171",
        ])
        .unwrap();
        assert!(m.cm.agents.is_empty());
        assert_eq!(m.cm.agent_port, 7171);
    }

    #[test]
    fn ids_are_valid_agent_idents() {
        let id = format!("{}-{}", prefix_of("api.v2"), random_suffix());
        assert!(crate::registry::valid_ident(&id), "{id}");
    }
}
