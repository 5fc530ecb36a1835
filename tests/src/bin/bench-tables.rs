//! `cargo xtask bench tables`: what a weight change costs the daemon —
//! building a weighted Maglev table into the inactive buffer (in place, in
//! the mmap'ed map) and flipping the service to it — per table size and
//! backend count. Needs root (it loads the XDP object to get real maps).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use headroom::{
    maglev::{self, MaglevBackend},
    Balancer, LoadOptions,
};
use headroom_tests::{fixture_env::service_key, is_root};
use lb_common::{MODE_NAT, PROTO_TCP};

#[derive(Parser)]
struct Args {
    /// Rebuilds per cell.
    #[arg(long, default_value_t = 300)]
    iterations: usize,
    /// Table size M (prime).
    #[arg(long, default_value_t = 65537)]
    table_size: u32,
}

/// splitmix64: weights that change every iteration, deterministically.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        is_root(),
        "bench-tables loads the XDP object: run it as root"
    );
    let m = args.table_size;
    let opts = LoadOptions {
        conntrack_size: 4096,
        max_services: 2,
        max_backends: 1024,
        max_table_size: m,
        ..LoadOptions::default()
    };
    let mut lb = Balancer::load(&opts).context("loading the balancer")?;
    let key = service_key(std::net::Ipv4Addr::new(10, 100, 0, 1).into(), 80, PROTO_TCP);
    println!("| backends | M | median | p99 | max | (build + flip, {} rebuilds, weights 1–100 changing every time) |", args.iterations);
    println!("|---:|---:|---:|---:|---:|---|");
    let mut rng = 42u64;
    for n in [3usize, 10, 100, 1000] {
        let names: Vec<String> = (0..n)
            .map(|i| format!("10.1.{}.{}:8080", i / 250, i % 250))
            .collect();
        let mut times = Vec::with_capacity(args.iterations);
        for _ in 0..args.iterations {
            let backends: Vec<MaglevBackend> = names
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    MaglevBackend::new(k.as_str(), i as u32, 1 + (next(&mut rng) % 100) as u32)
                })
                .collect();
            let start = Instant::now();
            lb.publish_with(key, 0, MODE_NAT, m, |buf| {
                maglev::build_into(&backends, buf)
            })
            .context("publishing")?;
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "| {n} | {m} | {:.2} ms | {:.2} ms | {:.2} ms | |",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3
        );
    }
    Ok(())
}
