//! The `headroom` command: one binary for the balancer and the control modules.

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
    Shim(ShimArgs),
    /// Accept signed load reports and write them to the scoreboard.
    LoadReceiver(LoadReceiverArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Keys(a) => headroom_control::run_keys(a).await,
        Cmd::Shim(a) => headroom_control::run_shim(a).await,
        Cmd::LoadReceiver(a) => headroom_control::run_load_receiver(a).await,
    }
}
