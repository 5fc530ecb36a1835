//! Per-service key filtering in key sync: an instance of service A holds
//! (in memory and in its disk snapshot) only the secrets of principals
//! granted on A; keys of other principals are known without secrets and
//! refused with 403 `no_grant`; a grant added at run time brings the secrets
//! by a fresh snapshot, a grant removed strips them again; a disk snapshot
//! written by an older version (all secrets) is stripped on load.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use headroom_control::authz::{AuthState, Source};
use headroom_control::keystore::{self, Grant, KeyRecord, KeyStore, Snapshot};
use headroom_control::keysync::{self, KeySyncConfig};
use headroom_control::shim::{start_shim, ShimArgs, ShimHandle};

const A: &str = "orders";
const B: &str = "billing";
const T: Duration = Duration::from_secs(10);

fn all() -> Grant {
    Grant {
        methods: vec!["*".into()],
        prefixes: vec!["/".into()],
    }
}

async fn new_key(ks: &mut KeyStore, principal: &str) -> Creds {
    let k = ks.create_key(principal).await.unwrap();
    Creds {
        akid: k.access_key_id,
        secret: k.secret,
    }
}

async fn shim(redis_url: &str, snapshot: &Path) -> ShimHandle {
    let upstream = start_echo_upstream().await;
    let mut a = ShimArgs::new(A, "127.0.0.1:0".parse().unwrap(), upstream, redis_url);
    a.snapshot = Some(snapshot.to_path_buf());
    a.sync_block_ms = 300;
    start_shim(a).await.unwrap()
}

async fn status(c: &HttpClient, s: &ShimHandle, creds: &Creds, path: &str) -> (u16, String) {
    let (st, body) = signed(c, s.local_addr, "GET", path, b"", creds, A).await;
    (st, error_of(&body))
}

async fn wait_for(c: &HttpClient, s: &ShimHandle, creds: &Creds, want: (u16, &str), what: &str) {
    eventually(T, what, || async {
        let (st, e) = status(c, s, creds, "/x").await;
        st == want.0 && (want.1.is_empty() || e == want.1)
    })
    .await;
}

/// Every secret string the in-memory snapshot holds.
fn secrets_in_memory(state: &AuthState) -> Vec<String> {
    state
        .snapshot()
        .unwrap()
        .keys
        .iter()
        .flat_map(|r| [r.secret.clone(), r.prev_secret.clone()])
        .flatten()
        .collect()
}

fn record(state: &AuthState, akid: &str) -> KeyRecord {
    state
        .snapshot()
        .unwrap()
        .keys
        .into_iter()
        .find(|r| r.akid == akid)
        .unwrap_or_else(|| panic!("{akid} not in the snapshot"))
}

fn file_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// `secret` is neither in memory nor in the disk snapshot.
fn assert_absent(s: &ShimHandle, file: &Path, secret: &str, what: &str) {
    assert!(
        !secrets_in_memory(s.state()).iter().any(|x| x == secret),
        "{what}: secret in memory"
    );
    assert!(!file_text(file).contains(secret), "{what}: secret on disk");
}

/// `secret` is both in memory and in the disk snapshot.
fn assert_present(s: &ShimHandle, file: &Path, secret: &str, what: &str) {
    assert!(
        secrets_in_memory(s.state()).iter().any(|x| x == secret),
        "{what}: secret not in memory"
    );
    assert!(
        file_text(file).contains(secret),
        "{what}: secret not on disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_holds_only_secrets_of_principals_granted_on_its_service() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.json");
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(A, "alice", &all()).await.unwrap();
    ks.set_grant(B, "bob", &all()).await.unwrap();
    let alice = new_key(&mut ks, "alice").await;
    let bob = new_key(&mut ks, "bob").await;
    let carol = new_key(&mut ks, "carol").await; // no grant anywhere

    let s = shim(&redis.url(), &file).await;
    let c = client();
    wait_for(&c, &s, &alice, (200, ""), "alice served").await;

    // Start snapshot: alice's secret here, bob's and carol's keys known
    // without secrets.
    assert_present(&s, &file, &alice.secret, "alice at start");
    assert_absent(&s, &file, &bob.secret, "bob at start");
    assert_absent(&s, &file, &carol.secret, "carol at start");
    let rb = record(s.state(), &bob.akid);
    assert_eq!(
        (rb.principal.as_str(), rb.status.as_str()),
        ("bob", "active")
    );
    assert!(rb.secret.is_none() && rb.prev_secret.is_none());

    // Signed correctly with a key of a principal not granted here: no_grant,
    // like before; unknown and revoked keys answer as before.
    assert_eq!(status(&c, &s, &bob, "/x").await, (403, "no_grant".into()));
    assert_eq!(status(&c, &s, &carol, "/x").await, (403, "no_grant".into()));
    let unknown = Creds {
        akid: "HRKNOTAKEYATALL00000".into(),
        secret: bob.secret.clone(),
    };
    assert_eq!(
        status(&c, &s, &unknown, "/x").await,
        (401, "unknown_key".into())
    );
    ks.revoke_key(&carol.akid).await.unwrap();
    wait_for(&c, &s, &carol, (401, "key_revoked"), "carol revoked").await;

    // Live events: a new key and a rotation for bob stay stripped.
    let bob2 = new_key(&mut ks, "bob").await;
    wait_for(&c, &s, &bob2, (403, "no_grant"), "bob2 known").await;
    let rot = ks
        .rotate_key(&bob.akid, Duration::from_secs(600))
        .await
        .unwrap();
    eventually(T, "bob's rotation applied", || async {
        record(s.state(), &bob.akid).secret_id.as_deref() == Some("2")
    })
    .await;
    let rb = record(s.state(), &bob.akid);
    assert!(rb.secret.is_none() && rb.prev_secret.is_none() && rb.prev_expires_ms.is_none());
    // The batch is persisted after it is applied: wait for the file too.
    eventually(T, "rotation persisted", || async {
        let snap: Snapshot = serde_json::from_str(&file_text(&file)).unwrap();
        snap.keys
            .iter()
            .any(|r| r.akid == bob.akid && r.secret_id.as_deref() == Some("2"))
    })
    .await;
    for (secret, what) in [
        (&bob.secret, "bob's old secret after rotation"),
        (&rot.secret, "bob's new secret after rotation"),
        (&bob2.secret, "bob2 after create"),
    ] {
        assert_absent(&s, &file, secret, what);
    }
    let rot_creds = Creds {
        akid: bob.akid.clone(),
        secret: rot.secret.clone(),
    };
    assert_eq!(
        status(&c, &s, &rot_creds, "/x").await,
        (403, "no_grant".into())
    );
    // A new key of a granted principal arrives with its secret.
    let alice2 = new_key(&mut ks, "alice").await;
    wait_for(&c, &s, &alice2, (200, ""), "alice2 served").await;
    eventually(T, "alice2 persisted", || async {
        file_text(&file).contains(&alice2.secret)
    })
    .await;
    assert_present(&s, &file, &alice2.secret, "alice2 after create");
    // None of this needed a fresh snapshot.
    assert_eq!(s.keysync.resync_count(), 0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_at_runtime_fetches_secrets_and_ungrant_strips_them() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.json");
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    ks.set_grant(A, "alice", &all()).await.unwrap();
    ks.set_grant(B, "bob", &all()).await.unwrap();
    let alice = new_key(&mut ks, "alice").await;
    let bob = new_key(&mut ks, "bob").await;
    let s = shim(&redis.url(), &file).await;
    let c = client();
    wait_for(&c, &s, &alice, (200, ""), "alice served").await;
    assert_eq!(status(&c, &s, &bob, "/x").await, (403, "no_grant".into()));
    assert_absent(&s, &file, &bob.secret, "bob before the grant");
    assert_eq!(s.keysync.resync_count(), 0);

    // Grant bob on A: a fresh snapshot brings his secret; his key works.
    ks.set_grant(A, "bob", &all()).await.unwrap();
    eventually(
        Duration::from_secs(3),
        "bob served after the grant",
        || async { status(&c, &s, &bob, "/x").await.0 == 200 },
    )
    .await;
    assert!(s.keysync.resync_count() >= 1, "the grant needs a snapshot");
    let after_grant = s.keysync.resync_count();
    assert_present(&s, &file, &bob.secret, "bob after the grant");
    // His later key events keep their secrets.
    let bob2 = new_key(&mut ks, "bob").await;
    wait_for(&c, &s, &bob2, (200, ""), "bob2 served").await;

    // Changing the grant of a principal already granted: no snapshot.
    ks.set_grant(
        A,
        "bob",
        &Grant {
            methods: vec!["GET".into()],
            prefixes: vec!["/only".into()],
        },
    )
    .await
    .unwrap();
    wait_for(
        &c,
        &s,
        &bob,
        (403, "path_not_granted"),
        "bob's narrower grant",
    )
    .await;
    assert_eq!(status(&c, &s, &bob, "/only/x").await.0, 200);
    // A grant for a principal with no keys yet needs no snapshot either;
    // its first key then arrives with its secret.
    ks.set_grant(A, "dave", &all()).await.unwrap();
    let dave = new_key(&mut ks, "dave").await;
    wait_for(&c, &s, &dave, (200, ""), "dave served").await;
    assert_eq!(s.keysync.resync_count(), after_grant);

    // Ungrant bob: his secrets leave memory and disk, his keys get no_grant.
    ks.remove_grant(A, "bob").await.unwrap();
    wait_for(&c, &s, &bob, (403, "no_grant"), "bob refused after ungrant").await;
    assert_eq!(
        status(&c, &s, &bob2, "/only/x").await,
        (403, "no_grant".into())
    );
    eventually(T, "ungrant persisted", || async {
        !file_text(&file).contains(&bob.secret)
    })
    .await;
    assert_absent(&s, &file, &bob.secret, "bob after ungrant");
    assert_absent(&s, &file, &bob2.secret, "bob2 after ungrant");
    assert_present(&s, &file, &alice.secret, "alice untouched by bob's ungrant");
    assert_eq!(status(&c, &s, &alice, "/x").await.0, 200);
    assert_eq!(s.keysync.resync_count(), after_grant);

    // And granting again works again (one more snapshot).
    ks.set_grant(A, "bob", &all()).await.unwrap();
    wait_for(&c, &s, &bob2, (200, ""), "bob2 served after re-grant").await;
    assert!(s.keysync.resync_count() > after_grant);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_disk_snapshot_with_all_secrets_is_stripped_on_load() {
    // A snapshot file as an older version wrote it: every key with secrets.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.json");
    let key = |principal: &str| {
        let creds = Creds {
            akid: keystore::new_access_key_id().unwrap(),
            secret: keystore::new_secret().unwrap(),
        };
        let rec = KeyRecord {
            akid: creds.akid.clone(),
            principal: principal.into(),
            status: "active".into(),
            secret: Some(creds.secret.clone()),
            secret_id: Some("1".into()),
            prev_secret: None,
            prev_expires_ms: None,
            created_ms: "1".into(),
            updated_ms: "1".into(),
        };
        (creds, rec)
    };
    let (alice, ra) = key("alice");
    let (bob, rb) = key("bob");
    let old = Snapshot {
        service: A.into(),
        gen: "0123456789abcdef0123456789abcdef".into(),
        seq: 2,
        last_id: "1-0".into(),
        keys: vec![ra, rb],
        grants: [("alice".to_string(), all())].into_iter().collect(),
    };
    keysync::save_snapshot(&file, &old).unwrap();
    assert!(file_text(&file).contains(&bob.secret));

    // Redis unreachable (nothing listens there): the shim starts from disk.
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let s = shim(&dead, &file).await;
    assert!(s.state().is_ready());
    assert_eq!(s.state().source(), Source::Disk);
    let c = client();
    assert_eq!(status(&c, &s, &alice, "/x").await.0, 200);
    assert_eq!(status(&c, &s, &bob, "/x").await, (403, "no_grant".into()));
    assert_absent(&s, &file, &bob.secret, "bob in an old snapshot");
    assert_present(&s, &file, &alice.secret, "alice in an old snapshot");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_script_filters_by_grant_and_identity_prefix() {
    let redis = RedisServer::start();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let mm = headroom_control::node_report::NODE_REPORT_SERVICE;
    ks.set_grant(mm, "container-manager", &all()).await.unwrap();
    let cm = new_key(&mut ks, "container-manager").await;
    let node = new_key(&mut ks, "node-db").await;
    let other = new_key(&mut ks, "nodeless").await;
    let mut conn = keystore::connect(&redis.url(), Duration::from_secs(2))
        .await
        .unwrap();
    let secret_of = |snap: &Snapshot, akid: &str| {
        snap.keys
            .iter()
            .find(|r| r.akid == akid)
            .map(|r| r.secret.clone())
            .expect("key listed")
    };
    // Without prefixes: only the granted principal's secret.
    let plain = keystore::read_snapshot(&mut conn, mm).await.unwrap();
    assert_eq!(plain.keys.len(), 3);
    assert_eq!(secret_of(&plain, &cm.akid), Some(cm.secret.clone()));
    assert_eq!(secret_of(&plain, &node.akid), None);
    assert_eq!(secret_of(&plain, &other.akid), None);
    // The machine-manager's key sync also keeps node principals' secrets
    // (node reports are authenticated by principal name, not by grant):
    // it passes the `node-` prefix; nobody else passes any.
    let prefixes = vec![headroom_control::node_report::node_principal("")];
    assert_eq!(prefixes, vec!["node-".to_string()]);
    assert!(KeySyncConfig::new(&redis.url(), A)
        .identity_principal_prefixes
        .is_empty());
    let scoped = keystore::read_snapshot_scoped(&mut conn, mm, &prefixes)
        .await
        .unwrap();
    assert_eq!(secret_of(&scoped, &cm.akid), Some(cm.secret.clone()));
    assert_eq!(secret_of(&scoped, &node.akid), Some(node.secret.clone()));
    assert_eq!(secret_of(&scoped, &other.akid), None);
    // Another service sees no secret at all.
    let elsewhere = keystore::read_snapshot(&mut conn, A).await.unwrap();
    assert!(elsewhere.keys.iter().all(|r| r.secret.is_none()));
    assert_eq!(elsewhere.keys.len(), 3);
}
