//! Mirror of the agent's instance table in Redis, so the container-manager
//! sees starts, exits and stops: hash `headroom:agent:{node}:instances`,
//! field = instance id, value = the instance's JSON record.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use super::supervise::Supervisor;

/// Redis hash of one node's instances.
pub fn instances_key(node: &str) -> String {
    format!("headroom:agent:{node}:instances")
}

async fn write_all(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    sup: &Supervisor,
) -> Result<(), redis::RedisError> {
    let recs = sup.list();
    let mut p = redis::pipe();
    p.atomic().del(key);
    let fields: Vec<(String, String)> = recs
        .iter()
        .filter_map(|r| {
            serde_json::to_string(r)
                .ok()
                .map(|j| (r.instance_id.clone(), j))
        })
        .collect();
    if !fields.is_empty() {
        p.hset_multiple(key, &fields);
    }
    p.query_async::<()>(conn).await
}

/// Write the table after every change (and every 10 s, to heal a lost
/// write) until `stop` turns true.
pub async fn run(
    redis_url: String,
    node: String,
    sup: Arc<Supervisor>,
    mut stop: watch::Receiver<bool>,
) {
    let key = instances_key(&node);
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut failing = false;
    loop {
        // Register for the next change before writing, so none is missed.
        let changed = sup.changed.clone();
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if conn.is_none() {
            conn = crate::keystore::connect(&redis_url, Duration::from_secs(2))
                .await
                .ok();
        }
        let ok = match conn.as_mut() {
            Some(c) => write_all(c, &key, &sup).await.is_ok(),
            None => false,
        };
        if !ok {
            conn = None;
            if !failing {
                warn!(key, "cannot write the instance table to redis; retrying");
            }
        }
        failing = !ok;
        let wait = if ok {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = &mut notified => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
