//! The binaries tests run as processes, found in the target directory and
//! checked to be newer than their sources (a stale one would test old code).

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{bail, Context, Result};

/// The `headroom` binary: `HEADROOM_BIN`, else `headroom` next to the
/// running executable or one directory up (`target/<profile>/deps/…`),
/// which must be newer than the sources it is built from: a missing or
/// stale one is an error naming the command that builds it.
pub fn headroom_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HEADROOM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let build = "cargo build --release -p lb-userspace --bin headroom (or set HEADROOM_BIN)";
    let bin = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("headroom"))
        .find(|p| p.is_file())
        .with_context(|| format!("no headroom binary near {}: {build}", exe.display()))?;
    let built = std::fs::metadata(&bin)?.modified()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["lb-userspace/src", "control/src", "lb-common/src"] {
        if let Some((_, newer)) = newest(&root.join(dir))?.filter(|(t, _)| *t > built) {
            bail!(
                "{} is older than {}: {build}",
                bin.display(),
                newer.display()
            );
        }
    }
    Ok(bin)
}

/// The most recently modified file below `dir`.
fn newest(dir: &Path) -> Result<Option<(SystemTime, PathBuf)>> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let cand = if p.is_dir() {
            newest(&p)?
        } else {
            Some((std::fs::metadata(&p)?.modified()?, p))
        };
        if let Some(c) = cand {
            if best.as_ref().is_none_or(|b| c.0 > b.0) {
                best = Some(c);
            }
        }
    }
    Ok(best)
}
