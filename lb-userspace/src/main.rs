//! The `headroom` command: one binary for the balancer and the control modules.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use headroom_control::cli::{KeysArgs, LoadReceiverArgs, ShimArgs};
use tracing_subscriber::EnvFilter;

/// Headroom: an XDP load balancer steered by the services' own load.
#[derive(Debug, Parser)]
#[command(
    name = "headroom",
    version,
    about = "Headroom: an XDP load balancer steered by the services' own load"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Manage API keys and grants in the permission DB (Redis).
    Keys(KeysArgs),
    /// Run the authorising reverse proxy in front of one service instance.
    Shim(Box<ShimArgs>),
    /// Accept signed load reports and write them to the scoreboard.
    LoadReceiver(LoadReceiverArgs),
    /// The load-balancer daemon and its tools.
    #[command(subcommand)]
    Lb(LbCmd),
}

#[derive(Debug, Subcommand)]
enum LbCmd {
    /// Validate a config file without touching the kernel: print a summary
    /// and exit 0, or the invalid fields and exit 1.
    CheckConfig {
        /// The TOML config file (docs/CONFIG.md).
        file: PathBuf,
    },
    /// Run the balancer daemon: attach to the configured interfaces and
    /// follow the scoreboard until SIGINT/SIGTERM.
    Run {
        /// The TOML config file (docs/CONFIG.md).
        #[arg(long)]
        config: PathBuf,
        /// Attach even to an interface that carries the default route.
        #[arg(long)]
        force: bool,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // `lb run` logs at its config's level; RUST_LOG, when set, wins.
    let lb_config = match &cli.cmd {
        Cmd::Lb(LbCmd::Run { config, .. }) => Some(load_or_exit(config)),
        _ => None,
    };
    let level = lb_config.as_ref().map_or("info", |c| c.log_level.as_str());
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match (cli.cmd, lb_config) {
        (Cmd::Keys(a), _) => headroom_control::run_keys(a).await,
        (Cmd::Shim(a), _) => headroom_control::run_shim(*a).await,
        (Cmd::LoadReceiver(a), _) => headroom_control::run_load_receiver(a).await,
        (Cmd::Lb(LbCmd::CheckConfig { file }), _) => check_config(&file),
        (Cmd::Lb(LbCmd::Run { force, .. }), Some(config)) => lb_run(config, force).await,
        (Cmd::Lb(LbCmd::Run { config, .. }), None) => {
            unreachable!("{} was loaded above", config.display())
        }
    }
}

/// Loads a config, or prints why it is invalid and exits 1.
fn load_or_exit(file: &std::path::Path) -> headroom::config::Config {
    match headroom::config::Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            // A user's mistake, not a program error: no anyhow backtrace.
            eprintln!("invalid config {}: {e}", file.display());
            std::process::exit(1);
        }
    }
}

/// `headroom lb run --config FILE [--force]`.
async fn lb_run(config: headroom::config::Config, force: bool) -> Result<()> {
    if let Err(e) = headroom::daemon::run(config, headroom::daemon::RunOptions { force }).await {
        // Operational errors (refused interface, missing object, no
        // permission): the message chain, no backtrace.
        eprintln!("headroom lb run: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// `headroom lb check-config FILE`: parse and validate only; no BPF, no Redis.
fn check_config(file: &std::path::Path) -> Result<()> {
    print!("{}", load_or_exit(file).summary());
    Ok(())
}
