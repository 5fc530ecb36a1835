//! Test harness of Headroom's integration tests and demo: network
//! namespaces, veth pairs, child processes that die with the test, and a
//! throwaway redis-server.
//!
//! Convention: a test that needs root is named `root_*` and starts with
//! `if !require_root("root_name") { return; }`. `cargo xtask test` skips
//! those when not root (and fails in CI when not root).
pub mod bench_e2e;
pub mod bins;
pub mod bpffs;
pub mod cmd;
pub mod fixture_env;
pub mod mountns;
pub mod netns;
pub mod packets;
pub mod process;
pub mod redis;
pub mod scale_env;
pub mod topology;

use std::net::{Ipv4Addr, TcpListener};

use anyhow::{Context, Result};

pub use bpffs::PrivateBpffs;
pub use cmd::run_cmd;
pub use netns::{veth_pair, EnteredNetns, Netns};
pub use process::ChildGuard;
pub use redis::RedisServer;

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Gate of a root-only test: true if root. Otherwise prints
/// `skipping NAME: needs root` and returns false, except in CI (`CI=true`),
/// where a skipped root test would hide a failure: there it panics.
pub fn require_root(test_name: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("root-only test {test_name} must run in CI, and CI is not root");
    }
    eprintln!("skipping {test_name}: needs root");
    false
}

/// Pins the calling thread to one CPU. BPF_PROG_TEST_RUN runs on the
/// caller's CPU, so tests and benchmarks that read per-CPU state (the
/// next-hop cache, per-CPU counters) must not migrate between runs.
pub fn pin_thread_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity(0 = this thread) only read and write that set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning this thread to CPU {cpu}"));
        }
    }
    Ok(())
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> Result<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu)
        .map_err(|_| anyhow::anyhow!("sched_getcpu: {}", std::io::Error::last_os_error()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked
/// it). Another process may take it before the caller binds it; callers
/// that start servers retry.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding 127.0.0.1:0 for a free port")?;
    Ok(listener.local_addr().context("local_addr")?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().expect("free port");
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port is free");
    }

    #[test]
    fn gate_agrees_with_euid() {
        // Outside CI it returns instead of panicking; in CI it passes only as root.
        assert_eq!(require_root("gate_agrees_with_euid"), is_root());
    }
}
