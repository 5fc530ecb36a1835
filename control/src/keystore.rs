//! The permission DB in Redis: API keys, grants, rotation overlap and the
//! change stream. Every change writes the state and appends its event in one
//! Lua script (one atomic step). Layout: docs/AUTH.md.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use serde::{Deserialize, Serialize};

pub const GEN_KEY: &str = "headroom:auth:gen";
pub const SEQ_KEY: &str = "headroom:auth:seq";
pub const LAST_ID_KEY: &str = "headroom:auth:last_id";
pub const EVENTS_KEY: &str = "headroom:auth:events";
pub const KEYS_SET: &str = "headroom:auth:keys";
pub const SERVICES_SET: &str = "headroom:auth:services";

pub fn key_hash(akid: &str) -> String {
    format!("headroom:auth:key:{akid}")
}
pub fn grants_hash(service: &str) -> String {
    format!("headroom:auth:grants:{service}")
}
pub fn instances_hash(service: &str) -> String {
    format!("headroom:auth:instances:{service}")
}

/// Default approximate stream length (`XADD … MAXLEN ~ N`).
pub const DEFAULT_STREAM_MAXLEN: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("no such access key: {0}")]
    NoSuchKey(String),
    #[error("access key already exists: {0}")]
    KeyExists(String),
    #[error("access key is revoked: {0}")]
    KeyRevoked(String),
    #[error("no grant for principal {principal} on service {service}")]
    NoSuchGrant { principal: String, service: String },
    #[error("invalid {field}: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("cannot decode permission DB data: {0}")]
    Decode(String),
    #[error("random source failed: {0}")]
    Random(String),
}

/// A key as stored (all values are strings in the Redis hash). Secrets are
/// absent once a key is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub akid: String,
    pub principal: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_expires_ms: Option<String>,
    #[serde(default)]
    pub created_ms: String,
    #[serde(default)]
    pub updated_ms: String,
}

impl KeyRecord {
    pub fn is_active(&self) -> bool {
        self.status == "active"
    }

    /// Drops the secrets (and the rotation overlap that only matters with
    /// them); `true` if there was anything to drop.
    pub fn strip_secrets(&mut self) -> bool {
        let had = self.secret.is_some() || self.prev_secret.is_some();
        self.secret = None;
        self.prev_secret = None;
        self.prev_expires_ms = None;
        had
    }
}

/// Whether a service instance may hold `principal`'s secrets: the principal
/// has a grant on the service (`grants`), or its name starts with one of
/// `identity_prefixes` (principals the service authenticates by name rather
/// than by grant, e.g. the machine-manager's `node-*`). Empty prefixes are
/// ignored (they would match everyone).
pub fn secrets_in_scope(
    grants: &BTreeMap<String, Grant>,
    identity_prefixes: &[String],
    principal: &str,
) -> bool {
    grants.contains_key(principal)
        || identity_prefixes
            .iter()
            .any(|p| !p.is_empty() && principal.starts_with(p.as_str()))
}

/// What a principal may call on one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Upper-case HTTP methods, or `*`.
    pub methods: Vec<String>,
    /// Path prefixes, segment-aware (`/a` allows `/a` and `/a/b`, not `/ab`).
    pub prefixes: Vec<String>,
}

impl Grant {
    pub fn validate(&self) -> Result<(), KeyStoreError> {
        if self.methods.is_empty() {
            return Err(KeyStoreError::Invalid {
                field: "methods",
                detail: "empty".into(),
            });
        }
        for m in &self.methods {
            if m != "*" && (m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase())) {
                return Err(KeyStoreError::Invalid {
                    field: "methods",
                    detail: format!("{m:?} is not an upper-case method or *"),
                });
            }
        }
        if self.prefixes.is_empty() {
            return Err(KeyStoreError::Invalid {
                field: "prefixes",
                detail: "empty".into(),
            });
        }
        for p in &self.prefixes {
            if !p.starts_with('/') {
                return Err(KeyStoreError::Invalid {
                    field: "prefixes",
                    detail: format!("{p:?} does not start with /"),
                });
            }
        }
        Ok(())
    }

    pub fn allows_method(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == "*" || m == method)
    }

    pub fn allows_path(&self, path: &str) -> bool {
        self.prefixes.iter().any(|p| path_has_prefix(path, p))
    }
}

/// Segment-aware prefix match.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" || path == prefix {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// A consistent read of everything one service's shims need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub service: String,
    /// Random id of this incarnation of the permission DB; empty if the DB
    /// has never been written (or was recreated empty).
    pub gen: String,
    /// Sequence number of the last change event included.
    pub seq: u64,
    /// Stream ID of that event (`0-0` if none).
    pub last_id: String,
    pub keys: Vec<KeyRecord>,
    pub grants: BTreeMap<String, Grant>,
}

impl Snapshot {
    /// Strips the secrets of every key whose principal is out of scope
    /// ([`secrets_in_scope`] with this snapshot's grants); returns how many
    /// records lost secrets. Idempotent.
    pub fn strip_out_of_scope(&mut self, identity_prefixes: &[String]) -> usize {
        let grants = &self.grants;
        self.keys
            .iter_mut()
            .filter(|r| !secrets_in_scope(grants, identity_prefixes, &r.principal))
            .map(|r| r.strip_secrets())
            .filter(|stripped| *stripped)
            .count()
    }
}

/// A change event as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub id: String,
    pub gen: String,
    pub seq: u64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Key created, rotated or revoked: the full record after the change.
    Key { record: KeyRecord },
    /// Grant set (`grant: Some`) or removed (`None`).
    Grant {
        service: String,
        principal: String,
        grant: Option<Grant>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub access_key_id: String,
    pub secret: String,
    pub principal: String,
}

/// Everything for `keys list` (no secrets).
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub gen: String,
    pub seq: u64,
    pub keys: Vec<KeyInfo>,
    /// service → principal → grant
    pub grants: BTreeMap<String, BTreeMap<String, Grant>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub access_key_id: String,
    pub principal: String,
    pub status: String,
    pub rotation_overlap_until_ms: Option<i64>,
    pub created_ms: String,
    pub updated_ms: String,
}

// ------------------------------------------------------------------ Lua

const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function record(k)
  local f = redis.call('HGETALL', k)
  local t = {}
  for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
  return t
end
local function emit(kind, payload)
  local gen = redis.call('GET', 'headroom:auth:gen')
  if not gen then
    gen = ARGV[1]
    redis.call('SET', 'headroom:auth:gen', gen)
  end
  local seq = redis.call('INCR', 'headroom:auth:seq')
  local id = redis.call('XADD', 'headroom:auth:events', 'MAXLEN', '~', ARGV[2], '*',
    'gen', gen, 'seq', seq, 'kind', kind, 'data', payload)
  redis.call('SET', 'headroom:auth:last_id', id)
  return id
end
local function key_event(k)
  return emit('key', cjson.encode({kind = 'key', record = record(k)}))
end
"#;

const CREATE: &str = r#"
local akid, principal, secret = ARGV[3], ARGV[4], ARGV[5]
local k = 'headroom:auth:key:' .. akid
if redis.call('EXISTS', k) == 1 then return 'exists' end
local now = now_ms()
redis.call('HSET', k, 'akid', akid, 'principal', principal, 'status', 'active',
  'secret', secret, 'secret_id', '1', 'created_ms', now, 'updated_ms', now)
redis.call('SADD', 'headroom:auth:keys', akid)
key_event(k)
return 'ok'
"#;

const ROTATE: &str = r#"
local akid, secret, overlap = ARGV[3], ARGV[4], tonumber(ARGV[5])
local k = 'headroom:auth:key:' .. akid
if redis.call('EXISTS', k) == 0 then return 'nokey' end
if redis.call('HGET', k, 'status') ~= 'active' then return 'revoked' end
local now = now_ms()
local old = redis.call('HGET', k, 'secret')
if overlap > 0 then
  redis.call('HSET', k, 'prev_secret', old, 'prev_expires_ms', now + overlap)
else
  redis.call('HDEL', k, 'prev_secret', 'prev_expires_ms')
end
redis.call('HSET', k, 'secret', secret, 'updated_ms', now)
redis.call('HINCRBY', k, 'secret_id', 1)
key_event(k)
return 'ok'
"#;

const REVOKE: &str = r#"
local akid = ARGV[3]
local k = 'headroom:auth:key:' .. akid
if redis.call('EXISTS', k) == 0 then return 'nokey' end
if redis.call('HGET', k, 'status') ~= 'active' then return 'revoked' end
redis.call('HSET', k, 'status', 'revoked', 'updated_ms', now_ms())
redis.call('HDEL', k, 'secret', 'prev_secret', 'prev_expires_ms')
key_event(k)
return 'ok'
"#;

const GRANT: &str = r#"
local service, principal, grant, payload = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
redis.call('HSET', 'headroom:auth:grants:' .. service, principal, grant)
redis.call('SADD', 'headroom:auth:services', service)
emit('grant', payload)
return 'ok'
"#;

const UNGRANT: &str = r#"
local service, principal, payload = ARGV[3], ARGV[4], ARGV[5]
if redis.call('HDEL', 'headroom:auth:grants:' .. service, principal) == 0 then return 'nogrant' end
emit('grant', payload)
return 'ok'
"#;

// ARGV[1] = service, ARGV[2..] = identity principal prefixes. Secrets leave
// Redis only for principals granted on the service (or matching a prefix);
// every other key comes without them, so the instance can still tell
// "unknown" from "not granted here" from "revoked".
const SNAPSHOT: &str = r#"
local gen = redis.call('GET', 'headroom:auth:gen') or ''
local seq = redis.call('GET', 'headroom:auth:seq') or '0'
local last = redis.call('GET', 'headroom:auth:last_id') or '0-0'
local grants = redis.call('HGETALL', 'headroom:auth:grants:' .. ARGV[1])
local granted = {}
for i = 1, #grants, 2 do granted[grants[i]] = true end
local function in_scope(p)
  if p == nil then return false end
  if granted[p] then return true end
  for i = 2, #ARGV do
    local pre = ARGV[i]
    if pre ~= '' and string.sub(p, 1, #pre) == pre then return true end
  end
  return false
end
local keys = {}
for _, akid in ipairs(redis.call('SMEMBERS', 'headroom:auth:keys')) do
  local r = record('headroom:auth:key:' .. akid)
  if not in_scope(r.principal) then
    r.secret = nil
    r.prev_secret = nil
    r.prev_expires_ms = nil
  end
  keys[#keys + 1] = cjson.encode(r)
end
return {gen, seq, last, keys, grants}
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}\n{body}"))
}

// ------------------------------------------------------------------ helpers

pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyStoreError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| KeyStoreError::Random(e.to_string()))?;
    Ok(b)
}

fn random_string(len: usize, alphabet: &[u8]) -> Result<String, KeyStoreError> {
    // alphabet length divides 256 (32 or 64): no modulo bias.
    let mut out = String::with_capacity(len);
    for b in random_bytes::<64>()?.iter().take(len) {
        out.push(alphabet[(*b as usize) % alphabet.len()] as char);
    }
    Ok(out)
}

/// `HRK` + 17 base32 characters (20 characters, like AWS access key ids).
pub fn new_access_key_id() -> Result<String, KeyStoreError> {
    Ok(format!(
        "HRK{}",
        random_string(17, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")?
    ))
}

/// 40 characters from a 64-character alphabet (240 bits).
pub fn new_secret() -> Result<String, KeyStoreError> {
    random_string(
        40,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    )
}

pub fn new_generation() -> Result<String, KeyStoreError> {
    Ok(hex::encode(random_bytes::<16>()?))
}

/// Names of services and principals: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_name(field: &'static str, s: &str) -> Result<(), KeyStoreError> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(KeyStoreError::Invalid {
            field,
            detail: format!("{s:?} must match [A-Za-z0-9._-]{{1,64}}"),
        })
    }
}

/// Connect with bounded connect and response times (a dead Redis must not
/// hang a caller).
pub async fn connect(
    url: &str,
    response_timeout: Duration,
) -> Result<MultiplexedConnection, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

// ------------------------------------------------------------------ store

/// Administrative access to the permission DB (`headroom keys …`).
pub struct KeyStore {
    conn: MultiplexedConnection,
    stream_maxlen: usize,
}

impl KeyStore {
    pub async fn connect(url: &str) -> Result<Self, KeyStoreError> {
        Ok(KeyStore {
            conn: connect(url, Duration::from_secs(5)).await?,
            stream_maxlen: DEFAULT_STREAM_MAXLEN,
        })
    }

    pub fn with_stream_maxlen(mut self, n: usize) -> Self {
        self.stream_maxlen = n.max(1);
        self
    }

    async fn run(&mut self, body: &str, args: &[&str]) -> Result<String, KeyStoreError> {
        let gen = new_generation()?;
        let s = script(body);
        let mut inv = s.prepare_invoke();
        inv.arg(&gen).arg(self.stream_maxlen);
        for a in args {
            inv.arg(*a);
        }
        Ok(inv.invoke_async(&mut self.conn).await?)
    }

    pub async fn create_key(&mut self, principal: &str) -> Result<NewKey, KeyStoreError> {
        check_name("principal", principal)?;
        let akid = new_access_key_id()?;
        let secret = new_secret()?;
        match self
            .run(CREATE, &[&akid, principal, &secret])
            .await?
            .as_str()
        {
            "ok" => Ok(NewKey {
                access_key_id: akid,
                secret,
                principal: principal.to_string(),
            }),
            _ => Err(KeyStoreError::KeyExists(akid)),
        }
    }

    /// New secret; the old one stays valid for `overlap` (zero: not at all).
    pub async fn rotate_key(
        &mut self,
        akid: &str,
        overlap: Duration,
    ) -> Result<NewKey, KeyStoreError> {
        let secret = new_secret()?;
        let ms = overlap.as_millis().to_string();
        match self.run(ROTATE, &[akid, &secret, &ms]).await?.as_str() {
            "ok" => {
                let principal: String = redis::cmd("HGET")
                    .arg(key_hash(akid))
                    .arg("principal")
                    .query_async(&mut self.conn)
                    .await?;
                Ok(NewKey {
                    access_key_id: akid.to_string(),
                    secret,
                    principal,
                })
            }
            "revoked" => Err(KeyStoreError::KeyRevoked(akid.to_string())),
            _ => Err(KeyStoreError::NoSuchKey(akid.to_string())),
        }
    }

    pub async fn revoke_key(&mut self, akid: &str) -> Result<(), KeyStoreError> {
        match self.run(REVOKE, &[akid]).await?.as_str() {
            "ok" => Ok(()),
            "revoked" => Err(KeyStoreError::KeyRevoked(akid.to_string())),
            _ => Err(KeyStoreError::NoSuchKey(akid.to_string())),
        }
    }

    pub async fn set_grant(
        &mut self,
        service: &str,
        principal: &str,
        grant: &Grant,
    ) -> Result<(), KeyStoreError> {
        check_name("service", service)?;
        check_name("principal", principal)?;
        grant.validate()?;
        let g = serde_json::to_string(grant).map_err(|e| KeyStoreError::Decode(e.to_string()))?;
        let payload = serde_json::to_string(&Change::Grant {
            service: service.into(),
            principal: principal.into(),
            grant: Some(grant.clone()),
        })
        .map_err(|e| KeyStoreError::Decode(e.to_string()))?;
        self.run(GRANT, &[service, principal, &g, &payload]).await?;
        Ok(())
    }

    pub async fn remove_grant(
        &mut self,
        service: &str,
        principal: &str,
    ) -> Result<(), KeyStoreError> {
        let payload = serde_json::to_string(&Change::Grant {
            service: service.into(),
            principal: principal.into(),
            grant: None,
        })
        .map_err(|e| KeyStoreError::Decode(e.to_string()))?;
        match self
            .run(UNGRANT, &[service, principal, &payload])
            .await?
            .as_str()
        {
            "ok" => Ok(()),
            _ => Err(KeyStoreError::NoSuchGrant {
                principal: principal.into(),
                service: service.into(),
            }),
        }
    }

    pub async fn list(&mut self) -> Result<Listing, KeyStoreError> {
        let gen: Option<String> = redis::cmd("GET")
            .arg(GEN_KEY)
            .query_async(&mut self.conn)
            .await?;
        let seq: Option<u64> = redis::cmd("GET")
            .arg(SEQ_KEY)
            .query_async(&mut self.conn)
            .await?;
        let mut akids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(KEYS_SET)
            .query_async(&mut self.conn)
            .await?;
        akids.sort();
        let mut keys = Vec::new();
        for akid in akids {
            let m: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(key_hash(&akid))
                .query_async(&mut self.conn)
                .await?;
            let get = |f: &str| m.get(f).cloned().unwrap_or_default();
            keys.push(KeyInfo {
                access_key_id: akid.clone(),
                principal: get("principal"),
                status: get("status"),
                rotation_overlap_until_ms: m.get("prev_expires_ms").and_then(|v| v.parse().ok()),
                created_ms: get("created_ms"),
                updated_ms: get("updated_ms"),
            });
        }
        let mut services: Vec<String> = redis::cmd("SMEMBERS")
            .arg(SERVICES_SET)
            .query_async(&mut self.conn)
            .await?;
        services.sort();
        let mut grants = BTreeMap::new();
        for s in services {
            let m: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(grants_hash(&s))
                .query_async(&mut self.conn)
                .await?;
            let mut per = BTreeMap::new();
            for (p, g) in m {
                let g: Grant =
                    serde_json::from_str(&g).map_err(|e| KeyStoreError::Decode(e.to_string()))?;
                per.insert(p, g);
            }
            if !per.is_empty() {
                grants.insert(s, per);
            }
        }
        Ok(Listing {
            gen: gen.unwrap_or_default(),
            seq: seq.unwrap_or(0),
            keys,
            grants,
        })
    }
}

/// One atomic read (a Lua script) of the keys and of `service`'s grants,
/// with the stream position they correspond to. Only keys of principals
/// granted on `service` carry secrets.
pub async fn read_snapshot(
    conn: &mut MultiplexedConnection,
    service: &str,
) -> Result<Snapshot, KeyStoreError> {
    read_snapshot_scoped(conn, service, &[]).await
}

/// [`read_snapshot`], also with the secrets of principals whose name starts
/// with one of `identity_prefixes` (see [`secrets_in_scope`]).
pub async fn read_snapshot_scoped(
    conn: &mut MultiplexedConnection,
    service: &str,
    identity_prefixes: &[String],
) -> Result<Snapshot, KeyStoreError> {
    let s = script(SNAPSHOT);
    let mut inv = s.prepare_invoke();
    inv.arg(service);
    for p in identity_prefixes.iter().filter(|p| !p.is_empty()) {
        inv.arg(p.as_str());
    }
    let (gen, seq, last_id, keys, grants): (String, String, String, Vec<String>, Vec<String>) =
        inv.invoke_async(conn).await?;
    let seq = seq
        .parse::<u64>()
        .map_err(|e| KeyStoreError::Decode(format!("seq: {e}")))?;
    let mut recs = Vec::with_capacity(keys.len());
    for k in keys {
        recs.push(
            serde_json::from_str::<KeyRecord>(&k)
                .map_err(|e| KeyStoreError::Decode(format!("key: {e}")))?,
        );
    }
    let mut g = BTreeMap::new();
    for pair in grants.chunks(2) {
        if let [p, v] = pair {
            g.insert(
                p.clone(),
                serde_json::from_str::<Grant>(v)
                    .map_err(|e| KeyStoreError::Decode(format!("grant: {e}")))?,
            );
        }
    }
    Ok(Snapshot {
        service: service.to_string(),
        gen,
        seq,
        last_id,
        keys: recs,
        grants: g,
    })
}

/// Parse one stream entry into a change event.
pub fn parse_event(entry: &redis::streams::StreamId) -> Result<ChangeEvent, KeyStoreError> {
    let field = |name: &str| -> Result<String, KeyStoreError> {
        entry
            .get::<String>(name)
            .ok_or_else(|| KeyStoreError::Decode(format!("event {} has no {name}", entry.id)))
    };
    let seq = field("seq")?
        .parse::<u64>()
        .map_err(|e| KeyStoreError::Decode(format!("event seq: {e}")))?;
    let change: Change = serde_json::from_str(&field("data")?)
        .map_err(|e| KeyStoreError::Decode(format!("event data: {e}")))?;
    Ok(ChangeEvent {
        id: entry.id.clone(),
        gen: field("gen")?,
        seq,
        change,
    })
}

/// Instance registration in the permission DB (paper §4.2: the observer
/// registry) — `headroom:auth:instances:{service}` instance → JSON.
pub async fn register_instance(
    conn: &mut MultiplexedConnection,
    service: &str,
    instance: &str,
    info_json: &str,
) -> Result<(), KeyStoreError> {
    redis::cmd("HSET")
        .arg(instances_hash(service))
        .arg(instance)
        .arg(info_json)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

pub async fn unregister_instance(
    conn: &mut MultiplexedConnection,
    service: &str,
    instance: &str,
) -> Result<(), KeyStoreError> {
    redis::cmd("HDEL")
        .arg(instances_hash(service))
        .arg(instance)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_segment_aware() {
        assert!(path_has_prefix("/a", "/a"));
        assert!(path_has_prefix("/a/b", "/a"));
        assert!(path_has_prefix("/a/b", "/a/"));
        assert!(!path_has_prefix("/ab", "/a"));
        assert!(path_has_prefix("/anything", "/"));
        assert!(!path_has_prefix("/b", "/a"));
    }

    #[test]
    fn ids_and_secrets_have_the_documented_shape() {
        let a = new_access_key_id().unwrap();
        assert_eq!(a.len(), 20);
        assert!(a.starts_with("HRK"));
        let s = new_secret().unwrap();
        assert_eq!(s.len(), 40);
        assert_ne!(s, new_secret().unwrap());
    }

    #[test]
    fn grant_validation() {
        let g = Grant {
            methods: vec!["GET".into()],
            prefixes: vec!["/x".into()],
        };
        assert!(g.validate().is_ok());
        assert!(Grant {
            methods: vec!["get".into()],
            prefixes: vec!["/".into()]
        }
        .validate()
        .is_err());
        assert!(Grant {
            methods: vec!["*".into()],
            prefixes: vec!["x".into()]
        }
        .validate()
        .is_err());
        assert!(g.allows_method("GET") && !g.allows_method("POST"));
    }
}
