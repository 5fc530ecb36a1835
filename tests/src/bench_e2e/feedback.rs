//! Feedback latency: from a load written to the Redis scoreboard to the
//! kernel's table holding the new weights.
//!
//! The daemon runs in the balancer namespace with one scoreboard service
//! over the three backends. Each change writes new loads with plain Redis
//! commands (one MULTI/EXEC, as docs/SCOREBOARD.md says any reporter may);
//! the clock starts right before the write. The end is read from the
//! kernel, not from the daemon: the bench finds the XDP program attached to
//! the balancer's client-side veth, opens its `SERVICES` map by id and polls
//! the service's entry until it points at the other table buffer (the
//! daemon's one-update flip). It then reads that buffer through its own
//! mmap of the `TABLES` map and checks that its slot counts follow the new
//! weights, so a flip for any other reason would fail the run.
//!
//! Knobs: `ewma_alpha = 1` (a report applies at once), `dead_band = 0`
//! (every share change rebuilds), `ramp_up = "0s"`, TTL 5 s. Loads alternate
//! between 20/50/80 and 80/50/20 (shares 53/33/13 % and back), so each
//! change moves two shares by 40 points. A random pause in
//! `[0, refresh_interval)` before each write keeps the writes from locking
//! onto the daemon's refresh phase.

use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use headroom::{
    config::Config,
    daemon::{Daemon, DaemonHandle, RunOptions},
    tables::TableMem,
};
use lb_common::{ServiceKey, ServiceValue, PROTO_TCP};

use super::{net::BenchNet, net::LB_CLIENT_IF, variants::BACKEND_HTTP_PORT};
use crate::{
    fixture_env::service_key,
    topology::{backend_addr, VIP},
    Netns, PrivateBpffs,
};

/// The scoreboard service.
const SERVICE: &str = "fb";
/// The VIP port of the feedback service (nothing connects to it).
const PORT: u16 = 80;
/// Bound on one change becoming visible.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two reads of the kernel's service entry.
const POLL: Duration = Duration::from_micros(200);
/// The two load patterns the changes alternate between.
const LOADS: [[f64; 3]; 2] = [[20.0, 50.0, 80.0], [80.0, 50.0, 20.0]];

/// Latencies of one feedback run.
#[derive(Clone, Debug)]
pub struct FeedbackResult {
    /// The daemon's refresh interval.
    pub refresh: Duration,
    /// Sorted latencies, one per change.
    pub latencies: Vec<Duration>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl FeedbackResult {
    /// The `p` quantile (0..=1) of the latencies.
    pub fn quantile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

/// Runs `changes` load changes against a daemon refreshing every `refresh`.
pub fn run(
    net: &BenchNet,
    redis_url: &str,
    refresh: Duration,
    changes: usize,
) -> Result<FeedbackResult> {
    ensure!(
        net.backends.len() == 3,
        "the feedback run expects 3 backends"
    );
    let instances: Vec<String> = (0..3)
        .map(|i| format!("{}:{BACKEND_HTTP_PORT}", backend_addr(i)))
        .collect();
    let mut redis = {
        let _inside = net.lb.enter_thread()?;
        let c = redis::Client::open(redis_url).context("redis URL")?;
        let conn = c
            .get_connection_with_timeout(Duration::from_secs(2))
            .context("connecting to the bench's redis")?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn
    };
    redis::cmd("FLUSHALL").query::<()>(&mut redis)?;
    write_loads(&mut redis, &instances, &LOADS[0])?;

    let config = config(&net.lb_interfaces(), redis_url, refresh)?;
    // Dropped after the daemon (declared before it): detaches what it pinned.
    let pins = PrivateBpffs::mount("bench-fb")?;
    let daemon = {
        let _inside = net.lb.enter_thread()?;
        let opts = RunOptions {
            pin_root: Some(pins.root().to_path_buf()),
            ..RunOptions::default()
        };
        Daemon::start(config, opts).context("starting the daemon")?
    };
    let ids = wait_first_table(&daemon, &instances)?;
    let kernel = KernelView::open(&net.lb)?;
    let key = service_key(IpAddr::V4(VIP), PORT, PROTO_TCP);
    let mut current = kernel.service(&key)?;
    check_table(&kernel, &current, &ids, &LOADS[0]).context("the first table")?;

    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    let mut latencies = Vec::with_capacity(changes);
    let started = Instant::now();
    for k in 1..=changes {
        let pause = refresh.mul_f64((xorshift(&mut rng) % 1000) as f64 / 1000.0);
        thread::sleep(pause);
        let loads = &LOADS[k % 2];
        let t0 = Instant::now();
        write_loads(&mut redis, &instances, loads)?;
        let next = loop {
            let v = kernel.service(&key)?;
            if v.table_base != current.table_base {
                break v;
            }
            if t0.elapsed() > CHANGE_TIMEOUT {
                bail!("change {k}: the kernel table did not change within {CHANGE_TIMEOUT:?}");
            }
            thread::sleep(POLL);
        };
        latencies.push(t0.elapsed());
        check_table(&kernel, &next, &ids, loads).with_context(|| format!("change {k}"))?;
        current = next;
    }
    let elapsed = started.elapsed();
    daemon.shutdown().context("stopping the feedback daemon")?;
    drop(pins);
    latencies.sort();
    Ok(FeedbackResult {
        refresh,
        latencies,
        elapsed,
    })
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One report of every instance: address, load, time (docs/SCOREBOARD.md).
fn write_loads(conn: &mut redis::Connection, instances: &[String], loads: &[f64]) -> Result<()> {
    let now = now_ms();
    let mut p = redis::pipe();
    p.atomic();
    for (id, load) in instances.iter().zip(loads) {
        p.cmd("HSET")
            .arg(format!("headroom:sb:{{{SERVICE}}}:addr"))
            .arg(id)
            .arg(id)
            .ignore();
        p.cmd("ZADD")
            .arg(format!("headroom:sb:{{{SERVICE}}}:load"))
            .arg(*load)
            .arg(id)
            .ignore();
        p.cmd("ZADD")
            .arg(format!("headroom:sb:{{{SERVICE}}}:seen"))
            .arg(now)
            .arg(id)
            .ignore();
    }
    p.cmd("SADD").arg("headroom:services").arg(SERVICE).ignore();
    p.query::<()>(conn).context("writing the loads")
}

fn config(interfaces: &[String], redis_url: &str, refresh: Duration) -> Result<Config> {
    let mut text = format!(
        "name = \"bench-fb-{}\"\n\n[scoreboard]\nredis_url = \"{redis_url}\"\n\
         refresh_interval = \"{}us\"\nttl = \"5s\"\n\n\
         [weights]\newma_alpha = 1\ndead_band = 0\nramp_up = \"0s\"\n\n\
         [datapath]\nconntrack_size = 4096\nmax_services = 2\nmax_backends = 64\n\n\
         [[group]]\nname = \"fb\"\n",
        std::process::id(),
        refresh.as_micros()
    );
    for i in interfaces {
        text.push_str(&format!(
            "[[group.interface]]\nname = \"{i}\"\nmode = \"native\"\n"
        ));
    }
    text.push_str(&format!(
        "[[group.service]]\nname = \"{SERVICE}\"\nvip = \"{VIP}\"\nport = {PORT}\nmode = \"nat\"\n"
    ));
    text.parse::<Config>()
        .map_err(|e| anyhow::anyhow!("feedback daemon config: {e}\n{text}"))
}

/// Waits for the daemon's first table with all three instances; returns
/// instance index → backend id.
fn wait_first_table(daemon: &DaemonHandle, instances: &[String]) -> Result<Vec<u32>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = daemon.status();
        if let Some(s) = st.service(SERVICE) {
            let ids: Option<Vec<u32>> = instances
                .iter()
                .map(|i| s.table.iter().find(|b| &b.instance == i).and_then(|b| b.id))
                .collect();
            if let Some(ids) = ids {
                if s.generation >= 1 {
                    return Ok(ids);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no table with the three instances within 15 s: {st:#?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's `SERVICES` and `TABLES` maps, found through the program
/// attached to the balancer namespace's client-side veth.
struct KernelView {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    tables: TableMem,
}

impl KernelView {
    fn open(lb: &Netns) -> Result<KernelView> {
        let link = lb.exec(&["ip", "-j", "link", "show", "dev", LB_CLIENT_IF])?;
        let prog_id = xdp_prog_id(&link).with_context(|| format!("no XDP program in {link}"))?;
        let prog = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == prog_id)
            .with_context(|| format!("program {prog_id} not found"))?;
        let map_ids = prog
            .map_ids()
            .context("reading the program's maps")?
            .context("the kernel did not list the program's maps")?;
        let (mut services, mut tables) = (None, None);
        for id in map_ids {
            let info = aya::maps::MapInfo::from_id(id).context("map info")?;
            match info.name_as_str() {
                Some(lb_common::maps::SERVICES) => {
                    let md = MapData::from_id(id).context("opening SERVICES")?;
                    services = Some(
                        HashMap::try_from(Map::HashMap(md)).context("SERVICES as a hash map")?,
                    );
                }
                Some(lb_common::maps::TABLES) => {
                    let md = MapData::from_id(id).context("opening TABLES")?;
                    tables = Some(
                        TableMem::map(md.fd(), info.max_entries() * 2).context("mmap of TABLES")?,
                    );
                }
                _ => {}
            }
        }
        Ok(KernelView {
            services: services.context("the program has no SERVICES map")?,
            tables: tables.context("the program has no TABLES map")?,
        })
    }

    fn service(&self, key: &ServiceKey) -> Result<ServiceValue> {
        self.services
            .get(key, 0)
            .context("looking the service up in the kernel's SERVICES map")
    }
}

/// The program id in `ip -j link show` output (`"prog":{"id":N`).
fn xdp_prog_id(json: &str) -> Option<u32> {
    let at = json.find("\"prog\":{\"id\":")? + "\"prog\":{\"id\":".len();
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The table `v` points at gives each backend a share within 3 points of
/// the formula's for `loads` (floor 5, no smoothing).
fn check_table(k: &KernelView, v: &ServiceValue, ids: &[u32], loads: &[f64]) -> Result<()> {
    let slots = k.tables.region(v.table_base, v.table_size as usize)?;
    let mut counts: StdHashMap<u32, usize> = StdHashMap::new();
    for &s in slots {
        *counts.entry(s).or_default() += 1;
    }
    let weights: Vec<f64> = loads.iter().map(|l| (100.0 - l).max(5.0)).collect();
    let sum: f64 = weights.iter().sum();
    for (i, (&id, w)) in ids.iter().zip(&weights).enumerate() {
        let got = *counts.get(&id).unwrap_or(&0) as f64 / slots.len() as f64;
        let want = w / sum;
        ensure!(
            (got - want).abs() < 0.03,
            "backend {i} (id {id}) has {:.1} % of the slots, the loads {loads:?} give {:.1} %",
            got * 100.0,
            want * 100.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prog_id_from_ip_json() {
        let j = r#"[{"ifindex":2,"ifname":"lb-c","xdp":{"mode":1,"prog":{"id":417,"name":"headroom","tag":"ab"}}}]"#;
        assert_eq!(xdp_prog_id(j), Some(417));
        assert_eq!(xdp_prog_id(r#"[{"ifname":"lb-c"}]"#), None);
    }

    #[test]
    fn feedback_config_validates() {
        let ifs = ["lb-c", "lb-b0"].map(String::from);
        config(&ifs, "redis://127.0.0.1:6379", Duration::from_millis(10)).expect("valid");
    }
}
