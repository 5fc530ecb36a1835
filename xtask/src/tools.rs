//! Programs the tests, the demo and the benchmarks start at run time.
use anyhow::Result;

use crate::{apt::Apt, sh, sys};

/// Debian package and the command it provides.
const TOOLS: [(&str, &str); 9] = [
    ("redis-server", "redis-server"),
    ("iproute2", "ip"),
    ("curl", "curl"),
    ("wrk", "wrk"),
    ("ethtool", "ethtool"),
    ("iperf3", "iperf3"),
    ("iputils-ping", "ping"),
    // The e2e benchmark's baselines: nftables DNAT and HAProxy in TCP mode.
    ("nftables", "nft"),
    ("haproxy", "haproxy"),
];

/// Installs the missing tools when root on Debian. Otherwise only warns:
/// the tests that need a missing tool fail with their own message, and the
/// rest can still run.
pub fn ensure(apt: &mut Apt) -> Result<()> {
    sh::step(
        "checking runtime tools \
         (redis-server, iproute2, curl, wrk, ethtool, iperf3, ping, nft, haproxy)",
    );
    if sys::is_debian() {
        let pkgs: Vec<&str> = TOOLS.iter().map(|(pkg, _)| *pkg).collect();
        let missing = apt.missing(&pkgs);
        if missing.is_empty() {
            return Ok(());
        }
        if apt.can_install() {
            return apt.install(&missing);
        }
        eprintln!(
            "warning: missing {}; tests that need them will fail. Install with:\n  {}",
            missing.join(" "),
            Apt::install_hint(&missing)
        );
    } else {
        let missing: Vec<&str> = TOOLS
            .iter()
            .map(|(_, cmd)| *cmd)
            .filter(|cmd| sh::which(cmd, &[]).is_none())
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "warning: not found on PATH: {} (not Debian: install them yourself); \
                 tests that need them will fail",
                missing.join(" ")
            );
        }
    }
    Ok(())
}
