//! Graceful shutdown of a real shim (real Redis, real sockets): once the
//! instance is marked draining a request on a new connection is still
//! answered (the drain notice), an idle keep-alive connection is closed
//! while a signed request in flight is answered in full, the instance stays
//! registered while it drains, `shutdown()` returns only after the request
//! was answered, and new connections are refused.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use headroom_control::keystore::KeyStore;
use headroom_control::scoreboard::{addr_key, drain_key};
use headroom_control::shim::{start_shim, ShimArgs};
use headroom_control::sigv4;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};

const SVC: &str = "orders";
const T: Duration = Duration::from_secs(10);

/// An upstream whose `/api/slow` tells `entered` it has the request, then
/// answers "slow answer" once `release` turns true (a slow upstream whose
/// slowness the test controls, instead of a sleep it would have to race).
async fn start_gated_upstream(
    entered: mpsc::UnboundedSender<()>,
    release: watch::Receiver<bool>,
) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (entered, release) = (entered.clone(), release.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (entered, mut release) = (entered.clone(), release.clone());
                    async move {
                        let body = if req.uri().path() == "/api/slow" {
                            let _ = entered.send(());
                            let _ = release.wait_for(|r| *r).await;
                            "slow answer"
                        } else {
                            "fast answer"
                        };
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(body.as_bytes()),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A signed GET for `path` to the shim at `addr`, for a client connection
/// of the test's own (the pooled client would reuse its connections).
fn signed_get(addr: SocketAddr, path: &str, creds: &Creds) -> Request<Full<Bytes>> {
    let host = addr.to_string();
    let hdrs = sigv4::sign(
        "GET",
        path,
        "",
        &[("host", &host)],
        b"",
        &creds.akid,
        &creds.secret,
        REGION,
        SVC,
        sigv4::unix_now(),
    );
    let mut b = Request::builder().uri(path).header("host", &host);
    for (n, v) in &hdrs {
        b = b.header(n.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

fn registered(conn: &mut redis::Connection, instance: &str) -> bool {
    let v: Option<String> = redis::cmd("HGET")
        .arg(addr_key(SVC))
        .arg(instance)
        .query(conn)
        .unwrap();
    v.is_some()
}

fn draining(conn: &mut redis::Connection, instance: &str) -> bool {
    redis::cmd("SISMEMBER")
        .arg(drain_key(SVC))
        .arg(instance)
        .query(conn)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_shutdown_is_answered_before_shutdown_returns() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let creds = granted_key(&mut ks, "alice", SVC, &["GET"], &["/api"]).await;
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(false);
    let upstream = start_gated_upstream(entered_tx, release_rx).await;
    let mut args = ShimArgs::new(SVC, "127.0.0.1:0".parse().unwrap(), upstream, &redis.url());
    args.snapshot = Some(dir.path().join("snap.json"));
    args.threads = 2;
    let shim = start_shim(args).await.unwrap();
    let addr = shim.local_addr;
    let instance = shim.instance.clone();
    let in_flight = shim.in_flight.clone();
    let mut rc = redis.conn();
    eventually(T, "the shim registered", || {
        let r = registered(&mut rc, &instance);
        async move { r }
    })
    .await;

    // A request answered at once on a connection of its own, which stays
    // open and idle (keep-alive) until the shim stops; `idle_task` ends when
    // the connection does.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut idle, idle_conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    let idle_task = tokio::spawn(async move {
        let _ = idle_conn.await;
    });
    let resp = tokio::time::timeout(T, idle.send_request(signed_get(addr, "/api/fast", &creds)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"fast answer");

    // The pooled client has no connection yet: the slow request gets a new one.
    let c = client();
    let req = {
        let (c, creds) = (c.clone(), creds.clone());
        tokio::spawn(async move { signed(&c, addr, "GET", "/api/slow", b"", &creds, SVC).await })
    };
    tokio::time::timeout(T, entered.recv())
        .await
        .expect("the slow request reached the upstream")
        .unwrap();
    assert_eq!(in_flight.load(Ordering::Relaxed), 1);

    let shutdown = tokio::spawn(shim.shutdown());
    // Marked draining, the shim still accepts for its drain notice, while
    // balancers catch up: a request on a new connection sent right then is
    // answered, not refused or dropped.
    eventually(T, "the instance marked draining", || {
        let d = draining(&mut rc, &instance);
        async move { d }
    })
    .await;
    let (st, body) = signed(&client(), addr, "GET", "/api/fast", b"", &creds, SVC).await;
    assert_eq!((st, body.as_str()), (200, "fast answer"));

    eventually(T, "the shim to stop accepting", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // Draining: still registered (the balancer keeps its established flows)
    // and marked, so balancers send it no new ones; shutdown waits for the
    // request held by the upstream.
    assert!(registered(&mut rc, &instance));
    assert!(draining(&mut rc, &instance));
    assert!(!shutdown.is_finished());
    assert!(!req.is_finished());
    // The idle keep-alive connection is closed by the shim at once, not
    // kept for the grace, while the slow request is still held.
    tokio::time::timeout(T, idle_task)
        .await
        .expect("the shim closed the idle connection")
        .unwrap();
    assert!(idle.is_closed());
    assert!(!req.is_finished());

    release.send(true).unwrap();
    tokio::time::timeout(T, shutdown)
        .await
        .expect("shutdown returned")
        .unwrap();
    // Returned after the shim's handler had the answer and passed it on.
    assert_eq!(in_flight.load(Ordering::Relaxed), 0);
    let (st, body) = tokio::time::timeout(T, req).await.unwrap().unwrap();
    assert_eq!((st, body.as_str()), (200, "slow answer"));
    // Then unregistered; and nothing listens any more.
    assert!(!registered(&mut rc, &instance));
    assert!(!draining(&mut rc, &instance));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
