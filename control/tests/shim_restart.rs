//! A shim killed mid-shutdown leaves its instance in the drain set; the
//! next process of the same instance clears the mark when it registers, or
//! balancers would never send it a new flow (real Redis, real shim).

mod common;

use std::time::Duration;

use common::*;
use headroom_control::scoreboard::{addr_key, drain_key};
use headroom_control::shim::{start_shim, ShimArgs};

const SVC: &str = "orders";
const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_shim_clears_the_drain_mark_its_killed_predecessor_left() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut rc = redis.conn();
    // What a shim killed between marking and unregistering leaves behind.
    let instance = "orders-1";
    let _: () = redis::cmd("SADD")
        .arg(drain_key(SVC))
        .arg(instance)
        .query(&mut rc)
        .unwrap();

    let upstream = "127.0.0.1:9".parse().unwrap();
    let mut args = ShimArgs::new(SVC, "127.0.0.1:0".parse().unwrap(), upstream, &redis.url());
    args.snapshot = Some(dir.path().join("snap.json"));
    args.instance = Some(instance.to_string());
    args.threads = 1;
    let shim = start_shim(args).await.unwrap();

    eventually(T, "the shim registered", || {
        let addr: Option<String> = redis::cmd("HGET")
            .arg(addr_key(SVC))
            .arg(instance)
            .query(&mut redis.conn())
            .unwrap();
        async move { addr.is_some() }
    })
    .await;
    let marked: bool = redis::cmd("SISMEMBER")
        .arg(drain_key(SVC))
        .arg(instance)
        .query(&mut rc)
        .unwrap();
    assert!(
        !marked,
        "the registration left the stale drain mark in place"
    );
    shim.shutdown().await;
}
