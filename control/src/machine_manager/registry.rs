//! The node registry and node stats in Redis. Layout (prefix `P`, default
//! `headroom:mm`):
//!
//! - `P:nodes` set of node names ever registered;
//! - `P:node:{name}` hash: `type`, `address`, `static` (0/1), `state`
//!   (`starting`/`ready`/`stopping`/`stopped`), `started_at_ms`,
//!   `state_since_ms`, `last_report_ms`, `idle_since_ms`, `reason`;
//! - `P:stats:{name}` stream of reports (field `json`, a [`NodeReport`]),
//!   trimmed by `MINID` to the retention;
//! - `P:placements:{name}` hash placement id → JSON [`Placement`];
//!   `P:placement-index` hash id → node; `P:seq:{type}` and
//!   `P:placement-seq` counters.
//!
//! Every manager decision is written through [`Fence::exec`], so a manager
//! that lost its lease cannot change the registry. Report ingestion is not
//! fenced: it records what the node said, is idempotent, and is accepted by
//! any manager (see [`ingest_report`]).

use std::collections::BTreeMap;

use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

use crate::cmd_args;
use crate::lease::{Fence, LeaseError};
use crate::node_report::NodeReport;

/// Lifecycle state of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Start command run (or static node registered), no report yet.
    Starting,
    /// Has reported; placements may go here.
    Ready,
    /// Stop command being run.
    Stopping,
    /// Stopped; kept for history.
    Stopped,
}

impl NodeState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Ready => "ready",
            NodeState::Stopping => "stopping",
            NodeState::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "starting" => NodeState::Starting,
            "ready" => NodeState::Ready,
            "stopping" => NodeState::Stopping,
            "stopped" => NodeState::Stopped,
            _ => return None,
        })
    }
}

/// Key names under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    /// The prefix, e.g. `headroom:mm`.
    pub prefix: String,
}

impl Keys {
    /// Keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    /// Set of node names.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    /// One node's hash.
    pub fn node(&self, name: &str) -> String {
        format!("{}:node:{name}", self.prefix)
    }
    /// One node's stats stream.
    pub fn stats(&self, name: &str) -> String {
        format!("{}:stats:{name}", self.prefix)
    }
    /// One node's placements.
    pub fn placements(&self, name: &str) -> String {
        format!("{}:placements:{name}", self.prefix)
    }
    /// Placement id → node.
    pub fn placement_index(&self) -> String {
        format!("{}:placement-index", self.prefix)
    }
    /// Name counter of a node type.
    pub fn seq(&self, node_type: &str) -> String {
        format!("{}:seq:{node_type}", self.prefix)
    }
    /// Placement id counter.
    pub fn placement_seq(&self) -> String {
        format!("{}:placement-seq", self.prefix)
    }
}

/// Errors reading or writing the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A fenced write was refused or failed.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// Stored data could not be decoded.
    #[error("corrupt registry entry {key}: {detail}")]
    Corrupt {
        /// The Redis key.
        key: String,
        /// What was wrong.
        detail: String,
    },
}

/// One node as registered.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// Its node type.
    pub node_type: String,
    /// Its address (empty if the provider did not tell).
    pub address: String,
    /// Never stopped.
    pub is_static: bool,
    /// Lifecycle state.
    pub state: NodeState,
    /// When it was registered/started, ms.
    pub started_at_ms: i64,
    /// When it entered `state`, ms.
    pub state_since_ms: i64,
    /// Last accepted report, ms (manager clock).
    pub last_report_ms: Option<i64>,
    /// Since when it has been idle, ms.
    pub idle_since_ms: Option<i64>,
    /// Why it was stopped, or the last command error.
    pub reason: Option<String>,
}

/// Resources promised to one service instance on a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Placement id.
    pub id: String,
    /// The service.
    pub service: String,
    /// CPU cores.
    pub cpu: f64,
    /// Memory, MiB.
    pub ram_mib: u64,
    /// When placed, ms.
    pub at_ms: i64,
}

/// A node with what placement needs to know about it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    /// The registry entry.
    pub record: NodeRecord,
    /// Its latest report, if any.
    pub latest: Option<NodeReport>,
    /// Its placements.
    pub placements: Vec<Placement>,
}

fn field_i64(m: &BTreeMap<String, String>, k: &str) -> Option<i64> {
    m.get(k).and_then(|v| v.parse().ok())
}

fn parse_record(
    key: &str,
    name: &str,
    m: &BTreeMap<String, String>,
) -> Result<NodeRecord, RegistryError> {
    let corrupt = |d: &str| RegistryError::Corrupt {
        key: key.to_string(),
        detail: d.to_string(),
    };
    Ok(NodeRecord {
        name: name.to_string(),
        node_type: m.get("type").cloned().ok_or_else(|| corrupt("no type"))?,
        address: m.get("address").cloned().unwrap_or_default(),
        is_static: m.get("static").map(|s| s == "1").unwrap_or(false),
        state: m
            .get("state")
            .and_then(|s| NodeState::parse(s))
            .ok_or_else(|| corrupt("bad state"))?,
        started_at_ms: field_i64(m, "started_at_ms").unwrap_or(0),
        state_since_ms: field_i64(m, "state_since_ms").unwrap_or(0),
        last_report_ms: field_i64(m, "last_report_ms"),
        idle_since_ms: field_i64(m, "idle_since_ms"),
        reason: m.get("reason").cloned().filter(|s| !s.is_empty()),
    })
}

/// One node's record, if registered.
pub async fn get_node<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    name: &str,
) -> Result<Option<NodeRecord>, RegistryError> {
    let key = keys.node(name);
    let m: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    if m.is_empty() {
        return Ok(None);
    }
    parse_record(&key, name, &m).map(Some)
}

/// The latest report of `name`.
pub async fn latest_report<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    name: &str,
) -> Result<Option<NodeReport>, RegistryError> {
    let key = keys.stats(name);
    let r: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(&key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    let Some(entry) = r.ids.first() else {
        return Ok(None);
    };
    let json: String = entry.get("json").ok_or_else(|| RegistryError::Corrupt {
        key: key.clone(),
        detail: "entry without json".into(),
    })?;
    serde_json::from_str(&json)
        .map(Some)
        .map_err(|e| RegistryError::Corrupt {
            key,
            detail: e.to_string(),
        })
}

/// Number of stored reports of `name`.
pub async fn stats_len<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    name: &str,
) -> Result<u64, RegistryError> {
    Ok(redis::cmd("XLEN")
        .arg(keys.stats(name))
        .query_async(conn)
        .await?)
}

/// The placements on `name`.
pub async fn placements<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    name: &str,
) -> Result<Vec<Placement>, RegistryError> {
    let key = keys.placements(name);
    let m: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    m.values()
        .map(|v| {
            serde_json::from_str(v).map_err(|e| RegistryError::Corrupt {
                key: key.clone(),
                detail: e.to_string(),
            })
        })
        .collect()
}

/// Every registered node with its latest report and placements.
pub async fn load_all<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
) -> Result<Vec<NodeView>, RegistryError> {
    let mut names: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.nodes())
        .query_async(conn)
        .await?;
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let Some(record) = get_node(conn, keys, &n).await? else {
            continue;
        };
        let (latest, placements) = if record.state == NodeState::Stopped {
            (None, Vec::new())
        } else {
            (
                latest_report(conn, keys, &n).await?,
                placements(conn, keys, &n).await?,
            )
        };
        out.push(NodeView {
            record,
            latest,
            placements,
        });
    }
    Ok(out)
}

/// Registers a node (fenced). Overwrites an existing entry of that name.
pub async fn register<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    fence: &Fence,
    rec: &NodeRecord,
) -> Result<(), RegistryError> {
    let key = keys.node(&rec.name);
    fence
        .exec(
            conn,
            &[
                cmd_args!("DEL", key),
                cmd_args!(
                    "HSET",
                    key,
                    "type",
                    rec.node_type,
                    "address",
                    rec.address,
                    "static",
                    if rec.is_static { "1" } else { "0" },
                    "state",
                    rec.state.as_str(),
                    "started_at_ms",
                    rec.started_at_ms,
                    "state_since_ms",
                    rec.state_since_ms
                ),
                cmd_args!("SADD", keys.nodes(), rec.name),
            ],
        )
        .await?;
    Ok(())
}

/// Moves `name` to `state` (fenced), recording `reason` if given.
pub async fn set_state<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    fence: &Fence,
    name: &str,
    state: NodeState,
    now_ms: i64,
    reason: Option<&str>,
) -> Result<(), RegistryError> {
    let key = keys.node(name);
    let mut cmds = vec![cmd_args!(
        "HSET",
        key,
        "state",
        state.as_str(),
        "state_since_ms",
        now_ms,
        "reason",
        reason.unwrap_or("")
    )];
    if state == NodeState::Stopped {
        cmds.push(cmd_args!("HDEL", key, "idle_since_ms"));
    }
    fence.exec(conn, &cmds).await?;
    Ok(())
}

/// Sets or clears the idle mark of `name` (fenced).
pub async fn set_idle_since<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    fence: &Fence,
    name: &str,
    since: Option<i64>,
) -> Result<(), RegistryError> {
    let key = keys.node(name);
    let cmd = match since {
        Some(t) => cmd_args!("HSET", key, "idle_since_ms", t),
        None => cmd_args!("HDEL", key, "idle_since_ms"),
    };
    fence.exec(conn, &[cmd]).await?;
    Ok(())
}

/// Next number for a started node of `node_type` (fenced).
pub async fn next_node_number<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    fence: &Fence,
    node_type: &str,
) -> Result<u64, RegistryError> {
    let out = fence
        .exec(conn, &[cmd_args!("INCR", keys.seq(node_type))])
        .await?;
    first_int(&out, &keys.seq(node_type))
}

fn first_int(out: &[redis::Value], key: &str) -> Result<u64, RegistryError> {
    out.first()
        .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
        .ok_or_else(|| RegistryError::Corrupt {
            key: key.to_string(),
            detail: format!("INCR answered {out:?}"),
        })
}

/// Records a placement on `node` (fenced); returns its id. Clears the
/// node's idle mark in the same step.
#[allow(clippy::too_many_arguments)]
pub async fn add_placement<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    fence: &Fence,
    node: &str,
    service: &str,
    cpu: f64,
    ram_mib: u64,
    now_ms: i64,
) -> Result<Placement, RegistryError> {
    let out = fence
        .exec(conn, &[cmd_args!("INCR", keys.placement_seq())])
        .await?;
    let n = first_int(&out, &keys.placement_seq())?;
    let p = Placement {
        id: format!("p{n}"),
        service: service.to_string(),
        cpu,
        ram_mib,
        at_ms: now_ms,
    };
    let json = serde_json::to_string(&p).map_err(|e| RegistryError::Corrupt {
        key: keys.placements(node),
        detail: e.to_string(),
    })?;
    fence
        .exec(
            conn,
            &[
                cmd_args!("HSET", keys.placements(node), p.id, json),
                cmd_args!("HSET", keys.placement_index(), p.id, node),
                cmd_args!("HDEL", keys.node(node), "idle_since_ms"),
            ],
        )
        .await?;
    Ok(p)
}

/// Removes placement `id` (fenced); the node it was on, if it existed.
pub async fn remove_placement<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    fence: &Fence,
    id: &str,
) -> Result<Option<String>, RegistryError> {
    let node: Option<String> = redis::cmd("HGET")
        .arg(keys.placement_index())
        .arg(id)
        .query_async(conn)
        .await?;
    let Some(node) = node else { return Ok(None) };
    fence
        .exec(
            conn,
            &[
                cmd_args!("HDEL", keys.placements(&node), id),
                cmd_args!("HDEL", keys.placement_index(), id),
            ],
        )
        .await?;
    Ok(Some(node))
}

/// Drops stats older than `retention_ms` (by Redis time) from `name`'s
/// stream (fenced: housekeeping is the leader's job).
pub async fn trim_stats<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    fence: &Fence,
    name: &str,
    now_ms: i64,
    retention_ms: u64,
) -> Result<(), RegistryError> {
    let min = (now_ms - retention_ms as i64).max(0);
    fence
        .exec(conn, &[cmd_args!("XTRIM", keys.stats(name), "MINID", min)])
        .await?;
    Ok(())
}

const INGEST: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'unknown' end
if st == 'stopped' then return 'stopped' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minid = now - tonumber(ARGV[2])
if minid < 0 then minid = 0 end
redis.call('XADD', KEYS[2], 'MINID', minid, '*', 'json', ARGV[1])
redis.call('HSET', KEYS[1], 'last_report_ms', ARGV[3])
if st == 'starting' then
  redis.call('HSET', KEYS[1], 'state', 'ready', 'state_since_ms', ARGV[3])
  return 'became_ready'
end
return st
"#;

/// What happened to an ingested report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Stored; the node was `starting` and is now `ready`.
    BecameReady,
    /// Stored; the node's state is unchanged.
    Stored,
    /// Not stored: no such node.
    UnknownNode,
    /// Not stored: the node is stopped.
    Stopped,
}

/// Stores a validated report in one atomic step: append to the stats
/// stream (trimming to the retention), set `last_report_ms`, and turn a
/// `starting` node `ready`. Not fenced on purpose: it records the node's own
/// facts, the only transition it makes is starting → ready, and every
/// manager, leader or not, may receive reports.
pub async fn ingest_report<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    report: &NodeReport,
    now_ms: i64,
    retention_ms: u64,
) -> Result<Ingested, RegistryError> {
    let json = serde_json::to_string(report).map_err(|e| RegistryError::Corrupt {
        key: keys.stats(&report.node),
        detail: e.to_string(),
    })?;
    let r: String = redis::Script::new(INGEST)
        .key(keys.node(&report.node))
        .key(keys.stats(&report.node))
        .arg(json)
        .arg(retention_ms)
        .arg(now_ms)
        .invoke_async(conn)
        .await?;
    Ok(match r.as_str() {
        "unknown" => Ingested::UnknownNode,
        "stopped" => Ingested::Stopped,
        "became_ready" => Ingested::BecameReady,
        _ => Ingested::Stored,
    })
}
