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
    /// Run the node agent: command executor and load transmitter.
    Agent(Box<headroom_control::agent::AgentArgs>),
    /// Manage the service registry (register FILE | list | remove NAME).
    Services(headroom_control::registry::ServicesArgs),
    /// Run the machine-manager: node registry, placements, node start/stop.
    MachineManager(headroom_control::machine_manager::MachineManagerArgs),
    /// Run the container-manager: scale registered services on their load.
    ContainerManager(Box<headroom_control::container_manager::ContainerManagerArgs>),
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
    /// Detach the balancer of a config: remove its pinned XDP links (the
    /// interfaces stop balancing), its pinned maps and its pin directory.
    Detach {
        /// The TOML config file (docs/CONFIG.md); its `name` picks the pins.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a running daemon's backends: load, weight, share, flows, pkts/s.
    Status(headroom::observe_cli::StatusArgs),
    /// Which backend a flow SRC:PORT → VIP:PORT gets now, asked of the live
    /// program.
    Trace(headroom::observe_cli::TraceArgs),
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
        (Cmd::Agent(a), _) => headroom_control::agent::run_agent(*a).await,
        (Cmd::Services(a), _) => headroom_control::registry::run_services(a).await,
        (Cmd::MachineManager(a), _) => {
            headroom_control::machine_manager::run_machine_manager(a).await
        }
        (Cmd::ContainerManager(a), _) => {
            headroom_control::container_manager::run_container_manager(*a).await
        }
        (Cmd::Lb(LbCmd::CheckConfig { file }), _) => check_config(&file),
        (Cmd::Lb(LbCmd::Detach { config }), _) => lb_detach(&config),
        (Cmd::Lb(LbCmd::Status(a)), _) => lb_status(&a).await,
        (Cmd::Lb(LbCmd::Trace(a)), _) => lb_trace(&a).await,
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
    let opts = headroom::daemon::RunOptions {
        force,
        ..Default::default()
    };
    if let Err(e) = headroom::daemon::run(config, opts).await {
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

/// `headroom lb detach --config FILE`: removes what `lb run` pinned.
fn lb_detach(file: &std::path::Path) -> Result<()> {
    let config = load_or_exit(file);
    let dir = config.pin_dir();
    match headroom::daemon::attach::detach_pinned(&dir) {
        Ok(None) => println!(
            "nothing to detach: {} does not exist (balancer {:?} is not pinned on this host)",
            dir.display(),
            config.name
        ),
        Ok(Some(d)) => println!(
            "detached balancer {:?}: removed from [{}], {} pinned maps and {} removed",
            config.name,
            d.links.join(", "),
            d.maps.len(),
            dir.display()
        ),
        Err(e) => {
            eprintln!("headroom lb detach: {e:#}");
            std::process::exit(1);
        }
    }
    Ok(())
}

/// `headroom lb status`: prints the table, or why the daemon could not be
/// asked and exits 1.
async fn lb_status(args: &headroom::observe_cli::StatusArgs) -> Result<()> {
    match headroom::observe_cli::status(args).await {
        Ok(table) => {
            print!("{table}");
            Ok(())
        }
        Err(e) => {
            eprintln!("headroom lb status: {e}");
            std::process::exit(1);
        }
    }
}

/// `headroom lb trace`: prints the answer; exits 1 if the daemon could not
/// answer, the input is bad, or the destination is not a service.
async fn lb_trace(args: &headroom::observe_cli::TraceArgs) -> Result<()> {
    match headroom::observe_cli::trace(args).await {
        Ok((answer, text)) => {
            print!("{text}");
            if answer.outcome == headroom::trace::Outcome::NotAService {
                std::process::exit(1);
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("headroom lb trace: {e}");
            std::process::exit(1);
        }
    }
}
