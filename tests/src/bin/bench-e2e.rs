//! `cargo xtask bench e2e`: Headroom (nat, dsr) against the kernel's ECMP
//! route, nftables DNAT, HAProxy and a direct route, on one client —
//! balancer — 3 backends topology of network namespaces; then what XDP on
//! veths costs in offloads; then the feedback latency from a scoreboard
//! write to the kernel's table. Needs root. Module docs of
//! `headroom_tests::bench_e2e` and docs/BENCHMARKS.md say what each figure is.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use headroom_tests::{
    bench_e2e::{
        feedback,
        measure::{self, CpuTimes},
        net::{BenchNet, Offloads, Receive},
        servers::Servers,
        stats,
        variants::{Variant, BACKEND_HTTP_PORT, BULK_PORT, HTTP_PORT},
    },
    is_root,
    topology::VIP,
    RedisServer,
};

#[derive(Parser)]
#[command(about = "End-to-end benchmark: Headroom against ECMP, nftables, HAProxy, direct")]
struct Args {
    /// Rounds; every round measures every variant once, in a rotated order.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per measurement (each wrk run, each bulk run).
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Variants to run, comma separated (ecmp is always run: it is the
    /// reference). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Variant>,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Skip the feedback-latency part.
    #[arg(long)]
    skip_feedback: bool,
    /// Skip the offload (TSO/GRO) part.
    #[arg(long)]
    skip_offloads: bool,
    /// Load changes per feedback run (two runs: refresh 100 ms and 10 ms).
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Smoke run: 1 round of 2 s, 50 changes.
    #[arg(long)]
    quick: bool,
}

/// Set by SIGINT/SIGTERM: the run stops at the next measurement and
/// unwinds, so namespaces, mounts and processes are removed (a signal's
/// default action would skip every destructor).
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Fails once a stop was requested.
fn check_stop() -> Result<()> {
    ensure!(!STOP.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// One variant's figures in one round.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    conns_per_s: f64,
    cpu_us_per_conn: f64,
    own_us_per_conn: f64,
    req_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    bulk1_gbps: f64,
    bulk4_gbps: f64,
    errors: u64,
    /// Headroom variants: the kernel's run time of our programs and their
    /// runs, per connection, over a separate `Connection: close` run.
    prog_ns_per_conn: Option<f64>,
    prog_runs_per_conn: Option<f64>,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.rounds = 1;
        args.duration = 2;
        args.changes = 50;
    }
    ensure!(
        is_root(),
        "bench-e2e builds network namespaces and loads XDP: run it as root"
    );
    ensure!(
        args.rounds >= 1 && args.duration >= 1,
        "--rounds and --duration must be ≥ 1"
    );
    let variants: Vec<Variant> = if args.only.is_empty() {
        Variant::ALL.to_vec()
    } else {
        let mut v = args.only.clone();
        v.push(Variant::Ecmp);
        v.sort();
        v.dedup();
        v
    };
    for tool in ["wrk", "ethtool", "nft", "haproxy"] {
        if tool == "haproxy" && !variants.contains(&Variant::Haproxy) {
            continue;
        }
        if tool == "nft" && !variants.contains(&Variant::Nft) {
            continue;
        }
        ensure!(
            headroom_tests::run_cmd(&["sh", "-c", &format!("command -v {tool}")]).is_ok(),
            "{tool} is not installed (cargo xtask bench installs it on Debian)"
        );
    }

    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let started = Instant::now();
    eprintln!("bench-e2e: building the network");
    let mut net = BenchNet::new(3)?;
    let redis = {
        let _inside = net.lb.enter_thread()?;
        RedisServer::start()?
    };
    let servers = Servers::start(&net.backends, &[HTTP_PORT, BACKEND_HTTP_PORT], BULK_PORT)?;
    print_machine();
    println!(
        "command: bench-e2e --rounds {} --duration {} --connections {} --threads {}{}",
        args.rounds,
        args.duration,
        args.connections,
        args.threads,
        if args.only.is_empty() {
            String::new()
        } else {
            format!(" --only {}", names(&variants))
        }
    );

    let mut samples: BTreeMap<Variant, Vec<Sample>> = BTreeMap::new();
    for round in 0..args.rounds {
        let mut order = variants.clone();
        order.rotate_left(round % variants.len());
        eprintln!("round {}/{}: {}", round + 1, args.rounds, names(&order));
        for &v in &order {
            check_stop()?;
            let s = measure_variant(&mut net, &servers, &redis.url(), v, &args, round)
                .with_context(|| format!("round {}: {v}", round + 1))?;
            eprintln!(
                "  {v:<13} conn/s {:>8.0}  cpu {:>6.1} (own {:>6.1}) µs/conn  req/s {:>8.0}  p50 {:>6.0} µs  p99 {:>6.0} µs  bulk {:>5.2} / {:>5.2} Gbit/s  errors {}",
                s.conns_per_s, s.cpu_us_per_conn, s.own_us_per_conn, s.req_per_s, s.p50_us, s.p99_us, s.bulk1_gbps, s.bulk4_gbps, s.errors
            );
            samples.entry(v).or_default().push(s);
        }
    }
    report(&samples, &variants);

    if !args.skip_offloads {
        offloads(&mut net, &servers, &redis.url(), &args)?;
    }
    if !args.skip_feedback {
        net.set_offloads(Offloads::DEFAULT)?;
        println!("\n### Feedback latency (scoreboard write → kernel table)\n");
        println!(
            "| refresh | changes | p50 ms | p99 ms | max ms | target p99 ≤ refresh + 10 ms | run |"
        );
        println!("|---:|---:|---:|---:|---:|---|---:|");
        for refresh in [Duration::from_millis(100), Duration::from_millis(10)] {
            check_stop()?;
            eprintln!("feedback: refresh {refresh:?}, {} changes", args.changes);
            let r = feedback::run(&net, &redis.url(), refresh, args.changes)?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let target = refresh + Duration::from_millis(10);
            println!(
                "| {} ms | {} | {:.1} | {:.1} | {:.1} | {} | {:.0} s |",
                refresh.as_millis(),
                r.latencies.len(),
                ms(r.quantile(0.5)),
                ms(r.quantile(0.99)),
                ms(r.quantile(1.0)),
                if r.quantile(0.99) <= target {
                    "met"
                } else {
                    "**not met**"
                },
                r.elapsed.as_secs_f64()
            );
        }
    }
    eprintln!("bench-e2e: done in {:.0?}", started.elapsed());
    Ok(())
}

fn names(vs: &[Variant]) -> String {
    vs.iter().map(|v| v.name()).collect::<Vec<_>>().join(",")
}

/// Installs `v`, runs every measurement, removes it.
fn measure_variant(
    net: &mut BenchNet,
    servers: &Servers,
    redis_url: &str,
    v: Variant,
    args: &Args,
    round: usize,
) -> Result<Sample> {
    net.set_offloads(v.offloads())?;
    let installed = v.install(net, redis_url, &format!("r{round}"))?;
    let url = format!("http://{VIP}:{HTTP_PORT}/");
    // One wrk run through the VIP: new connections (`close`) or keep-alive.
    let wrk = |close| {
        measure::wrk(
            &net.client,
            &url,
            args.duration,
            args.threads,
            args.connections,
            close,
        )
    };
    let mut s = Sample::default();

    let before = servers.requests();
    let pids = installed.pids();
    let (cpu0, own0) = (CpuTimes::now()?, measure::own_cpu_secs(&pids)?);
    let close = wrk(true)?;
    let (cpu1, own1) = (CpuTimes::now()?, measure::own_cpu_secs(&pids)?);
    check_spread(v, &before, &servers.requests())?;
    ensure!(close.requests > 0, "no connection completed");
    s.conns_per_s = close.rate;
    s.cpu_us_per_conn = cpu1.busy_secs_since(&cpu0) * 1e6 / close.requests as f64;
    s.own_us_per_conn = (own1 - own0 + cpu1.irq_secs_since(&cpu0)) * 1e6 / close.requests as f64;
    s.errors += close.errors;

    let ka = wrk(false)?;
    s.req_per_s = ka.rate;
    s.p50_us = ka.p50_us;
    s.p99_us = ka.p99_us;
    s.errors += ka.errors;

    let bulk = SocketAddr::from((VIP, BULK_PORT));
    s.bulk1_gbps = measure::bulk(&net.client, servers, bulk, 1, args.duration)?;
    s.bulk4_gbps = measure::bulk(&net.client, servers, bulk, 4, args.duration)?;
    if v.is_headroom() {
        // Its own run, last (the others compare with ECMP on equal terms):
        // the stats clock reads cost the program time.
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run-time stats")?;
        let (t0, n0) = measure::prog_stats(&measure::PROGRAMS);
        let r = wrk(true)?;
        let (t1, n1) = measure::prog_stats(&measure::PROGRAMS);
        ensure!(r.requests > 0, "no connection completed");
        let conns = r.requests as f64;
        // A program replaced meanwhile (none should be) spoils the sample.
        if let (Some(t), Some(n)) = (t1.checked_sub(t0), n1.checked_sub(n0)) {
            if n > 0 {
                s.prog_ns_per_conn = Some(t.as_nanos() as f64 / conns);
                s.prog_runs_per_conn = Some(n as f64 / conns);
            }
        }
        s.errors += r.errors;
    }
    drop(installed);
    Ok(s)
}

/// The connections of the last run went where the variant sends them:
/// every backend got at least 15 % (balancers), or backend 0 all (direct).
fn check_spread(v: Variant, before: &[u64], after: &[u64]) -> Result<()> {
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = d.iter().sum();
    ensure!(total > 0, "{v}: no request reached a backend");
    if v.spreads() {
        for (i, &n) in d.iter().enumerate() {
            if (n as f64) < 0.15 * total as f64 {
                bail!("{v}: backend {i} got {n} of {total} connections: not balanced ({d:?})");
            }
        }
    } else if d[0] != total {
        bail!("{v}: connections reached other backends than 0: {d:?}");
    }
    Ok(())
}

/// Prints the summary table over rounds.
fn report(samples: &BTreeMap<Variant, Vec<Sample>>, variants: &[Variant]) {
    let Some(ecmp) = samples.get(&Variant::Ecmp) else {
        return;
    };
    println!("\n### Medians over rounds (min–max); ratios to ECMP of the same round\n");
    println!("| variant | conn/s | × ECMP | req/s (keep-alive) | × ECMP | p50 µs | p99 µs | bulk 1 stream Gbit/s | × ECMP | bulk 4 streams Gbit/s | × ECMP | CPU µs/conn, machine | excess over ECMP | CPU µs/conn, attributed | excess over ECMP | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for v in variants {
        let Some(ss) = samples.get(v) else { continue };
        let col = |f: fn(&Sample) -> f64| ss.iter().map(f).collect::<Vec<f64>>();
        let ratio = |f: fn(&Sample) -> f64| {
            ss.iter()
                .zip(ecmp)
                .map(|(s, e)| f(s) / f(e))
                .collect::<Vec<f64>>()
        };
        let excess = |f: fn(&Sample) -> f64| {
            ss.iter()
                .zip(ecmp)
                .map(|(s, e)| f(s) - f(e))
                .collect::<Vec<f64>>()
        };
        println!(
            "| {v} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            stats::show(&col(|s| s.conns_per_s), 0),
            stats::show(&ratio(|s| s.conns_per_s), 2),
            stats::show(&col(|s| s.req_per_s), 0),
            stats::show(&ratio(|s| s.req_per_s), 2),
            stats::show(&col(|s| s.p50_us), 0),
            stats::show(&col(|s| s.p99_us), 0),
            stats::show(&col(|s| s.bulk1_gbps), 2),
            stats::show(&ratio(|s| s.bulk1_gbps), 2),
            stats::show(&col(|s| s.bulk4_gbps), 2),
            stats::show(&ratio(|s| s.bulk4_gbps), 2),
            stats::show(&col(|s| s.cpu_us_per_conn), 1),
            stats::show(&excess(|s| s.cpu_us_per_conn), 1),
            stats::show(&col(|s| s.own_us_per_conn), 1),
            stats::show(&excess(|s| s.own_us_per_conn), 1),
            ss.iter().map(|s| s.errors).sum::<u64>(),
        );
    }
    let any_prog = samples
        .values()
        .flatten()
        .any(|s| s.prog_ns_per_conn.is_some());
    if any_prog {
        print_prog_stats(samples, variants);
    }
    println!("\nper round (conn/s, req/s, bulk 4 as × ECMP):\n");
    for (r, e) in ecmp.iter().enumerate() {
        let cells: Vec<String> = variants
            .iter()
            .filter_map(|v| {
                let s = samples.get(v)?.get(r)?;
                Some(format!(
                    "{v} {:.2}/{:.2}/{:.2}",
                    s.conns_per_s / e.conns_per_s,
                    s.req_per_s / e.req_per_s,
                    s.bulk4_gbps / e.bulk4_gbps
                ))
            })
            .collect();
        println!("- round {}: {}", r + 1, cells.join("; "));
    }
}

/// The programs' own run time per connection (Headroom variants).
fn print_prog_stats(samples: &BTreeMap<Variant, Vec<Sample>>, variants: &[Variant]) {
    println!("\n### The balancer programs' own time (kernel BPF run-time stats, separate `Connection: close` run)\n");
    println!("An upper bound of what a TC variant adds to ECMP's CPU per connection: its redirects replace the routing ECMP does, its passes add to it.\n");
    println!("| variant | program runs/conn | program ns/conn | ns/run |");
    println!("|---|---:|---:|---:|");
    for v in variants {
        let Some(ss) = samples.get(v) else { continue };
        let runs: Vec<f64> = ss.iter().filter_map(|s| s.prog_runs_per_conn).collect();
        let ns: Vec<f64> = ss.iter().filter_map(|s| s.prog_ns_per_conn).collect();
        if ns.is_empty() {
            continue;
        }
        let per_run: Vec<f64> = ns.iter().zip(&runs).map(|(t, n)| t / n).collect();
        println!(
            "| {v} | {} | {} | {} |",
            stats::show(&runs, 1),
            stats::show(&ns, 0),
            stats::show(&per_run, 0)
        );
    }
}

/// Bulk throughput under different offload settings: what XDP on the veths
/// costs, what GRO instead of the pass program gives back, and the TC hook,
/// which needs no change.
fn offloads(net: &mut BenchNet, servers: &Servers, redis_url: &str, args: &Args) -> Result<()> {
    let cases = [
        (Variant::Ecmp, Offloads::DEFAULT),
        (
            Variant::Ecmp,
            Offloads {
                sender_tx_csum: false,
                receive: Receive::Plain,
            },
        ),
        (Variant::HeadroomNat, Offloads::HEADROOM),
        (
            Variant::HeadroomNat,
            Offloads {
                sender_tx_csum: false,
                receive: Receive::Gro,
            },
        ),
        (
            Variant::HeadroomNat,
            Offloads {
                sender_tx_csum: false,
                receive: Receive::PassGro,
            },
        ),
        // At TC ingress the skb keeps its GSO and checksum state: defaults.
        (Variant::HeadroomNatTc, Offloads::DEFAULT),
    ];
    let rounds = args.rounds.min(3);
    let mut got: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); cases.len()];
    let bulk = SocketAddr::from((VIP, BULK_PORT));
    for round in 0..rounds {
        eprintln!("offloads round {}/{rounds}", round + 1);
        for (k, (v, o)) in cases.iter().enumerate() {
            check_stop()?;
            net.set_offloads(*o)?;
            let installed = v.install(net, redis_url, &format!("o{round}"))?;
            let one = measure::bulk(&net.client, servers, bulk, 1, args.duration)?;
            let four = measure::bulk(&net.client, servers, bulk, 4, args.duration)?;
            drop(installed);
            eprintln!("  {v} ({}): {one:.2} / {four:.2} Gbit/s", o.label());
            got[k].0.push(one);
            got[k].1.push(four);
        }
    }
    println!("\n### Offloads: bulk throughput, Gbit/s, median (min–max) over {rounds} rounds\n");
    println!("| balancer | client and backend veths | 1 stream | 4 streams |");
    println!("|---|---|---:|---:|");
    for ((v, o), (one, four)) in cases.iter().zip(&got) {
        println!(
            "| {v} | {} | {} | {} |",
            o.label(),
            stats::show(one, 2),
            stats::show(four, 2)
        );
    }
    Ok(())
}

/// Machine facts for the report.
fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    println!(
        "machine: {cpus} CPUs ({model}), kernel {}, load average at start {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
