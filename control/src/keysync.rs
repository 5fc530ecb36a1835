//! Key sync: one snapshot read at start, then follow the change stream with
//! `XREAD BLOCK` from the snapshot's position. Gaps (trimmed stream, Redis
//! restarted empty, failover to a DB of another generation) are detected and
//! answered by a fresh snapshot. The last good snapshot is persisted to disk
//! and used when Redis is unreachable at start. See docs/AUTH.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::authz::{Applied, AuthState, Source};
use crate::keystore::{self, KeyStoreError, Snapshot, EVENTS_KEY, GEN_KEY, SEQ_KEY};

#[derive(Debug, Clone)]
pub struct KeySyncConfig {
    pub redis_url: String,
    pub service: String,
    /// Where the last good snapshot is kept (mode 0600: it holds secrets).
    pub snapshot_path: Option<PathBuf>,
    /// `XREAD BLOCK` time; after each empty block the follower checks the
    /// DB generation and sequence (gap detection when no event arrives).
    pub block: Duration,
    /// How long `start` waits for the first Redis snapshot before falling
    /// back to the disk snapshot.
    pub initial_timeout: Duration,
    /// Upper bound of the reconnect back-off.
    pub max_backoff: Duration,
    /// Principals (by name prefix) whose secrets this instance keeps even
    /// without a grant on `service`, because it authenticates them by name
    /// (the machine-manager's node reports: `node-*`). Everyone else's
    /// secrets are held only while they have a grant on `service`.
    pub identity_principal_prefixes: Vec<String>,
}

impl KeySyncConfig {
    pub fn new(redis_url: &str, service: &str) -> Self {
        KeySyncConfig {
            redis_url: redis_url.to_string(),
            service: service.to_string(),
            snapshot_path: None,
            block: Duration::from_millis(2000),
            initial_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_millis(1000),
            identity_principal_prefixes: Vec::new(),
        }
    }
}

/// Why the follower took a fresh snapshot (exposed for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    Initial,
    GenerationChanged,
    SequenceGap,
    /// A grant was added for a principal whose secrets we did not hold.
    GrantAdded,
}

/// Handle on a running sync task.
pub struct KeySync {
    pub state: Arc<AuthState>,
    resyncs: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl KeySync {
    /// Try one snapshot from Redis (bounded by `initial_timeout`); if that
    /// fails, load the disk snapshot; then follow in the background. The
    /// state is not ready if neither worked (the follower keeps trying).
    pub async fn start(cfg: KeySyncConfig) -> KeySync {
        let state = Arc::new(AuthState::with_identity_prefixes(
            &cfg.service,
            cfg.identity_principal_prefixes.clone(),
        ));
        let span = info_span!("keysync", service = %cfg.service);
        let first = tokio::time::timeout(cfg.initial_timeout, async {
            let mut conn =
                keystore::connect(&cfg.redis_url, cfg.block + Duration::from_secs(3)).await?;
            let snap = keystore::read_snapshot_scoped(
                &mut conn,
                &cfg.service,
                &cfg.identity_principal_prefixes,
            )
            .await?;
            Ok::<_, KeyStoreError>((conn, snap))
        })
        .instrument(span.clone())
        .await;
        let mut conn = None;
        match first {
            Ok(Ok((c, snap))) => {
                span.in_scope(|| {
                    info!(
                        seq = snap.seq,
                        keys = snap.keys.len(),
                        "snapshot from redis"
                    )
                });
                persist(&cfg, &snap);
                state.install(snap, Source::Redis);
                conn = Some(c);
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timeout".to_string(),
                };
                span.in_scope(|| warn!(error = %why, "redis unreachable at start"));
                if let Some(mut snap) = cfg
                    .snapshot_path
                    .as_deref()
                    .and_then(|p| load_snapshot(p, &cfg.service))
                {
                    // A file from an older version holds every principal's
                    // secrets: drop the ones not granted here and rewrite it.
                    let stripped = snap.strip_out_of_scope(&cfg.identity_principal_prefixes);
                    if stripped > 0 {
                        span.in_scope(|| {
                            warn!(stripped, "disk snapshot held secrets of principals not granted here; removed")
                        });
                        persist(&cfg, &snap);
                    }
                    span.in_scope(|| info!(seq = snap.seq, "serving from disk snapshot"));
                    state.install(snap, Source::Disk);
                }
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let (resync_tx, resyncs) = watch::channel(0u64);
        let follower = Follower {
            cfg,
            state: state.clone(),
            stop: stop_rx,
            resyncs: resync_tx,
        };
        let task = tokio::spawn(follower.run(conn).instrument(span));
        KeySync {
            state,
            resyncs,
            stop,
            task,
        }
    }

    /// Number of fresh snapshots taken after the first one.
    pub fn resync_count(&self) -> u64 {
        *self.resyncs.borrow()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.abort();
        let _ = self.task.await;
    }
}

struct Follower {
    cfg: KeySyncConfig,
    state: Arc<AuthState>,
    stop: watch::Receiver<bool>,
    resyncs: watch::Sender<u64>,
}

enum Step {
    Continue,
    Resync(ResyncReason),
    /// DB has no generation: keep what we have and poll.
    Uninitialised,
}

impl Follower {
    async fn run(mut self, mut conn: Option<MultiplexedConnection>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if *self.stop.borrow() {
                return;
            }
            let c = match conn.take() {
                Some(c) => c,
                None => match keystore::connect(
                    &self.cfg.redis_url,
                    self.cfg.block + Duration::from_secs(3),
                )
                .await
                {
                    Ok(c) => {
                        debug!("connected");
                        backoff = Duration::from_millis(50);
                        c
                    }
                    Err(e) => {
                        debug!(error = %e, "redis connect failed");
                        self.sleep(backoff).await;
                        backoff = (backoff * 2).min(self.cfg.max_backoff);
                        continue;
                    }
                },
            };
            let mut c = c;
            match self.follow(&mut c).await {
                Ok(()) => return,
                Err(e) => {
                    warn!(error = %e, "key sync connection lost; keeping current keys");
                    self.sleep(backoff).await;
                    backoff = (backoff * 2).min(self.cfg.max_backoff);
                }
            }
        }
    }

    async fn sleep(&mut self, d: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.changed() => {}
        }
    }

    /// Runs until an error (then the caller reconnects) or stop.
    async fn follow(&mut self, conn: &mut MultiplexedConnection) -> Result<(), KeyStoreError> {
        // On every (re)connect: compare generation and sequence first.
        let mut step = self.check_position(conn).await?;
        loop {
            if *self.stop.borrow() {
                return Ok(());
            }
            match step {
                Step::Resync(reason) => {
                    let snap = keystore::read_snapshot_scoped(
                        conn,
                        &self.cfg.service,
                        &self.cfg.identity_principal_prefixes,
                    )
                    .await?;
                    if snap.gen.is_empty() && self.state.is_ready() {
                        step = Step::Uninitialised;
                        continue;
                    }
                    info!(?reason, seq = snap.seq, gen = %snap.gen, keys = snap.keys.len(), "fresh snapshot");
                    persist(&self.cfg, &snap);
                    self.state.install(snap, Source::Redis);
                    if reason != ResyncReason::Initial {
                        self.resyncs.send_modify(|n| *n += 1);
                    }
                    step = Step::Continue;
                }
                Step::Uninitialised => {
                    // Keep serving the keys we have until an admin writes the
                    // DB again (which creates a new generation).
                    self.sleep(Duration::from_millis(250)).await;
                    step = self.check_position(conn).await?;
                }
                Step::Continue => {
                    step = self.read_events(conn).await?;
                }
            }
        }
    }

    async fn check_position(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> Result<Step, KeyStoreError> {
        let (gen, seq) = db_position(conn).await?;
        let Some((my_gen, my_seq, _)) = self.state.position() else {
            return Ok(Step::Resync(ResyncReason::Initial));
        };
        if let Some(step) = generation_step(&gen, &my_gen) {
            return Ok(step);
        }
        // Behind is normal (events to read); ahead of the DB means it went back.
        Ok(if seq < my_seq {
            Step::Resync(ResyncReason::GenerationChanged)
        } else {
            Step::Continue
        })
    }

    async fn read_events(
        &mut self,
        conn: &mut MultiplexedConnection,
    ) -> Result<Step, KeyStoreError> {
        let Some((my_gen, my_seq, last_id)) = self.state.position() else {
            return Ok(Step::Resync(ResyncReason::Initial));
        };
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(self.cfg.block.as_millis() as u64)
            .arg("COUNT")
            .arg(1000)
            .arg("STREAMS")
            .arg(EVENTS_KEY)
            .arg(&last_id)
            .query_async(conn)
            .await?;
        let entries: Vec<_> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if entries.is_empty() {
            // Nothing new: make sure nothing was lost either (trimmed past
            // us without later entries, or the DB was replaced).
            let (gen, seq) = db_position(conn).await?;
            if let Some(step) = generation_step(&gen, &my_gen) {
                return Ok(step);
            }
            return Ok(if seq != my_seq {
                Step::Resync(ResyncReason::SequenceGap)
            } else {
                Step::Continue
            });
        }
        let mut applied = 0usize;
        for (expected, entry) in (my_seq + 1..).zip(entries.iter()) {
            let ev = match keystore::parse_event(entry) {
                Ok(ev) => ev,
                Err(e) => {
                    // Unreadable event: do not guess, take a fresh snapshot
                    // (which also moves our position past it).
                    warn!(error = %e, "undecodable change event");
                    return Ok(Step::Resync(ResyncReason::SequenceGap));
                }
            };
            if ev.gen != my_gen {
                return Ok(Step::Resync(ResyncReason::GenerationChanged));
            }
            if ev.seq != expected {
                warn!(expected, got = ev.seq, "change stream gap");
                return Ok(Step::Resync(ResyncReason::SequenceGap));
            }
            if self.state.apply(&ev) == Applied::NeedsSnapshot {
                // Rare (an admin granted a new principal here): the fresh
                // snapshot brings that principal's secrets with the grant.
                // Until it is installed, that principal still gets no_grant.
                info!(seq = ev.seq, "grant for a principal without secrets here");
                if applied > 0 {
                    if let Some(snap) = self.state.snapshot() {
                        persist(&self.cfg, &snap);
                    }
                }
                return Ok(Step::Resync(ResyncReason::GrantAdded));
            }
            applied += 1;
        }
        debug!(applied, "applied change events");
        if let Some(snap) = self.state.snapshot() {
            persist(&self.cfg, &snap);
        }
        Ok(Step::Continue)
    }
}

/// Write the snapshot atomically (temp file + rename), mode 0600.
pub fn save_snapshot(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    use std::io::Write;
    let data = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Load a snapshot for `service`; `None` if absent, unreadable or for
/// another service.
pub fn load_snapshot(path: &Path, service: &str) -> Option<Snapshot> {
    let data = std::fs::read(path).ok()?;
    let snap: Snapshot = serde_json::from_slice(&data).ok()?;
    (snap.service == service).then_some(snap)
}

fn persist(cfg: &KeySyncConfig, snap: &Snapshot) {
    if let Some(p) = &cfg.snapshot_path {
        if let Err(e) = save_snapshot(p, snap) {
            warn!(path = %p.display(), error = %e, "cannot persist key snapshot");
        }
    }
}

/// The permission DB's generation and last sequence number, in one round
/// trip ("" and 0 when the DB has none).
async fn db_position(conn: &mut MultiplexedConnection) -> Result<(String, u64), KeyStoreError> {
    let (gen, seq): (Option<String>, Option<u64>) = redis::pipe()
        .cmd("GET")
        .arg(GEN_KEY)
        .cmd("GET")
        .arg(SEQ_KEY)
        .query_async(conn)
        .await?;
    Ok((gen.unwrap_or_default(), seq.unwrap_or(0)))
}

/// What the DB's generation says of ours: `None` when they match and the
/// sequence number decides.
fn generation_step(gen: &str, my_gen: &str) -> Option<Step> {
    if gen.is_empty() {
        // A DB without permission data yet (or wiped): nothing to follow.
        return Some(if my_gen.is_empty() {
            Step::Continue
        } else {
            Step::Uninitialised
        });
    }
    (gen != my_gen).then_some(Step::Resync(ResyncReason::GenerationChanged))
}
