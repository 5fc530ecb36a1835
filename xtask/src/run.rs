//! `cargo xtask demo` and `cargo xtask bench`: build the XDP program, then
//! run a binary of the headroom-tests crate.
use anyhow::{Context, Result};
use clap::ValueEnum;

use crate::{apt::Apt, ebpf, sh, sys, tools};

/// The benchmarks; each is the binary `bench-NAME` of headroom-tests.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Bench {
    /// XDP per-packet cost (BPF_PROG_TEST_RUN).
    Xdp,
    /// Rebuilding and swapping a service's table.
    Tables,
    /// End to end through the balancer.
    E2e,
    /// The L7 auth shim.
    Auth,
    /// Autoscaler reaction time.
    Scale,
}

impl Bench {
    fn bin(self) -> &'static str {
        match self {
            Bench::Xdp => "bench-xdp",
            Bench::Tables => "bench-tables",
            Bench::E2e => "bench-e2e",
            Bench::Auth => "bench-auth",
            Bench::Scale => "bench-scale",
        }
    }
}

/// Builds the XDP program, then runs the demo with `args`.
pub fn demo(apt: &mut Apt, args: &[String]) -> Result<()> {
    prepare(apt)?;
    run_bin("demo", args)
}

/// Builds the XDP program, then runs benchmark `bench` with `args`.
pub fn bench(apt: &mut Apt, bench: Bench, args: &[String]) -> Result<()> {
    prepare(apt)?;
    run_bin(bench.bin(), args)
}

fn prepare(apt: &mut Apt) -> Result<()> {
    ebpf::build(apt)?;
    tools::ensure(apt)
}

fn run_bin(bin: &str, args: &[String]) -> Result<()> {
    let mut cmd = sys::cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "headroom-tests",
        "--bin",
        bin,
        "--",
    ])
    .args(args);
    sh::step(format!("running {bin}: {}", sh::display(&cmd)));
    sh::run(&mut cmd).with_context(|| format!("{bin} failed"))
}
