//! The in-memory key cache of one service instance and the per-request
//! authentication + authorisation decision. No I/O: zero Redis calls per
//! request.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::keystore::{secrets_in_scope, Change, ChangeEvent, Grant, KeyRecord, Snapshot};
use crate::sigv4::{self, CachedSecret, RequestParts, SigError, VerifyPolicy};

/// Why a request is refused. `status()` and `reason()` go to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error(transparent)]
    Signature(#[from] SigError),
    #[error("unknown access key")]
    UnknownKey,
    #[error("access key revoked")]
    KeyRevoked,
    #[error("nonce already used")]
    ReplayedNonce,
    #[error("path is not canonical")]
    NonCanonicalPath,
    #[error("principal has no grant for this service")]
    NoGrant,
    #[error("method not granted")]
    MethodNotGranted,
    #[error("path not granted")]
    PathNotGranted,
    #[error("no key snapshot yet")]
    NotReady,
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::NonCanonicalPath => 400,
            Rejection::NoGrant | Rejection::MethodNotGranted | Rejection::PathNotGranted => 403,
            Rejection::NotReady => 503,
            _ => 401,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Signature(e) => e.reason(),
            Rejection::UnknownKey => "unknown_key",
            Rejection::KeyRevoked => "key_revoked",
            Rejection::ReplayedNonce => "replayed_nonce",
            Rejection::NonCanonicalPath => "non_canonical_path",
            Rejection::NoGrant => "no_grant",
            Rejection::MethodNotGranted => "method_not_granted",
            Rejection::PathNotGranted => "path_not_granted",
            Rejection::NotReady => "not_ready",
        }
    }
}

#[derive(Debug, Clone)]
enum KeyEntry {
    Active {
        principal: String,
        current: Arc<CachedSecret>,
        previous: Option<(Arc<CachedSecret>, i64)>,
    },
    /// Active, but its principal has no grant here, so we hold no secret:
    /// refused with `no_grant` (without a signature check, which needs it).
    Ungranted,
    Revoked,
}

fn entry_from(rec: &KeyRecord) -> KeyEntry {
    match (&rec.secret, rec.is_active()) {
        (None, true) => KeyEntry::Ungranted,
        (Some(secret), true) => KeyEntry::Active {
            principal: rec.principal.clone(),
            current: Arc::new(CachedSecret::new(secret.clone())),
            previous: match (&rec.prev_secret, &rec.prev_expires_ms) {
                (Some(p), Some(exp)) => exp
                    .parse::<i64>()
                    .ok()
                    .map(|e| (Arc::new(CachedSecret::new(p.clone())), e)),
                _ => None,
            },
        },
        _ => KeyEntry::Revoked,
    }
}

#[derive(Debug, Default)]
struct Inner {
    snapshot: Option<Snapshot>,
    keys: HashMap<String, KeyEntry>,
}

/// Where the current key set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    None,
    Redis,
    Disk,
}

/// What [`AuthState::apply`] did with an event.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied; the position moved past the event.
    Done,
    /// A grant for a principal whose secrets we do not hold (their keys are
    /// stored stripped): nothing was changed, the position did not move; a
    /// fresh snapshot brings the grant together with the secrets.
    NeedsSnapshot,
}

/// The key cache. Cheap to share (`Arc`); reads take a read lock briefly.
/// It holds secrets only for principals granted on its service (and those
/// matching its identity prefixes); other keys are kept without secrets.
#[derive(Debug)]
pub struct AuthState {
    service: String,
    identity_prefixes: Vec<String>,
    inner: RwLock<Inner>,
    ready: AtomicBool,
    source: Mutex<Source>,
}

impl AuthState {
    pub fn new(service: &str) -> Self {
        Self::with_identity_prefixes(service, Vec::new())
    }

    /// A cache that also keeps the secrets of principals whose name starts
    /// with one of `prefixes`, granted here or not (see
    /// [`secrets_in_scope`]).
    pub fn with_identity_prefixes(service: &str, prefixes: Vec<String>) -> Self {
        AuthState {
            service: service.to_string(),
            identity_prefixes: prefixes.into_iter().filter(|p| !p.is_empty()).collect(),
            inner: RwLock::new(Inner::default()),
            ready: AtomicBool::new(false),
            source: Mutex::new(Source::None),
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn source(&self) -> Source {
        self.source.lock().map(|s| *s).unwrap_or(Source::None)
    }

    /// (generation, seq, last stream id) of the installed snapshot.
    pub fn position(&self) -> Option<(String, u64, String)> {
        let g = self.inner.read().ok()?;
        g.snapshot
            .as_ref()
            .map(|s| (s.gen.clone(), s.seq, s.last_id.clone()))
    }

    /// A copy of the current snapshot (kept up to date with applied events).
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.inner.read().ok()?.snapshot.clone()
    }

    /// The identity prefixes this cache was made with.
    pub fn identity_prefixes(&self) -> &[String] {
        &self.identity_prefixes
    }

    /// Replace everything with `snap` (secrets of out-of-scope principals
    /// are dropped first, whatever the source).
    pub fn install(&self, mut snap: Snapshot, source: Source) {
        snap.strip_out_of_scope(&self.identity_prefixes);
        let keys = snap
            .keys
            .iter()
            .map(|r| (r.akid.clone(), entry_from(r)))
            .collect();
        if let Ok(mut g) = self.inner.write() {
            g.keys = keys;
            g.snapshot = Some(snap);
        }
        if let Ok(mut s) = self.source.lock() {
            *s = source;
        }
        self.ready.store(true, Ordering::Release);
    }

    /// Apply one event that directly follows the installed position. Key
    /// records of principals out of scope are stored without secrets; a
    /// removed grant strips its principal's keys.
    pub fn apply(&self, ev: &ChangeEvent) -> Applied {
        let Ok(mut g) = self.inner.write() else {
            // Poisoned lock: install() could not write either, so asking for
            // a snapshot would only loop; the cache stays as it was.
            return Applied::Done;
        };
        let Inner { snapshot, keys } = &mut *g;
        let Some(snap) = snapshot.as_mut() else {
            return Applied::NeedsSnapshot;
        };
        match &ev.change {
            Change::Key { record } => {
                let mut record = record.clone();
                if !secrets_in_scope(&snap.grants, &self.identity_prefixes, &record.principal) {
                    record.strip_secrets();
                }
                keys.insert(record.akid.clone(), entry_from(&record));
                match snap.keys.iter_mut().find(|r| r.akid == record.akid) {
                    Some(r) => *r = record,
                    None => snap.keys.push(record),
                }
            }
            Change::Grant {
                service,
                principal,
                grant,
            } if *service == self.service => match grant {
                Some(gr) => {
                    let had = secrets_in_scope(&snap.grants, &self.identity_prefixes, principal);
                    let has_active_keys = snap
                        .keys
                        .iter()
                        .any(|r| r.principal == *principal && r.is_active());
                    if !had && has_active_keys {
                        return Applied::NeedsSnapshot;
                    }
                    snap.grants.insert(principal.clone(), gr.clone());
                }
                None => {
                    snap.grants.remove(principal);
                    if !secrets_in_scope(&snap.grants, &self.identity_prefixes, principal) {
                        for r in snap.keys.iter_mut().filter(|r| r.principal == *principal) {
                            r.strip_secrets();
                            keys.insert(r.akid.clone(), entry_from(r));
                        }
                    }
                }
            },
            Change::Grant { .. } => {}
        }
        snap.seq = ev.seq;
        snap.last_id = ev.id.clone();
        Applied::Done
    }

    /// Signature check: returns the principal.
    pub fn authenticate(
        &self,
        req: &RequestParts<'_>,
        policy: &VerifyPolicy,
        now_unix: i64,
    ) -> Result<String, Rejection> {
        if !self.is_ready() {
            return Err(Rejection::NotReady);
        }
        let (parsed, _) = sigv4::precheck(req, policy, now_unix)?;
        let (principal, current, previous) = {
            let g = self.inner.read().map_err(|_| Rejection::NotReady)?;
            match g.keys.get(&parsed.access_key_id) {
                None => return Err(Rejection::UnknownKey),
                Some(KeyEntry::Revoked) => return Err(Rejection::KeyRevoked),
                // No secret here to check the signature with; the answer is
                // the one a correctly signed request would get anyway.
                Some(KeyEntry::Ungranted) => return Err(Rejection::NoGrant),
                Some(KeyEntry::Active {
                    principal,
                    current,
                    previous,
                }) => (principal.clone(), current.clone(), previous.clone()),
            }
        };
        let now_ms = now_unix.saturating_mul(1000);
        match previous {
            Some((prev, until)) if until > now_ms => {
                sigv4::verify_signature(req, &parsed, &[&current, &prev])?
            }
            _ => sigv4::verify_signature(req, &parsed, &[&current])?,
        }
        Ok(principal)
    }

    /// Grant check for `principal` calling `method` on (decoded) `path` of
    /// this service.
    pub fn authorise(&self, principal: &str, method: &str, path: &str) -> Result<(), Rejection> {
        let g = self.inner.read().map_err(|_| Rejection::NotReady)?;
        let grant: &Grant = g
            .snapshot
            .as_ref()
            .and_then(|s| s.grants.get(principal))
            .ok_or(Rejection::NoGrant)?;
        if !grant.allows_method(method) {
            return Err(Rejection::MethodNotGranted);
        }
        if !grant.allows_path(path) {
            return Err(Rejection::PathNotGranted);
        }
        Ok(())
    }
}

/// Decode a request path for grant checks; refuses `.`/`..`/empty segments
/// and encoded slashes, so that what we check is what the upstream serves.
pub fn decoded_path(raw: &str) -> Result<String, Rejection> {
    if !raw.starts_with('/') {
        return Err(Rejection::NonCanonicalPath);
    }
    if !raw.contains('%') {
        // Nothing to decode (the usual case): the same segment checks,
        // without a copy per segment.
        let mut segs = raw[1..].split('/').peekable();
        while let Some(seg) = segs.next() {
            let last = segs.peek().is_none();
            if seg == "." || seg == ".." || (seg.is_empty() && !last) {
                return Err(Rejection::NonCanonicalPath);
            }
        }
        return Ok(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let segs: Vec<&str> = raw[1..].split('/').collect();
    let n = segs.len();
    for (i, seg) in segs.iter().enumerate() {
        let d = sigv4::uri_decode(seg).ok_or(Rejection::NonCanonicalPath)?;
        let d = String::from_utf8(d).map_err(|_| Rejection::NonCanonicalPath)?;
        let last = i + 1 == n;
        if d == "." || d == ".." || d.contains('/') || (d.is_empty() && !last) {
            return Err(Rejection::NonCanonicalPath);
        }
        out.push('/');
        out.push_str(&d);
    }
    Ok(out)
}

/// nonce → first-seen time, and insertion order for eviction.
type NonceTable = (HashMap<String, i64>, VecDeque<(String, i64)>);

/// Per-instance replay cache for the optional nonce header: remembers nonces
/// for the time window, bounded in size (oldest forgotten first).
#[derive(Debug)]
pub struct NonceCache {
    inner: Mutex<NonceTable>,
    capacity: usize,
    ttl_secs: i64,
}

impl NonceCache {
    pub fn new(capacity: usize, ttl_secs: i64) -> Self {
        NonceCache {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            capacity: capacity.max(1),
            ttl_secs,
        }
    }

    /// `false` if `(principal, nonce)` was seen within the window.
    pub fn check_and_insert(&self, principal: &str, nonce: &str, now_unix: i64) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        let (map, order) = &mut *g;
        while let Some((k, t)) = order.front() {
            if *t + self.ttl_secs < now_unix || map.len() >= self.capacity {
                if map.get(k) == Some(t) {
                    map.remove(k);
                }
                order.pop_front();
            } else {
                break;
            }
        }
        let key = format!("{principal}\u{0}{nonce}");
        if map.contains_key(&key) {
            return false;
        }
        map.insert(key.clone(), now_unix);
        order.push_back((key, now_unix));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_path_refuses_traversal() {
        assert_eq!(decoded_path("/a/b%20c").unwrap(), "/a/b c");
        assert_eq!(decoded_path("/").unwrap(), "/");
        assert_eq!(decoded_path("/a/").unwrap(), "/a/");
        for bad in ["/a/../b", "/a/./b", "/a//b", "/a%2Fb", "/%2e%2e/x", "a"] {
            assert_eq!(decoded_path(bad), Err(Rejection::NonCanonicalPath), "{bad}");
        }
    }

    #[test]
    fn nonce_cache_rejects_replay_and_forgets_after_ttl() {
        let c = NonceCache::new(10, 300);
        assert!(c.check_and_insert("p", "n1", 1000));
        assert!(!c.check_and_insert("p", "n1", 1001));
        assert!(c.check_and_insert("q", "n1", 1001));
        assert!(c.check_and_insert("p", "n1", 1400));
    }
}
