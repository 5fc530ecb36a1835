//! `headroom container-manager` against a real redis-server, real agents
//! (in-process, as control/tests/agent.rs) and real instance processes: a
//! shell script started through the registered argv template that reports
//! `backlog / backends` to the scoreboard with redis-cli, the backlog being
//! a file the test writes.
//!
//! 1. Under load the service scales from min to `predicted_replicas`, and
//!    back to min; never outside [min, max]; no action inside warm-up or
//!    cool-down; drained instances leave the balancer before they stop.
//! 2. A queue-bound service (flat CPU, growing backlog) is scaled on its
//!    custom metric, while the same policy fed with the instances' CPU %
//!    (from /proc/PID/stat) never asks for more.
//! 3. A manager killed during a scale-up, then replaced, loses no instance
//!    and starts no duplicate.
//! 4. An instance killed with SIGKILL is noticed through its agent's list,
//!    forgotten (record, balancer, scoreboard) and replaced so `min` holds;
//!    an unreachable agent is no evidence: nothing is dropped or started.
//! 5. With `--machine-manager` (real, in-process, static nodes reporting
//!    signed NodeReports): instances run only on the node the
//!    machine-manager chooses by requirements; a refused placement
//!    (max_count 0) starts nothing and records the reason; a placement no
//!    record owns is released; scale-in gives the placement back.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use headroom_control::agent::supervise::State;
use headroom_control::agent::{start_agent, AgentArgs, AgentHandle, AGENT_SERVICE};
use headroom_control::container_manager::state::{
    instances_key, DecisionRecord, InstanceRecord, Phase, DECISIONS_KEY,
};
use headroom_control::container_manager::{
    parse_agent, start_container_manager, ContainerManagerArgs,
};
use headroom_control::keystore::{Grant, KeyStore};
use headroom_control::registry::{parse_services, Registry};
use headroom_control::scaling::{decide, Decision, LoadWindow, Observation, ScalingPolicy, Timing};
use headroom_control::scoreboard::addr_key;

const WARM_MS: i64 = 1000;
const COOL_MS: i64 = 1000;

/// The instance: every 200 ms, load = min(100, backlog / backends) where
/// backlog is the file's number and backends the balancer's addr count.
const INSTANCE_SH: &str = r#"#!/bin/sh
# usage: inst.sh ID SERVICE REDIS_PORT BACKLOG_FILE PORT
ID="$1"; S="$2"; RP="$3"; F="$4"
i=0
while [ "$i" -lt 1500 ]; do
  T=$(/bin/cat "$F" 2>/dev/null)
  N=$(/usr/bin/redis-cli -p "$RP" HLEN "headroom:sb:{$S}:addr")
  L=$(/usr/bin/awk -v t="${T:-0}" -v n="${N:-1}" 'BEGIN { if (n < 1) n = 1; l = t / n; if (l > 100) l = 100; printf "%.2f", l }')
  NOW=$(/bin/date +%s%3N)
  printf 'ZADD headroom:sb:{%s}:load %s %s\nZADD headroom:sb:{%s}:seen %s %s\n' "$S" "$L" "$ID" "$S" "$NOW" "$ID" | /usr/bin/redis-cli -p "$RP" >/dev/null
  /bin/sleep 0.2
  i=$((i+1))
done
"#;

struct Env {
    redis: RedisServer,
    dir: tempfile::TempDir,
    cm: Creds,
    agents: Vec<(String, AgentHandle)>,
}

/// A service entry with `extra` TOML lines (e.g. requirements).
fn service_toml_with(name: &str, min: u32, max: u32, dir: &Path, port: u16, extra: &str) -> String {
    let d = dir.display();
    format!(
        r#"
[[service]]
name = "{name}"
min = {min}
max = {max}
load_balanced = true
lb = {{ service = "{name}", port_param = "port" }}
warm_up_secs = {w}
cool_down_secs = {c}
stop_grace_secs = 1
resources = {{ cpu = 0.1, ram_mib = 16 }}
params = {{ port = {{ type = "port", min = 20000, max = 20100 }} }}
templates.start = {{ argv = ["/bin/sh", "{d}/inst.sh", "{{instance_id}}", "{name}", "{port}", "{d}/backlog-{name}", "{{port}}"] }}
{extra}
"#,
        w = WARM_MS / 1000,
        c = COOL_MS / 1000,
    )
}

async fn env(services: &[(&str, u32, u32)]) -> Env {
    let with: Vec<(&str, u32, u32, &str)> =
        services.iter().map(|(n, a, b)| (*n, *a, *b, "")).collect();
    env_with(&with).await
}

/// Like [`env`], each service with extra TOML lines.
async fn env_with(services: &[(&str, u32, u32, &str)]) -> Env {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inst.sh"), INSTANCE_SH).unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let cm = ks.create_key("container-manager").await.unwrap();
    ks.set_grant(
        AGENT_SERVICE,
        "container-manager",
        &Grant {
            methods: vec!["GET".into(), "POST".into(), "DELETE".into()],
            prefixes: vec!["/v1/instances".into()],
        },
    )
    .await
    .unwrap();
    let mut toml = String::new();
    for (name, min, max, extra) in services {
        std::fs::write(dir.path().join(format!("backlog-{name}")), "0").unwrap();
        toml.push_str(&service_toml_with(
            name,
            *min,
            *max,
            dir.path(),
            redis.port,
            extra,
        ));
    }
    Registry::connect(&redis.url())
        .await
        .unwrap()
        .register(&parse_services(&toml).unwrap())
        .await
        .unwrap();
    Env {
        redis,
        dir,
        cm: Creds {
            akid: cm.access_key_id,
            secret: cm.secret,
        },
        agents: Vec::new(),
    }
}

impl Env {
    async fn add_agent(&mut self, node: &str, listen: &str) {
        let state = self.dir.path().join(format!("agent-{node}"));
        let a = start_agent(AgentArgs::new(
            node,
            listen.parse().unwrap(),
            &self.redis.url(),
            state,
        ))
        .await
        .unwrap();
        self.agents.push((node.to_string(), a));
    }

    fn agent_spec(&self, node: &str) -> String {
        let (_, a) = self.agents.iter().find(|(n, _)| n == node).unwrap();
        format!("{node}=http://{}", a.local_addr)
    }

    fn cm_args(&self, holder: &str, agents: &[String]) -> ContainerManagerArgs {
        ContainerManagerArgs {
            redis: self.redis.url(),
            agents: agents.iter().map(|a| parse_agent(a).unwrap()).collect(),
            machine_manager: None,
            agent_port: 7070,
            access_key_id: self.cm.akid.clone(),
            secret: self.cm.secret.clone(),
            region: REGION.into(),
            interval: Duration::from_millis(200),
            window: Duration::from_secs(1),
            stale: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(2),
            holder: Some(holder.into()),
            services: Vec::new(),
            node_timeout: Duration::from_secs(60),
        }
    }

    fn set_backlog(&self, service: &str, v: f64) {
        std::fs::write(
            self.dir.path().join(format!("backlog-{service}")),
            v.to_string(),
        )
        .unwrap();
    }

    /// Every instance any agent ever started for `service`.
    fn agent_instances(
        &self,
        service: &str,
    ) -> Vec<headroom_control::agent::supervise::InstanceRecord> {
        self.agents
            .iter()
            .flat_map(|(_, a)| a.supervisor.list())
            .filter(|r| r.service == service)
            .collect()
    }

    fn live(&self, service: &str) -> Vec<headroom_control::agent::supervise::InstanceRecord> {
        self.agent_instances(service)
            .into_iter()
            .filter(|r| matches!(r.state, State::Running | State::Stopping))
            .collect()
    }

    fn records(&self, service: &str) -> Vec<InstanceRecord> {
        let mut c = self.redis.conn();
        let m: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(instances_key(service))
            .query(&mut c)
            .unwrap();
        m.values()
            .map(|v| serde_json::from_str(v).unwrap())
            .collect()
    }

    fn backends(&self, service: &str) -> HashMap<String, String> {
        let mut c = self.redis.conn();
        redis::cmd("HGETALL")
            .arg(addr_key(service))
            .query(&mut c)
            .unwrap()
    }

    fn decisions(&self, service: &str) -> Vec<DecisionRecord> {
        let mut c = self.redis.conn();
        let v: Vec<String> = redis::cmd("LRANGE")
            .arg(DECISIONS_KEY)
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .unwrap();
        let mut d: Vec<DecisionRecord> = v
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .filter(|d: &DecisionRecord| d.service == service)
            .collect();
        d.reverse();
        d
    }

    /// Stop every instance and every agent.
    async fn teardown(mut self) {
        for (_, a) in &self.agents {
            for r in a.supervisor.list() {
                if r.state == State::Running {
                    a.supervisor.stop(&r.instance_id).await;
                }
            }
        }
        for (_, a) in self.agents.drain(..) {
            a.shutdown().await;
        }
    }
}

/// Polls until `f` holds, calling `check` on every poll (bounds).
async fn wait_for(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut(),
    mut f: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        check();
        if f() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn policy(min: u32, max: u32) -> ScalingPolicy {
    ScalingPolicy {
        min,
        max,
        ..ScalingPolicy::default()
    }
}

/// Every load-driven action respects warm-up after the previous start and
/// cool-down after the previous stop.
fn assert_timing(decisions: &[DecisionRecord]) {
    let mut last_up: Option<i64> = None;
    let mut last_down: Option<i64> = None;
    for d in decisions.iter().filter(|d| d.action != "hold") {
        let below_min = d.reason.contains("below min");
        if !below_min {
            if let Some(t) = last_up {
                assert!(
                    d.ts_ms - t >= WARM_MS,
                    "{d:?} only {} ms after a start",
                    d.ts_ms - t
                );
            }
            if let Some(t) = last_down {
                assert!(
                    d.ts_ms - t >= COOL_MS,
                    "{d:?} only {} ms after a stop",
                    d.ts_ms - t
                );
            }
        }
        if d.action == "up" {
            last_up = Some(d.ts_ms);
        } else {
            last_down = Some(d.ts_ms);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_to_the_predicted_count_and_back_to_min_within_bounds() {
    let (min, max) = (1, 4);
    let mut e = env(&[("web", min, max)]).await;
    e.add_agent("n1", "127.0.0.1:0").await;
    e.add_agent("n2", "127.0.0.2:0").await;
    let agents = vec![e.agent_spec("n1"), e.agent_spec("n2")];
    let cm = start_container_manager(e.cm_args("cm-a", &agents))
        .await
        .unwrap();

    let bounds = |e: &Env, reached_min: bool| {
        let n = e.live("web").len() as u32;
        assert!(n <= max, "{n} instances running, max is {max}");
        if reached_min {
            let r = e.records("web");
            let counted = r.iter().filter(|r| r.phase != Phase::Draining).count() as u32;
            assert!(counted >= min, "{counted} counted instances, min is {min}");
        }
    };
    wait_for(
        Duration::from_secs(20),
        "min instances",
        || bounds(&e, false),
        || e.live("web").len() as u32 == min,
    )
    .await;

    let total = 150.0;
    let want = policy(min, max).predicted_replicas(total);
    assert_eq!(want, 3, "the load asks for a count between min and max");
    e.set_backlog("web", total);
    wait_for(
        Duration::from_secs(40),
        "scale-up to the predicted count",
        || bounds(&e, true),
        || {
            e.live("web").len() as u32 == want
                && e.records("web").iter().all(|r| r.phase == Phase::Running)
                && e.backends("web").len() as u32 == want
        },
    )
    .await;
    // It settles there: no further action for a few windows.
    let settle = Instant::now() + Duration::from_secs(4);
    while Instant::now() < settle {
        bounds(&e, true);
        assert_eq!(
            e.live("web").len() as u32,
            want,
            "settled at the predicted count"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Spread over both agents.
    let nodes: BTreeSet<String> = e.records("web").iter().map(|r| r.node.clone()).collect();
    assert_eq!(nodes.len(), 2, "{nodes:?}");

    e.set_backlog("web", 0.0);
    wait_for(
        Duration::from_secs(40),
        "scale-in to min",
        || bounds(&e, true),
        || e.live("web").len() as u32 == min && e.records("web").len() as u32 == min,
    )
    .await;
    let backends = e.backends("web");
    let recs = e.records("web");
    assert_eq!(backends.len(), 1);
    assert_eq!(
        backends
            .get(&recs[0].id)
            .map(|a| a.ends_with(&format!(";node={}", recs[0].node))),
        Some(true),
        "{backends:?}"
    );
    let decisions = e.decisions("web");
    let actions: Vec<(String, u32)> = decisions
        .iter()
        .filter(|d| d.action != "hold")
        .map(|d| (d.action.clone(), d.to))
        .collect();
    assert_eq!(
        actions,
        [
            ("up".to_string(), 1),
            ("up".to_string(), 2),
            ("up".to_string(), 3),
            ("down".to_string(), 2),
            ("down".to_string(), 1)
        ],
        "{decisions:#?}"
    );
    assert_timing(&decisions);
    // Drain first: each stopped instance ended at least the cool-down
    // after the decision that took it out of the balancer.
    let downs: Vec<i64> = decisions
        .iter()
        .filter(|d| d.action == "down")
        .map(|d| d.ts_ms)
        .collect();
    let mut ended: Vec<i64> = e
        .agent_instances("web")
        .iter()
        .filter(|r| r.state == State::Stopped)
        .filter_map(|r| r.ended_ms)
        .collect();
    ended.sort();
    assert_eq!(ended.len(), 2, "two instances stopped");
    for (d, t) in downs.iter().zip(&ended) {
        assert!(
            t - d >= COOL_MS,
            "stopped {} ms after the drain began",
            t - d
        );
    }
    // Every start happened once: the agents saw exactly the 3 ids.
    assert_eq!(e.agent_instances("web").len(), 3);

    cm.shutdown().await;
    e.teardown().await;
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the man page; `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bound_service_scales_on_its_metric_not_on_cpu() {
    let (min, max) = (1, 4);
    let mut e = env(&[("queue", min, max)]).await;
    e.add_agent("n1", "127.0.0.1:0").await;
    let agents = vec![e.agent_spec("n1")];
    let cm = start_container_manager(e.cm_args("cm-a", &agents))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "min instances",
        || {},
        || e.live("queue").len() as u32 == min,
    )
    .await;

    // The CPU policy: same decide(), same window, fed with the instances'
    // CPU % over each 200 ms step.
    let p = policy(min, max);
    let timing = Timing {
        warm_up: Duration::ZERO,
        cool_down: Duration::ZERO,
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let t0 = Instant::now();
    let mut window = LoadWindow::new(Duration::from_secs(1));
    let mut prev: HashMap<u32, (u64, Instant)> = HashMap::new();
    let mut cpu_decisions = Vec::new();
    let mut cpu_max: f64 = 0.0;
    let final_backlog = 180.0;
    let want = p.predicted_replicas(final_backlog);
    assert_eq!(want, 3);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut backlog = 0.0;
    loop {
        // The queue grows by 20 every 400 ms up to the final backlog.
        if backlog < final_backlog && t0.elapsed().as_millis() as f64 / 400.0 * 20.0 > backlog {
            backlog += 20.0;
            e.set_backlog("queue", backlog);
        }
        let live = e.live("queue");
        let mut cpus = Vec::new();
        for r in &live {
            if let Some(t) = cpu_ticks(r.pid) {
                let now = Instant::now();
                if let Some((t_prev, at)) = prev.insert(r.pid, (t, now)) {
                    let dt = now.duration_since(at).as_secs_f64();
                    if dt > 0.0 {
                        cpus.push((t - t_prev) as f64 / hz / dt * 100.0);
                    }
                }
            }
        }
        if !cpus.is_empty() {
            let mean = cpus.iter().sum::<f64>() / cpus.len() as f64;
            cpu_max = cpu_max.max(mean);
            window.push(t0.elapsed(), mean);
            let n = live.len() as u32;
            cpu_decisions.push(decide(
                &p,
                &timing,
                &Observation {
                    running: n,
                    fresh: n,
                    window_mean: window.mean(),
                    since_start: None,
                    since_stop: None,
                },
            ));
        }
        if backlog >= final_backlog
            && e.live("queue").len() as u32 == want
            && e.records("queue").iter().all(|r| r.phase == Phase::Running)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue service did not scale to {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cpu_decisions.len() >= 10, "CPU policy was evaluated");
    assert!(
        cpu_decisions
            .iter()
            .all(|d| !matches!(d, Decision::Up { .. })),
        "CPU policy asked to scale: {cpu_decisions:?}"
    );
    assert!(
        cpu_max < p.up_threshold(1),
        "CPU stayed flat (max mean {cpu_max:.1} %)"
    );
    let ups: Vec<u32> = e
        .decisions("queue")
        .iter()
        .filter(|d| d.action == "up" && d.load.is_some_and(|l| l > 60.0))
        .map(|d| d.to)
        .collect();
    assert!(!ups.is_empty(), "custom metric drove the scale-up");
    assert_timing(&e.decisions("queue"));
    cm.shutdown().await;
    e.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_manager_mid_scale_up_loses_nothing_and_duplicates_nothing() {
    let (min, max) = (2, 4);
    let mut e = env(&[("jobs", min, max)]).await;
    // Phase A: the agent is down while the first manager records its
    // intents; the manager is then killed with the starts unconfirmed.
    let port = free_port();
    let spec = format!("n1=http://127.0.0.1:{port}");
    let a = start_container_manager(e.cm_args("cm-a", std::slice::from_ref(&spec)))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "intents recorded",
        || {},
        || e.records("jobs").len() as u32 == min,
    )
    .await;
    // Let it retry (and fail) a few rounds: still no new intents.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let intents: BTreeSet<String> = e.records("jobs").iter().map(|r| r.id.clone()).collect();
    assert_eq!(
        intents.len() as u32,
        min,
        "no extra intents while the agent is down"
    );
    assert!(e.records("jobs").iter().all(|r| r.phase == Phase::Starting));
    a.kill();

    e.add_agent("n1", &format!("127.0.0.1:{port}")).await;
    let b = start_container_manager(e.cm_args("cm-b", std::slice::from_ref(&spec)))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "intents completed by the new manager",
        || {},
        || e.records("jobs").iter().all(|r| r.phase == Phase::Running) && e.live("jobs").len() == 2,
    )
    .await;
    let started: BTreeSet<String> = e
        .agent_instances("jobs")
        .iter()
        .map(|r| r.instance_id.clone())
        .collect();
    assert_eq!(
        started, intents,
        "the recorded ids were started, nothing else"
    );

    // Phase B: kill the manager the moment it records a scale-up intent
    // (its start call possibly in flight), then replace it.
    e.set_backlog("jobs", 150.0);
    let want = policy(min, max).predicted_replicas(150.0);
    assert_eq!(want, 3);
    wait_for(
        Duration::from_secs(30),
        "scale-up intent",
        || {},
        || e.records("jobs").len() as u32 > min,
    )
    .await;
    b.kill();
    let c = start_container_manager(e.cm_args("cm-c", std::slice::from_ref(&spec)))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "scale-up completed",
        || {
            assert!(e.live("jobs").len() as u32 <= max);
        },
        || {
            e.live("jobs").len() as u32 == want
                && e.records("jobs").iter().all(|r| r.phase == Phase::Running)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recs: BTreeSet<String> = e.records("jobs").iter().map(|r| r.id.clone()).collect();
    let live: BTreeSet<String> = e
        .live("jobs")
        .iter()
        .map(|r| r.instance_id.clone())
        .collect();
    let ever: Vec<String> = e
        .agent_instances("jobs")
        .iter()
        .map(|r| r.instance_id.clone())
        .collect();
    assert_eq!(
        recs, live,
        "every record runs, every running instance is recorded"
    );
    assert_eq!(
        ever.len() as u32,
        want,
        "no instance was ever started twice or lost: {ever:?}"
    );
    assert_eq!(e.backends("jobs").len() as u32, want);
    c.shutdown().await;
    e.teardown().await;
}

/// A scoreboard score of `id` in `key`, if any.
fn zscore(e: &Env, key: &str, id: &str) -> Option<f64> {
    let mut c = e.redis.conn();
    redis::cmd("ZSCORE").arg(key).arg(id).query(&mut c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_is_replaced_and_an_unreachable_agent_drops_nothing() {
    use headroom_control::scoreboard::{drain_key, load_key, seen_key};
    let (min, max) = (2, 4);
    let mut e = env(&[("svc", min, max)]).await;
    e.add_agent("n1", "127.0.0.1:0").await;
    let agents = vec![e.agent_spec("n1")];
    let cm = start_container_manager(e.cm_args("cm-a", &agents))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "min instances running and in the balancer",
        || {},
        || {
            e.live("svc").len() as u32 == min
                && e.records("svc").iter().all(|r| r.phase == Phase::Running)
                && e.backends("svc").len() as u32 == min
        },
    )
    .await;
    let first: BTreeSet<String> = e.records("svc").iter().map(|r| r.id.clone()).collect();
    let victim = first.iter().next().unwrap().clone();
    wait_for(
        Duration::from_secs(10),
        "the victim reports its load",
        || {},
        || zscore(&e, &load_key("svc"), &victim).is_some(),
    )
    .await;
    let pid = e
        .live("svc")
        .iter()
        .find(|r| r.instance_id == victim)
        .unwrap()
        .pid;
    // The agent starts each instance as its own process group.
    assert_eq!(unsafe { libc::kill(-(pid as i32), libc::SIGKILL) }, 0);

    wait_for(
        Duration::from_secs(30),
        "the killed instance forgotten and replaced",
        || assert!(e.live("svc").len() as u32 <= max),
        || {
            let recs = e.records("svc");
            let b = e.backends("svc");
            !recs.iter().any(|r| r.id == victim)
                && recs.len() as u32 == min
                && recs.iter().all(|r| r.phase == Phase::Running)
                && e.live("svc").len() as u32 == min
                && b.len() as u32 == min
                && !b.contains_key(&victim)
        },
    )
    .await;
    // The scoreboard forgot it: reports and drain mark too.
    assert_eq!(zscore(&e, &load_key("svc"), &victim), None);
    assert_eq!(zscore(&e, &seen_key("svc"), &victim), None);
    let drained: bool = redis::cmd("SISMEMBER")
        .arg(drain_key("svc"))
        .arg(&victim)
        .query(&mut e.redis.conn())
        .unwrap();
    assert!(!drained);
    // The agent: the victim stays exited (killed by 9), never started
    // again; exactly one new id was started.
    let all = e.agent_instances("svc");
    let v = all.iter().find(|r| r.instance_id == victim).unwrap();
    assert_eq!(v.state, State::Exited, "{v:?}");
    assert_eq!(v.signal, Some(libc::SIGKILL), "{v:?}");
    let ids: BTreeSet<String> = all.iter().map(|r| r.instance_id.clone()).collect();
    assert_eq!(all.len(), ids.len(), "an id was started twice: {all:?}");
    assert_eq!(all.len() as u32, min + 1, "{all:?}");
    let now: BTreeSet<String> = e.records("svc").iter().map(|r| r.id.clone()).collect();
    assert_eq!(now.difference(&first).count(), 1, "one replacement");
    // Recorded: the replacement reason, then the scale-up back to min.
    let d = e.decisions("svc");
    let at = d
        .iter()
        .position(|d| d.action == "replace")
        .unwrap_or_else(|| panic!("no replace decision: {d:#?}"));
    assert!(
        d[at].reason.contains(&victim) && d[at].reason.contains("signal 9"),
        "{:?}",
        d[at]
    );
    assert_eq!((d[at].running, d[at].to), (min, min - 1));
    assert!(
        d[at + 1..]
            .iter()
            .any(|x| x.action == "up" && x.to == min && x.reason.contains("below min")),
        "{d:#?}"
    );
    assert_eq!(d.iter().filter(|d| d.action == "replace").count(), 1);

    // The node's agent becomes unreachable (its records point at a port
    // nobody listens on): no evidence of exit, so nothing is dropped and
    // nothing is started.
    let dead = format!("http://127.0.0.1:{}/", free_port());
    let mut c = e.redis.conn();
    for mut r in e.records("svc") {
        r.agent = dead.clone();
        let _: () = redis::cmd("HSET")
            .arg(instances_key("svc"))
            .arg(&r.id)
            .arg(serde_json::to_string(&r).unwrap())
            .query(&mut c)
            .unwrap();
    }
    let decided = e.decisions("svc").len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept: BTreeSet<String> = e.records("svc").iter().map(|r| r.id.clone()).collect();
    assert_eq!(kept, now, "records kept through the outage");
    assert!(e.records("svc").iter().all(|r| r.phase == Phase::Running));
    assert_eq!(e.backends("svc").len() as u32, min);
    assert_eq!(e.agent_instances("svc").len() as u32, min + 1);
    let later: Vec<DecisionRecord> = e.decisions("svc").split_off(decided);
    assert!(
        later.iter().all(|d| d.action == "hold"),
        "acted during the outage: {later:#?}"
    );
    cm.shutdown().await;
    e.teardown().await;
}

/// Posts a signed NodeReport for `node` every 300 ms (fixed, low use, so
/// placement does not depend on how busy the test machine is) until
/// aborted; bounded to 10 minutes.
fn report_node(mm: std::net::SocketAddr, node: &str, creds: Creds) -> tokio::task::JoinHandle<()> {
    let node = node.to_string();
    tokio::spawn(async move {
        let c = client();
        for _ in 0..2000 {
            let body = serde_json::json!({
                "node": node,
                "ts_ms": headroom_control::sigv4::unix_now_ms(),
                "cpu_pct": 5.0,
                "mem_used_bytes": 100u64 << 20,
                "mem_total_bytes": 8u64 << 30,
                "net_rx_bps": 0.0,
                "net_tx_bps": 0.0,
                "disk_used_bytes": 1,
                "disk_total_bytes": 2,
            })
            .to_string();
            let _ = signed(
                &c,
                mm,
                "POST",
                headroom_control::node_report::NODE_REPORT_PATH,
                body.as_bytes(),
                &creds,
                headroom_control::node_report::NODE_REPORT_SERVICE,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// A placement hash of the machine-manager: placement id → JSON.
fn mm_hash(e: &Env, key: &str) -> HashMap<String, String> {
    let mut c = e.redis.conn();
    redis::cmd("HGETALL").arg(key).query(&mut c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_manager_places_instances_refuses_with_reason_and_gets_places_back() {
    use headroom_control::machine_manager::registry::{self as mmreg, Keys, NodeState};
    use headroom_control::machine_manager::{start_machine_manager, MachineManagerConfig};
    use headroom_control::node_report::{node_principal, NODE_REPORT_SERVICE};

    let (min, max) = (2, 4);
    // web may run only where zone=b (node n2); gpu needs a node type whose
    // max_count is 0 and of which no node exists.
    let mut e = env_with(&[
        (
            "web",
            min,
            max,
            r#"requirements = { labels = { zone = "b" } }"#,
        ),
        ("gpu", 1, 2, r#"requirements = { node_type = "gpu" }"#),
    ])
    .await;
    let mut ks = KeyStore::connect(&e.redis.url()).await.unwrap();
    ks.set_grant(
        NODE_REPORT_SERVICE,
        "container-manager",
        &Grant {
            methods: vec!["GET".into(), "POST".into(), "DELETE".into()],
            prefixes: vec!["/v1/placements".into(), "/v1/nodes".into()],
        },
    )
    .await
    .unwrap();
    let mut node_creds = HashMap::new();
    for n in ["n1", "n2"] {
        let k = ks.create_key(&node_principal(n)).await.unwrap();
        node_creds.insert(
            n,
            Creds {
                akid: k.access_key_id,
                secret: k.secret,
            },
        );
    }
    let cfg = MachineManagerConfig::parse(&format!(
        r#"
listen = "127.0.0.1:0"
redis = "{redis}"
monthly_cost_limit = 1000.0
lease_ttl_ms = 2000
tick_ms = 200

[[node_type]]
name = "small"
cpu = 4
ram_mib = 8192
disk_gib = 10
disk_kind = "ssd"
cost_per_hour = 0.0
start = ["/bin/false"]
stop = ["/bin/true"]
max_count = 1
labels = {{ zone = "a" }}

[[node_type]]
name = "large"
cpu = 8
ram_mib = 8192
disk_gib = 10
disk_kind = "ssd"
cost_per_hour = 0.0
start = ["/bin/false"]
stop = ["/bin/true"]
max_count = 1
labels = {{ zone = "b" }}

[[node_type]]
name = "gpu"
cpu = 8
ram_mib = 8192
disk_gib = 10
disk_kind = "nvme"
cost_per_hour = 1.0
start = ["/bin/false"]
stop = ["/bin/true"]
max_count = 0

[[static_node]]
name = "n1"
type = "small"
address = "127.0.0.2"

[[static_node]]
name = "n2"
type = "large"
address = "127.0.0.3"
"#,
        redis = e.redis.url()
    ))
    .unwrap();
    let mm = start_machine_manager(cfg).await.unwrap();
    let reporters: Vec<_> = ["n1", "n2"]
        .iter()
        .map(|n| report_node(mm.local_addr, n, node_creds[n].clone()))
        .collect();
    let keys = Keys::new("headroom:mm");
    let mut rc = headroom_control::lease::connect(&e.redis.url())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in ["n1", "n2"] {
        loop {
            let st = mmreg::get_node(&mut rc, &keys, n).await.unwrap();
            if st.is_some_and(|r| r.state == NodeState::Ready) {
                break;
            }
            assert!(Instant::now() < deadline, "node {n} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // One agent per node, at the node's address and the common agent port.
    let agent_port = free_port();
    e.add_agent("n1", &format!("127.0.0.2:{agent_port}")).await;
    e.add_agent("n2", &format!("127.0.0.3:{agent_port}")).await;
    let mut args = e.cm_args("cm-a", &[]);
    args.machine_manager = Some(format!("http://{}", mm.local_addr).parse().unwrap());
    args.agent_port = agent_port;
    let cm = start_container_manager(args).await.unwrap();

    // Invariants on every poll: gpu never gets a record or an instance,
    // and nothing of web runs on n1.
    let check = |e: &Env| {
        assert!(e.records("gpu").is_empty(), "{:?}", e.records("gpu"));
        assert!(e.agent_instances("gpu").is_empty());
        assert!(e.records("web").iter().all(|r| r.node == "n2"));
        let (_, n1) = e.agents.iter().find(|(n, _)| n == "n1").unwrap();
        assert!(n1.supervisor.list().is_empty(), "n1 ran something");
        assert!(e.live("web").len() as u32 <= max);
    };
    // Every record's placement is at the machine-manager on n2, and n2
    // holds no other placement (nothing leaked, nothing placed twice).
    let placements_match = |e: &Env| {
        let recs = e.records("web");
        let mut ids: Vec<String> = recs.iter().filter_map(|r| r.placement.clone()).collect();
        ids.sort();
        let mut on_n2: Vec<String> = mm_hash(e, &keys.placements("n2")).into_keys().collect();
        on_n2.sort();
        ids.len() == recs.len()
            && ids == on_n2
            && mm_hash(e, &keys.placements("n1")).is_empty()
            && mm_hash(e, &keys.placement_index()).len() == recs.len()
    };
    wait_for(
        Duration::from_secs(30),
        "web at min on n2, placed by the machine-manager",
        || check(&e),
        || {
            e.live("web").len() as u32 == min
                && e.records("web").iter().all(|r| r.phase == Phase::Running)
                && e.backends("web").len() as u32 == min
                && placements_match(&e)
        },
    )
    .await;
    for (_, a) in e.backends("web") {
        assert!(
            a.starts_with("127.0.0.3:") && a.ends_with(";node=n2"),
            "{a}"
        );
    }
    // A placement no record owns, as a manager that died right after the
    // answer would leave: the manager releases it once it is old enough.
    let (st, body) = signed(
        &client(),
        mm.local_addr,
        "POST",
        "/v1/placements",
        br#"{"service":"web","requirements":{"labels":{"zone":"b"}},"cpu":0.1,"ram_mib":16}"#,
        &e.cm,
        NODE_REPORT_SERVICE,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let orphan = serde_json::from_str::<serde_json::Value>(&body).unwrap()["placement"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(mm_hash(&e, &keys.placements("n2")).contains_key(&orphan));
    wait_for(
        Duration::from_secs(30),
        "the orphaned placement released",
        || check(&e),
        || !mm_hash(&e, &keys.placement_index()).contains_key(&orphan) && placements_match(&e),
    )
    .await;
    assert_eq!(e.live("web").len() as u32, min, "instances untouched");
    wait_for(
        Duration::from_secs(20),
        "the gpu refusal recorded",
        || check(&e),
        || !e.decisions("gpu").is_empty(),
    )
    .await;
    let g = e.decisions("gpu");
    assert!(
        g.iter().all(|d| d.action == "hold"),
        "gpu was never scaled: {g:#?}"
    );
    assert!(
        g[0].reason.contains("max_count")
            && g[0].reason.contains("max count reached for type gpu: 0/0"),
        "{:?}",
        g[0]
    );

    // Scale up on load (still only on n2), then back: the drained
    // instance's placement is released.
    e.set_backlog("web", 150.0);
    let want = policy(min, max).predicted_replicas(150.0);
    assert_eq!(want, 3);
    wait_for(
        Duration::from_secs(40),
        "scale-up to 3 on n2",
        || check(&e),
        || {
            e.live("web").len() as u32 == want
                && e.records("web").iter().all(|r| r.phase == Phase::Running)
                && placements_match(&e)
        },
    )
    .await;
    let at_three: BTreeSet<String> = e
        .records("web")
        .iter()
        .filter_map(|r| r.placement.clone())
        .collect();
    e.set_backlog("web", 0.0);
    wait_for(
        Duration::from_secs(40),
        "scale-in to 2 with the placement released",
        || check(&e),
        || {
            e.live("web").len() as u32 == min
                && e.records("web").len() as u32 == min
                && placements_match(&e)
        },
    )
    .await;
    let left: BTreeSet<String> = e
        .records("web")
        .iter()
        .filter_map(|r| r.placement.clone())
        .collect();
    let released: Vec<&String> = at_three.difference(&left).collect();
    assert_eq!(released.len(), 1, "{at_three:?} → {left:?}");
    assert!(!mm_hash(&e, &keys.placement_index()).contains_key(released[0]));
    // The gpu service still has nothing and still no instance anywhere.
    check(&e);
    assert_eq!(e.agent_instances("web").len(), 3, "three ids ever started");

    cm.shutdown().await;
    for r in reporters {
        r.abort();
    }
    mm.shutdown().await;
    e.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_dead_node_are_replaced_after_the_node_timeout() {
    let (min, max) = (2, 4);
    let mut e = env(&[("svc", min, max)]).await;
    e.add_agent("n1", "127.0.0.1:0").await;
    e.add_agent("n2", "127.0.0.1:0").await;
    let agents = vec![e.agent_spec("n1"), e.agent_spec("n2")];
    let mut args = e.cm_args("cm-a", &agents);
    args.node_timeout = Duration::from_secs(2);
    let cm = start_container_manager(args).await.unwrap();
    wait_for(
        Duration::from_secs(20),
        "one instance on each node",
        || {},
        || {
            let recs = e.records("svc");
            recs.len() as u32 == min
                && recs.iter().all(|r| r.phase == Phase::Running)
                && recs
                    .iter()
                    .map(|r| r.node.clone())
                    .collect::<BTreeSet<_>>()
                    .len()
                    == 2
        },
    )
    .await;
    let on_n2: Vec<String> = e
        .records("svc")
        .iter()
        .filter(|r| r.node == "n2")
        .map(|r| r.id.clone())
        .collect();
    // n2 stops answering (its records now point at a port nobody listens
    // on, as when a node dies or is cut off; its process keeps running):
    // nothing happens before the node timeout...
    let dead = format!("http://127.0.0.1:{}/", free_port());
    let mut c = e.redis.conn();
    for mut r in e.records("svc").into_iter().filter(|r| r.node == "n2") {
        r.agent = dead.clone();
        let _: () = redis::cmd("HSET")
            .arg(instances_key("svc"))
            .arg(&r.id)
            .arg(serde_json::to_string(&r).unwrap())
            .query(&mut c)
            .unwrap();
    }
    let down = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        e.records("svc").iter().any(|r| on_n2.contains(&r.id)),
        "forgotten before the node timeout"
    );
    // ...then its instance is forgotten and replaced; min holds.
    wait_for(
        Duration::from_secs(30),
        "the dead node's instance replaced",
        || {},
        || {
            let recs = e.records("svc");
            recs.len() as u32 == min
                && recs.iter().all(|r| r.phase == Phase::Running)
                && !recs.iter().any(|r| on_n2.contains(&r.id))
        },
    )
    .await;
    assert!(
        down.elapsed() >= Duration::from_secs(2),
        "not before the node timeout"
    );
    assert!(!e.backends("svc").keys().any(|id| on_n2.contains(id)));
    let replace: Vec<_> = e
        .decisions("svc")
        .into_iter()
        .filter(|d| d.action == "replace")
        .collect();
    assert_eq!(replace.len(), 1, "{replace:#?}");
    assert!(
        replace[0].reason.contains("dead node"),
        "{}",
        replace[0].reason
    );
    cm.shutdown().await;
    e.teardown().await;
}
