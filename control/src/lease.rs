//! A leader lease in Redis with a fencing token, for managers that may run
//! twice (paper §3.1 managers; issue 5 "can safely run twice").
//!
//! - Acquire: one Lua step `INCR {prefix}:fence` and `SET {prefix}:lease
//!   "<holder>#<token>" NX PX ttl`; the token is handed to the holder.
//! - Renew / release: compare-and-set on the exact value (`PEXPIRE` / `DEL`
//!   only if it still holds our `<holder>#<token>`).
//! - Fencing: every state-changing write of a holder goes through
//!   [`Fence::exec`], a Lua script that first checks `{prefix}:fence` and
//!   refuses unless it still equals the holder's token. A paused old leader
//!   whose lease expired and was taken over therefore cannot write any more,
//!   also when Redis lost its data and the counter started again.
//!
//! [`LeaseKeeper`] runs the acquire/renew loop and publishes the current
//! role; a holder counts itself leader only until its last successful
//! renewal plus 80 % of the TTL, so it steps down before Redis expires the
//! key even when Redis is unreachable.

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tracing::{info, warn};

/// Errors of lease operations and fenced writes.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Redis could not be reached or answered an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The fencing counter moved past this holder's token (or was lost with
    /// Redis's data): this holder has been superseded.
    #[error("fenced: token {token} is not the current token {current}")]
    Fenced {
        /// The token the write carried.
        token: u64,
        /// The newest token issued.
        current: u64,
    },
    /// A Redis reply that does not have the expected shape.
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
}

/// Names of the two Redis keys of one lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseKeys {
    /// The lease itself: `<holder>#<token>` with a TTL.
    pub lease: String,
    /// The fencing counter (`INCR` on every acquisition, never expires).
    pub fence: String,
}

impl LeaseKeys {
    /// `{prefix}:lease` and `{prefix}:fence`.
    pub fn new(prefix: &str) -> Self {
        LeaseKeys {
            lease: format!("{prefix}:lease"),
            fence: format!("{prefix}:fence"),
        }
    }
}

const ACQUIRE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '#' .. t, 'NX', 'PX', ARGV[2])
return {1, tostring(t)}
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

// ARGV[1] = token, then for each command: argc, args... Commands run only
// if the counter still equals the token (each acquisition increments it, so
// equality means no one acquired since; `>` alone would let an old token
// through after Redis lost the counter and restarted it below); all in one
// atomic step.
const FENCED_EXEC: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok = tonumber(ARGV[1])
if cur ~= tok then return {0, tostring(cur)} end
local i = 2
local out = {}
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local cmd = {}
  for j = 1, n do cmd[j] = ARGV[i + j] end
  out[#out + 1] = redis.call(unpack(cmd))
  i = i + n + 1
end
return {1, out}
"#;

/// Connects a self-reconnecting connection with bounded connect and
/// response times (a dead Redis must not hang a manager).
pub async fn connect(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1);
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_connection_manager_with_config(cfg),
    )
    .await
    .map_err(|_| redis::RedisError::from(std::io::Error::other("redis connect timeout")))?
}

/// The outcome of one acquisition attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// We hold the lease with this fencing token.
    Leader(Fence),
    /// Someone else holds it; their `<holder>#<token>` value.
    Held(String),
}

/// The right to write: the fence key and the token of our acquisition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The fencing counter key.
    pub key: String,
    /// Our token.
    pub token: u64,
}

impl Fence {
    /// Runs `cmds` (each a full Redis command, e.g. `["HSET", k, f, v]`)
    /// atomically, only if the fencing counter still holds our token. Returns each
    /// command's reply. Keys are passed as arguments, so this is for a
    /// single (non-cluster) Redis, which is what Headroom uses.
    pub async fn exec<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        cmds: &[Vec<String>],
    ) -> Result<Vec<redis::Value>, LeaseError> {
        let script = redis::Script::new(FENCED_EXEC);
        let mut inv = script.key(&self.key);
        inv.arg(self.token);
        for c in cmds {
            inv.arg(c.len());
            for a in c {
                inv.arg(a);
            }
        }
        let v: redis::Value = inv.invoke_async(conn).await?;
        match v {
            redis::Value::Array(items) if items.len() == 2 => {
                let ok: i64 = redis::from_redis_value_ref(&items[0])
                    .map_err(|e| LeaseError::Reply(e.to_string()))?;
                if ok == 1 {
                    match &items[1] {
                        redis::Value::Array(out) => Ok(out.clone()),
                        redis::Value::Nil => Ok(Vec::new()),
                        other => Ok(vec![other.clone()]),
                    }
                } else {
                    let cur: String = redis::from_redis_value_ref(&items[1])
                        .map_err(|e| LeaseError::Reply(e.to_string()))?;
                    Err(LeaseError::Fenced {
                        token: self.token,
                        current: cur.parse().unwrap_or(u64::MAX),
                    })
                }
            }
            other => Err(LeaseError::Reply(format!("{other:?}"))),
        }
    }
}

/// Builds one command for [`Fence::exec`] from anything printable.
#[macro_export]
macro_rules! cmd_args {
    ($($a:expr),+ $(,)?) => { vec![$($a.to_string()),+] };
}

/// One contender for a lease: its identity, keys and TTL.
#[derive(Clone, Debug)]
pub struct Lease {
    /// Keys in Redis.
    pub keys: LeaseKeys,
    /// This contender's id (shown to followers as the leader's id).
    pub holder: String,
    /// Lease time-to-live.
    pub ttl: Duration,
}

impl Lease {
    /// A contender named `holder` for the lease under `prefix`.
    pub fn new(prefix: &str, holder: &str, ttl: Duration) -> Self {
        Lease {
            keys: LeaseKeys::new(prefix),
            holder: holder.to_string(),
            ttl,
        }
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis().clamp(1, u64::MAX as u128) as u64
    }

    /// The value stored in the lease key while we hold it with `token`.
    pub fn value(&self, token: u64) -> String {
        format!("{}#{token}", self.holder)
    }

    /// One `SET NX PX` attempt; a new fencing token on success.
    pub async fn try_acquire<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> Result<Acquired, LeaseError> {
        let (ok, v): (i64, String) = redis::Script::new(ACQUIRE)
            .key(&self.keys.lease)
            .key(&self.keys.fence)
            .arg(&self.holder)
            .arg(self.ttl_ms())
            .invoke_async(conn)
            .await?;
        if ok == 1 {
            let token = v
                .parse::<u64>()
                .map_err(|e| LeaseError::Reply(format!("token {v:?}: {e}")))?;
            Ok(Acquired::Leader(Fence {
                key: self.keys.fence.clone(),
                token,
            }))
        } else {
            Ok(Acquired::Held(v))
        }
    }

    /// Extends the lease by the TTL if we still hold it with `token`.
    pub async fn renew<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        token: u64,
    ) -> Result<bool, LeaseError> {
        let n: i64 = redis::Script::new(RENEW)
            .key(&self.keys.lease)
            .arg(self.value(token))
            .arg(self.ttl_ms())
            .invoke_async(conn)
            .await?;
        Ok(n == 1)
    }

    /// Gives the lease up if we still hold it with `token`.
    pub async fn release<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        token: u64,
    ) -> Result<bool, LeaseError> {
        let n: i64 = redis::Script::new(RELEASE)
            .key(&self.keys.lease)
            .arg(self.value(token))
            .invoke_async(conn)
            .await?;
        Ok(n == 1)
    }

    /// The current holder's `<holder>#<token>`, if any.
    pub async fn current<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> Result<Option<String>, LeaseError> {
        Ok(redis::cmd("GET")
            .arg(&self.keys.lease)
            .query_async(conn)
            .await?)
    }
}

/// This process's role, as published by [`LeaseKeeper`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// We lead, with this fence, until the instant (local clock) after
    /// which we must consider the lease lost unless renewed.
    Leader {
        /// Our write token.
        fence: Fence,
        /// Local deadline of our leadership.
        until: Instant,
    },
    /// Someone else leads (their `<holder>#<token>`), or nobody is known.
    Follower {
        /// The lease value seen, if any.
        leader: Option<String>,
    },
}

impl Role {
    /// Our fence if we lead and our local deadline has not passed.
    pub fn fence(&self) -> Option<&Fence> {
        match self {
            Role::Leader { fence, until } if Instant::now() < *until => Some(fence),
            _ => None,
        }
    }
}

/// Runs the acquire/renew loop in a task and publishes the [`Role`].
pub struct LeaseKeeper {
    role: watch::Receiver<Role>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts contending for `lease` on `conn`; tries every TTL/3.
    pub fn start(lease: Lease, conn: ConnectionManager) -> LeaseKeeper {
        let (tx, role) = watch::channel(Role::Follower { leader: None });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(keep(lease, conn, tx, stop_rx));
        LeaseKeeper { role, stop, task }
    }

    /// The current role (check [`Role::fence`] before acting).
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// A receiver that sees every role change.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Stops contending and releases the lease if held.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops the loop without releasing (as if the process died).
    pub fn abort(self) {
        self.task.abort();
    }
}

async fn keep(
    lease: Lease,
    mut conn: ConnectionManager,
    tx: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) {
    let period = (lease.ttl / 3).max(Duration::from_millis(10));
    // Step down at 80 % of the TTL after the last confirmed write, so a
    // slow or lost renewal never leaves two leaders acting.
    let valid_for = lease.ttl.mul_f64(0.8);
    let mut held: Option<u64> = None;
    loop {
        let started = Instant::now();
        match held {
            Some(token) => match lease.renew(&mut conn, token).await {
                Ok(true) => {
                    let _ = tx.send(Role::Leader {
                        fence: Fence {
                            key: lease.keys.fence.clone(),
                            token,
                        },
                        until: started + valid_for,
                    });
                }
                Ok(false) => {
                    warn!(holder = %lease.holder, token, "lease lost");
                    held = None;
                    let leader = lease.current(&mut conn).await.ok().flatten();
                    let _ = tx.send(Role::Follower { leader });
                }
                Err(e) => {
                    // Keep the token: the renewal may succeed before the
                    // deadline; `Role::fence` stops us acting after it.
                    warn!(error = %e, "lease renewal failed");
                    let past = matches!(&*tx.borrow(), Role::Leader { until, .. } if Instant::now() >= *until);
                    if past {
                        held = None;
                        let _ = tx.send(Role::Follower { leader: None });
                    }
                }
            },
            None => match lease.try_acquire(&mut conn).await {
                Ok(Acquired::Leader(fence)) => {
                    info!(holder = %lease.holder, token = fence.token, "lease acquired");
                    held = Some(fence.token);
                    let _ = tx.send(Role::Leader {
                        fence,
                        until: started + valid_for,
                    });
                }
                Ok(Acquired::Held(v)) => {
                    tx.send_if_modified(|r| {
                        let new = Role::Follower {
                            leader: Some(v.clone()),
                        };
                        if *r != new {
                            *r = new;
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "lease acquisition failed");
                    let _ = tx.send(Role::Follower { leader: None });
                }
            },
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(period) => {}
        }
    }
    if let Some(token) = held {
        let _ = lease.release(&mut conn, token).await;
        info!(holder = %lease.holder, token, "lease released");
    }
    let _ = tx.send(Role::Follower { leader: None });
}
