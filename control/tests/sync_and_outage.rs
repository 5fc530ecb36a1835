//! Key sync: revocation latency to 3 shims, Redis outages, Redis restarted
//! empty, stream trimmed past a shim's position, start from the disk
//! snapshot, and zero Redis commands per proxied request.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use headroom_control::authz::Source;
use headroom_control::keystore::{Grant, KeyStore};
use headroom_control::shim::{start_shim, ShimArgs, ShimHandle};

const SVC: &str = "catalog";

fn all() -> Grant {
    Grant {
        methods: vec!["*".into()],
        prefixes: vec!["/".into()],
    }
}

async fn shim(redis_url: &str, snapshot: std::path::PathBuf, block_ms: u64) -> ShimHandle {
    let upstream = start_echo_upstream().await;
    let mut a = ShimArgs::new(SVC, "127.0.0.1:0".parse().unwrap(), upstream, redis_url);
    a.snapshot = Some(snapshot);
    a.sync_block_ms = block_ms;
    start_shim(a).await.unwrap()
}

async fn new_key(ks: &mut KeyStore, principal: &str) -> Creds {
    let k = ks.create_key(principal).await.unwrap();
    Creds {
        akid: k.access_key_id,
        secret: k.secret,
    }
}

async fn status(c: &common::HttpClient, s: &ShimHandle, creds: &Creds) -> (u16, String) {
    let (st, body) = signed(c, s.local_addr, "GET", "/x", b"", creds, SVC).await;
    (st, error_of(&body))
}

async fn wait_status(c: &common::HttpClient, s: &ShimHandle, creds: &Creds, want: u16, what: &str) {
    let t = Instant::now();
    loop {
        let (st, _) = status(c, s, creds).await;
        if st == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "timed out: {what} (last status {st})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_three_shims_within_one_second_p99() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(SVC, "p", &all()).await.unwrap();
    let mut keys = Vec::new();
    for _ in 0..100 {
        keys.push(new_key(&mut ks, "p").await);
    }
    let mut shims = Vec::new();
    for i in 0..3 {
        shims.push(shim(&redis.url(), dir.path().join(format!("s{i}.json")), 2000).await);
    }
    let c = client();
    for s in &shims {
        for k in [&keys[0], &keys[99]] {
            wait_status(&c, s, k, 200, "keys known").await;
        }
    }
    let addrs: Vec<_> = shims.iter().map(|s| s.local_addr).collect();
    let mut per_shim: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    for k in &keys {
        let t0 = Instant::now();
        ks.revoke_key(&k.akid).await.unwrap();
        let mut tasks = Vec::new();
        for &addr in &addrs {
            let (c, k) = (c.clone(), k.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let (st, body) = signed(&c, addr, "GET", "/x", b"", &k, SVC).await;
                    if st == 401 && error_of(&body) == "key_revoked" {
                        return Some(t0.elapsed());
                    }
                    if t0.elapsed() > Duration::from_secs(10) {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let d = t.await.unwrap().expect("revocation never reached a shim");
            per_shim[i].push(d);
        }
    }
    for (i, mut v) in per_shim.into_iter().enumerate() {
        v.sort();
        let p50 = v[v.len() / 2];
        let p99 = v[(v.len() * 99).div_ceil(100) - 1];
        let max = v[v.len() - 1];
        eprintln!(
            "shim {i}: revocation latency over {} revocations: p50 {p50:?} p99 {p99:?} max {max:?}",
            v.len()
        );
        assert!(p99 < Duration::from_secs(1), "shim {i}: p99 {p99:?} >= 1 s");
    }
    for s in shims {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted_empty() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(SVC, "p", &all()).await.unwrap();
    let k1 = new_key(&mut ks, "p").await;
    let s = shim(&redis.url(), dir.path().join("s.json"), 300).await;
    let c = client();
    wait_status(&c, &s, &k1, 200, "k1 known").await;
    let unknown = Creds {
        akid: "HRKNOTAKEYATALL00000".into(),
        secret: "s".repeat(40),
    };

    // Redis killed: known keys still work, unknown ones still fail, for a while.
    redis.kill();
    let until = Instant::now() + Duration::from_millis(1500);
    let mut n = 0;
    while Instant::now() < until {
        assert_eq!(status(&c, &s, &k1).await.0, 200, "known key during outage");
        assert_eq!(
            status(&c, &s, &unknown).await,
            (401, "unknown_key".to_string())
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(n > 5);

    // Restarted empty: an empty DB (no generation) does not wipe our keys...
    redis.restart_empty();
    tokio::time::sleep(Duration::from_millis(800)).await; // several follower polls
    assert_eq!(
        status(&c, &s, &k1).await.0,
        200,
        "empty DB must not revoke everything"
    );
    // ...but as soon as the DB is written again (new generation) the shim
    // takes a fresh snapshot and follows changes again.
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(SVC, "p", &all()).await.unwrap();
    let k2 = new_key(&mut ks, "p").await;
    wait_status(&c, &s, &k2, 200, "k2 from the new DB").await;
    assert_eq!(
        status(&c, &s, &k1).await,
        (401, "unknown_key".to_string()),
        "k1 is not in the new DB"
    );
    assert!(s.keysync.resync_count() >= 1);
    ks.revoke_key(&k2.akid).await.unwrap();
    wait_status(&c, &s, &k2, 401, "revocation after re-sync").await;
    assert_eq!(status(&c, &s, &k2).await.1, "key_revoked");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_trimmed_past_shim_position_resyncs() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut admin = redis.conn();
    // The shim logs in as its own Redis user, so the test can lock it out
    // while the stream moves on and is trimmed.
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("shim")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query::<()>(&mut admin)
        .unwrap();
    let shim_url = format!("redis://shim:pw@127.0.0.1:{}", redis.port);
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(SVC, "p", &all()).await.unwrap();
    let k1 = new_key(&mut ks, "p").await;
    let s = shim(&shim_url, dir.path().join("s.json"), 300).await;
    let c = client();
    wait_status(&c, &s, &k1, 200, "k1 known").await;
    let lock_out = |admin: &mut redis::Connection| {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("shim")
            .arg("off")
            .query::<()>(admin)
            .unwrap();
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg("shim")
            .query::<i64>(admin)
            .unwrap();
    };
    let let_in = |admin: &mut redis::Connection| {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("shim")
            .arg("on")
            .query::<()>(admin)
            .unwrap();
    };

    // Case 1: events after the trim point remain (seq jumps).
    lock_out(&mut admin);
    ks.revoke_key(&k1.akid).await.unwrap();
    let k2 = new_key(&mut ks, "p").await;
    redis::cmd("XTRIM")
        .arg("headroom:auth:events")
        .arg("MAXLEN")
        .arg(0)
        .query::<i64>(&mut admin)
        .unwrap();
    let k3 = new_key(&mut ks, "p").await;
    assert_eq!(
        status(&c, &s, &k1).await.0,
        200,
        "still the old view while locked out"
    );
    let_in(&mut admin);
    wait_status(&c, &s, &k2, 200, "k2 (its event was trimmed) after re-sync").await;
    assert_eq!(status(&c, &s, &k3).await.0, 200);
    assert_eq!(status(&c, &s, &k1).await, (401, "key_revoked".to_string()));
    let after_first = s.keysync.resync_count();
    assert!(after_first >= 1, "a gap must cause a fresh snapshot");

    // Case 2: trimmed to nothing, no later event (detected by the sequence check).
    lock_out(&mut admin);
    ks.revoke_key(&k3.akid).await.unwrap();
    redis::cmd("XTRIM")
        .arg("headroom:auth:events")
        .arg("MAXLEN")
        .arg(0)
        .query::<i64>(&mut admin)
        .unwrap();
    let_in(&mut admin);
    wait_status(&c, &s, &k3, 401, "k3 revocation (trimmed) after re-sync").await;
    assert_eq!(status(&c, &s, &k3).await.1, "key_revoked");
    assert!(s.keysync.resync_count() > after_first);
    // And changes flow normally afterwards.
    ks.revoke_key(&k2.akid).await.unwrap();
    wait_status(&c, &s, &k2, 401, "k2 revocation via the stream").await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_started_while_redis_down_uses_disk_snapshot() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("a.json");
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(SVC, "p", &all()).await.unwrap();
    let k1 = new_key(&mut ks, "p").await;
    let c = client();
    let a = shim(&redis.url(), snap.clone(), 300).await;
    wait_status(&c, &a, &k1, 200, "k1 known").await;
    a.shutdown().await;
    assert!(snap.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&snap).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    redis.kill();
    // With the snapshot: ready, serves known keys, rejects unknown ones.
    let b = shim(&redis.url(), snap.clone(), 300).await;
    assert!(b.state().is_ready());
    assert_eq!(b.state().source(), Source::Disk);
    assert_eq!(status(&c, &b, &k1).await.0, 200);
    let unknown = Creds {
        akid: "HRKNOTAKEYATALL00000".into(),
        secret: "s".repeat(40),
    };
    assert_eq!(
        status(&c, &b, &unknown).await,
        (401, "unknown_key".to_string())
    );
    // Without one: not ready, 503.
    let cfresh = shim(&redis.url(), dir.path().join("none.json"), 300).await;
    assert!(!cfresh.state().is_ready());
    assert_eq!(
        status(&c, &cfresh, &k1).await,
        (503, "not_ready".to_string())
    );
    let ready = send(
        &c,
        hyper::Request::get(format!("http://{}/_headroom/ready", cfresh.local_addr))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(ready.0, 503);

    // Redis back (empty, then written): both converge on the new DB.
    redis.restart_empty();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(SVC, "p", &all()).await.unwrap();
    let k2 = new_key(&mut ks, "p").await;
    wait_status(&c, &cfresh, &k2, 200, "fresh shim gets ready from Redis").await;
    wait_status(&c, &b, &k2, 200, "disk-started shim re-syncs").await;
    assert_eq!(b.state().source(), Source::Redis);
    b.shutdown().await;
    cfresh.shutdown().await;
}

fn commandstats(conn: &mut redis::Connection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_requests_cause_no_redis_commands() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(SVC, "p", &all()).await.unwrap();
    let k1 = new_key(&mut ks, "p").await;
    let s = shim(&redis.url(), dir.path().join("s.json"), 2000).await;
    let c = client();
    wait_status(&c, &s, &k1, 200, "k1 known").await;
    let mut conn = redis.conn();
    let addr_key = headroom_control::scoreboard::addr_key(SVC);
    eventually(Duration::from_secs(10), "registered", || {
        let v: Option<String> = redis::cmd("HGET")
            .arg(&addr_key)
            .arg(&s.instance)
            .query(&mut conn)
            .unwrap();
        async move { v.is_some() }
    })
    .await;
    let before = commandstats(&mut conn);
    const N: u64 = 500;
    let t = Instant::now();
    for _ in 0..N {
        assert_eq!(status(&c, &s, &k1).await.0, 200);
    }
    let took = t.elapsed();
    let after = commandstats(&mut conn);
    let mut delta = BTreeMap::new();
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 && k != "info" {
            delta.insert(k.clone(), d);
        }
    }
    eprintln!(
        "{N} proxied requests in {took:?}; redis commands meanwhile (besides INFO): {delta:?}"
    );
    // Only background work may appear, independent of N: the key-sync
    // follower's polling (one XREAD BLOCK + one GET pair every 2 s) and the
    // shim's re-registration every REREGISTER_EVERY (a new connection, then
    // MULTI HSET SADD EXEC and an HSET).
    let total: u64 = delta.values().sum();
    let allowed_per_sec = 3.0;
    let reregistrations =
        (took.as_secs_f64() / headroom_control::shim::REREGISTER_EVERY.as_secs_f64()).ceil() as u64
            + 1;
    let bound = (took.as_secs_f64() * allowed_per_sec).ceil() as u64 + 3 + 8 * reregistrations;
    assert!(
        total <= bound,
        "redis commands {delta:?} during {N} requests (bound {bound})"
    );
    for k in delta.keys() {
        assert!(
            ["xread", "get", "hset", "sadd", "multi", "exec", "client", "hello", "select"]
                .contains(&k.as_str()),
            "unexpected redis command {k} during proxied requests"
        );
    }
    // And none of those is per request.
    for (k, v) in &delta {
        assert!(*v < N / 10, "{v} × {k} for {N} requests");
    }
    s.shutdown().await;
}
