//! `cargo xtask demo`: a client, the XDP balancer and three backends in
//! network namespaces; a weighted Maglev table (weights 1, 2, 3); real TCP
//! connections through the VIP in nat mode; where they went, and the
//! balancer's counters. Everything is removed on exit, also on an error or
//! Ctrl-C. Needs root. Reads nothing from stdin.
//!
//! Usage: demo [--connections N]
use std::{
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use headroom_tests::{
    is_root,
    topology::{
        backend_addr, backend_name, ClientLimits, Mode, Tally, Topology, TABLE_SIZE, VIP, VIP_PORT,
    },
};

/// Backend weights: backend `i` gets `WEIGHTS[i]`.
const WEIGHTS: [u32; 3] = [1, 2, 3];
/// Connections made unless `--connections` says otherwise.
const DEFAULT_CONNECTIONS: usize = 300;
/// Most connections the demo makes (keeps the run short).
const MAX_CONNECTIONS: usize = 100_000;

fn main() -> ExitCode {
    let stop = match watch_signals() {
        Ok(stop) => stop,
        Err(e) => return fail(&e),
    };
    match parse_args().and_then(|n| run(n, &stop)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("demo failed: {e:#}");
    ExitCode::FAILURE
}

/// The number of connections, from `--connections N` (or the default).
fn parse_args() -> Result<usize> {
    let mut args = std::env::args().skip(1);
    let mut connections = DEFAULT_CONNECTIONS;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connections" | "-n" => {
                let v = args.next().context("--connections needs a value")?;
                connections = v
                    .parse()
                    .with_context(|| format!("--connections {v:?} is not a number"))?;
            }
            "--help" | "-h" => {
                println!(
                    "usage: demo [--connections N]   (default {DEFAULT_CONNECTIONS}; needs root)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (usage: demo [--connections N])"),
        }
    }
    ensure!(
        (1..=MAX_CONNECTIONS).contains(&connections),
        "--connections must be in 1..={MAX_CONNECTIONS}"
    );
    Ok(connections)
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag the demo polls, so it
/// stops at the next connection and unwinds normally, and the topology's
/// Drop removes the namespaces. Must run before any other thread starts:
/// threads inherit the blocked mask, so only the watcher receives them.
fn watch_signals() -> Result<Arc<AtomicBool>> {
    // SAFETY: plain sigset manipulation on a local, zero-initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    };
    // SAFETY: blocks the signals in this (the only) thread.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    ensure!(
        rc == 0,
        "blocking signals: {}",
        std::io::Error::from_raw_os_error(rc)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: waits for one of the blocked signals in `set`.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                if flag.swap(true, Ordering::SeqCst) {
                    eprintln!("signal {sig}: already stopping, cleaning up");
                } else {
                    eprintln!("signal {sig}: stopping, cleaning up");
                }
            }
        })
        .context("starting the signal watcher")?;
    Ok(stop)
}

/// Fails if a signal asked the demo to stop.
fn check_stop(stop: &AtomicBool) -> Result<()> {
    ensure!(!stop.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

fn run(connections: usize, stop: &AtomicBool) -> Result<()> {
    ensure!(
        is_root(),
        "the demo needs root (network namespaces and XDP)"
    );
    let mode = Mode::Nat;
    println!(
        "headroom demo: client -> XDP balancer ({mode}) -> {} backends, VIP {VIP}:{VIP_PORT}",
        WEIGHTS.len()
    );
    let started = Instant::now();
    let mut topo = Topology::new(mode, WEIGHTS.len()).context("building the topology")?;
    check_stop(stop)?;
    let table = topo.publish(&WEIGHTS).context("publishing the service")?;
    println!(
        "topology ready in {:.1?}: namespaces {}, {}, {}",
        started.elapsed(),
        topo.client_ns().name(),
        topo.balancer_ns().name(),
        (0..topo.backend_count())
            .map(|i| topo.backend_ns(i).name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    check_stop(stop)?;

    let before = topo.counters()?;
    let limits = ClientLimits::default();
    let tally = topo
        .run_clients(connections, limits, stop)
        .context("connecting through the VIP")?;
    let counters = topo.counters()?.since(&before);
    println!(
        "{} TCP connections through {VIP}:{VIP_PORT} in {:.2?}, every reply checked",
        tally.total(),
        tally.elapsed
    );
    print_distribution(&topo, &tally, &table);
    println!("balancer counters: {}", counters.summary());
    for (i, c) in counters.backends.iter().enumerate() {
        ensure!(
            c.new_flows == tally.per_backend[i],
            "the balancer counted {} new flows for {} but the client saw {}",
            c.new_flows,
            backend_name(i),
            tally.per_backend[i]
        );
    }
    drop(topo);
    println!("cleaned up; total {:.1?}", started.elapsed());
    Ok(())
}

/// One line per backend: connections, their share, the share the weights
/// ask for, and the table slots the backend holds.
fn print_distribution(topo: &Topology, tally: &Tally, table: &[u32]) {
    let total_weight: u32 = WEIGHTS.iter().sum();
    let total = tally.total().max(1) as f64;
    println!(
        "  {:<10} {:<15} {:>6} {:>6} {:>7} {:>8} {:>12}",
        "backend", "address", "weight", "conns", "share", "expected", "table slots"
    );
    for (i, &weight) in WEIGHTS.iter().enumerate() {
        let slots = table.iter().filter(|&&id| id as usize == i).count();
        let addr = format!("{}:{}", backend_addr(i), topo.mode().server_port());
        println!(
            "  {:<10} {:<15} {:>6} {:>6} {:>6.1}% {:>7.1}% {:>12}",
            backend_name(i),
            addr,
            weight,
            tally.per_backend[i],
            tally.per_backend[i] as f64 / total * 100.0,
            f64::from(weight) / f64::from(total_weight) * 100.0,
            format!("{slots}/{TABLE_SIZE}")
        );
    }
}
