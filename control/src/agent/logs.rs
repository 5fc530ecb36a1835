//! Bounds the instances' logs (`STATE_DIR/logs/ID.log`): an instance that
//! logs forever must not fill the node's disk, which is also the disk the
//! load transmitter reports.
//!
//! Every [`CHECK_EVERY`] each `*.log` over the size limit is copied to
//! `ID.log.1` (replacing the previous one) and truncated in place
//! ("copytruncate"): the instance keeps writing to the same open file with
//! `O_APPEND`, so renaming it would not help. Lines written between the copy
//! and the truncation are lost; that is the price of not restarting the
//! instance. The logs of an instance the agent no longer lists are deleted
//! once untouched for [`FORGOTTEN_AFTER`] (a log is created just before its
//! instance is listed).

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

/// How often the sizes are checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// A log of an unlisted instance is deleted only when older than this.
pub const FORGOTTEN_AFTER: Duration = Duration::from_secs(120);

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Logs copied to `.1` and truncated.
    pub rotated: Vec<PathBuf>,
    /// Logs (and their `.1`) of instances no longer listed, deleted.
    pub removed: Vec<PathBuf>,
}

/// What a pass could not do, per file (the other files were still done).
pub type Failures = Vec<(PathBuf, io::Error)>;

/// One pass over `dir`: rotates every `ID.log` larger than `max_bytes` and,
/// when `known` is given, deletes the logs of ids not in it that were
/// untouched for [`FORGOTTEN_AFTER`]. A file that fails is reported and
/// skipped, never the whole pass.
pub fn pass(
    dir: &Path,
    max_bytes: u64,
    known: Option<&BTreeSet<String>>,
) -> io::Result<(Pass, Failures)> {
    let mut out = Pass::default();
    let mut failed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if let Err(e) = one(&entry, max_bytes, known, &mut out) {
            failed.push((path, e));
        }
    }
    Ok((out, failed))
}

/// Rotates or deletes one file of the log directory, if it is due.
fn one(
    entry: &std::fs::DirEntry,
    max_bytes: u64,
    known: Option<&BTreeSet<String>>,
    out: &mut Pass,
) -> io::Result<()> {
    let path = entry.path();
    let name = entry.file_name().to_string_lossy().into_owned();
    let (id, rotated_copy) = match name.strip_suffix(".log.1") {
        Some(id) => (id, true),
        None => match name.strip_suffix(".log") {
            Some(id) => (id, false),
            None => return Ok(()),
        },
    };
    let meta = entry.metadata()?;
    if known.is_some_and(|k| !k.contains(id)) {
        if meta.modified()?.elapsed().unwrap_or_default() >= FORGOTTEN_AFTER {
            std::fs::remove_file(&path)?;
            out.removed.push(path);
        }
        return Ok(());
    }
    if rotated_copy || meta.len() <= max_bytes {
        return Ok(());
    }
    let mut copy = path.clone().into_os_string();
    copy.push(".1");
    // The old copy goes first, and a failed copy (a full disk) still
    // truncates: the point is to free the disk, not to keep the copy.
    let _ = std::fs::remove_file(&copy);
    let copied = std::fs::copy(&path, &copy);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(0)?;
    out.rotated.push(path);
    copied.map(|_| ())
}

/// Runs [`pass`] every [`CHECK_EVERY`] until `stop`; `known` lists the
/// instance ids the agent has records of.
pub async fn run(
    dir: PathBuf,
    max_bytes: u64,
    known: impl Fn() -> Option<BTreeSet<String>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        if *stop.borrow() {
            return;
        }
        match pass(&dir, max_bytes, known().as_ref()) {
            Ok((p, failed)) => {
                for (f, e) in &failed {
                    warn!(log = %f.display(), error = %e, "instance log check failed");
                }
                for f in &p.rotated {
                    info!(log = %f.display(), max_bytes, "instance log over its limit: rotated");
                }
                for f in &p.removed {
                    info!(log = %f.display(), "log of a forgotten instance deleted");
                }
            }
            Err(e) => warn!(dir = %dir.display(), error = %e, "checking instance logs failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn rotates_big_logs_keeps_small_ones_and_drops_forgotten_ones() {
        let dir = std::env::temp_dir().join(format!("hr-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A writer with O_APPEND, as the instances have.
        let mut big = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("a.log"))
            .unwrap();
        big.write_all(&[b'x'; 2000]).unwrap();
        std::fs::write(dir.join("b.log"), b"small").unwrap();
        let old = std::time::SystemTime::now() - FORGOTTEN_AFTER - Duration::from_secs(1);
        for (name, text) in [("gone.log", "old"), ("gone.log.1", "older")] {
            std::fs::write(dir.join(name), text).unwrap();
            let f = std::fs::File::options()
                .write(true)
                .open(dir.join(name))
                .unwrap();
            f.set_modified(old).unwrap();
        }
        // Unlisted but fresh: an instance being started right now.
        std::fs::write(dir.join("starting.log"), b"hello").unwrap();
        std::fs::write(dir.join("instances.json"), b"{}").unwrap();
        let known: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();

        let (p, failed) = pass(&dir, 1000, Some(&known)).unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(p.rotated, vec![dir.join("a.log")]);
        let mut removed = p.removed.clone();
        removed.sort();
        assert_eq!(removed, vec![dir.join("gone.log"), dir.join("gone.log.1")]);
        assert_eq!(std::fs::read(dir.join("a.log.1")).unwrap().len(), 2000);
        assert_eq!(std::fs::metadata(dir.join("a.log")).unwrap().len(), 0);
        assert_eq!(std::fs::read(dir.join("b.log")).unwrap(), b"small");
        assert!(dir.join("instances.json").exists(), "other files untouched");
        assert!(dir.join("starting.log").exists(), "a fresh log is kept");

        // The writer goes on at the start of the truncated file, not at its
        // old offset (no hole of 2000 zero bytes).
        big.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(dir.join("a.log")).unwrap(), b"after");
        // Under the limit now: nothing to do.
        assert_eq!(pass(&dir, 1000, Some(&known)).unwrap().0, Pass::default());
        // Without the instance table nothing counts as forgotten.
        let old_log = dir.join("old.log");
        std::fs::write(&old_log, b"x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&old_log)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(pass(&dir, 1000, None).unwrap().0, Pass::default());
        assert!(old_log.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
