//! Headroom userspace: loads the XDP program, fills its maps, builds tables.

pub mod admin;
pub mod admin_client;
pub mod config;
pub mod daemon;
pub mod loader;
pub mod maglev;
pub mod metrics;
pub mod observe_cli;
pub mod scoreboard;
pub mod status_table;
pub mod tables;
pub mod trace;
pub mod weights;

pub use loader::{Balancer, BalancerError, LoadOptions, RunResult};
