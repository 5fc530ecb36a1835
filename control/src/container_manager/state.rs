//! The container-manager's records in Redis: one hash per service of its
//! instances (intent → running → draining), the last start/stop times (so a
//! restarted manager keeps warm-up and cool-down), and the decision log.
//! Every write goes through the lease's [`Fence`], so a superseded manager
//! cannot write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lease::{Fence, LeaseError};

/// Lease prefix of the container-manager (`…:lease`, `…:fence`).
pub const LEASE_PREFIX: &str = "headroom:cm";

/// Redis list of recorded decisions (newest first, JSON each).
pub const DECISIONS_KEY: &str = "headroom:cm:decisions";

/// How many decisions the list keeps.
pub const DECISIONS_KEPT: usize = 1000;

/// Hash of a service's instances: id → [`InstanceRecord`] JSON.
pub fn instances_key(service: &str) -> String {
    format!("headroom:cm:{{{service}}}:instances")
}

/// Hash of a service's timing state: `last_start_ms`, `last_stop_ms`.
pub fn timing_key(service: &str) -> String {
    format!("headroom:cm:{{{service}}}:timing")
}

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Recorded before the start call; the start may or may not have run.
    Starting,
    /// The agent confirmed the start.
    Running,
    /// Removed from the balancer; stopped once the cool-down has passed.
    Draining,
    /// Ended (stopped, exited, or its start refused) and out of the
    /// balancer; the record stays only until its placement is released.
    Gone,
}

/// One instance as the manager records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    /// Instance id (also the agent's and the scoreboard's id).
    pub id: String,
    /// Node name.
    pub node: String,
    /// Agent base URL.
    pub agent: String,
    /// Balancer address `ip:port` when load-balanced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Start parameters.
    pub params: BTreeMap<String, String>,
    /// Life phase.
    pub phase: Phase,
    /// When the intent was recorded, Unix ms.
    pub created_ms: i64,
    /// When draining began, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_since_ms: Option<i64>,
    /// The machine-manager's placement id (released when the instance
    /// ends); none with static `--agent` nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
}

/// One recorded decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Unix ms.
    pub ts_ms: i64,
    /// Service name.
    pub service: String,
    /// `up`, `down`, `hold` or `replace` (an instance ended by itself).
    pub action: String,
    /// Instances counted before acting.
    pub running: u32,
    /// Target count (equal to `running` for a hold).
    pub to: u32,
    /// The load that drove it, if any.
    pub load: Option<f64>,
    /// Why, in words.
    pub reason: String,
}

/// Reads a service's instance records; unparsable entries are skipped and
/// returned by id so the caller can log them.
pub async fn load_instances<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    service: &str,
) -> redis::RedisResult<(Vec<InstanceRecord>, Vec<String>)> {
    let m: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(instances_key(service))
        .query_async(conn)
        .await?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (id, json) in m {
        match serde_json::from_str::<InstanceRecord>(&json) {
            Ok(r) if r.id == id => ok.push(r),
            _ => bad.push(id),
        }
    }
    Ok((ok, bad))
}

/// Last start and stop times (Unix ms) of a service.
pub async fn load_timing<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    service: &str,
) -> redis::RedisResult<(Option<i64>, Option<i64>)> {
    let (s, t): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
        .arg(timing_key(service))
        .arg("last_start_ms")
        .arg("last_stop_ms")
        .query_async(conn)
        .await?;
    Ok((s, t))
}

/// The command that stores `r`.
pub fn put_cmd(service: &str, r: &InstanceRecord) -> Vec<String> {
    let json = serde_json::to_string(r).unwrap_or_default();
    vec!["HSET".into(), instances_key(service), r.id.clone(), json]
}

/// The command that records a decision (plus its trim).
pub fn decision_cmds(d: &DecisionRecord) -> Vec<Vec<String>> {
    let json = serde_json::to_string(d).unwrap_or_default();
    vec![
        vec!["LPUSH".into(), DECISIONS_KEY.into(), json],
        vec![
            "LTRIM".into(),
            DECISIONS_KEY.into(),
            "0".into(),
            (DECISIONS_KEPT - 1).to_string(),
        ],
    ]
}

/// Runs `cmds` under the fence.
pub async fn fenced<C: redis::aio::ConnectionLike>(
    fence: &Fence,
    conn: &mut C,
    cmds: &[Vec<String>],
) -> Result<(), LeaseError> {
    fence.exec(conn, cmds).await.map(|_| ())
}

/// The commands that take instance `id` out of the balancer and the
/// scoreboard: its address, drain mark and reports.
pub fn scoreboard_forget_cmds(service: &str, id: &str) -> Vec<Vec<String>> {
    use crate::scoreboard::{addr_key, drain_key, load_key, seen_key};
    vec![
        vec!["HDEL".into(), addr_key(service), id.into()],
        vec!["SREM".into(), drain_key(service), id.into()],
        vec!["ZREM".into(), load_key(service), id.into()],
        vec!["ZREM".into(), seen_key(service), id.into()],
    ]
}
