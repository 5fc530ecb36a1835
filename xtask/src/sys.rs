//! Facts about the machine and the checkout.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True on Debian and derivatives (where `apt-get` and `dpkg` apply).
pub fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
}

/// True when CI says so (`CI=true`).
pub fn is_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true")
}

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("xtask manifest dir {} has no parent", manifest.display()))
}

/// `$CARGO_HOME`, or `~/.cargo`.
pub fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// `$CARGO_HOME/bin`, where rustup and `cargo install` put binaries; it is
/// not always on `PATH` (e.g. a fresh CI shell).
pub fn cargo_bin() -> Option<PathBuf> {
    cargo_home().map(|h| h.join("bin"))
}

/// `PATH` with `$CARGO_HOME/bin` in front, so tools installed by
/// `cargo install` (bpf-linker) are found by the processes we start.
pub fn path_with_cargo_bin() -> Result<std::ffi::OsString> {
    let mut dirs: Vec<PathBuf> = cargo_bin().into_iter().collect();
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(dirs).context("PATH contains a directory with ':' in its name")
}

/// The cargo that runs xtask (the stable toolchain), for building and
/// running the workspace.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    if let Ok(root) = workspace_root() {
        cmd.current_dir(root);
    }
    cmd
}
