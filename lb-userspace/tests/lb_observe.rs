//! The daemon's observability, end to end: its admin endpoint
//! (`/metrics`, `/status`, `/trace`), `headroom lb status` and
//! `headroom lb trace`, against real parts.
//!
//! Setup (each test): `headroom_tests::topology` built for a daemon (client,
//! balancer and three backend namespaces whose TCP servers answer with their
//! name), a private redis-server on the balancer namespace's loopback with
//! loads 20/50/80 written as plain Redis commands (docs/SCOREBOARD.md), and
//! the daemon ([`Daemon::start`] on a thread inside the balancer namespace,
//! pins in a private bpffs). Its admin endpoint listens on
//! `127.0.0.1:9470` of that namespace. With `ewma_alpha = 1` and no ramp, a
//! load L gives weight `round(100 · max(100 − L, 5))`, computed here
//! independently of the weights module.
//!
//! - `root_observe_metrics`: 300 real connections, then `/metrics` scraped
//!   with a plain HTTP/1.1 client and parsed: per-backend new flows equal
//!   the connections each backend's server answered (exactly), packets and
//!   bytes add up to the service's, load/weight/share are the written loads
//!   and the formula, the global counters are consistent with each other
//!   and with the per-service ones, the refresh histogram is monotone with
//!   `_count` = refreshes; with redis-server killed, `headroom_redis_up`
//!   turns 0. `headroom lb status` (the binary) shows the three backends
//!   with their loads, weights and shares.
//! - `root_observe_trace_agrees`: for 24 client ports, `/trace` says
//!   "new flow, backend X"; a real connection bound to that exact source
//!   port is answered by X's server; traced while open it is "tracked" on
//!   X. Traces of tuples never connected leave no entry in the (pinned)
//!   connection table. Bad requests get 400/404/405; the `headroom lb trace`
//!   binary prints the same answers and fails on bad input.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{atomic::AtomicBool, Mutex, PoisonError},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use headroom::{
    admin_client::AdminClient,
    config::Config,
    daemon::{Daemon, DaemonHandle, RunOptions, Status},
    trace::{Outcome, Proto, TraceAnswer, TraceRequest},
};
use headroom_tests::{
    require_root,
    topology::{
        backend_addr, backend_name, ClientLimits, Mode, Topology, CLIENT_ADDR, VIP, VIP_PORT,
    },
    Netns, PrivateBpffs, RedisServer,
};
use lb_common::{Flow, FlowKey};

const HEADROOM: &str = env!("CARGO_BIN_EXE_headroom");
const SERVICE: &str = "web";
const BACKENDS: usize = 3;
const LOADS: [f64; 3] = [20.0, 50.0, 80.0];
const ADMIN: &str = "127.0.0.1:9470";
const REFRESH: Duration = Duration::from_millis(100);
/// Long enough that one write of the scoreboard lasts the whole test.
const TTL: Duration = Duration::from_secs(600);
const WAIT: Duration = Duration::from_secs(20);

/// One topology at a time: on two cores, parallel ones only add noise.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn root_observe_metrics() {
    if !require_root("root_observe_metrics") {
        return;
    }
    metrics().expect("metrics");
}

#[test]
fn root_observe_trace_agrees() {
    if !require_root("root_observe_trace_agrees") {
        return;
    }
    trace_agrees().expect("trace");
}

// ---------------------------------------------------------------- metrics

fn metrics() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut env = Env::start()?;
    env.wait_weights()?;

    let before = env.scrape()?;
    for i in 0..BACKENDS {
        ensure!(
            before.backend("headroom_backend_new_flows_total", i)? == 0.0,
            "new flows before any connection: {}",
            before.text
        );
    }
    let served_before: Vec<u64> = (0..BACKENDS).map(|i| env.topo.served(i)).collect();
    let never = AtomicBool::new(false);
    let limits = ClientLimits {
        per_connection: Duration::from_secs(3),
        total: Duration::from_secs(60),
    };
    let tally = env.topo.run_clients(300, limits, &never)?.per_backend;
    eprintln!("connections per backend: {tally:?}");
    for (i, n) in tally.iter().enumerate() {
        ensure!(
            env.topo.served(i) - served_before[i] == *n,
            "{}: served {} but the client counted {n}",
            backend_name(i),
            env.topo.served(i) - served_before[i]
        );
    }
    env.wait_refreshes(2)?;
    let m = env.scrape()?;

    // Per backend: exact new flows, packets and bytes that add up.
    let weights: Vec<f64> = LOADS.iter().map(|&l| formula_weight(l) as f64).collect();
    let wsum: f64 = weights.iter().sum();
    let (mut pkts, mut bytes, mut flows) = (0.0, 0.0, 0.0);
    for i in 0..BACKENDS {
        let nf = m.backend("headroom_backend_new_flows_total", i)?;
        ensure!(
            nf == tally[i] as f64,
            "{}: new flows {nf}, connections {}",
            backend_name(i),
            tally[i]
        );
        let p = m.backend("headroom_backend_packets_total", i)?;
        let b = m.backend("headroom_backend_bytes_total", i)?;
        // SYN, ACK, request, FIN at least, each a frame of 54+ bytes.
        ensure!(
            p >= 4.0 * tally[i] as f64,
            "{}: {p} packets for {} connections",
            backend_name(i),
            tally[i]
        );
        ensure!(
            b >= 54.0 * p,
            "{}: {b} bytes for {p} packets",
            backend_name(i)
        );
        pkts += p;
        bytes += b;
        flows += nf;

        let load = m.backend("headroom_backend_load", i)?;
        ensure!(load == LOADS[i], "{}: load {load}", backend_name(i));
        let w = m.backend("headroom_backend_weight", i)?;
        ensure!(w == weights[i], "{}: weight {w}", backend_name(i));
        let share = m.backend("headroom_backend_weight_share", i)?;
        ensure!(
            (share - weights[i] / wsum).abs() < 1e-9,
            "{}: weight share {share}, formula {}",
            backend_name(i),
            weights[i] / wsum
        );
        let slots = m.backend("headroom_backend_slot_share", i)?;
        ensure!(
            (slots - weights[i] / wsum).abs() < 0.01,
            "{}: slot share {slots}, weight share {}",
            backend_name(i),
            weights[i] / wsum
        );
        let age = m.backend("headroom_backend_report_age_seconds", i)?;
        ensure!(
            (0.0..TTL.as_secs_f64()).contains(&age),
            "{}: report age {age}",
            backend_name(i)
        );
        ensure!(m.backend("headroom_backend_draining", i)? == 0.0);
    }
    let svc = [("service", SERVICE)];
    ensure!(m.get("headroom_service_packets_total", &svc)? == pkts);
    ensure!(m.get("headroom_service_bytes_total", &svc)? == bytes);
    ensure!(m.get("headroom_service_new_flows_total", &svc)? == flows);
    ensure!(m.get("headroom_table_generation", &svc)? >= 1.0);
    ensure!(m.get("headroom_service_table_size", &svc)? == 65537.0);

    // Global counters: consistent with each other and with the service's.
    let ev = |e: &str| m.get("headroom_datapath_events_total", &[("event", e)]);
    let (hit, miss) = (ev("ct_hit")?, ev("ct_miss")?);
    ensure!(m.get("headroom_conntrack_lookups_total", &[("result", "hit")])? == hit);
    ensure!(m.get("headroom_conntrack_lookups_total", &[("result", "miss")])? == miss);
    ensure!(miss == flows, "ct_miss {miss} != new flows {flows}");
    ensure!(ev("miss_syn")? == flows, "miss_syn != new flows");
    ensure!(
        hit + miss == pkts,
        "ct_hit {hit} + ct_miss {miss} != packets {pkts}"
    );
    let verdict = |r: &str| {
        let action = r.split('_').next().unwrap_or(r);
        m.get(
            "headroom_verdicts_total",
            &[("action", action), ("reason", r)],
        )
    };
    let forwarded = verdict("tx")? + verdict("redirect")?;
    // Client → backend packets plus the nat replies.
    ensure!(
        forwarded == pkts + ev("nat_reply")?,
        "tx + redirect = {forwarded}, packets {pkts} + nat replies {}",
        ev("nat_reply")?
    );
    for r in ["drop_no_backend", "pass_fib"] {
        ensure!(verdict(r)? == 0.0, "{r} = {}", verdict(r)?);
    }
    let all: f64 = m.sum("headroom_verdicts_total");
    ensure!(
        all >= forwarded,
        "verdicts sum {all} < forwarded {forwarded}"
    );

    // The refresh histogram.
    let buckets = m.samples("headroom_refresh_duration_seconds_bucket");
    ensure!(buckets.len() >= 2, "no buckets:\n{}", m.text);
    let mut prev = 0.0;
    for (labels, v) in &buckets {
        ensure!(
            *v >= prev,
            "buckets not monotone at {labels:?}: {buckets:?}"
        );
        prev = *v;
    }
    let count = m.get("headroom_refresh_duration_seconds_count", &[])?;
    ensure!(buckets.last().map(|b| b.0.get("le").map(String::as_str)) == Some(Some("+Inf")));
    ensure!(prev == count, "+Inf bucket {prev} != count {count}");
    ensure!(
        count == m.get("headroom_refreshes_total", &[])?,
        "count != refreshes"
    );
    ensure!(count >= 2.0 && m.get("headroom_refresh_duration_seconds_sum", &[])? > 0.0);
    ensure!(m.get("headroom_redis_up", &[])? == 1.0);
    ensure!(m.get("headroom_redis_state", &[("state", "up")])? == 1.0);

    // `headroom lb status`, the real binary, in the balancer namespace.
    let out = env.headroom(&[
        "lb",
        "status",
        "--url",
        &format!("http://{ADMIN}"),
        "--interval",
        "200ms",
    ])?;
    ensure!(out.status.success(), "lb status failed: {}", out.stderr);
    eprintln!("lb status:\n{}", out.stdout);
    ensure!(out.stdout.starts_with("redis: up"), "{}", out.stdout);
    for i in 0..BACKENDS {
        let row: Vec<&str> = out
            .stdout
            .lines()
            .find(|l| l.contains(&instance(i)) && l.starts_with(SERVICE))
            .with_context(|| format!("no row for {}: {}", instance(i), out.stdout))?
            .split_whitespace()
            .collect();
        let want_share = format!("{:.1}%", 100.0 * weights[i] / wsum);
        ensure!(
            row[3] == format!("{:.1}", LOADS[i])
                && row[4] == formula_weight(LOADS[i]).to_string()
                && row[5] == want_share
                && row[6] == tally[i].to_string(),
            "row {row:?}: expected load {}, weight {}, share {want_share}, flows {}",
            LOADS[i],
            formula_weight(LOADS[i]),
            tally[i]
        );
    }
    let bad = env.headroom(&["lb", "status", "--url", "http://127.0.0.1:1"])?;
    ensure!(
        !bad.status.success() && bad.stderr.contains("cannot reach"),
        "lb status against nothing: {bad:?}"
    );

    // Redis killed: the state flips to down.
    {
        let _inside = env.topo.balancer_ns().enter_thread()?;
        env.redis.kill()?;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let m = env.scrape()?;
        if m.get("headroom_redis_up", &[])? == 0.0 {
            ensure!(m.get("headroom_redis_state", &[("state", "down")])? == 1.0);
            ensure!(m.get("headroom_scoreboard_reads_total", &[("result", "failed")])? >= 1.0);
            break;
        }
        ensure!(Instant::now() < deadline, "redis_up still 1 after {WAIT:?}");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

// ---------------------------------------------------------------- trace

fn trace_agrees() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let env = Env::start()?;
    env.wait_weights()?;
    let vip = SocketAddr::from((VIP, VIP_PORT));
    let names: Vec<String> = (0..BACKENDS).map(backend_name).collect();

    let mut per_backend = [0u32; BACKENDS];
    for k in 0..24u16 {
        let port = 41000 + 37 * k;
        let src = SocketAddr::from((CLIENT_ADDR, port));
        let req = TraceRequest {
            src,
            dst: vip,
            proto: Proto::Tcp,
            interface: None,
        };
        let first = env.trace(&req)?;
        ensure!(first.outcome == Outcome::NewFlow, "{src}: {first:?}");
        ensure!(
            first.action.as_deref() == Some("redirect"),
            "{src}: {first:?}"
        );
        let chosen = first.backend.clone().context("no backend")?;
        let addr = chosen.addr.context("no backend address")?;
        ensure!(
            chosen.instance.as_deref() == Some(addr.to_string().as_str()),
            "{src}: instance {:?} for {addr}",
            chosen.instance
        );
        // A second trace finds nothing tracked: the first left no entry.
        let again = env.trace(&req)?;
        ensure!(
            again.outcome == Outcome::NewFlow && again.backend == first.backend,
            "{src}: second trace {again:?} after {first:?}"
        );

        // A real connection from exactly that source port.
        let mut conn = env.connect_from(port)?;
        conn.write_all(b"first half;")?;
        let tracked = env.trace(&req)?;
        ensure!(
            tracked.outcome == Outcome::Tracked && tracked.backend == first.backend,
            "{src}: while connected {tracked:?}, traced before {first:?}"
        );
        conn.write_all(b"second half")?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        let (name, echoed) = reply.split_once('\n').context("reply without name")?;
        ensure!(echoed == "first half;second half", "{src}: reply {reply:?}");
        let i = names
            .iter()
            .position(|n| n == name)
            .with_context(|| format!("unknown backend {name:?}"))?;
        ensure!(
            SocketAddr::from((backend_addr(i), Mode::Nat.server_port())) == addr,
            "{src}: trace said {addr}, the connection reached {name} ({})",
            backend_addr(i)
        );
        per_backend[i] += 1;
    }
    eprintln!("traced and connected per backend: {per_backend:?}");
    ensure!(
        per_backend.iter().filter(|&&n| n > 0).count() >= 2,
        "24 flows all on one backend: {per_backend:?}"
    );

    // Tuples traced but never connected leave nothing in the connection
    // table (read from its pin, independently of the daemon).
    let untouched: Vec<u16> = (0..20).map(|k| 52000 + 11 * k).collect();
    for &p in &untouched {
        let a = env.trace(&TraceRequest {
            src: SocketAddr::from((CLIENT_ADDR, p)),
            dst: vip,
            proto: Proto::Tcp,
            interface: None,
        })?;
        ensure!(
            a.outcome == Outcome::NewFlow && a.backend.is_some(),
            "{p}: {a:?}"
        );
    }
    let flows = env.conntrack()?;
    ensure!(
        flows.len() >= 24,
        "expected the 24 connected flows in the table, found {}",
        flows.len()
    );
    for k in &flows {
        let sport = u16::from_be(k.sport);
        ensure!(
            !untouched.contains(&sport),
            "a traced, never connected tuple (port {sport}) is in the connection table"
        );
    }

    // Not a service; bad requests.
    let other = env.trace(&TraceRequest {
        src: SocketAddr::from((CLIENT_ADDR, 40000)),
        dst: SocketAddr::from((VIP, 81)),
        proto: Proto::Tcp,
        interface: None,
    })?;
    ensure!(other.outcome == Outcome::NotAService, "{other:?}");
    for (body, why) in [
        ("{", "EOF"),
        (r#"{"src":"10.90.0.2:1"}"#, "dst"),
        (
            r#"{"src":"10.90.0.2:1","dst":"10.99.0.1:80","proto":"icmp"}"#,
            "icmp",
        ),
        (r#"{"src":"10.90.0.2:1","dst":"10.99.0.1:80","x":1}"#, "x"),
        (r#"{"src":"10.90.0.2","dst":"10.99.0.1:80"}"#, "src"),
        (r#"{"src":"[fd00::2]:1","dst":"10.99.0.1:80"}"#, "famil"),
        (r#"{"src":"10.90.0.2:0","dst":"10.99.0.1:80"}"#, "port 0"),
        (
            r#"{"src":"10.90.0.2:1","dst":"10.99.0.1:80","interface":"eth9"}"#,
            "eth9",
        ),
    ] {
        let (code, text) = env.http("POST", "/trace", body)?;
        ensure!(
            code == 400 && text.contains(why),
            "POST /trace {body}: {code} {text}"
        );
    }
    for (method, path, want) in [
        ("GET", "/trace", 405),
        ("POST", "/metrics", 405),
        ("DELETE", "/status", 405),
        ("GET", "/nothing", 404),
        ("GET", "/status", 200),
    ] {
        let (code, text) = env.http(method, path, "")?;
        ensure!(code == want, "{method} {path}: {code} {text}");
    }

    // The real `headroom lb trace`: with --config, then --url.
    let cfg = tempfile::NamedTempFile::new()?;
    std::fs::write(cfg.path(), config_text(&env.interfaces, &env.redis_url))?;
    let cfg_path = cfg.path().to_str().context("temp path")?;
    // A port never used: the answer is a new flow.
    let port = 45000;
    let out = env.headroom(&[
        "lb",
        "trace",
        &format!("{CLIENT_ADDR}:{port}"),
        &vip.to_string(),
        "tcp",
        "--config",
        cfg_path,
    ])?;
    ensure!(out.status.success(), "lb trace: {out:?}");
    let expect = env.trace(&TraceRequest {
        src: SocketAddr::from((CLIENT_ADDR, port)),
        dst: vip,
        proto: Proto::Tcp,
        interface: None,
    })?;
    let b = expect.backend.context("no backend")?;
    ensure!(
        out.stdout.contains("new flow")
            && out
                .stdout
                .contains(&format!("backend {} {}", b.id, b.addr.context("addr")?)),
        "lb trace printed {:?}, the endpoint says {b:?}",
        out.stdout
    );
    eprintln!("lb trace: {}", out.stdout.trim());
    let url = format!("http://{ADMIN}");
    let bad = env.headroom(&["lb", "trace", "10.90.0.2", &vip.to_string(), "--url", &url])?;
    ensure!(
        !bad.status.success() && bad.stderr.contains("10.90.0.2"),
        "bad source accepted: {bad:?}"
    );
    let none = env.headroom(&["lb", "trace", "10.90.0.2:5", "10.99.0.1:81", "--url", &url])?;
    ensure!(
        !none.status.success() && none.stdout.contains("not a service"),
        "not a service: {none:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------- the environment

/// Topology, Redis and daemon. Field order is drop order.
struct Env {
    daemon: Option<DaemonHandle>,
    pins: PrivateBpffs,
    redis: RedisServer,
    topo: Topology,
    interfaces: Vec<String>,
    redis_url: String,
    pin_dir: PathBuf,
}

impl Env {
    fn start() -> Result<Env> {
        let topo =
            Topology::new_for_daemon(Mode::Nat, BACKENDS).context("building the topology")?;
        let redis = {
            let _inside = topo.balancer_ns().enter_thread()?;
            RedisServer::start()?
        };
        write_scoreboard(topo.balancer_ns(), &redis.url())?;
        let interfaces = topo.balancer_interfaces();
        let text = config_text(&interfaces, &redis.url());
        let config: Config = text
            .parse()
            .map_err(|e| anyhow!("test config: {e}\n{text}"))?;
        let pins = PrivateBpffs::mount("observe")?;
        let pin_dir = config.pin_dir_in(pins.root());
        let daemon = {
            let _inside = topo.balancer_ns().enter_thread()?;
            let opts = RunOptions {
                pin_root: Some(pins.root().to_path_buf()),
                ..RunOptions::default()
            };
            Daemon::start(config, opts).context("starting the daemon")?
        };
        let redis_url = redis.url();
        Ok(Env {
            daemon: Some(daemon),
            pins,
            redis,
            topo,
            interfaces,
            redis_url,
            pin_dir,
        })
    }

    fn status(&self) -> Status {
        self.daemon
            .as_ref()
            .map(DaemonHandle::status)
            .unwrap_or_default()
    }

    /// Waits until the table has the formula's weights for [`LOADS`].
    fn wait_weights(&self) -> Result<()> {
        let want: BTreeMap<String, u32> = (0..BACKENDS)
            .map(|i| (instance(i), formula_weight(LOADS[i])))
            .collect();
        let deadline = Instant::now() + WAIT;
        loop {
            let st = self.status();
            let got: BTreeMap<String, u32> = st
                .service(SERVICE)
                .map(|s| {
                    s.table
                        .iter()
                        .map(|b| (b.instance.clone(), b.weight))
                        .collect()
                })
                .unwrap_or_default();
            if got == want {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "weights {got:?}, want {want:?} (root {:?})",
                self.pins.root()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `n` more refreshes (counters are read at each).
    fn wait_refreshes(&self, n: u64) -> Result<()> {
        let start = self.status().refreshes;
        let deadline = Instant::now() + WAIT;
        while self.status().refreshes < start + n {
            ensure!(Instant::now() < deadline, "no refresh within {WAIT:?}");
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// One plain HTTP/1.1 exchange with the admin endpoint, from inside the
    /// balancer namespace: (status code, body).
    fn http(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let mut s = {
            let _inside = self.topo.balancer_ns().enter_thread()?;
            TcpStream::connect_timeout(&ADMIN.parse()?, Duration::from_secs(5))
                .context("connecting to the admin endpoint")?
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {ADMIN}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, rest) = raw
            .split_once("\r\n\r\n")
            .with_context(|| format!("no header end in {raw:?}"))?;
        let code: u16 = head
            .split_whitespace()
            .nth(1)
            .context("no status code")?
            .parse()?;
        ensure!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "chunked answer: {head}"
        );
        Ok((code, rest.to_string()))
    }

    fn scrape(&self) -> Result<Scrape> {
        let (code, text) = self.http("GET", "/metrics", "")?;
        ensure!(code == 200, "GET /metrics: {code} {text}");
        Scrape::parse(text)
    }

    /// `POST /trace` through the library's client (what `lb trace` uses).
    fn trace(&self, req: &TraceRequest) -> Result<TraceAnswer> {
        let _inside = self.topo.balancer_ns().enter_thread()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = AdminClient::from_url(&format!("http://{ADMIN}"))?;
        Ok(rt.block_on(client.trace(req))?)
    }

    /// A TCP connection to the VIP from the client namespace, bound to
    /// `port`.
    fn connect_from(&self, port: u16) -> Result<TcpStream> {
        let _inside = self.topo.client_ns().enter_thread()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let s = rt
            .block_on(async {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.bind(SocketAddr::from((CLIENT_ADDR, port)))?;
                tokio::time::timeout(
                    Duration::from_secs(5),
                    sock.connect(SocketAddr::from((VIP, VIP_PORT))),
                )
                .await
                .map_err(|_| std::io::Error::other("connect timed out"))?
            })
            .with_context(|| format!("connecting from port {port}"))?;
        let s = s.into_std()?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    }

    /// The connection table, read from its pin.
    fn conntrack(&self) -> Result<Vec<FlowKey>> {
        let path = find_file(&self.pin_dir, "CONNTRACK")
            .with_context(|| format!("no CONNTRACK pin under {}", self.pin_dir.display()))?;
        let data = aya::maps::MapData::from_pin(&path)?;
        let map = aya::maps::Map::from_map_data(data)?;
        let ct = aya::maps::HashMap::<_, FlowKey, Flow>::try_from(map)?;
        ct.keys()
            .map(|k| k.context("reading the connection table"))
            .collect()
    }

    /// Runs the `headroom` binary inside the balancer namespace.
    fn headroom(&self, args: &[&str]) -> Result<Output> {
        let mut argv = vec![HEADROOM];
        argv.extend_from_slice(args);
        let o = Command::new("ip")
            .args(["netns", "exec", self.topo.balancer_ns().name()])
            .args(&argv)
            .output()
            .context("running headroom")?;
        Ok(Output {
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        })
    }
}

#[derive(Debug)]
struct Output {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        }
    }
    None
}

/// The instance id (and address) of backend `i`.
fn instance(i: usize) -> String {
    format!("{}:{}", backend_addr(i), Mode::Nat.server_port())
}

/// The documented formula: floor 5, no smoothing, no ramp.
fn formula_weight(load: f64) -> u32 {
    (100.0 * (100.0 - load).max(5.0)).round() as u32
}

fn config_text(interfaces: &[String], redis_url: &str) -> String {
    headroom_tests::topology::scoreboard_daemon_config(
        "observe",
        Some(ADMIN.parse().expect("ADMIN is an address")),
        redis_url,
        REFRESH,
        TTL,
        interfaces,
        SERVICE,
        "nat",
    )
}

/// Writes every instance's address, load and report time, as any reporter
/// would (docs/SCOREBOARD.md), from inside the balancer namespace.
fn write_scoreboard(ns: &Netns, url: &str) -> Result<()> {
    let _inside = ns.enter_thread()?;
    let client = redis::Client::open(url)?;
    let mut c = client.get_connection_with_timeout(Duration::from_secs(5))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let mut p = redis::pipe();
    p.atomic();
    for (i, load) in LOADS.iter().enumerate() {
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
    p.query::<()>(&mut c)?;
    Ok(())
}

// ---------------------------------------------------------------- the text format

/// A parsed scrape: every sample with its labels.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// Parses the text format, checking that every sample's family was
    /// announced by `# TYPE` before it.
    fn parse(text: String) -> Result<Scrape> {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("TYPE line")?;
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("line {line:?}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().with_context(|| format!("value in {line:?}"))?,
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((n, l)) => (n.to_string(), parse_labels(l.trim_end_matches('}'))?),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(&name);
            ensure!(types.contains_key(family), "{name}: no TYPE before it");
            ensure!(name.starts_with("headroom_"), "{name}: not headroom_");
            samples.push((name, labels, value));
        }
        Ok(Scrape { text, samples })
    }

    fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    }

    /// The one sample of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<f64> = self
            .samples(name)
            .into_iter()
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .collect();
        match found.as_slice() {
            [v] => Ok(*v),
            [] => bail!("no {name} with {labels:?} in\n{}", self.text),
            _ => bail!("{} samples of {name} with {labels:?}", found.len()),
        }
    }

    /// Backend `i`'s sample of `name` (labels service, backend, instance).
    fn backend(&self, name: &str, i: usize) -> Result<f64> {
        let inst = instance(i);
        self.get(
            name,
            &[
                ("service", SERVICE),
                ("group", "observe"),
                ("backend", &inst),
                ("instance", &inst),
            ],
        )
    }

    fn sum(&self, name: &str) -> f64 {
        self.samples(name).iter().map(|(_, v)| v).sum()
    }
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes.
fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        ensure!(chars.next() == Some('"'), "label {key} not quoted in {s:?}");
        let mut val = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(c) => val.push(c),
                    None => bail!("dangling escape in {s:?}"),
                },
                Some('"') => break,
                Some(c) => val.push(c),
                None => bail!("unterminated label value in {s:?}"),
            }
        }
        out.insert(key.trim_start_matches(',').to_string(), val);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Ok(out)
}
