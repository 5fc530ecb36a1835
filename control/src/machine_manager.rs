//! `headroom machine-manager` (paper §3.1): keeps the node registry and
//! node stats in Redis, answers placement requests with the best-fitting
//! node, starts nodes of the cheapest fitting type within the count and
//! monthly cost limits, and stops idle non-static nodes after a grace
//! period. Runs safely twice: only the holder of the Redis leader lease
//! acts, and its writes carry the lease's fencing token. Reference:
//! docs/MACHINE_MANAGER.md.

pub mod api;
pub mod config;
pub mod costs;
pub mod lifecycle;
pub mod metrics;
pub mod placement;
pub mod registry;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::aio::ConnectionManager;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};

use crate::gate::Gate;
use crate::keysync::{KeySync, KeySyncConfig};
use crate::lease::{Lease, LeaseKeeper, Role};
use crate::node_report::NODE_REPORT_SERVICE;
use crate::sigv4::VerifyPolicy;

pub use config::MachineManagerConfig;

/// `headroom machine-manager` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct MachineManagerArgs {
    /// The TOML config file (docs/MACHINE_MANAGER.md).
    #[arg(long)]
    pub config: PathBuf,
}

/// Shared state of one running manager.
pub struct Manager {
    /// The configuration.
    pub cfg: MachineManagerConfig,
    /// Redis key names.
    pub keys: registry::Keys,
    /// Redis connection (reconnects by itself).
    pub conn: ConnectionManager,
    /// Our role in the lease.
    pub role: watch::Receiver<Role>,
    /// Signature verification (keys synced from the permission DB).
    pub gate: Gate,
    /// Counters for `/metrics`.
    pub metrics: metrics::Metrics,
    /// This manager's lease id.
    pub id: String,
    decide_lock: tokio::sync::Mutex<()>,
    in_flight: std::sync::Mutex<HashSet<String>>,
}

impl Manager {
    /// Marks a provider command for `node` as running; false if one is.
    fn begin_command(&self, node: &str) -> bool {
        self.in_flight
            .lock()
            .map(|mut s| s.insert(node.to_string()))
            .unwrap_or(false)
    }

    fn end_command(&self, node: &str) {
        if let Ok(mut s) = self.in_flight.lock() {
            s.remove(node);
        }
    }

    fn command_running(&self, node: &str) -> bool {
        self.in_flight
            .lock()
            .map(|s| s.contains(node))
            .unwrap_or(true)
    }
}

/// A running manager (tests drive it in-process).
pub struct MachineManagerHandle {
    /// Where the API listens.
    pub local_addr: SocketAddr,
    /// The shared state.
    pub manager: Arc<Manager>,
    keysync: KeySync,
    keeper: LeaseKeeper,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MachineManagerHandle {
    /// Our current role.
    pub fn role(&self) -> Role {
        self.manager.role.borrow().clone()
    }

    /// Stops the loops and the API, releases the lease.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        self.keeper.stop().await;
        self.keysync.stop().await;
    }

    /// Stops everything at once without releasing the lease, as a crash
    /// would (the lease then expires after its TTL).
    pub async fn kill(self) {
        self.keeper.abort();
        for t in &self.tasks {
            t.abort();
        }
        self.keysync.stop().await;
    }
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

/// Starts the manager: key sync, lease contention, API, leader loop.
pub async fn start_machine_manager(
    cfg: MachineManagerConfig,
) -> anyhow::Result<MachineManagerHandle> {
    let id = cfg.id.clone().unwrap_or_else(default_id);
    let conn = crate::lease::connect(&cfg.redis)
        .await
        .with_context(|| format!("connecting to redis {}", cfg.redis))?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let local_addr = listener.local_addr()?;
    let mut kcfg = KeySyncConfig::new(&cfg.redis, NODE_REPORT_SERVICE);
    kcfg.snapshot_path = cfg.snapshot.clone();
    // Node reports are authenticated by principal name (`node-<name>`), not
    // by grant: keep those secrets too.
    kcfg.identity_principal_prefixes = vec![crate::node_report::node_principal("")];
    let keysync = KeySync::start(kcfg).await;
    let policy = VerifyPolicy {
        service: NODE_REPORT_SERVICE.into(),
        region: cfg.region.clone(),
        max_skew_secs: cfg.max_skew_secs,
    };
    let lease = Lease::new(
        &cfg.key_prefix,
        &id,
        Duration::from_millis(cfg.lease_ttl_ms),
    );
    let keeper = LeaseKeeper::start(lease, conn.clone());
    let mgr = Arc::new(Manager {
        keys: registry::Keys::new(&cfg.key_prefix),
        conn,
        role: keeper.subscribe(),
        gate: Gate::new(keysync.state.clone(), policy, 1 << 20),
        metrics: metrics::Metrics::default(),
        id: id.clone(),
        decide_lock: tokio::sync::Mutex::new(()),
        in_flight: std::sync::Mutex::new(HashSet::new()),
        cfg,
    });
    let (stop, stop_rx) = watch::channel(false);
    let span = info_span!("machine_manager", id = %id);
    let m = mgr.clone();
    let server = tokio::spawn(
        crate::shim::serve_with(listener, stop_rx.clone(), move |req| {
            let m = m.clone();
            async move { api::handle(m, req).await }
        })
        .instrument(span.clone()),
    );
    let ticker = tokio::spawn(leader_loop(mgr.clone(), stop_rx).instrument(span.clone()));
    span.in_scope(|| info!(%local_addr, "machine-manager listening"));
    Ok(MachineManagerHandle {
        local_addr,
        manager: mgr,
        keysync,
        keeper,
        stop,
        tasks: vec![server, ticker],
    })
}

async fn leader_loop(mgr: Arc<Manager>, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(mgr.cfg.tick_ms);
    loop {
        let fence = mgr.role.borrow().fence().cloned();
        mgr.metrics.set(
            "headroom_mm_leader",
            if fence.is_some() { 1.0 } else { 0.0 },
        );
        if let Some(f) = fence {
            if let Err(e) = lifecycle::tick(&mgr, &f).await {
                if matches!(
                    e,
                    registry::RegistryError::Lease(crate::lease::LeaseError::Fenced { .. })
                ) {
                    mgr.metrics.inc("headroom_mm_fenced_writes_total");
                }
                warn!(error = %e, "leader tick failed");
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// `headroom machine-manager --config FILE`: run until SIGINT/SIGTERM.
pub async fn run_machine_manager(args: MachineManagerArgs) -> anyhow::Result<()> {
    let cfg = MachineManagerConfig::load(&args.config)
        .with_context(|| format!("invalid config {}", args.config.display()))?;
    let h = start_machine_manager(cfg).await?;
    crate::wait_for_shutdown_signal().await;
    h.shutdown().await;
    Ok(())
}
