//! Headroom userspace: loads the XDP program, fills its maps, builds tables.

pub mod config;
pub mod daemon;
pub mod loader;
pub mod maglev;
pub mod scoreboard;
pub mod tables;
pub mod weights;

pub use loader::{Balancer, BalancerError, LoadOptions, RunResult};
