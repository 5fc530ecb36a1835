//! Load reports through the load-receiver land in the scoreboard exactly as
//! docs/SCOREBOARD.md says; malformed and unauthorised reports are rejected
//! and leave it untouched; the shim registers, reports and unregisters.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use headroom_control::keystore::{Grant, KeyStore};
use headroom_control::load_receiver::{start_load_receiver, LoadReceiverArgs, LoadReceiverHandle};
use headroom_control::scoreboard;
use headroom_control::shim::{start_shim, ShimArgs};
use headroom_control::sigv4::unix_now_ms;

const RECV: &str = "load-receiver";

struct Env {
    redis: RedisServer,
    recv: LoadReceiverHandle,
    ks: KeyStore,
    reporter: Creds,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let k = ks.create_key("reporter").await.unwrap();
    ks.set_grant(
        RECV,
        "reporter",
        &Grant {
            methods: vec!["POST".into()],
            prefixes: vec!["/v1/report/api".into(), "/v1/report/web".into()],
        },
    )
    .await
    .unwrap();
    let recv = start_load_receiver(LoadReceiverArgs::new(
        "127.0.0.1:0".parse().unwrap(),
        &redis.url(),
        dir.path().join("recv.json"),
    ))
    .await
    .unwrap();
    assert!(recv.keysync.state.is_ready());
    Env {
        redis,
        recv,
        ks,
        reporter: Creds {
            akid: k.access_key_id,
            secret: k.secret,
        },
        _dir: dir,
    }
}

async fn report(e: &Env, body: &str) -> (u16, serde_json::Value) {
    let (st, b) = signed(
        &client(),
        e.recv.local_addr,
        "POST",
        "/v1/report",
        body.as_bytes(),
        &e.reporter,
        RECV,
    )
    .await;
    (
        st,
        serde_json::from_str(&b).unwrap_or(serde_json::Value::String(b)),
    )
}

/// Every scoreboard key with its full content, for before/after comparison.
fn dump(conn: &mut redis::Connection) -> BTreeMap<String, Vec<(String, String)>> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("headroom:sb:*").query(conn).unwrap();
    keys.push(scoreboard::SERVICES_SET.into());
    let mut out = BTreeMap::new();
    for k in keys {
        let t: String = redis::cmd("TYPE").arg(&k).query(conn).unwrap();
        let v: Vec<(String, String)> = match t.as_str() {
            "zset" => redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(conn)
                .unwrap(),
            "hash" => redis::cmd("HGETALL").arg(&k).query(conn).unwrap(),
            "set" => {
                let mut m: Vec<String> = redis::cmd("SMEMBERS").arg(&k).query(conn).unwrap();
                m.sort();
                m.into_iter().map(|x| (x, String::new())).collect()
            }
            "none" => vec![],
            other => panic!("unexpected type {other} for {k}"),
        };
        out.insert(k, v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_appear_in_the_scoreboard_per_contract() {
    let e = env().await;
    let mut conn = e.redis.conn();
    let t0 = unix_now_ms();
    let (st, v) = report(
        &e,
        r#"{"service":"api","instance":"10.0.0.1:8080","load":42.5}"#,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = report(&e, r#"[{"service":"api","instance":"10.0.0.2:8080","load":0},{"service":"web","instance":"w1","load":100}]"#).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["accepted"], 2);
    let t1 = unix_now_ms();

    // Plain Redis commands, exactly the key names of docs/SCOREBOARD.md.
    let score = |conn: &mut redis::Connection, k: &str, m: &str| -> Option<f64> {
        redis::cmd("ZSCORE").arg(k).arg(m).query(conn).unwrap()
    };
    assert_eq!(
        score(&mut conn, "headroom:sb:{api}:load", "10.0.0.1:8080"),
        Some(42.5)
    );
    assert_eq!(
        score(&mut conn, "headroom:sb:{api}:load", "10.0.0.2:8080"),
        Some(0.0)
    );
    assert_eq!(
        score(&mut conn, "headroom:sb:{web}:load", "w1"),
        Some(100.0)
    );
    for (k, m) in [
        ("headroom:sb:{api}:seen", "10.0.0.1:8080"),
        ("headroom:sb:{api}:seen", "10.0.0.2:8080"),
        ("headroom:sb:{web}:seen", "w1"),
    ] {
        let seen = score(&mut conn, k, m).unwrap() as i64;
        assert!(
            seen >= t0 && seen <= t1,
            "{k} {m}: {seen} not in [{t0}, {t1}]"
        );
    }
    let mut services: Vec<String> = redis::cmd("SMEMBERS")
        .arg("headroom:services")
        .query(&mut conn)
        .unwrap();
    services.sort();
    assert_eq!(services, vec!["api", "web"]);
    // The balancer's read, lowest load first.
    let mut mc = headroom_control::keystore::connect(&e.redis.url(), Duration::from_secs(2))
        .await
        .unwrap();
    let board = scoreboard::read_service(&mut mc, "api").await.unwrap();
    assert_eq!(
        board.load,
        vec![
            ("10.0.0.2:8080".to_string(), 0.0),
            ("10.0.0.1:8080".to_string(), 42.5)
        ]
    );
    assert_eq!(board.seen.len(), 2);

    // Not allowed to report for this service: 403, nothing written, even
    // when batched with an allowed one.
    let before = dump(&mut conn);
    let (st, v) = report(&e, r#"{"service":"db","instance":"d1","load":1}"#).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (403, Some("path_not_granted")),
        "{v}"
    );
    let (st, _) = report(
        &e,
        r#"[{"service":"api","instance":"x","load":1},{"service":"db","instance":"d1","load":1}]"#,
    )
    .await;
    assert_eq!(st, 403);
    // Unsigned: 401.
    let (st, _) = send(
        &client(),
        hyper::Request::post(format!("http://{}/v1/report", e.recv.local_addr))
            .body(http_body_util::Full::new(Bytes::from_static(
                br#"{"service":"api","instance":"x","load":1}"#,
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(st, 401);
    assert_eq!(
        dump(&mut conn),
        before,
        "rejected reports changed the scoreboard"
    );
    e.recv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_reports_are_rejected_naming_the_field() {
    let e = env().await;
    let mut conn = e.redis.conn();
    let (st, _) = report(&e, r#"{"service":"api","instance":"i1","load":50}"#).await;
    assert_eq!(st, 200);
    let before = dump(&mut conn);
    assert!(!before.is_empty());
    let cases: &[(&str, &str, &str)] = &[
        ("not JSON", r#"{"service":"api","#, "body"),
        ("JSON scalar", "42", "body"),
        ("empty batch", "[]", "body"),
        (
            "missing service",
            r#"{"instance":"i1","load":5}"#,
            "service",
        ),
        (
            "service not a string",
            r#"{"service":7,"instance":"i1","load":5}"#,
            "service",
        ),
        (
            "service with bad characters",
            r#"{"service":"a{b}","instance":"i1","load":5}"#,
            "service",
        ),
        (
            "empty service",
            r#"{"service":"","instance":"i1","load":5}"#,
            "service",
        ),
        (
            "missing instance",
            r#"{"service":"api","load":5}"#,
            "instance",
        ),
        (
            "instance with a space",
            r#"{"service":"api","instance":"i 1","load":5}"#,
            "instance",
        ),
        (
            "missing load",
            r#"{"service":"api","instance":"i1"}"#,
            "load",
        ),
        (
            "load as a string",
            r#"{"service":"api","instance":"i1","load":"5"}"#,
            "load",
        ),
        (
            "load null",
            r#"{"service":"api","instance":"i1","load":null}"#,
            "load",
        ),
        (
            "load negative",
            r#"{"service":"api","instance":"i1","load":-0.5}"#,
            "load",
        ),
        (
            "load above 100",
            r#"{"service":"api","instance":"i1","load":100.01}"#,
            "load",
        ),
        (
            "unknown field",
            r#"{"service":"api","instance":"i1","load":5,"extra":1}"#,
            "extra",
        ),
        (
            "batch item not an object",
            r#"[{"service":"api","instance":"i1","load":5},3]"#,
            "[1].report",
        ),
        (
            "one bad item in a batch",
            r#"[{"service":"api","instance":"i2","load":5},{"service":"api","instance":"i3","load":500}]"#,
            "[1].load",
        ),
    ];
    assert!(cases.len() >= 10);
    for (what, body, field) in cases {
        let (st, v) = report(&e, body).await;
        assert_eq!(st, 400, "{what}: {v}");
        assert_eq!(v["error"], "invalid_report", "{what}: {v}");
        assert_eq!(v["field"], *field, "{what}: {v}");
    }
    assert_eq!(
        dump(&mut conn),
        before,
        "malformed reports changed the scoreboard"
    );
    e.recv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_registers_reports_its_load_and_unregisters() {
    let mut e = env().await;
    // The service gives its own load on a local endpoint.
    let load_srv = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let load_addr = load_srv.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = load_srv.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"{\"load\": 73}")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let k = e.ks.create_key("api-shim").await.unwrap();
    e.ks.set_grant(
        RECV,
        "api-shim",
        &Grant {
            methods: vec!["POST".into()],
            prefixes: vec!["/v1/report/api".into()],
        },
    )
    .await
    .unwrap();
    // wait until the receiver knows the new key and grant
    let creds = Creds {
        akid: k.access_key_id.clone(),
        secret: k.secret.clone(),
    };
    let recv_addr = e.recv.local_addr;
    eventually(
        Duration::from_secs(10),
        "receiver knows the shim's key",
        || {
            let creds = creds.clone();
            async move {
                let (st, _) = signed(
                    &client(),
                    recv_addr,
                    "POST",
                    "/v1/report",
                    br#"{"service":"api","instance":"probe","load":1}"#,
                    &creds,
                    RECV,
                )
                .await;
                st == 200
            }
        },
    )
    .await;
    let upstream = start_echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = ShimArgs::new(
        "api",
        "127.0.0.1:0".parse().unwrap(),
        upstream,
        &e.redis.url(),
    );
    a.snapshot = Some(dir.path().join("s.json"));
    a.load_receiver = Some(format!("http://{}", e.recv.local_addr));
    a.report_interval_ms = 100;
    a.load_url = Some(format!("http://{load_addr}/load"));
    a.report_key_id = Some(k.access_key_id);
    a.report_secret = Some(k.secret);
    a.node = Some("node-a".into());
    let s = start_shim(a).await.unwrap();
    let inst = s.instance.clone();
    assert_eq!(inst, s.local_addr.to_string());
    let mut conn = e.redis.conn();
    eventually(
        Duration::from_secs(10),
        "shim's report in the scoreboard",
        || {
            let v: Option<f64> = redis::cmd("ZSCORE")
                .arg("headroom:sb:{api}:load")
                .arg(&inst)
                .query(&mut conn)
                .unwrap();
            async move { v == Some(73.0) }
        },
    )
    .await;
    let addr: Option<String> = redis::cmd("HGET")
        .arg("headroom:sb:{api}:addr")
        .arg(&inst)
        .query(&mut conn)
        .unwrap();
    assert_eq!(addr, Some(format!("{};node=node-a", s.local_addr)));
    let registered: Option<String> = redis::cmd("HGET")
        .arg("headroom:auth:instances:api")
        .arg(&inst)
        .query(&mut conn)
        .unwrap();
    assert!(registered.is_some());
    s.shutdown().await;
    let addr: Option<String> = redis::cmd("HGET")
        .arg("headroom:sb:{api}:addr")
        .arg(&inst)
        .query(&mut conn)
        .unwrap();
    let load: Option<f64> = redis::cmd("ZSCORE")
        .arg("headroom:sb:{api}:load")
        .arg(&inst)
        .query(&mut conn)
        .unwrap();
    let seen: Option<f64> = redis::cmd("ZSCORE")
        .arg("headroom:sb:{api}:seen")
        .arg(&inst)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        (addr, load, seen),
        (None, None, None),
        "unregistered at shutdown"
    );
    e.recv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_registers_again_after_redis_restarts_empty() {
    let mut redis = RedisServer::start();
    let upstream = start_echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = ShimArgs::new(
        "api",
        "127.0.0.1:0".parse().unwrap(),
        upstream,
        &redis.url(),
    );
    a.snapshot = Some(dir.path().join("s.json"));
    let s = start_shim(a).await.unwrap();
    let inst = s.instance.clone();
    let want = Some(s.local_addr.to_string());
    let addr_of = |conn: &mut redis::Connection| -> Option<String> {
        redis::cmd("HGET")
            .arg("headroom:sb:{api}:addr")
            .arg(&inst)
            .query(conn)
            .unwrap_or(None)
    };
    let mut conn = redis.conn();
    eventually(Duration::from_secs(10), "first registration", || {
        let v = addr_of(&mut conn);
        let want = want.clone();
        async move { v == want }
    })
    .await;
    // A Redis that comes back empty learns the address again: otherwise the
    // balancer would never route to this instance again.
    redis.restart_empty();
    let mut conn = redis.conn();
    assert_eq!(addr_of(&mut conn), None, "the restarted Redis is empty");
    eventually(
        Duration::from_secs(15),
        "registration after the restart",
        || {
            let v = addr_of(&mut conn);
            let want = want.clone();
            async move { v == want }
        },
    )
    .await;
    s.shutdown().await;
}

/// Polls until nothing listens on `addr` any more (bounded).
async fn wait_refused(addr: std::net::SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting connections after the stop"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_report_in_flight_finish_then_refuses_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Env {
        redis,
        recv,
        reporter,
        ks: _ks,
        _dir,
    } = env().await;
    let addr = recv.local_addr;
    let body = br#"{"service":"api","instance":"10.0.0.9:8080","load":37}"#;
    let host = addr.to_string();
    let hdrs = headroom_control::sigv4::sign(
        "POST",
        "/v1/report",
        "",
        &[("host", &host)],
        body,
        &reporter.akid,
        &reporter.secret,
        REGION,
        RECV,
        headroom_control::sigv4::unix_now(),
    );
    let mut head = format!("POST /v1/report HTTP/1.1\r\nhost: {host}\r\n");
    for (n, v) in &hdrs {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    // The request is in flight: head and half the body sent, the receiver
    // waiting for the rest.
    let (first, rest) = body.split_at(body.len() / 2);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let shutdown = tokio::spawn(recv.shutdown());
    // Stopped accepting at once ...
    wait_refused(addr).await;
    // ... but still draining: shutdown waits for the report in flight
    // (well inside its grace).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown returned with a report in flight"
    );
    s.write_all(rest).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("no answer and close")
        .expect("the connection was reset instead of answered");
    // Closed as a client does once answered, ending the lingering close.
    drop(s);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(answer.ends_with(r#"{"accepted":1}"#), "{answer:?}");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown did not return")
        .unwrap();
    let mut conn = redis.conn();
    let load: Option<f64> = redis::cmd("ZSCORE")
        .arg("headroom:sb:{api}:load")
        .arg("10.0.0.9:8080")
        .query(&mut conn)
        .unwrap();
    assert_eq!(load, Some(37.0), "the report in flight was not written");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "a new connection was accepted after shutdown"
    );
}
