//! `cargo xtask`: the project's task runner.
//!
//! Every step it takes is printed as `==> ...` on stderr, so a failing run
//! shows what it was doing.
mod apt;
mod ebpf;
mod run;
mod sh;
mod sys;
mod test;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Headroom's task runner.
#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building the XDP program needs (nightly, rust-src,
    /// LLVM 22, bpf-linker), then build lb-ebpf.
    BuildEbpf,
    /// Build the XDP program, install the runtime test tools, run every test
    /// of the workspace (as non-root: all but the `root_*` tests).
    Test(test::Args),
    /// Build the XDP program, then run the demo (`tests/src/bin/demo.rs`).
    Demo {
        /// Arguments for the demo, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the XDP program, then run a benchmark (`tests/src/bin/bench-NAME.rs`).
    Bench {
        /// Which benchmark.
        name: run::Bench,
        /// Arguments for the benchmark, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One apt state per invocation: `apt-get update` runs at most once.
    let mut apt = apt::Apt::new();
    let result = match cli.command {
        Command::BuildEbpf => ebpf::build(&mut apt),
        Command::Test(args) => test::run(&mut apt, &args),
        Command::Demo { args } => run::demo(&mut apt, &args),
        Command::Bench { name, args } => run::bench(&mut apt, name, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
