//! A private bpf filesystem for one test: pins made there never appear in
//! the host's `/sys/fs/bpf`, and everything pinned is removed with it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::run_cmd;

/// A bpffs mounted on a fresh temporary directory. On drop, every balancer
/// pinned in it is detached (links, then maps), then it is unmounted and
/// the directory removed — also when the test failed.
pub struct PrivateBpffs {
    root: PathBuf,
}

impl PrivateBpffs {
    /// Mounts a bpffs on a new directory under the temp dir (`tag` makes the
    /// name readable; the pid and a counter make it unique).
    pub fn mount(tag: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "hr-bpffs-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let guard = Self { root };
        run_cmd(&["mount", "-t", "bpf", "bpf", &guard.root.to_string_lossy()])
            .context("mounting a private bpffs")?;
        Ok(guard)
    }

    /// The mount point (use it as the daemon's pin root).
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        // The root's own files (the kernel's `maps.debug`, `progs.debug`)
        // go with the unmount; every balancer lives in a directory.
        for dir in subdirs(&self.root) {
            clean(&dir);
        }
        let _ = run_cmd(&["umount", "-l", &self.root.to_string_lossy()]);
        let _ = std::fs::remove_dir(&self.root);
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Detaches every balancer pinned in or below `dir` (depth first; links,
/// then maps: see [`headroom::loader::detach`]) and removes the directories.
fn clean(dir: &Path) {
    for sub in subdirs(dir) {
        clean(&sub);
    }
    let has_files = std::fs::read_dir(dir).is_ok_and(|mut e| e.next().is_some());
    if has_files {
        // `detach` removes `dir` too.
        if let Err(err) = headroom::loader::detach(dir) {
            eprintln!("detaching {}: {err}", dir.display());
        }
    } else {
        let _ = std::fs::remove_dir(dir);
    }
}
