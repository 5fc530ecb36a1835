//! The scoreboard contract (docs/SCOREBOARD.md): key names, the validated
//! report type, the one-round-trip atomic write and the balancer's read.

use std::collections::BTreeMap;

use redis::aio::ConnectionLike;
use serde::Serialize;

pub const SERVICES_SET: &str = "headroom:services";

/// `headroom:sb:{S}:load` — sorted set, member = instance, score = load 0–100.
pub fn load_key(service: &str) -> String {
    format!("headroom:sb:{{{service}}}:load")
}
/// `headroom:sb:{S}:seen` — sorted set, member = instance, score = last
/// report time, ms since the Unix epoch (the load-receiver's clock).
pub fn seen_key(service: &str) -> String {
    format!("headroom:sb:{{{service}}}:seen")
}
/// `headroom:sb:{S}:addr` — hash, instance → `ip:port[;node=NAME]`.
pub fn addr_key(service: &str) -> String {
    format!("headroom:sb:{{{service}}}:addr")
}

/// `headroom:sb:{S}:drain` — set of instance ids being drained (scale-in):
/// out of new tables, their flows continue, until the address is removed.
pub fn drain_key(service: &str) -> String {
    format!("headroom:sb:{{{service}}}:drain")
}

/// Service names: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_service(s: &str) -> bool {
    crate::keystore::valid_name(s)
}

/// Instance ids: `[A-Za-z0-9._:@\[\]-]{1,128}` (an `ip:port` is a valid id).
pub fn valid_instance(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@' | b'[' | b']')
        })
}

/// One validated load report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    pub service: String,
    pub instance: String,
    /// 0–100
    pub load: f64,
}

/// Write all reports in ONE round trip, atomically (`MULTI … EXEC`
/// pipelined): for each report `ZADD load`, `ZADD seen`, `SADD services`.
pub async fn write_reports<C: ConnectionLike>(
    conn: &mut C,
    reports: &[LoadReport],
    now_ms: i64,
) -> redis::RedisResult<()> {
    let mut p = redis::pipe();
    p.atomic();
    for r in reports {
        p.cmd("ZADD")
            .arg(load_key(&r.service))
            .arg(r.load)
            .arg(&r.instance)
            .ignore();
        p.cmd("ZADD")
            .arg(seen_key(&r.service))
            .arg(now_ms)
            .arg(&r.instance)
            .ignore();
        p.cmd("SADD").arg(SERVICES_SET).arg(&r.service).ignore();
    }
    p.query_async::<()>(conn).await
}

/// Registration of an instance (shim start): address + service set, one
/// atomic round trip. `fresh` (a process's first registration) also clears
/// a drain mark an earlier process of the same instance left behind (killed
/// mid-shutdown); later re-registrations keep a scale-in mark.
pub async fn register<C: ConnectionLike>(
    conn: &mut C,
    service: &str,
    instance: &str,
    addr: &str,
    fresh: bool,
) -> redis::RedisResult<()> {
    let mut p = redis::pipe();
    p.atomic()
        .cmd("HSET")
        .arg(addr_key(service))
        .arg(instance)
        .arg(addr)
        .ignore()
        .cmd("SADD")
        .arg(SERVICES_SET)
        .arg(service)
        .ignore();
    if fresh {
        p.cmd("SREM").arg(drain_key(service)).arg(instance).ignore();
    }
    p.query_async::<()>(conn).await
}

/// Marks an instance as draining (shim shutdown, scale-in): balancers send
/// it no new flows and keep its established ones.
pub async fn mark_draining<C: ConnectionLike>(
    conn: &mut C,
    service: &str,
    instance: &str,
) -> redis::RedisResult<()> {
    redis::cmd("SADD")
        .arg(drain_key(service))
        .arg(instance)
        .query_async::<()>(conn)
        .await
}

/// Unregistration (shim shutdown): the instance disappears from all three
/// keys and from the drain set.
pub async fn unregister<C: ConnectionLike>(
    conn: &mut C,
    service: &str,
    instance: &str,
) -> redis::RedisResult<()> {
    redis::pipe()
        .atomic()
        .cmd("HDEL")
        .arg(addr_key(service))
        .arg(instance)
        .ignore()
        .cmd("ZREM")
        .arg(load_key(service))
        .arg(instance)
        .ignore()
        .cmd("ZREM")
        .arg(seen_key(service))
        .arg(instance)
        .ignore()
        .cmd("SREM")
        .arg(drain_key(service))
        .arg(instance)
        .ignore()
        .query_async::<()>(conn)
        .await
}

/// What the balancer reads for one service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceBoard {
    /// instance → load, ascending by load
    pub load: Vec<(String, f64)>,
    /// instance → last report, ms since epoch
    pub seen: BTreeMap<String, i64>,
    /// instance → address
    pub addr: BTreeMap<String, String>,
}

type BoardReply = (
    Vec<(String, f64)>,
    Vec<(String, f64)>,
    BTreeMap<String, String>,
);

/// The balancer's read: one pipelined round trip per service.
pub async fn read_service<C: ConnectionLike>(
    conn: &mut C,
    service: &str,
) -> redis::RedisResult<ServiceBoard> {
    let (load, seen, addr): BoardReply = redis::pipe()
        .cmd("ZRANGE")
        .arg(load_key(service))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .cmd("ZRANGE")
        .arg(seen_key(service))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .cmd("HGETALL")
        .arg(addr_key(service))
        .query_async(conn)
        .await?;
    Ok(ServiceBoard {
        load,
        seen: seen.into_iter().map(|(k, v)| (k, v as i64)).collect(),
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn key_names_follow_the_contract() {
        assert_eq!(load_key("api"), "headroom:sb:{api}:load");
        assert_eq!(seen_key("api"), "headroom:sb:{api}:seen");
        assert_eq!(addr_key("api"), "headroom:sb:{api}:addr");
        assert!(valid_instance("10.0.0.1:8080"));
        assert!(!valid_instance("a b"));
        assert!(!valid_instance("x{y}"));
    }
}
