//! The permission DB: each change writes state and its stream event in one
//! step; rotation overlap; revocation deletes secrets; errors.

mod common;

use std::time::Duration;

use common::*;
use headroom_control::keystore::{self, Change, Grant, KeyStore, KeyStoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_state_plus_one_event() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let k = ks.create_key("alice").await.unwrap();
    ks.set_grant(
        "svc",
        "alice",
        &Grant {
            methods: vec!["GET".into()],
            prefixes: vec!["/a".into()],
        },
    )
    .await
    .unwrap();
    let r = ks
        .rotate_key(&k.access_key_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_ne!(r.secret, k.secret);
    ks.remove_grant("svc", "alice").await.unwrap();
    ks.revoke_key(&k.access_key_id).await.unwrap();

    let xlen: u64 = redis::cmd("XLEN")
        .arg(keystore::EVENTS_KEY)
        .query(&mut conn)
        .unwrap();
    let seq: u64 = redis::cmd("GET")
        .arg(keystore::SEQ_KEY)
        .query(&mut conn)
        .unwrap();
    assert_eq!((xlen, seq), (5, 5));
    let gen: String = redis::cmd("GET")
        .arg(keystore::GEN_KEY)
        .query(&mut conn)
        .unwrap();
    assert_eq!(gen.len(), 32);
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(keystore::EVENTS_KEY)
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let events: Vec<_> = reply
        .ids
        .iter()
        .map(|e| keystore::parse_event(e).unwrap())
        .collect();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(events.iter().all(|e| e.gen == gen));
    match &events[2].change {
        Change::Key { record } => {
            assert_eq!(record.secret.as_deref(), Some(r.secret.as_str()));
            assert_eq!(record.prev_secret.as_deref(), Some(k.secret.as_str()));
            assert!(record.prev_expires_ms.is_some());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        &events[3].change,
        Change::Grant { grant: None, .. }
    ));
    match &events[4].change {
        Change::Key { record } => {
            assert!(!record.is_active() && record.secret.is_none() && record.prev_secret.is_none())
        }
        other => panic!("{other:?}"),
    }
    let last: String = redis::cmd("GET")
        .arg(keystore::LAST_ID_KEY)
        .query(&mut conn)
        .unwrap();
    assert_eq!(last, events[4].id);
    // Revocation removes the secrets from the DB.
    let secret: Option<String> = redis::cmd("HGET")
        .arg(keystore::key_hash(&k.access_key_id))
        .arg("secret")
        .query(&mut conn)
        .unwrap();
    assert_eq!(secret, None);

    // The snapshot is consistent with the stream position.
    let mut mc = keystore::connect(&redis.url(), Duration::from_secs(2))
        .await
        .unwrap();
    let snap = keystore::read_snapshot(&mut mc, "svc").await.unwrap();
    assert_eq!(
        (snap.seq, snap.last_id.as_str(), snap.gen.as_str()),
        (5, last.as_str(), gen.as_str())
    );
    assert_eq!(snap.keys.len(), 1);
    assert!(snap.grants.is_empty());

    let l = ks.list().await.unwrap();
    assert_eq!(l.keys[0].status, "revoked");
    assert!(!serde_json_contains_secret(&l, &k.secret));

    // Errors change nothing.
    assert!(matches!(
        ks.revoke_key(&k.access_key_id).await,
        Err(KeyStoreError::KeyRevoked(_))
    ));
    assert!(matches!(
        ks.rotate_key(&k.access_key_id, Duration::ZERO).await,
        Err(KeyStoreError::KeyRevoked(_))
    ));
    assert!(matches!(
        ks.revoke_key("HRKNOSUCHKEY00000000").await,
        Err(KeyStoreError::NoSuchKey(_))
    ));
    assert!(matches!(
        ks.remove_grant("svc", "alice").await,
        Err(KeyStoreError::NoSuchGrant { .. })
    ));
    assert!(matches!(
        ks.create_key("bad name").await,
        Err(KeyStoreError::Invalid { .. })
    ));
    let xlen: u64 = redis::cmd("XLEN")
        .arg(keystore::EVENTS_KEY)
        .query(&mut conn)
        .unwrap();
    assert_eq!(xlen, 5);
}

fn serde_json_contains_secret(l: &keystore::Listing, secret: &str) -> bool {
    format!("{l:?}").contains(secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_runs_against_redis() {
    use clap::Parser;
    use headroom_control::cli::{run_keys, KeysArgs};
    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        keys: KeysArgs,
    }
    let redis = RedisServer::start();
    let url = redis.url();
    run_keys(T::parse_from(["t", "--redis", &url, "create", "--principal", "ops"]).keys)
        .await
        .unwrap();
    run_keys(
        T::parse_from([
            "t",
            "--redis",
            &url,
            "grant",
            "--principal",
            "ops",
            "--service",
            "api",
            "--method",
            "get",
            "--prefix",
            "/v1",
        ])
        .keys,
    )
    .await
    .unwrap();
    run_keys(T::parse_from(["t", "--redis", &url, "list"]).keys)
        .await
        .unwrap();
    let mut ks = KeyStore::connect(&url).await.unwrap();
    let l = ks.list().await.unwrap();
    assert_eq!(l.keys.len(), 1);
    assert_eq!(l.keys[0].principal, "ops");
    assert_eq!(
        l.grants["api"]["ops"],
        Grant {
            methods: vec!["GET".into()],
            prefixes: vec!["/v1".into()]
        }
    );
    let akid = l.keys[0].access_key_id.clone();
    run_keys(
        T::parse_from([
            "t",
            "--redis",
            &url,
            "rotate",
            "--access-key-id",
            &akid,
            "--overlap-secs",
            "10",
        ])
        .keys,
    )
    .await
    .unwrap();
    run_keys(T::parse_from(["t", "--redis", &url, "revoke", "--access-key-id", &akid]).keys)
        .await
        .unwrap();
    assert!(run_keys(
        T::parse_from(["t", "--redis", &url, "revoke", "--access-key-id", &akid]).keys
    )
    .await
    .is_err());
    let l = ks.list().await.unwrap();
    assert_eq!(l.keys[0].status, "revoked");
}
