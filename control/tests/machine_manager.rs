//! `headroom machine-manager` end to end with real parts: a real
//! redis-server, the manager's real HTTP API with SigV4 verification, and a
//! fake provider CLI (a bash script run as the node types' start/stop argv)
//! that starts, per node, a real reporter process posting signed
//! NodeReports (curl --aws-sigv4 as `node-<name>`, standing in for the
//! agent's load transmitter). Shown: best-fit placement; the cheapest
//! fitting type started when nothing fits, ready on its first report, then
//! used; max-count and monthly-cost refusals with their reasons (API and
//! metrics); idle non-static nodes stopped after the grace, static never;
//! stats retention; unsigned and wrong-principal reports refused and not
//! stored; two managers: one leads, the other takes over when it is killed,
//! and the dead leader's fenced write is refused.

mod common;

mod support {
    //! Test fixtures for the machine-manager tests: a real redis-server, the
    //! manager in-process, keys in the permission DB, and a fake provider CLI
    //! (a bash script run as the node type's start/stop argv) that records each
    //! call and starts a real process per node: a test reporter that posts
    //! SigV4-signed NodeReports with `curl --aws-sigv4` as `node-<name>` (it
    //! stands in for `headroom agent`'s load transmitter).
    #![allow(dead_code)]

    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use crate::common::*;
    use headroom_control::keystore::{Grant, KeyStore};
    use headroom_control::machine_manager::registry::{self, Keys, NodeRecord};
    use headroom_control::machine_manager::{
        start_machine_manager, MachineManagerConfig, MachineManagerHandle,
    };
    use headroom_control::node_report::{node_principal, NODE_REPORT_SERVICE};

    pub const CM: &str = "container-manager";

    const PROVIDER: &str = r#"#!/bin/bash
    # Fake provider CLI: provider.sh start|stop NODE [ADDR]. Records the call;
    # start launches this node's reporter in the background, stop kills it.
    set -u
    dir="$(cd "$(dirname "$0")" && pwd)"
    cmd="$1"; node="$2"
    echo "$cmd $node ${3:-}" >> "$dir/calls.log"
    case "$cmd" in
      start)
        if [ -f "$dir/fail-start" ]; then exit 3; fi
        setsid "$dir/reporter.sh" "$node" </dev/null >/dev/null 2>&1 &
        echo $! > "$dir/pids/$node"
        ;;
      stop)
        if [ -f "$dir/pids/$node" ]; then
          kill "$(cat "$dir/pids/$node")" 2>/dev/null
          rm -f "$dir/pids/$node"
        fi
        ;;
      *) exit 2 ;;
    esac
    exit 0
    "#;

    const REPORTER: &str = r#"#!/bin/bash
    # Test reporter for one node: posts a signed NodeReport every 200 ms, at
    # most 1500 times (5 minutes). cpu_pct from cpu/<node> (default 5).
    set -u
    dir="$(cd "$(dirname "$0")" && pwd)"
    node="$1"
    read -r akid secret < "$dir/keys/$node"
    url="$(cat "$dir/url")"
    for _ in $(seq 1 1500); do
      now=$(date +%s%3N)
      cpu=$(cat "$dir/cpu/$node" 2>/dev/null || echo 5)
      body="{\"node\":\"$node\",\"ts_ms\":$now,\"cpu_pct\":$cpu,\"mem_used_bytes\":104857600,\"mem_total_bytes\":2147483648,\"net_rx_bps\":0,\"net_tx_bps\":0,\"disk_used_bytes\":1,\"disk_total_bytes\":2}"
      curl -s -o /dev/null --max-time 2 --aws-sigv4 "aws:amz:headroom:machine-manager" \
        --user "$akid:$secret" -H 'content-type: application/json' --data "$body" \
        "$url/v1/node-reports"
      sleep 0.2
    done
    "#;

    /// One test's world.
    pub struct Env {
        pub redis: RedisServer,
        pub dir: tempfile::TempDir,
        pub ks: KeyStore,
        pub cm: Creds,
        pub keys: Keys,
        pub managers: Vec<MachineManagerHandle>,
        reporters: Vec<Child>,
    }

    impl Env {
        /// Redis, the fake provider, the container-manager's key and grant, and
        /// keys for every node name in `nodes` (created before any manager
        /// starts, so each manager's first key snapshot has them).
        pub async fn new(nodes: &[&str]) -> Env {
            let redis = RedisServer::start();
            let dir = tempfile::tempdir().unwrap();
            for sub in ["keys", "pids", "cpu"] {
                std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            }
            write_exec(&dir.path().join("provider.sh"), PROVIDER);
            write_exec(&dir.path().join("reporter.sh"), REPORTER);
            std::fs::write(dir.path().join("calls.log"), "").unwrap();
            let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
            let k = ks.create_key(CM).await.unwrap();
            ks.set_grant(
                NODE_REPORT_SERVICE,
                CM,
                &Grant {
                    methods: vec!["GET".into(), "POST".into(), "DELETE".into()],
                    prefixes: vec!["/v1/placements".into(), "/v1/nodes".into()],
                },
            )
            .await
            .unwrap();
            let mut env = Env {
                keys: Keys::new("headroom:mm"),
                redis,
                dir,
                ks,
                cm: Creds {
                    akid: k.access_key_id,
                    secret: k.secret,
                },
                managers: Vec::new(),
                reporters: Vec::new(),
            };
            for n in nodes {
                env.node_key(n).await;
            }
            env
        }

        /// Creates the key of principal `node-<name>` and leaves it where the
        /// reporter reads it.
        pub async fn node_key(&mut self, node: &str) -> Creds {
            let principal = node_principal(node);
            let k = self
                .ks
                .create_key(&principal)
                .await
                .unwrap_or_else(|e| panic!("create key for {principal}: {e}"));
            let creds = Creds {
                akid: k.access_key_id,
                secret: k.secret,
            };
            std::fs::write(
                self.dir.path().join("keys").join(node),
                format!("{} {}\n", creds.akid, creds.secret),
            )
            .unwrap();
            creds
        }

        pub fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        pub fn provider(&self) -> String {
            self.path("provider.sh").display().to_string()
        }

        /// A config with the fake provider for every type; `extra` is appended.
        pub fn config(&self, head: &str, types_and_static: &str) -> MachineManagerConfig {
            let text = format!(
                "listen = \"127.0.0.1:0\"\nredis = \"{}\"\n{head}\n{}",
                self.redis.url(),
                types_and_static.replace("PROVIDER", &self.provider())
            );
            MachineManagerConfig::parse(&text).unwrap()
        }

        /// Starts a manager; the first one started is where reporters send.
        pub async fn start_manager(&mut self, cfg: MachineManagerConfig) -> SocketAddr {
            let h = start_machine_manager(cfg).await.unwrap();
            let addr = h.local_addr;
            if self.managers.is_empty() {
                std::fs::write(self.path("url"), format!("http://{addr}")).unwrap();
            }
            self.managers.push(h);
            addr
        }

        /// Points the reporters at `addr`.
        pub fn report_to(&self, addr: SocketAddr) {
            std::fs::write(self.path("url"), format!("http://{addr}")).unwrap();
        }

        /// Runs the reporter of a static node (its "agent") directly.
        pub fn start_reporter(&mut self, node: &str, cpu_pct: f64) {
            self.set_cpu(node, cpu_pct);
            let child = Command::new(self.path("reporter.sh"))
                .arg(node)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            self.reporters.push(child);
        }

        pub fn set_cpu(&self, node: &str, cpu_pct: f64) {
            std::fs::write(self.path("cpu").join(node), format!("{cpu_pct}")).unwrap();
        }

        /// Lines of the fake provider's call log.
        pub fn calls(&self) -> Vec<String> {
            std::fs::read_to_string(self.path("calls.log"))
                .unwrap_or_default()
                .lines()
                .map(|l| l.trim().to_string())
                .collect()
        }

        pub async fn node(&self, name: &str) -> Option<NodeRecord> {
            let mut c = headroom_control::lease::connect(&self.redis.url())
                .await
                .unwrap();
            registry::get_node(&mut c, &self.keys, name).await.unwrap()
        }

        pub async fn node_state(&self, name: &str) -> Option<String> {
            self.node(name).await.map(|n| n.state.as_str().to_string())
        }

        /// Waits until `name` is in `state`.
        pub async fn wait_state(&self, name: &str, state: &str, timeout: Duration) {
            eventually(timeout, &format!("{name} {state}"), || async {
                self.node_state(name).await.as_deref() == Some(state)
            })
            .await;
        }

        /// Signed placement request by the container-manager.
        pub async fn place(
            &self,
            addr: SocketAddr,
            body: serde_json::Value,
        ) -> (u16, serde_json::Value) {
            let (st, b) = signed(
                &client(),
                addr,
                "POST",
                "/v1/placements",
                body.to_string().as_bytes(),
                &self.cm,
                NODE_REPORT_SERVICE,
            )
            .await;
            (
                st,
                serde_json::from_str(&b).unwrap_or(serde_json::Value::String(b)),
            )
        }

        pub async fn metrics(&self, addr: SocketAddr) -> String {
            let req = hyper::Request::get(format!("http://{addr}/metrics"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            send(&client(), req).await.1
        }
    }

    impl Drop for Env {
        fn drop(&mut self) {
            for c in &mut self.reporters {
                let _ = c.kill();
                let _ = c.wait();
            }
            // Reporters the fake provider started and no stop has killed.
            if let Ok(rd) = std::fs::read_dir(self.dir.path().join("pids")) {
                for e in rd.flatten() {
                    if let Ok(pid) = std::fs::read_to_string(e.path()) {
                        let _ = Command::new("kill").arg(pid.trim()).status();
                    }
                }
            }
        }
    }

    /// The value of metric line `name` in a /metrics text (0 if absent).
    pub fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn write_exec(p: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(p, text).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

use std::time::{Duration, Instant};

use common::*;
use headroom_control::lease::LeaseError;
use headroom_control::machine_manager::registry::{self, NodeState, RegistryError};
use headroom_control::node_report::NODE_REPORT_SERVICE;
use serde_json::json;
use support::*;

const T: Duration = Duration::from_secs(30);

const TYPES: &str = r#"
[[node_type]]
name = "owned"
cpu = 4
ram_mib = 8192
disk_gib = 100
disk_kind = "ssd"
cost_per_hour = 0.0
start = ["PROVIDER", "start", "{node}"]
stop = ["PROVIDER", "stop", "{node}"]
max_count = 2

[[node_type]]
name = "small"
cpu = 2
ram_mib = 2048
disk_gib = 20
disk_kind = "ssd"
cost_per_hour = 0.05
start = ["PROVIDER", "start", "{node}", "{addr}"]
stop = ["PROVIDER", "stop", "{node}"]
max_count = 2
addresses = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]

[[node_type]]
name = "medium"
cpu = 4
ram_mib = 4096
disk_gib = 40
disk_kind = "nvme"
cost_per_hour = 0.08
start = ["PROVIDER", "start", "{node}", "{addr}"]
stop = ["PROVIDER", "stop", "{node}"]
max_count = 3
addresses = ["127.0.0.31"]
"#;

const STATIC_DB_WEB: &str = r#"
[[static_node]]
name = "db"
type = "owned"
address = "127.0.0.11"
labels = { role = "db" }

[[static_node]]
name = "web"
type = "owned"
address = "127.0.0.12"
"#;

const STATIC_DB: &str = r#"
[[static_node]]
name = "db"
type = "owned"
address = "127.0.0.11"
"#;

fn head(extra: &str) -> String {
    format!("monthly_cost_limit = 100.0\ntick_ms = 200\nlease_ttl_ms = 1000\n{extra}")
}

fn placed_on(r: &(u16, serde_json::Value)) -> String {
    assert_eq!(r.0, 200, "expected a placement, got {r:?}");
    r.1["node"].as_str().unwrap().to_string()
}

/// Retries a placement answered 202 until it is placed (bounded).
async fn place_until_placed(
    env: &Env,
    addr: std::net::SocketAddr,
    body: serde_json::Value,
    starting: &str,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + T;
    loop {
        let r = env.place(addr, body.clone()).await;
        if r.0 != 202 {
            return r;
        }
        assert_eq!(r.1["node"], starting, "waiting on another node: {r:?}");
        assert!(Instant::now() < deadline, "{starting} never became usable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn starts(env: &Env) -> Vec<String> {
    env.calls()
        .into_iter()
        .filter(|l| l.starts_with("start "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_fit_then_cheapest_type_is_started_becomes_ready_and_is_used() {
    let mut env = Env::new(&["db", "web", "small-1", "medium-1"]).await;
    let cfg = env.config(&head(""), &format!("{TYPES}{STATIC_DB_WEB}"));
    let mm = env.start_manager(cfg).await;
    // db measures 50 % of 4 cores (2 free), web 5 % (3.8 free).
    env.start_reporter("db", 50.0);
    env.start_reporter("web", 5.0);
    env.wait_state("db", "ready", T).await;
    env.wait_state("web", "ready", T).await;
    eventually(T, "leader", || async {
        env.managers[0].role().fence().is_some()
    })
    .await;

    let p = |cpu: f64| json!({"service": "api", "cpu": cpu, "ram_mib": 256});
    // 1.5 cores: db (2 free) is tighter than web (3.8).
    assert_eq!(placed_on(&env.place(mm, p(1.5)).await), "db");
    // 2.5: only web fits.
    assert_eq!(placed_on(&env.place(mm, p(2.5)).await), "web");
    // 1.5: web has 1.5 left (committed 2.5), db 2.0 → web, leftover 0.
    assert_eq!(placed_on(&env.place(mm, p(1.5)).await), "web");
    // 1.9: only db (2.0 free) fits.
    assert_eq!(placed_on(&env.place(mm, p(1.9)).await), "db");
    assert!(starts(&env).is_empty(), "{:?}", env.calls());

    // 1.9 again: nothing fits → the cheapest fitting type (small, $0.05/h,
    // not medium $0.08/h) is started with the first pool address.
    let r = env.place(mm, p(1.9)).await;
    assert_eq!(r.0, 202, "{r:?}");
    assert_eq!(r.1["status"], "starting");
    assert_eq!(r.1["node"], "small-1");
    assert_eq!(r.1["address"], "127.0.0.21");
    let rec = env.node("small-1").await.unwrap();
    assert!(!rec.is_static);
    assert_eq!(rec.node_type, "small");
    // The caller retries: no second node is started meanwhile, and once
    // small-1 has reported it takes the placement.
    let r = place_until_placed(&env, mm, p(1.9), "small-1").await;
    assert_eq!(placed_on(&r), "small-1");
    assert_eq!(r.1["address"], "127.0.0.21");
    let rec = env.node("small-1").await.unwrap();
    assert_eq!(rec.state, NodeState::Ready);
    assert!(rec.last_report_ms.is_some());
    // The start command really ran, once, with the node's placeholders.
    assert_eq!(starts(&env), ["start small-1 127.0.0.21"]);
    assert!(env.path("pids").join("small-1").exists());
    let m = env.metrics(mm).await;
    assert_eq!(metric(&m, "headroom_mm_nodes_started_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "headroom_mm_placements_total"), 5.0, "{m}");
    // The listing shows the registry: three nodes, five placements.
    let (st, b) = signed(
        &client(),
        mm,
        "GET",
        "/v1/nodes",
        b"",
        &env.cm,
        NODE_REPORT_SERVICE,
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    let names: Vec<&str> = nodes
        .iter()
        .map(|n| n["node"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "small-1", "web"]);
    let placed: usize = nodes
        .iter()
        .map(|n| n["placements"].as_array().unwrap().len())
        .sum();
    assert_eq!(placed, 5);
    assert_eq!(nodes[0]["node"]["is_static"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_beyond_max_count_or_monthly_cost_limit_are_refused_with_reasons() {
    let mut env = Env::new(&["small-1", "small-2", "medium-1"]).await;
    let cfg = env.config(&head(""), TYPES);
    let mm = env.start_manager(cfg).await;
    eventually(T, "leader", || async {
        env.managers[0].role().fence().is_some()
    })
    .await;
    let small = json!({"service": "api", "cpu": 1.5, "ram_mib": 512,
                       "requirements": {"node_type": "small"}});
    for n in ["small-1", "small-2"] {
        let r = env.place(mm, small.clone()).await;
        assert_eq!((r.0, r.1["node"].as_str()), (202, Some(n)), "{r:?}");
        assert_eq!(
            placed_on(&place_until_placed(&env, mm, small.clone(), n).await),
            n
        );
    }
    // Both smalls are full: a third would break max_count.
    let r = env.place(mm, small.clone()).await;
    assert_eq!(r.0, 409, "{r:?}");
    assert_eq!(r.1["error"], "max_count");
    assert_eq!(r.1["reason"], "max count reached for type small: 2/2");
    // An nvme disk: only medium (0/3 running) fits. Two smalls cost
    // 2 × 36.50 a month, a medium 58.40 more → 131.40 > 100.
    let r = env
        .place(
            mm,
            json!({"service": "api", "cpu": 3, "ram_mib": 512,
                   "requirements": {"labels": {"disk_kind": "nvme"}}}),
        )
        .await;
    assert_eq!(r.0, 409, "{r:?}");
    assert_eq!(r.1["error"], "monthly_cost_limit");
    assert_eq!(
        r.1["reason"],
        "starting a medium node: projected monthly spend would be $131.40 > limit $100.00"
    );
    // Nothing could ever fit 64 cores.
    let r = env
        .place(mm, json!({"service": "api", "cpu": 64, "ram_mib": 512}))
        .await;
    assert_eq!(
        (r.0, r.1["error"].as_str()),
        (422, Some("no_type_fits")),
        "{r:?}"
    );
    // Refused starts ran nothing; each refusal was counted by reason.
    assert_eq!(
        starts(&env),
        ["start small-1 127.0.0.21", "start small-2 127.0.0.22"]
    );
    assert!(env.node("medium-1").await.is_none());
    let m = env.metrics(mm).await;
    for (reason, n) in [
        ("max_count", 1.0),
        ("monthly_cost_limit", 1.0),
        ("no_type_fits", 1.0),
    ] {
        let name = format!("headroom_mm_placement_refusals_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&m, &name), n, "{name} in {m}");
    }
    assert_eq!(metric(&m, "headroom_mm_nodes_started_total"), 2.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_non_static_node_is_stopped_after_the_grace_static_never() {
    let mut env = Env::new(&["db", "small-1"]).await;
    let grace = Duration::from_millis(1500);
    let cfg = env.config(
        &head("idle_grace_ms = 1500\nidle_cpu_pct = 20.0"),
        &format!("{TYPES}{STATIC_DB}"),
    );
    let mm = env.start_manager(cfg).await;
    env.start_reporter("db", 1.0); // idle the whole test
    env.wait_state("db", "ready", T).await;
    let body = json!({"service": "api", "cpu": 1, "ram_mib": 256,
                      "requirements": {"node_type": "small"}});
    let r = env.place(mm, body.clone()).await;
    assert_eq!((r.0, r.1["node"].as_str()), (202, Some("small-1")), "{r:?}");
    env.set_cpu("small-1", 1.0);
    let r = place_until_placed(&env, mm, body, "small-1").await;
    assert_eq!(placed_on(&r), "small-1");
    let placement = r.1["placement"].as_str().unwrap().to_string();

    // Low CPU but an instance placed: not idle, kept beyond twice the grace.
    tokio::time::sleep(grace * 2).await;
    assert_eq!(env.node_state("small-1").await.as_deref(), Some("ready"));

    // Release the placement: now idle; stopped once the grace has passed.
    let (st, b) = signed(
        &client(),
        mm,
        "DELETE",
        &format!("/v1/placements/{placement}"),
        b"",
        &env.cm,
        NODE_REPORT_SERVICE,
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let released = Instant::now();
    env.wait_state("small-1", "stopped", T).await;
    assert!(
        released.elapsed() >= grace,
        "stopped after {:?}, before the grace",
        released.elapsed()
    );
    let rec = env.node("small-1").await.unwrap();
    assert_eq!(rec.reason.as_deref(), Some("idle"));
    assert!(
        env.calls().contains(&"stop small-1".to_string()),
        "{:?}",
        env.calls()
    );
    assert!(
        !env.path("pids").join("small-1").exists(),
        "reporter not killed"
    );

    // The static node has been idle all along, far past the grace: never stopped.
    tokio::time::sleep(grace * 2).await;
    assert_eq!(env.node_state("db").await.as_deref(), Some("ready"));
    assert!(
        env.calls().iter().all(|l| !l.contains(" db")),
        "{:?}",
        env.calls()
    );
    let m = env.metrics(mm).await;
    assert_eq!(metric(&m, "headroom_mm_nodes_stopped_total"), 1.0, "{m}");
}

async fn post_report(
    addr: std::net::SocketAddr,
    creds: &Creds,
    node: &str,
    cpu: f64,
) -> (u16, String) {
    let body = json!({"node": node, "ts_ms": headroom_control::sigv4::unix_now_ms(),
        "cpu_pct": cpu, "mem_used_bytes": 1, "mem_total_bytes": 2,
        "net_rx_bps": 0.0, "net_tx_bps": 0.0, "disk_used_bytes": 1, "disk_total_bytes": 2});
    signed(
        &client(),
        addr,
        "POST",
        "/v1/node-reports",
        body.to_string().as_bytes(),
        creds,
        NODE_REPORT_SERVICE,
    )
    .await
}

async fn xlen(env: &Env, node: &str) -> u64 {
    let mut c = headroom_control::lease::connect(&env.redis.url())
        .await
        .unwrap();
    registry::stats_len(&mut c, &env.keys, node).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_kept_with_timestamps_and_trimmed_to_the_retention() {
    let mut env = Env::new(&[]).await;
    let db = env.node_key("db").await;
    let cfg = env.config(
        &head("stats_retention_ms = 1500"),
        &format!("{TYPES}{STATIC_DB}"),
    );
    let mm = env.start_manager(cfg).await;
    env.wait_state("db", "starting", T).await;
    for i in 0..5 {
        let (st, b) = post_report(mm, &db, "db", i as f64).await;
        assert_eq!(st, 204, "{b}");
    }
    assert_eq!(xlen(&env, "db").await, 5);
    let mut c = headroom_control::lease::connect(&env.redis.url())
        .await
        .unwrap();
    let latest = registry::latest_report(&mut c, &env.keys, "db")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.cpu_pct, 4.0);
    assert!(latest.ts_ms > 0);
    // The leader's loop trims what is older than 1.5 s.
    eventually(T, "stats trimmed", || async { xlen(&env, "db").await == 0 }).await;
    let (st, b) = post_report(mm, &db, "db", 7.0).await;
    assert_eq!(st, 204, "{b}");
    assert_eq!(xlen(&env, "db").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_and_wrong_principal_reports_are_refused_and_not_stored() {
    let mut env = Env::new(&[]).await;
    let db = env.node_key("db").await;
    let web = env.node_key("web").await;
    let ghost = env.node_key("ghost").await;
    let cfg = env.config(&head(""), &format!("{TYPES}{STATIC_DB_WEB}"));
    let mm = env.start_manager(cfg).await;
    env.wait_state("db", "starting", T).await;

    let body = json!({"node": "db", "ts_ms": 1, "cpu_pct": 1.0, "mem_used_bytes": 1,
        "mem_total_bytes": 2, "net_rx_bps": 0.0, "net_tx_bps": 0.0,
        "disk_used_bytes": 1, "disk_total_bytes": 2});
    let unsigned = hyper::Request::post(format!("http://{mm}/v1/node-reports"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let (st, b) = send(&client(), unsigned).await;
    assert_eq!(st, 401, "{b}");
    // web's key, db's report.
    let (st, b) = post_report(mm, &web, "db", 1.0).await;
    assert_eq!(
        (st, error_of(&b)),
        (403, "principal_mismatch".to_string()),
        "{b}"
    );
    // The container-manager's key, db's report.
    let (st, b) = post_report(mm, &env.cm, "db", 1.0).await;
    assert_eq!(
        (st, error_of(&b)),
        (403, "principal_mismatch".to_string()),
        "{b}"
    );
    // db's key id with a wrong secret.
    let forged = Creds {
        akid: db.akid.clone(),
        secret: web.secret.clone(),
    };
    let (st, b) = post_report(mm, &forged, "db", 1.0).await;
    assert_eq!(st, 401, "{b}");
    // A correctly signed report of a node that is not registered.
    let (st, b) = post_report(mm, &ghost, "ghost", 1.0).await;
    assert_eq!((st, error_of(&b)), (404, "unknown_node".to_string()), "{b}");
    // Nothing stored, nobody ready.
    assert_eq!(xlen(&env, "db").await, 0);
    assert_eq!(xlen(&env, "ghost").await, 0);
    assert!(env.node("ghost").await.is_none());
    assert_eq!(env.node_state("db").await.as_deref(), Some("starting"));
    // Placements: a node's key has no grant; unsigned is refused.
    let (st, b) = signed(
        &client(),
        mm,
        "POST",
        "/v1/placements",
        br#"{"service":"x","cpu":1,"ram_mib":1}"#,
        &db,
        NODE_REPORT_SERVICE,
    )
    .await;
    assert_eq!((st, error_of(&b)), (403, "no_grant".to_string()), "{b}");
    let unsigned = hyper::Request::post(format!("http://{mm}/v1/placements"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&client(), unsigned).await.0, 401);
    // The real thing is accepted and makes db ready.
    let (st, b) = post_report(mm, &db, "db", 1.0).await;
    assert_eq!(st, 204, "{b}");
    assert_eq!(xlen(&env, "db").await, 1);
    assert_eq!(env.node_state("db").await.as_deref(), Some("ready"));
    let m = env.metrics(mm).await;
    assert_eq!(
        metric(&m, "headroom_mm_node_reports_rejected_total"),
        5.0,
        "{m}"
    );
    assert_eq!(metric(&m, "headroom_mm_node_reports_total"), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_managers_one_leads_the_other_takes_over_and_stale_writes_are_fenced() {
    let mut env = Env::new(&["db"]).await;
    let cfg = |env: &Env, id: &str| {
        env.config(
            &head(&format!("id = \"{id}\"")),
            &format!("{TYPES}{STATIC_DB}"),
        )
    };
    let a = env.start_manager(cfg(&env, "mm-a")).await;
    let b = env.start_manager(cfg(&env, "mm-b")).await;
    env.start_reporter("db", 5.0);
    eventually(T, "one leader", || async {
        env.managers.iter().any(|m| m.role().fence().is_some())
    })
    .await;
    let leaders: Vec<usize> = (0..2)
        .filter(|&i| env.managers[i].role().fence().is_some())
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leader");
    let (li, fi) = if leaders[0] == 0 { (0, 1) } else { (1, 0) };
    let (leader_addr, follower_addr) = if li == 0 { (a, b) } else { (b, a) };
    let leader_id = env.managers[li].manager.id.clone();
    env.wait_state("db", "ready", T).await;
    let body = json!({"service": "api", "cpu": 1, "ram_mib": 256});
    // The follower does not act: 503 naming the leader.
    let r = env.place(follower_addr, body.clone()).await;
    assert_eq!(r.0, 503, "{r:?}");
    assert_eq!(r.1["error"], "not_leader");
    assert!(
        r.1["leader"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{leader_id}#")),
        "{r:?}"
    );
    assert_eq!(placed_on(&env.place(leader_addr, body.clone()).await), "db");

    // Kill the leader (no lease release, as a crash).
    let old = env.managers[li].role().fence().cloned().unwrap();
    let dead = env.managers.remove(li);
    dead.kill().await;
    env.report_to(follower_addr);
    let survivor = &env.managers[0];
    assert_ne!(survivor.manager.id, leader_id);
    let _ = fi;
    eventually(T, "take-over", || async {
        survivor.role().fence().is_some()
    })
    .await;
    let new = survivor.role().fence().cloned().unwrap();
    assert!(new.token > old.token, "{new:?} after {old:?}");
    assert_eq!(
        placed_on(&env.place(follower_addr, body.clone()).await),
        "db"
    );

    // The dead leader's token cannot write any more.
    let mut c = headroom_control::lease::connect(&env.redis.url())
        .await
        .unwrap();
    let err = registry::set_state(
        &mut c,
        &env.keys,
        &old,
        "db",
        NodeState::Stopped,
        headroom_control::sigv4::unix_now_ms(),
        Some("stale"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, RegistryError::Lease(LeaseError::Fenced { .. })),
        "{err}"
    );
    assert_eq!(env.node_state("db").await.as_deref(), Some("ready"));

    // A restarted manager joins as a follower while the survivor leads.
    let c2 = env.start_manager(cfg(&env, &leader_id)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = env.place(c2, body.clone()).await;
    assert_eq!(
        (r.0, r.1["error"].as_str()),
        (503, Some("not_leader")),
        "{r:?}"
    );
    assert!(env.managers[0].role().fence().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_provider_start_is_recorded_and_frees_its_slot() {
    let mut env = Env::new(&["small-2"]).await;
    let cfg = env.config(&head(""), TYPES);
    let mm = env.start_manager(cfg).await;
    eventually(T, "leader", || async {
        env.managers[0].role().fence().is_some()
    })
    .await;
    std::fs::write(env.path("fail-start"), "").unwrap();
    let body = json!({"service": "api", "cpu": 1, "ram_mib": 256,
                      "requirements": {"node_type": "small"}});
    let r = env.place(mm, body.clone()).await;
    assert_eq!((r.0, r.1["node"].as_str()), (202, Some("small-1")), "{r:?}");
    env.wait_state("small-1", "stopped", T).await;
    let rec = env.node("small-1").await.unwrap();
    let reason = rec.reason.unwrap_or_default();
    assert!(
        reason.starts_with("start_failed: ") && reason.contains("exit status: 3"),
        "{reason}"
    );
    let m = env.metrics(mm).await;
    assert_eq!(metric(&m, "headroom_mm_start_failures_total"), 1.0, "{m}");
    // The failed node no longer counts: the provider works again and the
    // retry starts a fresh node, which takes the placement.
    std::fs::remove_file(env.path("fail-start")).unwrap();
    let r = env.place(mm, body.clone()).await;
    assert_eq!((r.0, r.1["node"].as_str()), (202, Some("small-2")), "{r:?}");
    let r = place_until_placed(&env, mm, body, "small-2").await;
    assert_eq!(placed_on(&r), "small-2");
    assert_eq!(
        starts(&env),
        ["start small-1 127.0.0.21", "start small-2 127.0.0.21"]
    );
}
