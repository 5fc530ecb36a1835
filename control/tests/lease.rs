//! The Redis leader lease with a real redis-server: one leader among
//! contenders, hand-over on expiry, compare-and-set renew/release, and the
//! fencing token refusing a superseded holder's writes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use headroom_control::cmd_args;
use headroom_control::lease::{Acquired, Lease, LeaseError, LeaseKeeper};

async fn conn(r: &RedisServer) -> redis::aio::ConnectionManager {
    headroom_control::lease::connect(&r.url()).await.unwrap()
}

fn leader(a: Acquired) -> headroom_control::lease::Fence {
    match a {
        Acquired::Leader(f) => f,
        Acquired::Held(v) => panic!("expected to lead, held by {v}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_contenders_only_one_leads_and_cas_protects_the_lease() {
    let r = RedisServer::start();
    let mut c = conn(&r).await;
    let a = Lease::new("t", "a", Duration::from_secs(30));
    let b = Lease::new("t", "b", Duration::from_secs(30));
    let fa = leader(a.try_acquire(&mut c).await.unwrap());
    assert_eq!(fa.token, 1);
    // b sees a's value and gets no token.
    assert_eq!(
        b.try_acquire(&mut c).await.unwrap(),
        Acquired::Held("a#1".into())
    );
    // b cannot renew or release a's lease (compare-and-set on the value).
    assert!(!b.renew(&mut c, 1).await.unwrap());
    assert!(!b.release(&mut c, 1).await.unwrap());
    assert!(!a.release(&mut c, 7).await.unwrap());
    assert_eq!(a.current(&mut c).await.unwrap().as_deref(), Some("a#1"));
    assert!(a.renew(&mut c, 1).await.unwrap());
    // a releases; b acquires with a newer token.
    assert!(a.release(&mut c, 1).await.unwrap());
    let fb = leader(b.try_acquire(&mut c).await.unwrap());
    assert_eq!(fb.token, 2);
    // A failed acquisition does not burn tokens.
    assert!(matches!(
        a.try_acquire(&mut c).await.unwrap(),
        Acquired::Held(_)
    ));
    let fence: String = redis::cmd("GET")
        .arg("t:fence")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fence, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_hands_over_and_the_stale_leaders_fenced_write_is_refused() {
    let r = RedisServer::start();
    let mut c = conn(&r).await;
    let a = Lease::new("t", "a", Duration::from_millis(400));
    let b = Lease::new("t", "b", Duration::from_millis(400));
    let fa = leader(a.try_acquire(&mut c).await.unwrap());
    // a writes while it leads.
    fa.exec(&mut c, &[cmd_args!("SET", "owner", "a")])
        .await
        .unwrap();
    // a "pauses": it stops renewing; after the TTL b takes over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let fb = leader(b.try_acquire(&mut c).await.unwrap());
    assert!(fb.token > fa.token);
    // a wakes up: its renewal fails and its write is refused by the fence.
    assert!(!a.renew(&mut c, fa.token).await.unwrap());
    let err = fa
        .exec(&mut c, &[cmd_args!("SET", "owner", "a-stale")])
        .await
        .unwrap_err();
    match err {
        LeaseError::Fenced { token, current } => {
            assert_eq!((token, current), (fa.token, fb.token))
        }
        e => panic!("expected Fenced, got {e}"),
    }
    let owner: String = redis::cmd("GET")
        .arg("owner")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(owner, "a", "the refused write must not have happened");
    // b's write, with the current token, goes through — all commands of it.
    let out = fb
        .exec(
            &mut c,
            &[cmd_args!("SET", "owner", "b"), cmd_args!("INCR", "writes")],
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    let owner: String = redis::cmd("GET")
        .arg("owner")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(owner, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_elect_one_leader_and_a_killed_leader_is_replaced() {
    let r = RedisServer::start();
    let ttl = Duration::from_millis(1000);
    let ka = LeaseKeeper::start(Lease::new("k", "a", ttl), conn(&r).await);
    let kb = LeaseKeeper::start(Lease::new("k", "b", ttl), conn(&r).await);
    eventually(Duration::from_secs(10), "a leader", || async {
        ka.role().fence().is_some() || kb.role().fence().is_some()
    })
    .await;
    // Watch for a while: never two leaders at once.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let (a, b) = (ka.role().fence().is_some(), kb.role().fence().is_some());
        assert!(!(a && b), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(Duration::from_secs(10), "a leader", || async {
        ka.role().fence().is_some() || kb.role().fence().is_some()
    })
    .await;
    let (dead, live) = if ka.role().fence().is_some() {
        (ka, kb)
    } else {
        (kb, ka)
    };
    let old = dead.role().fence().cloned().unwrap();
    // Crash: no release. The survivor takes over after the TTL.
    let t0 = Instant::now();
    dead.abort();
    eventually(Duration::from_secs(10), "take-over", || async {
        live.role().fence().is_some()
    })
    .await;
    let new = live.role().fence().cloned().unwrap();
    assert!(new.token > old.token);
    assert!(
        t0.elapsed() >= ttl / 2,
        "took over before the dead leader's lease could have expired"
    );
    let mut c = conn(&r).await;
    assert!(matches!(
        old.exec(&mut c, &[cmd_args!("SET", "x", "1")]).await,
        Err(LeaseError::Fenced { .. })
    ));
    // A clean stop releases at once.
    live.stop().await;
    let v: Option<String> = redis::cmd("GET")
        .arg("k:lease")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_is_refused_after_redis_lost_the_counter() {
    let r = RedisServer::start();
    let mut c = conn(&r).await;
    let a = Lease::new("t", "a", Duration::from_secs(30));
    let b = Lease::new("t", "b", Duration::from_secs(30));
    // a leads with token 3 (two earlier leaderships).
    for _ in 0..2 {
        let f = leader(a.try_acquire(&mut c).await.unwrap());
        assert!(a.release(&mut c, f.token).await.unwrap());
    }
    let fa = leader(a.try_acquire(&mut c).await.unwrap());
    assert_eq!(fa.token, 3);
    // Redis loses everything (restart without persistence); b leads with
    // token 1, below a's.
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let fb = leader(b.try_acquire(&mut c).await.unwrap());
    assert_eq!(fb.token, 1);
    let err = fa
        .exec(&mut c, &[cmd_args!("SET", "owner", "a-stale")])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LeaseError::Fenced {
                token: 3,
                current: 1
            }
        ),
        "{err}"
    );
    fb.exec(&mut c, &[cmd_args!("SET", "owner", "b")])
        .await
        .unwrap();
    let owner: String = redis::cmd("GET")
        .arg("owner")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(owner, "b");
}
