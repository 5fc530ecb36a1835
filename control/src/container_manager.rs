//! `headroom container-manager`: the scaling loop (paper §3.3). While it
//! holds the lease, once per interval and per registered service it reads
//! the instances' custom-metric reports from the scoreboard, keeps a
//! [`LoadWindow`], asks [`decide`] and acts:
//!
//! - **up**: picks an agent, records the instance (id, node, params) in
//!   Redis as an *intent* under the fence, then asks that node's agent to
//!   start it. Agent starts are idempotent by instance id, so a manager
//!   restarted after a crash completes a recorded intent with the same id
//!   instead of starting a duplicate. Once started, a load-balanced
//!   instance enters the balancer's backends (scoreboard `addr` hash).
//! - **down**: picks the least-loaded (then newest) instance, marks it in
//!   the scoreboard's drain set (the balancer sends it no new flow; existing
//!   flows continue), waits the cool-down, then stops it through its agent
//!   and forgets it.
//!
//! Every decision is logged and recorded in `headroom:cm:decisions`.
//! See docs/CONTAINER_MANAGER.md.

pub mod agent_client;
pub mod observe;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::agent::parse_duration;
use crate::lease::{Fence, Lease, LeaseKeeper, Role};
use crate::registry::{ParamType, Registry, ServiceSpec, INSTANCE_ID_PARAM};
use crate::scaling::{decide, Decision, LoadWindow, Observation, ScalingPolicy, Timing};
use crate::scoreboard::{addr_key, drain_key, load_key, seen_key};
use agent_client::{AgentCallError, AgentClient};
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

/// `headroom container-manager …` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ContainerManagerArgs {
    /// Redis: registry, scoreboard, lease, instance records.
    #[arg(long, env = "HEADROOM_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// An agent to start instances on, `NODE=http://IP:PORT` (repeat).
    #[arg(long = "agent", value_parser = parse_agent, required = true)]
    pub agents: Vec<AgentTarget>,
    /// Access key id of principal `container-manager` (signs agent calls).
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
    if args.agents.is_empty() {
        anyhow::bail!("--agent: at least one agent is required");
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
    let mgr = Manager {
        role: role.clone(),
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
            let specs = match self.registry.list().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "reading the service registry failed");
                    continue;
                }
            };
            for spec in specs {
                if !self.args.services.is_empty() && !self.args.services.contains(&spec.name) {
                    continue;
                }
                if let Err(e) = self.round(&fence, &spec).await {
                    warn!(service = %spec.name, error = %e, "scaling round failed");
                }
            }
        }
        info!("container-manager stopped");
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
        // Finish what a previous round (or a crashed manager) began.
        for r in recs.iter_mut().filter(|r| r.phase == Phase::Starting) {
            self.complete_start(fence, spec, r).await?;
        }
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
                sl.window.clear();
                sl.last_hold = None;
                info!(service = %svc, running = obs.running, %decision, "decision");
                let rec = record(&svc, "up", &obs, to, load, &decision);
                self.scale_up(fence, spec, &recs, obs.running, to, rec)
                    .await
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

    /// Records `to − running` intents (with the decision, atomically and
    /// fenced), then starts each through its agent.
    async fn scale_up(
        &mut self,
        fence: &Fence,
        spec: &ServiceSpec,
        existing: &[InstanceRecord],
        running: u32,
        to: u32,
        rec: DecisionRecord,
    ) -> Result<(), RoundError> {
        let svc = &spec.name;
        let now_ms = crate::sigv4::unix_now_ms();
        let mut planned: Vec<InstanceRecord> = Vec::new();
        for _ in running..to {
            let all: Vec<&InstanceRecord> = existing.iter().chain(planned.iter()).collect();
            planned.push(self.plan_instance(spec, &all, now_ms)?);
        }
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
        state::fenced(fence, &mut self.conn, &cmds).await?;
        for mut p in planned {
            self.complete_start(fence, spec, &mut p).await?;
        }
        Ok(())
    }

    /// Chooses node, id and parameters for a new instance.
    fn plan_instance(
        &self,
        spec: &ServiceSpec,
        existing: &[&InstanceRecord],
        now_ms: i64,
    ) -> Result<InstanceRecord, RoundError> {
        let spec_err = |detail: String| RoundError::Spec {
            service: spec.name.clone(),
            detail,
        };
        // Spread: the eligible agent running the fewest of this service.
        let agent = self
            .args
            .agents
            .iter()
            .filter(|a| spec.requirements.node.as_ref().is_none_or(|n| *n == a.node))
            .min_by_key(|a| existing.iter().filter(|r| r.node == a.node).count())
            .ok_or_else(|| spec_err("no configured agent meets requirements.node".into()))?;
        let id = format!("{}-{}", prefix_of(&spec.name), random_suffix());
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
                        .ok_or_else(|| spec_err(format!("params.{name}: no free port left")))?;
                    params.insert(name.clone(), port.to_string());
                    addr = Some(std::net::SocketAddr::new(agent.ip, port).to_string());
                }
                _ => {
                    return Err(spec_err(format!(
                        "params.{name}: the container-manager fills only {INSTANCE_ID_PARAM} \
                         and the lb port parameter"
                    )))
                }
            }
        }
        Ok(InstanceRecord {
            id,
            node: agent.node.clone(),
            agent: agent.url.to_string(),
            addr: if spec.load_balanced { addr } else { None },
            params,
            phase: Phase::Starting,
            created_ms: now_ms,
            drain_since_ms: None,
        })
    }

    /// Starts a recorded intent (idempotent at the agent) and marks it
    /// running; a load-balanced instance joins the balancer's backends.
    async fn complete_start(
        &mut self,
        fence: &Fence,
        spec: &ServiceSpec,
        r: &mut InstanceRecord,
    ) -> Result<(), RoundError> {
        let svc = &spec.name;
        let url: hyper::Uri = match r.agent.parse() {
            Ok(u) => u,
            Err(_) => {
                warn!(service = %svc, instance = %r.id, agent = %r.agent, "bad agent URL in record");
                return Ok(());
            }
        };
        if !self.leading_with(fence) {
            warn!(service = %svc, instance = %r.id, "lease lost: not calling the agent; the next leader completes the intent");
            return Ok(());
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
            }
            Err(AgentCallError::Refused { status, body, .. }) if (400..500).contains(&status) => {
                // The agent will never run this request: drop the intent so
                // the policy can try again with a fresh one.
                warn!(service = %svc, instance = %r.id, status, %body, "start refused; intent dropped");
                state::fenced(
                    fence,
                    &mut self.conn,
                    &[vec!["HDEL".into(), state::instances_key(svc), r.id.clone()]],
                )
                .await?;
            }
            Err(e) => {
                // Unknown outcome: keep the intent; the next round retries
                // with the same id, which cannot start a second copy.
                warn!(service = %svc, instance = %r.id, error = %e, "start not confirmed; will retry");
            }
        }
        Ok(())
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

    /// Stops a drained instance and forgets it; false if the agent could
    /// not confirm (retried next round).
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
        let cmds = vec![
            vec!["HDEL".into(), state::instances_key(svc), r.id.clone()],
            vec!["HDEL".into(), addr_key(svc), r.id.clone()],
            vec!["SREM".into(), drain_key(svc), r.id.clone()],
            vec!["ZREM".into(), load_key(svc), r.id.clone()],
            vec!["ZREM".into(), seen_key(svc), r.id.clone()],
        ];
        state::fenced(fence, &mut self.conn, &cmds).await?;
        info!(service = %svc, instance = %r.id, "instance stopped");
        Ok(true)
    }
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
    fn ids_are_valid_agent_idents() {
        let id = format!("{}-{}", prefix_of("api.v2"), random_suffix());
        assert!(crate::registry::valid_ident(&id), "{id}");
    }
}
