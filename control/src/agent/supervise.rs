//! Supervision of what the agent started: each instance runs in its own
//! process group; exits are reaped and recorded; stop runs the stop
//! template, then SIGTERM, then SIGKILL. The state file in the state dir
//! lets a restarted agent re-adopt live processes (or mark them lost).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::executor::Launch;

/// Most records kept; ended ones are evicted first.
const MAX_RECORDS: usize = 4096;

/// Fixed PATH for started commands: the request never chooses the program.
const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Lifecycle of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Process alive.
    Running,
    /// A stop is in progress.
    Stopping,
    /// Ended by itself.
    Exited,
    /// Ended after a stop request.
    Stopped,
    /// Recorded as running by an earlier agent but no longer there.
    Lost,
}

impl State {
    /// Whether the process may still be alive.
    pub fn is_live(self) -> bool {
        matches!(self, State::Running | State::Stopping)
    }
}

/// One instance as reported by `GET /v1/instances` and stored in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The idempotency key.
    pub instance_id: String,
    /// Registered service.
    pub service: String,
    /// Start template used.
    pub template: String,
    /// Checked parameter values.
    pub params: BTreeMap<String, String>,
    /// argv that was started.
    pub argv: Vec<String>,
    /// Process id (also the process group id).
    pub pid: u32,
    /// Kernel start time of `pid` (clock ticks), to recognise it after a restart.
    pub proc_start: Option<u64>,
    /// Current state.
    pub state: State,
    /// Exit code, when it ended normally and we reaped it.
    pub exit_code: Option<i32>,
    /// Terminating signal, when it was killed.
    pub signal: Option<i32>,
    /// Start time, ms since the epoch.
    pub started_ms: i64,
    /// End time, ms since the epoch.
    pub ended_ms: Option<i64>,
    /// Rendered stop template, if the service has one.
    pub stop_argv: Option<Vec<String>>,
    /// Grace before SIGTERM/SIGKILL escalation, seconds.
    pub stop_grace_secs: u64,
    /// Whether this agent process adopted it from the state file.
    #[serde(default)]
    pub adopted: bool,
}

/// A start that was refused by the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The id is in use with different service/template/params.
    #[error("instance id {0:?} is in use with different parameters")]
    Conflict(String),
    /// Too many records.
    #[error("too many instances on this agent")]
    Full,
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// argv\[0\].
        program: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// What a start asks for.
pub struct NewInstance {
    /// Id.
    pub instance_id: String,
    /// Service.
    pub service: String,
    /// Template name.
    pub template: String,
    /// Checked values.
    pub params: BTreeMap<String, String>,
    /// The start command.
    pub launch: Launch,
    /// The stop command, if any.
    pub stop: Option<Launch>,
    /// Escalation grace, seconds.
    pub stop_grace_secs: u64,
}

/// Shared table of instances plus its persistence.
pub struct Supervisor {
    records: Mutex<HashMap<String, InstanceRecord>>,
    state_file: PathBuf,
    log_dir: PathBuf,
    /// Signalled on every change (publisher and waiters listen).
    pub changed: Arc<Notify>,
    closed: AtomicBool,
}

fn now_ms() -> i64 {
    crate::sigv4::unix_now_ms()
}

/// Field 22 of /proc/PID/stat: start time in clock ticks after boot.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces: parse after the last ')'.
    let after = &s[s.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn signal_group(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: killpg has no memory effects; pid is the group we created.
        unsafe {
            libc::killpg(pid as libc::pid_t, sig);
        }
    }
}

impl Supervisor {
    /// Open (or create) the state dir and re-adopt what the state file lists.
    pub fn open(state_dir: &Path) -> std::io::Result<Arc<Supervisor>> {
        let log_dir = state_dir.join("logs");
        std::fs::create_dir_all(&log_dir)?;
        let state_file = state_dir.join("instances.json");
        let mut records: HashMap<String, InstanceRecord> = match std::fs::read(&state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(error = %e, file = %state_file.display(), "unreadable state file; starting empty");
                HashMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e),
        };
        let mut adopted = Vec::new();
        for r in records.values_mut() {
            if !r.state.is_live() {
                continue;
            }
            let alive = r.proc_start.is_some() && proc_start_time(r.pid) == r.proc_start;
            if alive {
                r.adopted = true;
                adopted.push(r.instance_id.clone());
                info!(instance = %r.instance_id, pid = r.pid, "re-adopted running instance");
            } else {
                r.state = State::Lost;
                r.ended_ms = Some(now_ms());
                warn!(instance = %r.instance_id, pid = r.pid, "instance lost while the agent was down");
            }
        }
        let sup = Arc::new(Supervisor {
            records: Mutex::new(records),
            state_file,
            log_dir,
            changed: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
        });
        sup.persist();
        for id in adopted {
            tokio::spawn(watch_adopted(sup.clone(), id));
        }
        Ok(sup)
    }

    /// Stop recording changes (the agent is shutting down; instances keep
    /// running for the next agent to adopt).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Copy of all records, sorted by id.
    pub fn list(&self) -> Vec<InstanceRecord> {
        let mut v: Vec<InstanceRecord> = self
            .records
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        v
    }

    /// The ids of all records; `None` if the table cannot be read (then
    /// nothing may be treated as forgotten).
    pub fn ids(&self) -> Option<std::collections::BTreeSet<String>> {
        Some(self.records.lock().ok()?.keys().cloned().collect())
    }

    /// Copy of one record.
    pub fn get(&self, id: &str) -> Option<InstanceRecord> {
        self.records.lock().ok()?.get(id).cloned()
    }

    fn persist(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(g) = self.records.lock() else { return };
        let Ok(json) = serde_json::to_vec(&*g) else {
            return;
        };
        drop(g);
        let tmp = self.state_file.with_extension("json.tmp");
        let res =
            std::fs::write(&tmp, &json).and_then(|()| std::fs::rename(&tmp, &self.state_file));
        if let Err(e) = res {
            warn!(error = %e, file = %self.state_file.display(), "cannot write state file");
        }
        self.changed.notify_waiters();
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut InstanceRecord)) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut g) = self.records.lock() {
            if let Some(r) = g.get_mut(id) {
                f(r);
            }
        }
        self.persist();
    }

    /// Start an instance, or return the existing one with the same id and
    /// the same request (`Ok((false, rec))`); a new start gives `(true, rec)`.
    pub fn start(self: &Arc<Self>, n: NewInstance) -> Result<(bool, InstanceRecord), StartError> {
        let mut g = self.records.lock().map_err(|_| StartError::Full)?;
        if let Some(r) = g.get(&n.instance_id) {
            if r.service == n.service && r.template == n.template && r.params == n.params {
                return Ok((false, r.clone()));
            }
            return Err(StartError::Conflict(n.instance_id));
        }
        if g.len() >= MAX_RECORDS {
            let oldest = g
                .values()
                .filter(|r| !r.state.is_live())
                .min_by_key(|r| r.ended_ms)
                .map(|r| r.instance_id.clone());
            match oldest {
                Some(id) => {
                    g.remove(&id);
                }
                None => return Err(StartError::Full),
            }
        }
        let log = self.log_dir.join(format!("{}.log", n.instance_id));
        let (out, err) = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|f| Ok((f.try_clone()?, f)))
        {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(_) => (Stdio::null(), Stdio::null()),
        };
        let Some((program, args)) = n.launch.argv.split_first() else {
            return Err(StartError::Spawn {
                program: String::new(),
                source: std::io::Error::other("empty argv"),
            });
        };
        let program = program.clone();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(args)
            .env_clear()
            .env("PATH", SAFE_PATH)
            .env("HEADROOM_INSTANCE_ID", &n.instance_id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|source| StartError::Spawn { program, source })?;
        let pid = child.id().unwrap_or(0);
        let rec = InstanceRecord {
            instance_id: n.instance_id.clone(),
            service: n.service,
            template: n.template,
            params: n.params,
            argv: n.launch.argv,
            pid,
            proc_start: proc_start_time(pid),
            state: State::Running,
            exit_code: None,
            signal: None,
            started_ms: now_ms(),
            ended_ms: None,
            stop_argv: n.stop.map(|l| l.argv),
            stop_grace_secs: n.stop_grace_secs,
            adopted: false,
        };
        g.insert(n.instance_id.clone(), rec.clone());
        drop(g);
        info!(instance = %rec.instance_id, pid, argv = ?rec.argv, "started");
        self.persist();
        let sup = self.clone();
        let id = n.instance_id;
        tokio::spawn(async move {
            let status = child.wait().await;
            let (code, sig) = match &status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    (s.code(), s.signal())
                }
                Err(_) => (None, None),
            };
            info!(instance = %id, ?code, ?sig, "ended");
            sup.update(&id, |r| {
                r.state = if r.state == State::Stopping {
                    State::Stopped
                } else {
                    State::Exited
                };
                r.exit_code = code;
                r.signal = sig;
                r.ended_ms = Some(now_ms());
            });
        });
        Ok((true, rec))
    }

    /// Stop an instance: stop template, then SIGTERM, then SIGKILL, each
    /// after the grace. Returns the final record, or `None` if unknown.
    pub async fn stop(self: &Arc<Self>, id: &str) -> Option<InstanceRecord> {
        let (pid, stop_argv, grace) = {
            let mut g = self.records.lock().ok()?;
            let r = g.get_mut(id)?;
            if !r.state.is_live() {
                return Some(r.clone());
            }
            r.state = State::Stopping;
            (
                r.pid,
                r.stop_argv.clone(),
                Duration::from_secs(r.stop_grace_secs.max(1)),
            )
        };
        self.persist();
        if let Some(argv) = stop_argv {
            run_stop_command(id, &argv, grace).await;
            if self.wait_ended(id, grace).await {
                return self.get(id);
            }
        }
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            if self.get(id).is_some_and(|r| r.state.is_live()) {
                info!(instance = %id, pid, sig, "signalling process group");
                signal_group(pid, sig);
            }
            if self.wait_ended(id, grace).await {
                break;
            }
        }
        self.get(id)
    }

    async fn wait_ended(&self, id: &str, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if !self.get(id).is_some_and(|r| r.state.is_live()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Run the rendered stop template, bounded by `grace`.
async fn run_stop_command(id: &str, argv: &[String], grace: Duration) {
    let Some(program) = argv.first() else { return };
    let child = tokio::process::Command::new(program)
        .args(&argv[1..])
        .env_clear()
        .env("PATH", SAFE_PATH)
        .env("HEADROOM_INSTANCE_ID", id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    match child {
        Ok(mut c) => match tokio::time::timeout(grace, c.wait()).await {
            Ok(Ok(s)) => info!(instance = %id, status = %s, "stop template ran"),
            Ok(Err(e)) => warn!(instance = %id, error = %e, "stop template failed"),
            Err(_) => warn!(instance = %id, "stop template timed out"),
        },
        Err(e) => warn!(instance = %id, error = %e, "cannot run stop template"),
    }
}

/// An adopted process is not our child: poll until it is gone.
async fn watch_adopted(sup: Arc<Supervisor>, id: String) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if sup.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(r) = sup.get(&id) else { return };
        if !r.state.is_live() {
            return;
        }
        if r.proc_start.is_none() || proc_start_time(r.pid) != r.proc_start {
            info!(instance = %id, pid = r.pid, "adopted instance ended (exit status unknown)");
            sup.update(&id, |r| {
                r.state = if r.state == State::Stopping {
                    State::Stopped
                } else {
                    State::Exited
                };
                r.ended_ms = Some(now_ms());
            });
            return;
        }
    }
}
