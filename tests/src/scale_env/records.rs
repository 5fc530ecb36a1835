//! What the container-manager, the agents and the instances left in Redis,
//! read as plain JSON (not the control crate's structs, which refuse
//! unknown fields: a test must not break when a record gains one).
use std::collections::HashMap;

use anyhow::{Context, Result};
use headroom_control::{
    agent::publish::instances_key as agent_instances_key,
    container_manager::state::{instances_key as cm_instances_key, DECISIONS_KEY},
    machine_manager::registry::Keys as MmKeys,
    scoreboard::{addr_key, drain_key, load_key, seen_key},
};
use serde_json::Value;

/// One instance as the container-manager records it.
#[derive(Clone, Debug, PartialEq)]
pub struct CmInstance {
    /// Instance id.
    pub id: String,
    /// Node it was placed on.
    pub node: String,
    /// `starting`, `running` or `draining`.
    pub phase: String,
    /// When the intent was recorded (Unix ms).
    pub created_ms: i64,
    /// When its drain began (Unix ms).
    pub drain_since_ms: Option<i64>,
    /// The machine-manager's placement id (none with static agents).
    pub placement: Option<String>,
}

/// One recorded decision of the container-manager.
#[derive(Clone, Debug, PartialEq)]
pub struct CmDecision {
    /// When (Unix ms).
    pub ts_ms: i64,
    /// `up`, `down` or `hold`.
    pub action: String,
    /// Instances counted before acting.
    pub running: u64,
    /// Target count.
    pub to: u64,
    /// Why, in words.
    pub reason: String,
}

/// One instance as its agent mirrors it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentInstance {
    /// Instance id.
    pub id: String,
    /// Process id (and process group).
    pub pid: u32,
    /// `running`, `stopping`, `exited`, `stopped`, `lost`.
    pub state: String,
    /// When the agent started it (Unix ms).
    pub started_ms: i64,
    /// When it ended (Unix ms).
    pub ended_ms: Option<i64>,
}

/// An instance's scoreboard entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SbEntries {
    /// Its `:addr` value.
    pub addr: Option<String>,
    /// Whether it is in `:drain`.
    pub drain: bool,
    /// Its `:load` score.
    pub load: Option<f64>,
    /// Its `:seen` score (Unix ms).
    pub seen: Option<f64>,
}

impl SbEntries {
    /// True when nothing of the instance is left.
    pub fn is_empty(&self) -> bool {
        *self == SbEntries::default()
    }
}

fn str_of(v: &Value, field: &str) -> Result<String> {
    v.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("field {field} missing or not a string in {v}"))
}

fn i64_of(v: &Value, field: &str) -> Result<i64> {
    v.get(field)
        .and_then(Value::as_i64)
        .with_context(|| format!("field {field} missing or not an integer in {v}"))
}

/// The container-manager's instance records of `service`.
pub fn cm_instances(c: &mut redis::Connection, service: &str) -> Result<Vec<CmInstance>> {
    let m: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(cm_instances_key(service))
        .query(c)
        .context("HGETALL instances")?;
    let mut out = Vec::new();
    for json in m.values() {
        let v: Value = serde_json::from_str(json).with_context(|| format!("record {json}"))?;
        out.push(CmInstance {
            id: str_of(&v, "id")?,
            node: str_of(&v, "node")?,
            phase: str_of(&v, "phase")?,
            created_ms: i64_of(&v, "created_ms")?,
            drain_since_ms: v.get("drain_since_ms").and_then(Value::as_i64),
            placement: v
                .get("placement")
                .and_then(Value::as_str)
                .map(str::to_string),
        });
    }
    out.sort_by_key(|r| r.created_ms);
    Ok(out)
}

/// The decisions recorded for `service`, oldest first.
pub fn decisions(c: &mut redis::Connection, service: &str) -> Result<Vec<CmDecision>> {
    let l: Vec<String> = redis::cmd("LRANGE")
        .arg(DECISIONS_KEY)
        .arg(0)
        .arg(-1)
        .query(c)
        .context("LRANGE decisions")?;
    let mut out = Vec::new();
    for json in l.iter().rev() {
        let v: Value = serde_json::from_str(json).with_context(|| format!("decision {json}"))?;
        if v.get("service").and_then(Value::as_str) != Some(service) {
            continue;
        }
        out.push(CmDecision {
            ts_ms: i64_of(&v, "ts_ms")?,
            action: str_of(&v, "action")?,
            running: v.get("running").and_then(Value::as_u64).unwrap_or(0),
            to: v.get("to").and_then(Value::as_u64).unwrap_or(0),
            reason: str_of(&v, "reason").unwrap_or_default(),
        });
    }
    Ok(out)
}

/// The instances node `node`'s agent mirrors.
pub fn agent_instances(c: &mut redis::Connection, node: &str) -> Result<Vec<AgentInstance>> {
    let m: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(agent_instances_key(node))
        .query(c)
        .context("HGETALL agent instances")?;
    let mut out = Vec::new();
    for json in m.values() {
        let v: Value = serde_json::from_str(json).with_context(|| format!("record {json}"))?;
        out.push(AgentInstance {
            id: str_of(&v, "instance_id")?,
            pid: i64_of(&v, "pid")? as u32,
            state: str_of(&v, "state")?,
            started_ms: i64_of(&v, "started_ms")?,
            ended_ms: v.get("ended_ms").and_then(Value::as_i64),
        });
    }
    Ok(out)
}

/// Instance `id`'s entries in `service`'s scoreboard.
pub fn sb_entries(c: &mut redis::Connection, service: &str, id: &str) -> Result<SbEntries> {
    let (addr, drain, load, seen): (Option<String>, bool, Option<f64>, Option<f64>) = redis::pipe()
        .cmd("HGET")
        .arg(addr_key(service))
        .arg(id)
        .cmd("SISMEMBER")
        .arg(drain_key(service))
        .arg(id)
        .cmd("ZSCORE")
        .arg(load_key(service))
        .arg(id)
        .cmd("ZSCORE")
        .arg(seen_key(service))
        .arg(id)
        .query(c)
        .context("reading the scoreboard")?;
    Ok(SbEntries {
        addr,
        drain,
        load,
        seen,
    })
}

/// The ids in `service`'s drain set.
pub fn drain_set(c: &mut redis::Connection, service: &str) -> Result<Vec<String>> {
    redis::cmd("SMEMBERS")
        .arg(drain_key(service))
        .query(c)
        .context("SMEMBERS drain")
}

/// One node as the machine-manager's registry holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct MmNode {
    /// `starting`, `ready`, `stopping` or `stopped`.
    pub state: String,
    /// When its last accepted report arrived (Unix ms).
    pub last_report_ms: Option<i64>,
}

/// Node `node` in the registry under `prefix` (none if unregistered).
pub fn mm_node(c: &mut redis::Connection, prefix: &str, node: &str) -> Result<Option<MmNode>> {
    let m: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(MmKeys::new(prefix).node(node))
        .query(c)
        .context("HGETALL mm node")?;
    let Some(state) = m.get("state") else {
        return Ok(None);
    };
    Ok(Some(MmNode {
        state: state.clone(),
        last_report_ms: m.get("last_report_ms").and_then(|v| v.parse().ok()),
    }))
}

/// The placements the machine-manager holds on `node`: id → `at_ms`.
pub fn mm_placements(
    c: &mut redis::Connection,
    prefix: &str,
    node: &str,
) -> Result<HashMap<String, i64>> {
    let m: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(MmKeys::new(prefix).placements(node))
        .query(c)
        .context("HGETALL mm placements")?;
    let mut out = HashMap::new();
    for (id, json) in m {
        let v: Value = serde_json::from_str(&json).with_context(|| format!("placement {json}"))?;
        out.insert(id, i64_of(&v, "at_ms")?);
    }
    Ok(out)
}
