//! `cargo xtask build-ebpf`: install what building the XDP program needs,
//! then build it.
//!
//! The checks are cheap (a few `rustup`/`dpkg` queries), so running this
//! before every test or demo costs about a second when all is in place.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{apt::Apt, sh, sys};

/// The nightly the XDP program is built with. Pinned: bpf-linker reads the
/// bitcode rustc emits with its own LLVM (22), and later nightlies are on
/// LLVM 23, whose bitcode it rejects ("Invalid record").
const NIGHTLY: &str = "nightly-2026-05-20";
/// rustc commit of [`NIGHTLY`]. A toolchain installed under another name
/// (plain `nightly`, installed that day) with this commit is the same
/// compiler, and is used rather than downloading it again.
const NIGHTLY_COMMIT: &str = "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a";
/// Debian packages bpf-linker is built against.
const LLVM_PACKAGES: [&str; 4] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Where Debian puts LLVM 22; bpf-linker's build finds `llvm-config` there.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// LLVM major version bpf-linker is built for (the one of [`NIGHTLY`]).
const LLVM_MAJOR: u32 = 22;
/// The bpf-linker release known to build with `--features llvm-22`.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Target triple of the XDP program.
const TARGET: &str = "bpfel-unknown-none";

/// Path of the built XDP object, where `lb-userspace/build.rs` looks for it.
pub fn object_path(root: &Path) -> PathBuf {
    root.join("target").join(TARGET).join("release/lb-ebpf")
}

/// Installs what is missing, then builds lb-ebpf.
pub fn build(apt: &mut Apt) -> Result<()> {
    let (rustup, toolchain) = ensure_prerequisites(apt)?;
    let root = sys::workspace_root()?;
    sh::step(format!("building lb-ebpf ({toolchain}, {TARGET})"));
    let mut cmd = Command::new(&rustup);
    cmd.args(["run", &toolchain, "cargo", "build", "--release"])
        .args(["-Z", "build-std=core", "--target", TARGET])
        .args(["--manifest-path", "lb-ebpf/Cargo.toml", "--target-dir"])
        .arg(root.join("target"))
        .current_dir(&root)
        // bpf-linker lives in ~/.cargo/bin, which may not be on PATH.
        .env("PATH", sys::path_with_cargo_bin()?)
        // Set by the stable cargo/rustup that started xtask; they would
        // point the nightly build at the stable compiler.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN");
    sh::run(&mut cmd).context("building the XDP program lb-ebpf failed")?;
    let object = object_path(&root);
    if !object.is_file() {
        bail!(
            "lb-ebpf built but {} is missing (did the bin target get renamed?)",
            object.display()
        );
    }
    sh::step(format!("XDP object: {}", object.display()));
    Ok(())
}

/// A prerequisite that is missing, and how to get it.
struct Fix {
    what: String,
    how: How,
}

enum How {
    /// Debian packages (needs root).
    Apt(Vec<&'static str>),
    /// A command any user can run (rustup, cargo install write to $HOME).
    Run(Command),
    /// Something xtask cannot do on this system; the text says what to do.
    Manual(String),
}

impl Fix {
    fn hint(&self) -> String {
        match &self.how {
            How::Apt(pkgs) => Apt::install_hint(pkgs),
            How::Run(cmd) => sh::display(cmd),
            How::Manual(text) => text.clone(),
        }
    }
}

/// Checks the toolchain, rust-src and bpf-linker; installs what is missing.
/// Returns the rustup binary and the toolchain to build with.
fn ensure_prerequisites(apt: &mut Apt) -> Result<(PathBuf, String)> {
    let cargo_bin = sys::cargo_bin();
    let extra: Vec<&Path> = cargo_bin.iter().map(PathBuf::as_path).collect();
    let Some(rustup) = sh::which("rustup", &extra) else {
        bail!(
            "rustup not found on PATH or in ~/.cargo/bin: the XDP program needs a nightly \
             toolchain, which only rustup provides; install rustup, then run this again"
        );
    };
    let mut fixes = Vec::new();

    sh::step(format!(
        "checking the nightly toolchain ({NIGHTLY}) and rust-src"
    ));
    let toolchain = match pinned_nightly(&rustup) {
        None => {
            fixes.push(Fix {
                what: format!("installing {NIGHTLY} with rust-src"),
                how: How::Run(rustup_cmd(
                    &rustup,
                    &["toolchain", "install", NIGHTLY, "--profile", "minimal"],
                    &["--component", "rust-src", "--no-self-update"],
                )),
            });
            NIGHTLY.to_string()
        }
        Some(toolchain) => {
            let components = sh::output(
                Command::new(&rustup)
                    .args(["component", "list", "--installed", "--toolchain"])
                    .arg(&toolchain),
            )
            .with_context(|| format!("listing the components of {toolchain}"))?;
            if !components.lines().any(|l| l.trim() == "rust-src") {
                fixes.push(Fix {
                    what: "adding rust-src (build-std needs core's source)".into(),
                    how: How::Run(rustup_cmd(
                        &rustup,
                        &["component", "add", "rust-src", "--toolchain"],
                        &[&toolchain],
                    )),
                });
            }
            toolchain
        }
    };

    sh::step("checking bpf-linker");
    if !bpf_linker_works(&extra) {
        // LLVM's development files are needed only to build bpf-linker.
        if sys::is_debian() {
            let missing = apt.missing(&LLVM_PACKAGES);
            if !missing.is_empty() {
                fixes.push(Fix {
                    what: format!("installing LLVM {LLVM_MAJOR} for bpf-linker"),
                    how: How::Apt(missing),
                });
            }
        } else if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
            fixes.push(Fix {
                what: format!("LLVM {LLVM_MAJOR} development files"),
                how: How::Manual(format!(
                    "install LLVM {LLVM_MAJOR} with its development files and Polly so that \
                     {LLVM_PREFIX}/bin/llvm-config exists (not Debian: xtask cannot do this)"
                )),
            });
        }
        fixes.push(Fix {
            what: format!("installing bpf-linker (LLVM {LLVM_MAJOR})"),
            how: How::Run(bpf_linker_install()?),
        });
    }

    apply(apt, fixes)?;
    if !bpf_linker_works(&extra) {
        bail!(
            "bpf-linker is still not runnable after installing it (`bpf-linker --version` failed)"
        );
    }
    Ok((rustup, toolchain))
}

/// Runs the fixes in order, or, if some need root (or a human), prints them
/// all and fails without changing anything.
fn apply(apt: &mut Apt, fixes: Vec<Fix>) -> Result<()> {
    let blocked = fixes.iter().any(|f| match f.how {
        How::Apt(_) => !apt.can_install(),
        How::Manual(_) => true,
        How::Run(_) => false,
    });
    if blocked {
        eprintln!("missing prerequisites; run these commands, then try again:");
        for fix in &fixes {
            eprintln!("  # {}\n  {}", fix.what, fix.hint());
        }
        bail!("prerequisites for building the XDP program are missing (see above)");
    }
    for fix in fixes {
        match fix.how {
            How::Apt(pkgs) => apt.install(&pkgs)?,
            How::Run(mut cmd) => {
                sh::step(format!("{}: {}", fix.what, sh::display(&cmd)));
                sh::run(&mut cmd).with_context(|| format!("{} failed", fix.what))?;
            }
            How::Manual(text) => bail!("{}: {text}", fix.what),
        }
    }
    Ok(())
}

fn rustup_cmd(rustup: &Path, args: &[&str], more: &[&str]) -> Command {
    let mut cmd = Command::new(rustup);
    cmd.args(args).args(more);
    cmd
}

/// The installed toolchain that is [`NIGHTLY`]: by name, or plain `nightly`
/// if it is the same rustc commit. `rustup run` never installs a toolchain
/// by itself, so this is a pure check.
fn pinned_nightly(rustup: &Path) -> Option<String> {
    [NIGHTLY, "nightly"].into_iter().find_map(|name| {
        let vv = sh::probe(Command::new(rustup).args(["run", name, "rustc", "-vV"]))?;
        let commit = vv.lines().find_map(|l| l.strip_prefix("commit-hash: "))?;
        (commit.trim() == NIGHTLY_COMMIT).then(|| name.to_string())
    })
}

/// `cargo install bpf-linker` against Debian's LLVM 22. Without LLVM_PREFIX
/// its build script cannot find libLLVM to link.
fn bpf_linker_install() -> Result<Command> {
    let path = std::env::join_paths(
        std::iter::once(PathBuf::from(LLVM_PREFIX).join("bin"))
            .chain(std::env::split_paths(&sys::path_with_cargo_bin()?)),
    )
    .context("building PATH for the bpf-linker install")?;
    let mut cmd = sys::cargo();
    cmd.env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", path)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{LLVM_MAJOR}"))
        // Reached only when the installed one does not run: replace it.
        .arg("--force");
    Ok(cmd)
}

fn bpf_linker_works(extra: &[&Path]) -> bool {
    sh::which("bpf-linker", extra)
        .is_some_and(|p| sh::probe(Command::new(p).arg("--version")).is_some())
}
