//! Headroom control modules (paper §3.2, §3.3, §4): the SigV4 shim that
//! authorises every request locally, the permission DB in Redis with its
//! change stream, key sync into each shim, and the load-receiver that writes
//! the scoreboard the balancer reads.
//!
//! Entry points for the `headroom` binary: [`cli::run_keys`],
//! [`shim::run_shim`], [`load_receiver::run_load_receiver`], with the clap
//! types [`cli::KeysArgs`], [`cli::ShimArgs`], [`cli::LoadReceiverArgs`].

pub mod agent;
pub mod authz;
pub mod bench;
pub mod cli;
pub mod container_manager;
pub mod gate;
pub mod keystore;
pub mod keysync;
pub mod lease;
pub mod load_receiver;
pub mod load_report;
pub mod machine_manager;
pub mod node_report;
pub mod per_thread;
pub mod registry;
pub mod scaling;
pub mod scoreboard;
pub mod shim;
pub mod sigv4;

pub use cli::run_keys;
pub use load_receiver::run_load_receiver;
pub use shim::run_shim;

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
