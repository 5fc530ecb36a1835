//! Debian packages: check with `dpkg -s`, install with `apt-get`.
use std::process::Command;

use anyhow::{ensure, Result};

use crate::{sh, sys};

/// apt state of one xtask invocation.
pub struct Apt {
    /// `apt-get update` already ran in this invocation.
    updated: bool,
}

impl Apt {
    /// Fresh state: nothing updated yet.
    pub fn new() -> Self {
        Apt { updated: false }
    }

    /// True if this process may install packages: root on Debian.
    pub fn can_install(&self) -> bool {
        sys::is_root() && sys::is_debian()
    }

    /// The packages of `pkgs` that dpkg does not list as installed.
    pub fn missing<'a>(&self, pkgs: &[&'a str]) -> Vec<&'a str> {
        pkgs.iter().copied().filter(|p| !installed(p)).collect()
    }

    /// The command a user would run to install `pkgs`.
    pub fn install_hint(pkgs: &[&str]) -> String {
        format!(
            "sudo apt-get update && sudo apt-get install -y {}",
            pkgs.join(" ")
        )
    }

    /// Installs `pkgs`, running `apt-get update` first if it has not run yet
    /// in this invocation (the package lists of a fresh machine are empty or
    /// stale).
    pub fn install(&mut self, pkgs: &[&str]) -> Result<()> {
        if pkgs.is_empty() {
            return Ok(());
        }
        ensure!(
            self.can_install(),
            "cannot install {} (needs root on Debian); run: {}",
            pkgs.join(" "),
            Self::install_hint(pkgs)
        );
        if !self.updated {
            sh::step("apt-get update");
            sh::run(apt_get().arg("update"))?;
            self.updated = true;
        }
        sh::step(format!("installing Debian packages: {}", pkgs.join(" ")));
        sh::run(apt_get().args(["install", "-y"]).args(pkgs))
    }
}

/// True if dpkg lists `pkg` as installed.
pub fn installed(pkg: &str) -> bool {
    sh::probe(Command::new("dpkg").args(["-s", pkg]))
        .is_some_and(|out| out.lines().any(|l| l == "Status: install ok installed"))
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    // No debconf questions (iperf3 asks whether to start a daemon): no stdin in CI.
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}
