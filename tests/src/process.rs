//! Child processes that cannot outlive the test that started them.
use std::{
    io::Read,
    ops::{Deref, DerefMut},
    process::{Child, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// Owns a child process and kills it (SIGKILL) and reaps it on drop, also
/// when the test panics. Derefs to the [`Child`].
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Takes ownership of `child`.
    pub fn new(child: Child) -> Self {
        ChildGuard { child }
    }

    /// Kills the process now (if still running) and returns how it ended.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let pid = self.child.id();
        if let Some(status) = self.child.try_wait().context("try_wait")? {
            return Ok(status);
        }
        self.child
            .kill()
            .with_context(|| format!("killing process {pid}"))?;
        self.child
            .wait()
            .with_context(|| format!("reaping process {pid}"))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it did not.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().context("try_wait")? {
                return Ok(Some(s));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The piped stderr of a process that has exited (empty while it runs:
    /// reading would block). Daemons under test log a few lines, which the
    /// pipe holds.
    pub fn exited_stderr(&mut self) -> String {
        let mut s = String::new();
        if self.child.try_wait().ok().flatten().is_some() {
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut s);
            }
        }
        s
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        ChildGuard::new(child)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("ChildGuard: {e:#}");
        }
    }
}
