//! What the leader does to nodes: start one of a type (provider start
//! command), stop idle or never-ready ones (stop command), keep static
//! nodes registered, trim stats. Every registry write carries the fence.

use std::process::Stdio;
use std::sync::Arc;

use tracing::{info, warn};

use super::config::{expand, NodeType};
use super::registry::{self, NodeRecord, NodeState, RegistryError};
use super::Manager;
use crate::lease::Fence;
use crate::sigv4::unix_now_ms;

/// Why a start could not even be attempted.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Every address of the type's pool is in use.
    #[error("no free address in the pool of node type {0}")]
    NoAddress(String),
    /// The registry write failed (or was fenced).
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Runs a provider command (argv, no shell) with the configured timeout;
/// `Err` says why it failed.
pub async fn run_command(argv: &[String], timeout: std::time::Duration) -> Result<(), String> {
    let Some((prog, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    // No pipes: a provider CLI may leave a child running that would hold
    // them open and make us wait for it.
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("{prog} exited with {st}")),
        Ok(Err(e)) => Err(format!("waiting for {prog}: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!("{prog} timed out after {timeout:?}"))
        }
    }
}

/// Registers a new node of type `t` as `starting` and runs the start
/// command in the background; returns the node's name at once.
pub async fn start_node(
    mgr: &Arc<Manager>,
    fence: &Fence,
    t: &NodeType,
    nodes: &[registry::NodeView],
) -> Result<NodeRecord, StartError> {
    let address = if t.addresses.is_empty() {
        String::new()
    } else {
        let used: Vec<&str> = nodes
            .iter()
            .filter(|n| n.record.state != NodeState::Stopped)
            .map(|n| n.record.address.as_str())
            .collect();
        t.addresses
            .iter()
            .map(|a| a.to_string())
            .find(|a| !used.contains(&a.as_str()))
            .ok_or_else(|| StartError::NoAddress(t.name.clone()))?
    };
    let mut conn = mgr.conn.clone();
    let n = registry::next_node_number(&mut conn, &mgr.keys, fence, &t.name).await?;
    let now = unix_now_ms();
    let rec = NodeRecord {
        name: format!("{}-{n}", t.name),
        node_type: t.name.clone(),
        address,
        is_static: false,
        state: NodeState::Starting,
        started_at_ms: now,
        state_since_ms: now,
        last_report_ms: None,
        idle_since_ms: None,
        reason: None,
    };
    registry::register(&mut conn, &mgr.keys, fence, &rec).await?;
    mgr.metrics.inc("headroom_mm_nodes_started_total");
    info!(node = %rec.name, node_type = %t.name, address = %rec.address, "starting node");
    let argv = expand(&t.start, &rec.name, &t.name, &rec.address);
    let (m, f, name) = (mgr.clone(), fence.clone(), rec.name.clone());
    tokio::spawn(async move {
        if !m.begin_command(&name) {
            return;
        }
        let res = run_command(&argv, m.cfg.command_timeout()).await;
        m.end_command(&name);
        if let Err(e) = res {
            warn!(node = %name, error = %e, "start command failed");
            m.metrics.inc("headroom_mm_start_failures_total");
            let mut c = m.conn.clone();
            let why = format!("start_failed: {e}");
            if let Err(e) = registry::set_state(
                &mut c,
                &m.keys,
                &f,
                &name,
                NodeState::Stopped,
                unix_now_ms(),
                Some(&why),
            )
            .await
            {
                warn!(node = %name, error = %e, "cannot record failed start");
            }
        }
    });
    Ok(rec)
}

/// Marks `name` stopping and runs its type's stop command in the
/// background; `stopped` on success, stays `stopping` (retried next tick)
/// on failure. Static nodes are refused here, whatever the caller thinks.
pub async fn stop_node(
    mgr: &Arc<Manager>,
    fence: &Fence,
    rec: &NodeRecord,
    reason: &str,
) -> Result<(), RegistryError> {
    if rec.is_static || mgr.cfg.static_node(&rec.name).is_some() {
        warn!(node = %rec.name, "refusing to stop a static node");
        return Ok(());
    }
    let Some(t) = mgr.cfg.node_type(&rec.node_type) else {
        warn!(node = %rec.name, node_type = %rec.node_type, "node type no longer configured; not stopping");
        return Ok(());
    };
    if !mgr.begin_command(&rec.name) {
        return Ok(());
    }
    let mut conn = mgr.conn.clone();
    if rec.state != NodeState::Stopping {
        if let Err(e) = registry::set_state(
            &mut conn,
            &mgr.keys,
            fence,
            &rec.name,
            NodeState::Stopping,
            unix_now_ms(),
            Some(reason),
        )
        .await
        {
            mgr.end_command(&rec.name);
            return Err(e);
        }
    }
    info!(node = %rec.name, reason, "stopping node");
    let argv = expand(&t.stop, &rec.name, &t.name, &rec.address);
    let (m, f, name, why) = (
        mgr.clone(),
        fence.clone(),
        rec.name.clone(),
        reason.to_string(),
    );
    tokio::spawn(async move {
        let res = run_command(&argv, m.cfg.command_timeout()).await;
        let mut c = m.conn.clone();
        match res {
            Ok(()) => {
                match registry::set_state(
                    &mut c,
                    &m.keys,
                    &f,
                    &name,
                    NodeState::Stopped,
                    unix_now_ms(),
                    Some(&why),
                )
                .await
                {
                    Ok(()) => {
                        m.metrics.inc("headroom_mm_nodes_stopped_total");
                        info!(node = %name, reason = %why, "node stopped");
                    }
                    Err(e) => warn!(node = %name, error = %e, "cannot record stop"),
                }
            }
            Err(e) => {
                m.metrics.inc("headroom_mm_stop_failures_total");
                warn!(node = %name, error = %e, "stop command failed; will retry");
            }
        }
        m.end_command(&name);
    });
    Ok(())
}

/// Registers configured static nodes that are missing (as `starting`:
/// ready on their first report) or whose type/address changed.
pub async fn ensure_static(mgr: &Arc<Manager>, fence: &Fence) -> Result<(), RegistryError> {
    let mut conn = mgr.conn.clone();
    for s in &mgr.cfg.static_nodes {
        let cur = registry::get_node(&mut conn, &mgr.keys, &s.name).await?;
        let address = s.address.to_string();
        let up_to_date = cur.as_ref().is_some_and(|r| {
            r.is_static
                && r.node_type == s.node_type
                && r.address == address
                && r.state != NodeState::Stopped
        });
        if up_to_date {
            continue;
        }
        let now = unix_now_ms();
        let rec = NodeRecord {
            name: s.name.clone(),
            node_type: s.node_type.clone(),
            address,
            is_static: true,
            state: match &cur {
                Some(r) if r.state == NodeState::Ready => NodeState::Ready,
                _ => NodeState::Starting,
            },
            started_at_ms: cur.as_ref().map_or(now, |r| r.started_at_ms),
            state_since_ms: now,
            last_report_ms: None,
            idle_since_ms: None,
            reason: None,
        };
        registry::register(&mut conn, &mgr.keys, fence, &rec).await?;
        info!(node = %s.name, "static node registered");
    }
    Ok(())
}

/// One pass of the leader loop: static nodes, retention, start timeouts,
/// idle stopping, stop retries.
pub async fn tick(mgr: &Arc<Manager>, fence: &Fence) -> Result<(), RegistryError> {
    ensure_static(mgr, fence).await?;
    let mut conn = mgr.conn.clone();
    let nodes = registry::load_all(&mut conn, &mgr.keys).await?;
    let now = unix_now_ms();
    let cfg = &mgr.cfg;
    for n in &nodes {
        let r = &n.record;
        if r.state == NodeState::Stopped {
            continue;
        }
        registry::trim_stats(
            &mut conn,
            &mgr.keys,
            fence,
            &r.name,
            now,
            cfg.stats_retention_ms,
        )
        .await?;
        if r.is_static {
            continue;
        }
        match r.state {
            NodeState::Starting => {
                if now - r.started_at_ms > cfg.start_timeout_ms as i64
                    && !mgr.command_running(&r.name)
                {
                    stop_node(mgr, fence, r, "start_timeout").await?;
                }
            }
            NodeState::Ready => {
                let idle = n.placements.is_empty()
                    && n.latest
                        .as_ref()
                        .is_some_and(|x| x.cpu_pct < cfg.idle_cpu_pct);
                match (idle, r.idle_since_ms) {
                    (true, None) => {
                        registry::set_idle_since(&mut conn, &mgr.keys, fence, &r.name, Some(now))
                            .await?
                    }
                    (true, Some(since)) if now - since >= cfg.idle_grace_ms as i64 => {
                        stop_node(mgr, fence, r, "idle").await?
                    }
                    (false, Some(_)) => {
                        registry::set_idle_since(&mut conn, &mgr.keys, fence, &r.name, None).await?
                    }
                    _ => {}
                }
            }
            NodeState::Stopping => {
                // A failed stop, or one cut short by a restart: run it again
                // (provider stop commands must be idempotent).
                let again = r.reason.clone().unwrap_or_else(|| "retry".into());
                stop_node(mgr, fence, r, &again).await?;
            }
            NodeState::Stopped => {}
        }
    }
    let spend = super::costs::projected_monthly(cfg, &nodes);
    mgr.metrics
        .set("headroom_mm_projected_monthly_spend", spend);
    Ok(())
}
