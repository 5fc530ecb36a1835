//! The scoreboard reader against a real redis-server: data written with plain
//! Redis commands (redis-cli and raw commands, literal key names from
//! docs/SCOREBOARD.md) reads back typed; malformed entries are skipped and
//! counted; the read is one round trip; outages are reported fast and
//! recovered from.
use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use headroom::scoreboard::{
    Missing, Piece, ReaderOptions, ScoreboardError, ScoreboardReader, SkipReason,
};
use headroom_tests::RedisServer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Runs `commands` (one per line) through `redis-cli`, as a shell script of
/// any language's service could.
fn redis_cli(redis: &RedisServer, commands: &str) {
    let mut child = Command::new("redis-cli")
        .args(["-p", &redis.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli (Debian package redis-tools)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "redis-cli: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("ERR"), "redis-cli: {text}");
}

/// One raw command over a plain connection.
fn cmd(conn: &mut redis::Connection, args: &[&[u8]]) {
    let mut c = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query::<redis::Value>(conn).unwrap();
}

fn conn(redis: &RedisServer) -> redis::Connection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn opts(timeout_ms: u64) -> ReaderOptions {
    ReaderOptions {
        timeout: Duration::from_millis(timeout_ms),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_what_plain_commands_wrote() {
    let redis = RedisServer::start().unwrap();
    let t = now_ms();
    // The contract's own example, via redis-cli: registration, then a report.
    redis_cli(
        &redis,
        &format!(
            "MULTI\n\
             HSET headroom:sb:{{api}}:addr 10.0.0.7:8080 10.0.0.7:8080;node=n1\n\
             SADD headroom:services api\n\
             EXEC\n\
             MULTI\n\
             ZADD headroom:sb:{{api}}:load 42.5 10.0.0.7:8080\n\
             ZADD headroom:sb:{{api}}:seen {t} 10.0.0.7:8080\n\
             SADD headroom:services api\n\
             EXEC\n"
        ),
    );
    // More with raw commands: a complete IPv6 instance, one registered but
    // never reported, one reporting without an address.
    let mut c = conn(&redis);
    let ts = t.to_string();
    cmd(&mut c, &[b"ZADD", b"headroom:sb:{api}:load", b"0", b"v6"]);
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{api}:seen", ts.as_bytes(), b"v6"],
    );
    cmd(
        &mut c,
        &[b"HSET", b"headroom:sb:{api}:addr", b"v6", b"[fd00::2]:80"],
    );
    cmd(
        &mut c,
        &[
            b"HSET",
            b"headroom:sb:{api}:addr",
            b"fresh",
            b"10.0.0.8:8080",
        ],
    );
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{api}:load", b"100", b"ghost"],
    );
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{api}:seen", ts.as_bytes(), b"ghost"],
    );
    // A second service; and one nobody wrote.
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{web.v2}:load", b"80", b"w1"],
    );
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{web.v2}:seen", ts.as_bytes(), b"w1"],
    );
    cmd(
        &mut c,
        &[
            b"HSET",
            b"headroom:sb:{web.v2}:addr",
            b"w1",
            b"10.0.1.1:443",
        ],
    );
    cmd(&mut c, &[b"SADD", b"headroom:services", b"web.v2"]);

    let mut reader = ScoreboardReader::new(&redis.url(), opts(1000)).unwrap();
    assert_eq!(reader.services().await.unwrap(), vec!["api", "web.v2"]);
    let snap = reader.read(&["api", "web.v2", "empty"]).await.unwrap();
    assert_eq!(snap.skipped_count(), 0);
    assert_eq!(snap.malformed_count(), 0);

    let api = snap.service("api").unwrap();
    assert_eq!(
        api.instances.keys().collect::<Vec<_>>(),
        vec!["10.0.0.7:8080", "fresh", "ghost", "v6"]
    );
    let i = &api.instances["10.0.0.7:8080"];
    assert_eq!(i.load, Some(42.5));
    assert_eq!(i.seen_ms, Some(t));
    let a = i.addr.as_ref().unwrap();
    assert_eq!(a.socket, "10.0.0.7:8080".parse().unwrap());
    assert_eq!(a.node.as_deref(), Some("n1"));
    assert!(i.missing().is_none());
    assert_eq!(
        api.instances["v6"].addr.as_ref().unwrap().socket,
        "[fd00::2]:80".parse().unwrap()
    );
    assert_eq!(api.instances["v6"].load, Some(0.0));
    assert_eq!(
        api.instances["fresh"].missing(),
        Missing {
            load: true,
            seen: true,
            addr: false
        }
    );
    assert_eq!(
        api.instances["ghost"].missing(),
        Missing {
            load: false,
            seen: false,
            addr: true
        }
    );
    assert_eq!(api.complete().count(), 2);
    let web = snap.service("web.v2").unwrap();
    assert_eq!(web.instances["w1"].load, Some(80.0));
    assert!(snap.service("empty").unwrap().instances.is_empty());

    // Invalid service names are refused before anything is sent.
    assert_eq!(
        reader.read(&["api", "bad{name}"]).await.unwrap_err(),
        ScoreboardError::InvalidService("bad{name}".into())
    );
    // No service: nothing to read.
    assert!(reader.read::<&str>(&[]).await.unwrap().services.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_skipped_and_counted() {
    let redis = RedisServer::start().unwrap();
    let mut c = conn(&redis);
    let ts = now_ms().to_string();
    let t = ts.as_bytes();
    for id in [&b"ok"[..], b"high", b"neg", b"inf", b"bad id", b"\xff\xfe"] {
        cmd(
            &mut c,
            &[b"HSET", b"headroom:sb:{api}:addr", id, b"10.0.0.1:80"],
        );
    }
    cmd(&mut c, &[b"ZADD", b"headroom:sb:{api}:load", b"10", b"ok"]);
    cmd(&mut c, &[b"ZADD", b"headroom:sb:{api}:seen", t, b"ok"]);
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{api}:load", b"100.5", b"high"],
    );
    cmd(&mut c, &[b"ZADD", b"headroom:sb:{api}:load", b"-3", b"neg"]);
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{api}:load", b"+inf", b"inf"],
    );
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{api}:load", b"5", b"bad id"],
    );
    cmd(&mut c, &[b"ZADD", b"headroom:sb:{api}:seen", b"-1", b"neg"]);
    cmd(
        &mut c,
        &[b"ZADD", b"headroom:sb:{api}:seen", b"1e300", b"high"],
    );
    cmd(
        &mut c,
        &[b"HSET", b"headroom:sb:{api}:addr", b"noport", b"10.0.0.2"],
    );
    cmd(
        &mut c,
        &[
            b"HSET",
            b"headroom:sb:{api}:addr",
            b"zone",
            b"10.0.0.2:80;zone=a",
        ],
    );
    // A key of the wrong type: that service is malformed, the others not.
    cmd(&mut c, &[b"SET", b"headroom:sb:{broken}:load", b"42"]);
    cmd(&mut c, &[b"ZADD", b"headroom:sb:{broken}:seen", t, b"x"]);

    let mut reader = ScoreboardReader::new(&redis.url(), opts(1000)).unwrap();
    let snap = reader.read(&["api", "broken"]).await.unwrap();
    let broken = snap.services["broken"].as_ref().unwrap_err();
    assert_eq!(broken.key, "headroom:sb:{broken}:load");
    assert!(broken.detail.contains("WRONGTYPE"), "{broken}");
    assert_eq!(snap.malformed_count(), 1);

    let api = snap.service("api").unwrap();
    let mut by: BTreeMap<(Piece, String), SkipReason> = BTreeMap::new();
    for s in &api.skipped {
        by.insert((s.piece, s.instance.clone()), s.reason.clone());
    }
    assert_eq!(api.skipped_count(), 10, "{:#?}", api.skipped);
    assert_eq!(by.len(), 10);
    let get = |p, i: &str| by.get(&(p, i.to_string())).cloned();
    assert_eq!(
        get(Piece::Load, "high"),
        Some(SkipReason::LoadOutOfRange(100.5))
    );
    assert_eq!(
        get(Piece::Load, "neg"),
        Some(SkipReason::LoadOutOfRange(-3.0))
    );
    assert_eq!(
        get(Piece::Load, "inf"),
        Some(SkipReason::LoadOutOfRange(f64::INFINITY))
    );
    assert_eq!(
        get(Piece::Load, "bad id"),
        Some(SkipReason::InvalidInstance)
    );
    assert_eq!(
        get(Piece::Addr, "bad id"),
        Some(SkipReason::InvalidInstance)
    );
    assert_eq!(
        get(Piece::Addr, "\u{fffd}\u{fffd}"),
        Some(SkipReason::InvalidInstance)
    );
    assert_eq!(get(Piece::Seen, "neg"), Some(SkipReason::InvalidTime(-1.0)));
    assert_eq!(
        get(Piece::Seen, "high"),
        Some(SkipReason::InvalidTime(1e300))
    );
    assert!(matches!(
        get(Piece::Addr, "noport"),
        Some(SkipReason::InvalidAddress(_))
    ));
    assert!(matches!(
        get(Piece::Addr, "zone"),
        Some(SkipReason::InvalidAddress(_))
    ));
    // What was valid of each instance is kept.
    assert!(api.instances["ok"].missing().is_none());
    assert_eq!(api.instances["high"].load, None);
    assert!(api.instances["high"].addr.is_some());
    assert_eq!(snap.skipped_count(), 10);
}

/// `cmdstat_<name>` → calls, from `INFO commandstats`.
fn command_calls(c: &mut redis::Connection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// A TCP proxy to `upstream` that holds every chunk from the client for
/// `delay` (so each client→server round trip costs `delay`), and counts the
/// chunks. Returns its port.
async fn delaying_proxy(upstream: std::net::SocketAddr, delay: Duration) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let chunks = Arc::new(AtomicU64::new(0));
    let counter = chunks.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_read_is_one_round_trip() {
    let redis = RedisServer::start().unwrap();
    let mut c = conn(&redis);
    let services = ["s0", "s1", "s2", "s3", "s4"];
    for s in services {
        for i in 0..20 {
            let id = format!("10.0.0.{i}:80");
            cmd(
                &mut c,
                &[
                    b"ZADD",
                    format!("headroom:sb:{{{s}}}:load").as_bytes(),
                    b"50",
                    id.as_bytes(),
                ],
            );
            cmd(
                &mut c,
                &[
                    b"ZADD",
                    format!("headroom:sb:{{{s}}}:seen").as_bytes(),
                    b"1",
                    id.as_bytes(),
                ],
            );
            cmd(
                &mut c,
                &[
                    b"HSET",
                    format!("headroom:sb:{{{s}}}:addr").as_bytes(),
                    id.as_bytes(),
                    id.as_bytes(),
                ],
            );
        }
    }
    // Every client→server chunk costs DELAY through the proxy: a read of 20
    // commands in one round trip takes ~DELAY; one round trip per command
    // (or per service) would take 20 (or 5) × DELAY.
    const DELAY: Duration = Duration::from_millis(300);
    let (port, chunks) = delaying_proxy(redis.addr(), DELAY).await;
    let mut reader =
        ScoreboardReader::new(&format!("redis://127.0.0.1:{port}"), opts(5000)).unwrap();
    // Connect (the client's handshake is not part of a read).
    reader.read(&["s0"]).await.unwrap();

    for round in 0..3 {
        let before = command_calls(&mut c);
        let chunks_before = chunks.load(Ordering::Relaxed);
        let start = Instant::now();
        let snap = reader.read(&services).await.unwrap();
        let took = start.elapsed();
        let after = command_calls(&mut c);
        let sent = chunks.load(Ordering::Relaxed) - chunks_before;
        for s in services {
            assert_eq!(snap.service(s).unwrap().complete().count(), 20);
        }
        // Exactly the pipelined commands reached Redis (INFO itself aside).
        let delta: BTreeMap<&str, u64> = after
            .iter()
            .filter(|(k, _)| k.as_str() != "info")
            .map(|(k, v)| (k.as_str(), v - before.get(k).copied().unwrap_or(0)))
            .filter(|(_, d)| *d > 0)
            .collect();
        assert_eq!(
            delta,
            BTreeMap::from([("hgetall", 5), ("smembers", 5), ("zrange", 10)]),
            "round {round}"
        );
        eprintln!("round {round}: {took:?}, {sent} client chunk(s)");
        assert_eq!(sent, 1, "round {round}: the read was sent in {sent} chunks");
        assert!(
            took >= DELAY,
            "round {round}: {took:?}: did not go through the proxy"
        );
        assert!(
            took < DELAY * 2,
            "round {round}: {took:?} for one read: more than one round trip"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_times_out_within_the_timeout() {
    let redis = RedisServer::start().unwrap();
    let (port, _) = delaying_proxy(redis.addr(), Duration::from_millis(1500)).await;
    let timeout = Duration::from_millis(200);
    let mut reader =
        ScoreboardReader::new(&format!("redis://127.0.0.1:{port}"), opts(200)).unwrap();
    for _ in 0..2 {
        let start = Instant::now();
        let e = reader.read(&["api"]).await.unwrap_err();
        let took = start.elapsed();
        assert!(e.is_outage(), "{e}");
        assert_eq!(e, ScoreboardError::Timeout(timeout));
        assert!(took < timeout + Duration::from_millis(100), "{took:?}");
        // Past the backoff, the next read tries again (and times out again).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(matches!(
        reader.last_error(),
        Some(ScoreboardError::Timeout(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let mut redis = RedisServer::start().unwrap();
    let write = |redis: &RedisServer, load: &str| {
        let mut c = conn(redis);
        let ts = now_ms().to_string();
        cmd(
            &mut c,
            &[b"ZADD", b"headroom:sb:{api}:load", load.as_bytes(), b"i1"],
        );
        cmd(
            &mut c,
            &[b"ZADD", b"headroom:sb:{api}:seen", ts.as_bytes(), b"i1"],
        );
        cmd(
            &mut c,
            &[b"HSET", b"headroom:sb:{api}:addr", b"i1", b"10.0.0.1:80"],
        );
    };
    write(&redis, "10");
    let timeout = Duration::from_millis(500);
    let mut reader = ScoreboardReader::new(&redis.url(), opts(500)).unwrap();
    let snap = reader.read(&["api"]).await.unwrap();
    assert_eq!(
        snap.service("api").unwrap().instances["i1"].load,
        Some(10.0)
    );
    assert!(reader.is_connected());

    redis.kill().unwrap();
    // Several reads while it is down: each fails fast as Unreachable (the
    // first on the dead connection, then connection refused or backoff).
    for n in 0..6 {
        let start = Instant::now();
        let e = reader.read(&["api"]).await.unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(e, ScoreboardError::Unreachable(_)),
            "read {n}: {e:?}"
        );
        assert!(e.is_outage());
        assert!(took < timeout, "read {n} took {took:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!reader.is_connected());

    redis.restart().unwrap();
    write(&redis, "77");
    // Back within the largest backoff (400 ms here) plus a read.
    let start = Instant::now();
    let snap = loop {
        match reader.read(&["api"]).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(matches!(e, ScoreboardError::Unreachable(_)), "{e:?}");
                assert!(start.elapsed() < Duration::from_secs(3), "not back: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    eprintln!("reads again {:?} after the restart", start.elapsed());
    assert!(start.elapsed() < Duration::from_millis(1000));
    assert_eq!(
        snap.service("api").unwrap().instances["i1"].load,
        Some(77.0)
    );
    assert!(reader.last_error().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_from_the_start() {
    let port = headroom_tests::free_port().unwrap();
    let mut reader =
        ScoreboardReader::new(&format!("redis://127.0.0.1:{port}"), opts(500)).unwrap();
    let start = Instant::now();
    let e = reader.read(&["api"]).await.unwrap_err();
    assert!(matches!(e, ScoreboardError::Unreachable(_)), "{e:?}");
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(matches!(
        ScoreboardReader::new("nope://x", opts(500)).unwrap_err(),
        ScoreboardError::InvalidUrl(_)
    ));
}
