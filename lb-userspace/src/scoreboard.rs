//! The balancer's side of the scoreboard contract (docs/SCOREBOARD.md): one
//! read of every key the contract defines, for any number of services, in
//! ONE pipelined round trip, turned into validated, typed snapshots.
//!
//! Key names come from `headroom_control::scoreboard` (the writer side), so
//! writer and reader cannot drift. Per service the pipeline holds, in this
//! order (no `MULTI`: a read needs no transaction):
//!
//! ```text
//! ZRANGE headroom:sb:{S}:load 0 -1 WITHSCORES
//! ZRANGE headroom:sb:{S}:seen 0 -1 WITHSCORES
//! HGETALL headroom:sb:{S}:addr
//! SMEMBERS headroom:sb:{S}:drain
//! ```
//!
//! **Validation.** Every entry is checked on its own; a bad entry is skipped
//! and recorded in [`ServiceSnapshot::skipped`] (never a panic, never a failed
//! read):
//!
//! - a member / field that is not a valid instance id (contract regex, UTF-8);
//! - a load that is not a finite number in `0..=100`;
//! - a last-report time that is not a finite number `>= 0` (fractional
//!   milliseconds are truncated);
//! - an address that is not `ip:port` (port != 0, ip not unspecified),
//!   optionally followed by exactly `;node=NAME` (NAME non-empty, printable
//!   ASCII, no `;`).
//!
//! A key of the wrong Redis type (`WRONGTYPE`), or a reply of an unexpected
//! shape, makes that one service [`Malformed`]; the other services of the
//! read are unaffected. Both RESP2 and RESP3 reply shapes are accepted.
//!
//! **Errors.** [`ScoreboardError`] separates the outage classes (Redis
//! unreachable, timeout, server refusing) from bad input (invalid service
//! name, URL). Malformed *data* never fails a whole read: it is per service
//! ([`Malformed`]) or per entry ([`Skipped`]).
//!
//! **Connection.** [`ScoreboardReader`] owns one multiplexed connection,
//! opened lazily. Every [`ScoreboardReader::read`] is bounded by
//! [`ReaderOptions::timeout`] (connect included). After a failure the
//! connection is dropped and reconnection waits an exponential backoff
//! (`backoff_min`, doubling, capped at `backoff_max`); during the backoff a
//! read fails at once with [`ScoreboardError::Unreachable`] without touching
//! the network. The first successful read resets the backoff.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    time::{Duration, Instant},
};

use headroom_control::scoreboard::{
    addr_key, drain_key, load_key, seen_key, valid_instance, valid_service, SERVICES_SET,
};
use redis::{
    aio::{ConnectionLike, MultiplexedConnection},
    AsyncConnectionConfig, Value,
};

/// Commands per service in the pipeline (ZRANGE load, ZRANGE seen, HGETALL
/// addr, SMEMBERS drain).
pub const COMMANDS_PER_SERVICE: usize = 4;

/// Instance ids in [`Skipped`] are cut to this many characters.
const MAX_SHOWN: usize = 160;

// ------------------------------------------------------------------ types

/// A backend address from `:addr`: `ip:port[;node=NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    /// Where the balancer sends the instance's flows.
    pub socket: SocketAddr,
    /// The node (host) the instance runs on, if the writer said.
    pub node: Option<String>,
}

impl Address {
    /// Parses `ip:port` or `ip:port;node=NAME` (IPv6 as `[addr]:port`).
    pub fn parse(s: &str) -> Result<Address, String> {
        let (sock, rest) = match s.split_once(';') {
            Some((a, r)) => (a, Some(r)),
            None => (s, None),
        };
        let socket: SocketAddr = sock
            .parse()
            .map_err(|_| format!("{sock:?} is not ip:port"))?;
        if socket.port() == 0 {
            return Err("port 0".into());
        }
        if socket.ip().is_unspecified() {
            return Err(format!("unspecified address {}", socket.ip()));
        }
        let node = match rest {
            None => None,
            Some(r) => {
                let name = r
                    .strip_prefix("node=")
                    .ok_or_else(|| format!("unknown suffix {r:?} (only ;node=NAME)"))?;
                if name.is_empty()
                    || name.len() > 255
                    || !name.bytes().all(|b| b.is_ascii_graphic() && b != b';')
                {
                    return Err(format!("invalid node name {name:?}"));
                }
                Some(name.to_string())
            }
        };
        Ok(Address { socket, node })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(n) => write!(f, "{};node={n}", self.socket),
            None => write!(f, "{}", self.socket),
        }
    }
}

/// What the scoreboard holds for one instance. Any piece may be missing
/// (never written, or skipped as malformed; see [`ServiceSnapshot::skipped`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceEntry {
    /// Load, `0.0..=100.0`, from `:load`.
    pub load: Option<f64>,
    /// Last report, ms since the Unix epoch (reporter's clock), from `:seen`.
    pub seen_ms: Option<i64>,
    /// Address, from `:addr`.
    pub addr: Option<Address>,
    /// Marked for draining in `:drain` (scale-in): no new flows.
    pub drain: bool,
}

impl InstanceEntry {
    /// Which pieces are missing.
    pub fn missing(&self) -> Missing {
        Missing {
            load: self.load.is_none(),
            seen: self.seen_ms.is_none(),
            addr: self.addr.is_none(),
        }
    }

    /// `now_ms - seen_ms` (negative if the reporter's clock is ahead).
    pub fn age_ms(&self, now_ms: i64) -> Option<i64> {
        self.seen_ms.map(|s| now_ms.saturating_sub(s))
    }
}

/// The missing pieces of an instance (true = missing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Missing {
    /// No (valid) entry in `:load`, e.g. registered but never reported.
    pub load: bool,
    /// No (valid) entry in `:seen`.
    pub seen: bool,
    /// No (valid) entry in `:addr`: not a backend candidate.
    pub addr: bool,
}

impl Missing {
    /// Nothing missing.
    pub fn is_none(&self) -> bool {
        !(self.load || self.seen || self.addr)
    }
}

/// Which key of a service an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Piece {
    /// `headroom:sb:{S}:load`
    Load,
    /// `headroom:sb:{S}:seen`
    Seen,
    /// `headroom:sb:{S}:addr`
    Addr,
    /// `headroom:sb:{S}:drain`
    Drain,
}

impl fmt::Display for Piece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Piece::Load => "load",
            Piece::Seen => "seen",
            Piece::Addr => "addr",
            Piece::Drain => "drain",
        })
    }
}

/// Why an entry was skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum SkipReason {
    /// The member / field is not a valid instance id (or not UTF-8).
    InvalidInstance,
    /// The score is not a number.
    NotANumber(String),
    /// The load is not a finite number in `0..=100`.
    LoadOutOfRange(f64),
    /// The time is not a finite number `>= 0` that fits in `i64`.
    InvalidTime(f64),
    /// The address does not parse (the reason says why).
    InvalidAddress(String),
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::InvalidInstance => f.write_str("invalid instance id"),
            SkipReason::NotANumber(s) => write!(f, "{s:?} is not a number"),
            SkipReason::LoadOutOfRange(v) => write!(f, "load {v} outside 0..=100"),
            SkipReason::InvalidTime(v) => write!(f, "time {v} is not ms since the epoch"),
            SkipReason::InvalidAddress(s) => write!(f, "invalid address: {s}"),
        }
    }
}

/// One skipped (malformed) entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The key it came from.
    pub piece: Piece,
    /// The member / field, lossily decoded and cut to 160 characters.
    pub instance: String,
    /// Why.
    pub reason: SkipReason,
}

/// Everything the scoreboard holds for one service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceSnapshot {
    /// The service name.
    pub service: String,
    /// Every instance id that has at least one valid piece, in id order.
    pub instances: BTreeMap<String, InstanceEntry>,
    /// The entries skipped as malformed, in key order (load, seen, addr, drain).
    pub skipped: Vec<Skipped>,
}

impl ServiceSnapshot {
    /// Number of skipped entries.
    pub fn skipped_count(&self) -> usize {
        self.skipped.len()
    }

    /// Instances with all three pieces.
    pub fn complete(&self) -> impl Iterator<Item = (&String, &InstanceEntry)> {
        self.instances.iter().filter(|(_, e)| e.missing().is_none())
    }
}

/// A whole key of a service could not be used (wrong Redis type, reply of
/// an unexpected shape). The service's snapshot is unusable for this read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed scoreboard key {key}: {detail}")]
pub struct Malformed {
    /// The Redis key.
    pub key: String,
    /// What was wrong.
    pub detail: String,
}

/// One read: every requested service, in name order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// service → its snapshot, or why that service's data is unusable.
    pub services: BTreeMap<String, Result<ServiceSnapshot, Malformed>>,
}

impl Snapshot {
    /// The snapshot of `service`, if it was read and is well formed.
    pub fn service(&self, service: &str) -> Option<&ServiceSnapshot> {
        self.services.get(service).and_then(|r| r.as_ref().ok())
    }

    /// Skipped entries over all services.
    pub fn skipped_count(&self) -> usize {
        self.services
            .values()
            .filter_map(|r| r.as_ref().ok())
            .map(ServiceSnapshot::skipped_count)
            .sum()
    }

    /// Number of services whose data is [`Malformed`].
    pub fn malformed_count(&self) -> usize {
        self.services.values().filter(|r| r.is_err()).count()
    }
}

/// Why a read failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScoreboardError {
    /// A service name does not match `[A-Za-z0-9._-]{1,64}` (nothing was sent).
    #[error("invalid service name {0:?}")]
    InvalidService(String),
    /// The Redis URL does not parse.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// Redis cannot be reached: connection refused or dropped, I/O error,
    /// or a reconnect backoff is running after such a failure.
    #[error("Redis unreachable: {0}")]
    Unreachable(String),
    /// No complete answer within the read timeout (connect included).
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error that is not about the data (`NOAUTH`,
    /// `NOPERM`, `LOADING`, …).
    #[error("Redis refused the read: {0}")]
    Server(String),
    /// The reply as a whole has an unexpected shape (e.g. wrong number of
    /// replies); per-service problems are [`Malformed`] inside a [`Snapshot`].
    #[error("malformed reply: {0}")]
    Malformed(String),
}

impl ScoreboardError {
    /// True for the outage classes (unreachable, timeout, server refusing):
    /// keep the last tables and retry later.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            ScoreboardError::Unreachable(_)
                | ScoreboardError::Timeout(_)
                | ScoreboardError::Server(_)
        )
    }
}

fn classify(e: redis::RedisError) -> ScoreboardError {
    if e.is_timeout() {
        // The connection's own response timeout; reported like ours.
        ScoreboardError::Unreachable(format!("I/O timeout: {e}"))
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        ScoreboardError::Unreachable(e.to_string())
    } else if e.kind() == redis::ErrorKind::Parse
        || e.kind() == redis::ErrorKind::UnexpectedReturnType
    {
        ScoreboardError::Malformed(e.to_string())
    } else {
        ScoreboardError::Server(e.to_string())
    }
}

// ------------------------------------------------------------------ the read

/// The pipeline of one read: [`COMMANDS_PER_SERVICE`] commands per service,
/// in the order of `services`. Not atomic (no `MULTI`).
pub fn read_pipeline<S: AsRef<str>>(services: &[S]) -> redis::Pipeline {
    let mut p = redis::pipe();
    p.ignore_errors();
    for s in services {
        let s = s.as_ref();
        p.cmd("ZRANGE")
            .arg(load_key(s))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGE")
            .arg(seen_key(s))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("HGETALL")
            .arg(addr_key(s))
            .cmd("SMEMBERS")
            .arg(drain_key(s));
    }
    p
}

fn check_services<S: AsRef<str>>(services: &[S]) -> Result<(), ScoreboardError> {
    match services.iter().find(|s| !valid_service(s.as_ref())) {
        Some(s) => Err(ScoreboardError::InvalidService(s.as_ref().to_string())),
        None => Ok(()),
    }
}

/// Reads `services` over `conn` in one pipelined round trip, without a
/// timeout or reconnection (see [`ScoreboardReader`] for those). Duplicate
/// names are read once each time they appear and collapse in the result.
pub async fn read_services<C: ConnectionLike, S: AsRef<str>>(
    conn: &mut C,
    services: &[S],
) -> Result<Snapshot, ScoreboardError> {
    check_services(services)?;
    if services.is_empty() {
        return Ok(Snapshot::default());
    }
    let replies: Vec<Value> = read_pipeline(services)
        .query_async(conn)
        .await
        .map_err(classify)?;
    parse_replies(services, replies)
}

/// Turns the replies of [`read_pipeline`] into a [`Snapshot`].
pub fn parse_replies<S: AsRef<str>>(
    services: &[S],
    replies: Vec<Value>,
) -> Result<Snapshot, ScoreboardError> {
    if replies.len() != services.len() * COMMANDS_PER_SERVICE {
        return Err(ScoreboardError::Malformed(format!(
            "{} replies for {} commands",
            replies.len(),
            services.len() * COMMANDS_PER_SERVICE
        )));
    }
    // A server error that is not about one key's type concerns the whole read.
    for v in &replies {
        if let Value::ServerError(e) = v {
            if e.code() != "WRONGTYPE" {
                return Err(ScoreboardError::Server(e.to_string()));
            }
        }
    }
    let mut out = Snapshot::default();
    let mut it = replies.into_iter();
    for s in services {
        let s = s.as_ref();
        let (load, seen, addr, drain) = (
            it.next().unwrap_or_default(),
            it.next().unwrap_or_default(),
            it.next().unwrap_or_default(),
            it.next().unwrap_or_default(),
        );
        out.services
            .insert(s.to_string(), parse_service(s, load, seen, addr, drain));
    }
    Ok(out)
}

/// Parses one service's four replies (ZRANGE load, ZRANGE seen, HGETALL
/// addr, SMEMBERS drain). Entry-level problems are skipped and recorded; a
/// wrong key type or reply shape makes the whole service [`Malformed`].
pub fn parse_service(
    service: &str,
    load: Value,
    seen: Value,
    addr: Value,
    drain: Value,
) -> Result<ServiceSnapshot, Malformed> {
    let mut snap = ServiceSnapshot {
        service: service.to_string(),
        ..Default::default()
    };
    let load = pairs(load).map_err(|detail| Malformed {
        key: load_key(service),
        detail,
    })?;
    let seen = pairs(seen).map_err(|detail| Malformed {
        key: seen_key(service),
        detail,
    })?;
    let addr = pairs(addr).map_err(|detail| Malformed {
        key: addr_key(service),
        detail,
    })?;
    let drain = members(drain).map_err(|detail| Malformed {
        key: drain_key(service),
        detail,
    })?;

    for (member, score) in load {
        let Some(id) = instance_id(&member, Piece::Load, &mut snap.skipped) else {
            continue;
        };
        match number(&score) {
            Err(raw) => skip(
                &mut snap.skipped,
                Piece::Load,
                &id,
                SkipReason::NotANumber(raw),
            ),
            Ok(v) if !(v.is_finite() && (0.0..=100.0).contains(&v)) => skip(
                &mut snap.skipped,
                Piece::Load,
                &id,
                SkipReason::LoadOutOfRange(v),
            ),
            Ok(v) => snap.instances.entry(id).or_default().load = Some(v),
        }
    }
    for (member, score) in seen {
        let Some(id) = instance_id(&member, Piece::Seen, &mut snap.skipped) else {
            continue;
        };
        match number(&score) {
            Err(raw) => skip(
                &mut snap.skipped,
                Piece::Seen,
                &id,
                SkipReason::NotANumber(raw),
            ),
            // `i64::MAX as f64` is 2^63: anything >= it does not fit.
            Ok(v) if !(0.0..i64::MAX as f64).contains(&v) => skip(
                &mut snap.skipped,
                Piece::Seen,
                &id,
                SkipReason::InvalidTime(v),
            ),
            Ok(v) => snap.instances.entry(id).or_default().seen_ms = Some(v.trunc() as i64),
        }
    }
    for (field, value) in addr {
        let Some(id) = instance_id(&field, Piece::Addr, &mut snap.skipped) else {
            continue;
        };
        let parsed = match text(&value) {
            Some(s) => Address::parse(&s),
            None => Err("not a string".to_string()),
        };
        match parsed {
            Ok(a) => snap.instances.entry(id).or_default().addr = Some(a),
            Err(e) => skip(
                &mut snap.skipped,
                Piece::Addr,
                &id,
                SkipReason::InvalidAddress(e),
            ),
        }
    }
    for member in drain {
        if let Some(id) = instance_id(&member, Piece::Drain, &mut snap.skipped) {
            snap.instances.entry(id).or_default().drain = true;
        }
    }
    Ok(snap)
}

fn skip(out: &mut Vec<Skipped>, piece: Piece, id: &str, reason: SkipReason) {
    out.push(Skipped {
        piece,
        instance: id.to_string(),
        reason,
    });
}

/// The member as a valid instance id, or skipped.
fn instance_id(member: &Value, piece: Piece, skipped: &mut Vec<Skipped>) -> Option<String> {
    match text(member) {
        Some(s) if valid_instance(&s) => Some(s),
        other => {
            let shown = match (other, member) {
                (Some(s), _) => s,
                (None, Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                (None, v) => format!("{v:?}"),
            };
            skip(
                skipped,
                piece,
                &shown.chars().take(MAX_SHOWN).collect::<String>(),
                SkipReason::InvalidInstance,
            );
            None
        }
    }
}

/// A string-like reply as UTF-8.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// A score: RESP2 sends it as a string ("42.5", "inf"), RESP3 as a double.
fn number(v: &Value) -> Result<f64, String> {
    match v {
        Value::Double(d) => Ok(*d),
        Value::Int(i) => Ok(*i as f64),
        _ => {
            let s = text(v).ok_or_else(|| format!("{v:?}"))?;
            s.trim().parse::<f64>().map_err(|_| s)
        }
    }
}

/// `SMEMBERS`: an array (RESP2) or a set (RESP3); a missing key is empty.
fn members(v: Value) -> Result<Vec<Value>, String> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::ServerError(e) => Err(e.to_string()),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// `ZRANGE … WITHSCORES` or `HGETALL` as (member, value) pairs: a flat
/// array (RESP2), an array of 2-arrays (RESP3 ZRANGE) or a map (RESP3
/// HGETALL). A missing key is an empty array (or nil).
fn pairs(v: Value) -> Result<Vec<(Value, Value)>, String> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Map(m) => Ok(m),
        Value::Array(items) => {
            if !items.is_empty()
                && items
                    .iter()
                    .all(|i| matches!(i, Value::Array(p) if p.len() == 2))
            {
                return Ok(items
                    .into_iter()
                    .map(|i| match i {
                        Value::Array(mut p) => {
                            let b = p.pop().unwrap_or_default();
                            let a = p.pop().unwrap_or_default();
                            (a, b)
                        }
                        _ => unreachable!("checked above"),
                    })
                    .collect());
            }
            if items.len() % 2 != 0 {
                return Err(format!("odd number ({}) of reply elements", items.len()));
            }
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(a), Some(b)) = (it.next(), it.next()) {
                out.push((a, b));
            }
            Ok(out)
        }
        Value::ServerError(e) => Err(e.to_string()),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

// ------------------------------------------------------------------ the reader

/// Knobs of [`ScoreboardReader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Bound on one read, connect included. Default 250 ms.
    pub timeout: Duration,
    /// First reconnect delay after a failure. Default 100 ms.
    pub backoff_min: Duration,
    /// Largest reconnect delay. Default 2 s.
    pub backoff_max: Duration,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            timeout: Duration::from_millis(250),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Reads the scoreboard with a bounded time per read and reconnection with
/// backoff. See the module docs.
pub struct ScoreboardReader {
    client: redis::Client,
    opts: ReaderOptions,
    conn: Option<MultiplexedConnection>,
    /// Delay before the next reconnect attempt after a failure.
    backoff: Duration,
    /// No reconnect before this instant (set after a failure).
    retry_at: Option<Instant>,
    last_error: Option<ScoreboardError>,
}

impl fmt::Debug for ScoreboardReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScoreboardReader")
            .field("opts", &self.opts)
            .field("connected", &self.conn.is_some())
            .field("backoff", &self.backoff)
            .field("last_error", &self.last_error)
            .finish()
    }
}

impl ScoreboardReader {
    /// A reader for `url` (`redis://…`). Does not connect: the first read does.
    pub fn new(url: &str, opts: ReaderOptions) -> Result<Self, ScoreboardError> {
        let client =
            redis::Client::open(url).map_err(|e| ScoreboardError::InvalidUrl(e.to_string()))?;
        Ok(ScoreboardReader {
            client,
            opts,
            conn: None,
            backoff: opts.backoff_min,
            retry_at: None,
            last_error: None,
        })
    }

    /// The options.
    pub fn options(&self) -> ReaderOptions {
        self.opts
    }

    /// True while a connection is open (it may still turn out dead).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The error of the last read, `None` after a successful one.
    pub fn last_error(&self) -> Option<&ScoreboardError> {
        self.last_error.as_ref()
    }

    /// Reads `services` in one pipelined round trip, within the timeout.
    pub async fn read<S: AsRef<str>>(
        &mut self,
        services: &[S],
    ) -> Result<Snapshot, ScoreboardError> {
        check_services(services)?;
        let timeout = self.opts.timeout;
        let r = tokio::time::timeout(timeout, async {
            let conn = self.connection().await?;
            read_services(conn, services).await
        })
        .await
        .unwrap_or(Err(ScoreboardError::Timeout(timeout)));
        self.settle(r)
    }

    /// The service names in `headroom:services` (invalid names are left out),
    /// sorted. One command, within the timeout.
    pub async fn services(&mut self) -> Result<Vec<String>, ScoreboardError> {
        let timeout = self.opts.timeout;
        let r = tokio::time::timeout(timeout, async {
            let conn = self.connection().await?;
            let mut names: Vec<String> = redis::cmd("SMEMBERS")
                .arg(SERVICES_SET)
                .query_async::<Vec<Value>>(conn)
                .await
                .map_err(classify)?
                .iter()
                .filter_map(text)
                .filter(|s| valid_service(s))
                .collect();
            names.sort();
            Ok(names)
        })
        .await
        .unwrap_or(Err(ScoreboardError::Timeout(timeout)));
        self.settle(r)
    }

    /// The open connection, or a new one if the backoff allows.
    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, ScoreboardError> {
        if self.conn.is_none() {
            if let Some(at) = self.retry_at {
                let now = Instant::now();
                if now < at {
                    let last = self
                        .last_error
                        .as_ref()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    return Err(ScoreboardError::Unreachable(format!(
                        "reconnect in {:?} (backoff) after: {last}",
                        at - now
                    )));
                }
            }
            // The client's own timeouts are only a backstop: the read's
            // timeout fires first, so a slow Redis is reported as Timeout.
            let backstop = self.opts.timeout.saturating_mul(2);
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(backstop))
                .set_response_timeout(Some(backstop));
            let c = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map_err(|e| match classify(e) {
                    // Any failure to connect is an unreachable Redis.
                    ScoreboardError::Server(s) | ScoreboardError::Malformed(s) => {
                        ScoreboardError::Unreachable(s)
                    }
                    e => e,
                })?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("set above"))
    }

    /// Bookkeeping after a read: backoff and connection reset on outages.
    fn settle<T>(&mut self, r: Result<T, ScoreboardError>) -> Result<T, ScoreboardError> {
        match &r {
            Ok(_) => {
                self.backoff = self.opts.backoff_min;
                self.retry_at = None;
                self.last_error = None;
            }
            Err(e @ (ScoreboardError::Unreachable(_) | ScoreboardError::Timeout(_))) => {
                // Backoff running: nothing was attempted, keep its schedule.
                let attempted =
                    self.conn.is_some() || self.retry_at.is_none_or(|at| Instant::now() >= at);
                if attempted {
                    // A timed-out connection may be black-holed: start over.
                    self.conn = None;
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(self.opts.backoff_max);
                    self.last_error = Some(e.clone());
                }
            }
            Err(e) => self.last_error = Some(e.clone()),
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }
    fn flat(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| bulk(s)).collect())
    }

    #[test]
    fn addresses_parse_per_contract() {
        let a = Address::parse("10.0.0.7:8080").unwrap();
        assert_eq!(a.socket, "10.0.0.7:8080".parse().unwrap());
        assert_eq!(a.node, None);
        let a = Address::parse("[fd00::7]:80;node=worker-1").unwrap();
        assert_eq!(a.socket, "[fd00::7]:80".parse().unwrap());
        assert_eq!(a.node.as_deref(), Some("worker-1"));
        assert_eq!(a.to_string(), "[fd00::7]:80;node=worker-1");
        for bad in [
            "",
            "10.0.0.7",
            "10.0.0.7:0",
            "0.0.0.0:80",
            "[::]:80",
            "host:80",
            "10.0.0.7:80;node=",
            "10.0.0.7:80;zone=a",
            "10.0.0.7:80;node=a b",
            "10.0.0.7:80;node=a;node=b",
            "10.0.0.7:70000",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resp2_and_resp3_shapes_give_the_same_snapshot() {
        let r2 = parse_service(
            "api",
            flat(&["a", "20", "b", "42.5"]),
            flat(&["a", "1000", "b", "2000.9"]),
            flat(&["a", "10.0.0.1:80", "b", "10.0.0.2:80;node=n1"]),
            flat(&["b"]),
        )
        .unwrap();
        let pair = |m: &str, v: f64| Value::Array(vec![bulk(m), Value::Double(v)]);
        let r3 = parse_service(
            "api",
            Value::Array(vec![pair("a", 20.0), pair("b", 42.5)]),
            Value::Array(vec![pair("a", 1000.0), pair("b", 2000.9)]),
            Value::Map(vec![
                (bulk("a"), bulk("10.0.0.1:80")),
                (bulk("b"), bulk("10.0.0.2:80;node=n1")),
            ]),
            Value::Set(vec![bulk("b")]),
        )
        .unwrap();
        assert_eq!(r2, r3);
        assert!(r2.instances["b"].drain && !r2.instances["a"].drain);
        assert_eq!(r2.skipped_count(), 0);
        let b = &r2.instances["b"];
        assert_eq!(b.load, Some(42.5));
        assert_eq!(b.seen_ms, Some(2000));
        assert_eq!(b.addr.as_ref().unwrap().node.as_deref(), Some("n1"));
        assert!(b.missing().is_none());
        assert_eq!(b.age_ms(2500), Some(500));
    }

    #[test]
    fn bad_entries_are_skipped_and_counted() {
        let s = parse_service(
            "api",
            flat(&[
                "ok", "50", "hi", "100.5", "neg", "-1", "inf", "inf", "bad id", "3", "nan", "x",
            ]),
            flat(&["ok", "1", "neg", "-5", "big", "1e300", "inf", "inf"]),
            flat(&["ok", "10.0.0.1:80", "neg", "nope", "x{y}", "10.0.0.1:81"]),
            flat(&["bad id"]),
        )
        .unwrap();
        // load: hi, neg, inf, "bad id", nan; seen: neg, big, inf; addr: neg,
        // x{y}; drain: "bad id"
        assert_eq!(s.skipped_count(), 11, "{:#?}", s.skipped);
        assert_eq!(s.skipped[10].piece, Piece::Drain);
        assert_eq!(
            s.skipped[0],
            Skipped {
                piece: Piece::Load,
                instance: "hi".into(),
                reason: SkipReason::LoadOutOfRange(100.5)
            }
        );
        assert!(s
            .skipped
            .iter()
            .any(|k| k.instance == "bad id" && k.reason == SkipReason::InvalidInstance));
        assert!(s
            .skipped
            .iter()
            .any(|k| k.instance == "nan" && k.reason == SkipReason::NotANumber("x".into())));
        assert!(s.instances["ok"].missing().is_none());
        // Nothing valid about "neg", "inf", "big", "hi": absent.
        assert_eq!(s.instances.keys().collect::<Vec<_>>(), vec!["ok"]);
    }

    #[test]
    fn non_utf8_members_and_odd_replies() {
        let s = parse_service(
            "api",
            Value::Array(vec![Value::BulkString(vec![0xff, 0xfe]), bulk("1")]),
            Value::Array(vec![]),
            Value::Nil,
            Value::Nil,
        )
        .unwrap();
        assert_eq!(s.skipped_count(), 1);
        assert_eq!(s.skipped[0].reason, SkipReason::InvalidInstance);
        let e = parse_service("api", flat(&["a"]), flat(&[]), flat(&[]), Value::Nil).unwrap_err();
        assert_eq!(e.key, "headroom:sb:{api}:load");
        let e = parse_service("api", flat(&[]), flat(&[]), Value::Int(3), Value::Nil).unwrap_err();
        assert_eq!(e.key, "headroom:sb:{api}:addr");
        let e = parse_service("api", flat(&[]), flat(&[]), flat(&[]), Value::Int(1)).unwrap_err();
        assert_eq!(e.key, "headroom:sb:{api}:drain");
    }

    #[test]
    fn missing_pieces_are_reported() {
        let s = parse_service(
            "api",
            flat(&["reported", "10", "noaddr", "10"]),
            flat(&["reported", "5", "noaddr", "5"]),
            flat(&["reported", "10.0.0.1:80", "registered", "10.0.0.2:80"]),
            Value::Nil,
        )
        .unwrap();
        assert!(s.instances["reported"].missing().is_none());
        assert_eq!(
            s.instances["registered"].missing(),
            Missing {
                load: true,
                seen: true,
                addr: false
            }
        );
        assert_eq!(
            s.instances["noaddr"].missing(),
            Missing {
                load: false,
                seen: false,
                addr: true
            }
        );
        assert_eq!(s.complete().count(), 1);
    }

    #[test]
    fn pipeline_has_four_commands_per_service_and_no_multi() {
        let p = read_pipeline(&["a", "b"]);
        assert_eq!(p.len(), 8);
        assert!(!p.is_transaction());
        let packed = String::from_utf8_lossy(&p.get_packed_pipeline()).into_owned();
        assert!(packed.contains("headroom:sb:{a}:load"));
        assert!(packed.contains("headroom:sb:{b}:addr"));
        assert!(packed.contains("headroom:sb:{b}:drain"));
        assert!(!packed.contains("MULTI"));
    }

    #[test]
    fn whole_read_errors() {
        let e = parse_replies(&["a"], vec![flat(&[]), flat(&[])]).unwrap_err();
        assert!(matches!(e, ScoreboardError::Malformed(_)));
        assert!(!e.is_outage());
        assert!(ScoreboardError::Timeout(Duration::from_millis(1)).is_outage());
        assert!(ScoreboardError::Unreachable("x".into()).is_outage());
    }
}
