//! A private mount namespace for daemons run as real processes: the bpffs
//! `headroom lb run` mounts on `/sys/fs/bpf` inside it never appears on the
//! host, and it outlives each daemon run (unlike `ip netns exec`, whose
//! mount namespace — and with it the bpffs, the pins and the XDP links —
//! ends with the process), so a restart finds the pins as on a real host.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use crate::ChildGuard;

/// A mount namespace kept alive by a sleeping holder process, killed on
/// drop: the namespace, its bpffs and every pin in it go with it.
pub struct MountNs {
    holder: ChildGuard,
}

impl MountNs {
    /// Starts the holder (`unshare --mount --propagation private sleep`) and
    /// waits until it has its own namespace.
    pub fn new() -> Result<Self> {
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .context("starting the mount namespace holder (unshare)")?;
        let ns = MountNs {
            holder: ChildGuard::new(child),
        };
        // The holder execs sleep only after unsharing.
        let mine = std::fs::read_link("/proc/self/ns/mnt")?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let comm =
                std::fs::read_to_string(format!("/proc/{}/comm", ns.pid())).unwrap_or_default();
            let theirs = std::fs::read_link(format!("/proc/{}/ns/mnt", ns.pid())).ok();
            if comm.trim() == "sleep" && theirs.is_some_and(|t| t != mine) {
                return Ok(ns);
            }
            ensure!(Instant::now() < deadline, "the holder did not unshare");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The holder's pid.
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// The holder's view of `/` (its mounts, e.g. the daemon's bpffs).
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid()))
    }

    /// `nsenter` into this mount namespace and the network namespace at
    /// `netns` (e.g. `Netns::path`); the command execs `argv`, so a spawned
    /// child's pid is that of `argv[0]`.
    pub fn command(&self, netns: &Path, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{}/ns/mnt", self.pid()))
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .args(argv);
        cmd
    }

    /// Starts a daemon inside (network namespace `netns`), `RUST_LOG=info`,
    /// stderr piped (see [`ChildGuard::exited_stderr`]), killed on drop.
    pub fn spawn_daemon(&self, netns: &Path, argv: &[&str]) -> Result<ChildGuard> {
        let child = self
            .command(netns, argv)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {argv:?}"))?;
        Ok(ChildGuard::new(child))
    }

    /// Runs `argv` inside; stdout, or an error with stderr.
    pub fn run(&self, netns: &Path, argv: &[&str]) -> Result<String> {
        crate::cmd::output(&mut self.command(netns, argv))
    }
}
