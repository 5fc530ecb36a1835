//! Headroom userspace: loads the XDP program, fills its maps, builds tables.

pub mod loader;
pub mod maglev;
pub mod tables;

pub use loader::{Balancer, BalancerError, LoadOptions, RunResult};
