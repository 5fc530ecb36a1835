//! curl --aws-sigv4 through the shim, and every tampering case rejected with
//! the right status and reason.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use headroom_control::keystore::{Grant, KeyStore};
use headroom_control::shim::{start_shim, ShimArgs, ShimHandle};

const SVC: &str = "orders";

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl output");
    (code.trim().parse().expect("status"), body.to_string())
}

fn curl_signed(creds: &Creds, scope: &str, extra: &[&str], url: &str) -> (u16, String) {
    let user = format!("{}:{}", creds.akid, creds.secret);
    let mut a = vec!["--aws-sigv4", scope, "--user", &user];
    a.extend_from_slice(extra);
    a.push(url);
    curl(&a)
}

/// Capture the exact request curl sends (signed), to replay it tampered.
fn capture_curl(
    creds: &Creds,
    scope: &str,
    extra: &[&str],
    path_q: &str,
    shim: SocketAddr,
) -> String {
    // Listen on a free port; curl must sign for the shim's host, so we send
    // `Host:` of the shim via --connect-to.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cap = l.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        String::from_utf8(buf).unwrap()
    });
    let connect_to = format!("127.0.0.1:{}:127.0.0.1:{}", shim.port(), cap.port());
    let mut a: Vec<&str> = vec!["--connect-to", &connect_to];
    a.extend_from_slice(extra);
    let url = format!("http://127.0.0.1:{}{}", shim.port(), path_q);
    let _ = curl_signed(creds, scope, &a, &url);
    handle.join().unwrap()
}

/// Send raw bytes to the shim, return (status, body).
fn raw(shim: SocketAddr, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(shim).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn with_close(req: &str) -> String {
    // make the server close after answering
    req.replacen("\r\n", "\r\nConnection: close\r\n", 1)
}

struct Env {
    _redis: RedisServer,
    shim: ShimHandle,
    ks: KeyStore,
    good: Creds,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let k = ks.create_key("alice").await.unwrap();
    ks.set_grant(
        SVC,
        "alice",
        &Grant {
            methods: vec!["GET".into(), "POST".into()],
            prefixes: vec!["/api".into()],
        },
    )
    .await
    .unwrap();
    let upstream = start_echo_upstream().await;
    let mut args = ShimArgs::new(SVC, "127.0.0.1:0".parse().unwrap(), upstream, &redis.url());
    args.snapshot = Some(dir.path().join("snap.json"));
    let shim = start_shim(args).await.unwrap();
    assert!(shim.state().is_ready());
    Env {
        _redis: redis,
        shim,
        ks,
        good: Creds {
            akid: k.access_key_id,
            secret: k.secret,
        },
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_shim_succeeds_and_principal_is_set() {
    let e = env().await;
    let port = e.shim.local_addr.port();
    let scope = format!("aws:amz:{REGION}:{SVC}");
    let url = format!("http://127.0.0.1:{port}/api/items?b=2&a=1");
    // GET, with a forged principal header that must be replaced.
    let (st, body) = curl_signed(
        &e.good,
        &scope,
        &["-H", "x-headroom-principal: admin"],
        &url,
    );
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["path"], "/api/items");
    assert_eq!(v["query"], "b=2&a=1");
    assert_eq!(v["principals"], serde_json::json!(["alice"]));
    // POST with a body.
    let (st, body) = curl_signed(
        &e.good,
        &scope,
        &["-H", "content-type: application/json", "-d", r#"{"x":1}"#],
        &format!("http://127.0.0.1:{port}/api/items"),
    );
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["body"], r#"{"x":1}"#);
    // Rust client (standard canonical form, x-amz-content-sha256 signed).
    let c = client();
    let (st, body) = signed(
        &c,
        e.shim.local_addr,
        "GET",
        "/api/x?z=1&y=%20",
        b"",
        &e.good,
        SVC,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // Readiness endpoint.
    let (st, _) = curl(&[&format!("http://127.0.0.1:{port}/_headroom/ready")]);
    assert_eq!(st, 200);
    e.shim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_requests_are_rejected_with_reason() {
    let mut e = env().await;
    let shim = e.shim.local_addr;
    let port = shim.port();
    let scope = format!("aws:amz:{REGION}:{SVC}");

    // A genuine curl-signed POST, captured, replays fine once...
    let captured = capture_curl(
        &e.good,
        &scope,
        &["-H", "x-custom: v1", "-d", "amount=10"],
        "/api/pay?to=bob",
        shim,
    );
    assert!(
        captured.contains("Authorization: AWS4-HMAC-SHA256"),
        "{captured}"
    );
    let (st, body) = raw(shim, &with_close(&captured));
    assert_eq!(st, 200, "replay of untampered capture: {body}");
    let signature = captured
        .split("Signature=")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .next()
        .unwrap()
        .to_string();

    let cases: Vec<(&str, String)> = vec![
        ("body", captured.replace("amount=10", "amount=99")),
        ("path", captured.replacen("/api/pay", "/api/pax", 1)),
        ("query", captured.replacen("to=bob", "to=eve", 1)),
        (
            "signed header",
            captured.replace("x-custom: v1", "x-custom: v2"),
        ),
        (
            "host",
            captured.replace(
                &format!("Host: 127.0.0.1:{port}"),
                &format!("Host: localhost:{port}"),
            ),
        ),
    ];
    for (what, req) in cases {
        assert_ne!(
            req, captured,
            "{what}: tampering did not change the request"
        );
        let (st, body) = raw(shim, &with_close(&req));
        assert_eq!(
            (st, error_of(&body).as_str()),
            (401, "signature_mismatch"),
            "tampered {what}: {body}"
        );
        assert!(
            !body.contains(&signature[..16]),
            "response leaks signature material"
        );
        assert!(body.len() < 100, "reason must be short: {body}");
    }
    // Drop x-amz-date from the signed headers list.
    let unsigned_date = captured.replacen(";x-amz-date;", ";", 1);
    assert_ne!(unsigned_date, captured);
    let (st, body) = raw(shim, &with_close(&unsigned_date));
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "unsigned_header"),
        "{body}"
    );

    let c = client();
    let now = headroom_control::sigv4::unix_now();
    // Expired and future timestamps (correctly signed otherwise).
    let (st, body) = signed_at(
        &c,
        shim,
        "GET",
        "/api/x",
        b"",
        &e.good,
        SVC,
        now - 301 - 5,
        &[],
    )
    .await;
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "request_expired"),
        "{body}"
    );
    let (st, body) = signed_at(
        &c,
        shim,
        "GET",
        "/api/x",
        b"",
        &e.good,
        SVC,
        now + 301 + 5,
        &[],
    )
    .await;
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "request_in_future"),
        "{body}"
    );
    // Inside the window still works.
    let (st, body) = signed_at(&c, shim, "GET", "/api/x", b"", &e.good, SVC, now - 200, &[]).await;
    assert_eq!(st, 200, "{body}");

    // Unknown key.
    let unknown = Creds {
        akid: "HRKUNKNOWNUNKNOWN123".into(),
        secret: e.good.secret.clone(),
    };
    let (st, body) = curl_signed(
        &unknown,
        &scope,
        &[],
        &format!("http://127.0.0.1:{port}/api/x"),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "unknown_key"),
        "{body}"
    );
    // Wrong secret.
    let wrong = Creds {
        akid: e.good.akid.clone(),
        secret: "x".repeat(40),
    };
    let (st, body) = curl_signed(
        &wrong,
        &scope,
        &[],
        &format!("http://127.0.0.1:{port}/api/x"),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "signature_mismatch"),
        "{body}"
    );
    // Wrong service / region in the credential scope.
    let (st, body) = curl_signed(
        &e.good,
        &format!("aws:amz:{REGION}:billing"),
        &[],
        &format!("http://127.0.0.1:{port}/api/x"),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "credential_scope_mismatch"),
        "{body}"
    );
    let (st, body) = curl_signed(
        &e.good,
        &format!("aws:amz:eu-west-1:{SVC}"),
        &[],
        &format!("http://127.0.0.1:{port}/api/x"),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "credential_scope_mismatch"),
        "{body}"
    );
    // No Authorization at all.
    let (st, body) = curl(&[&format!("http://127.0.0.1:{port}/api/x")]);
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "missing_authorization"),
        "{body}"
    );

    // Grants: method, path, and a key whose principal has no grant here.
    let (st, body) = curl_signed(
        &e.good,
        &scope,
        &["-X", "DELETE"],
        &format!("http://127.0.0.1:{port}/api/x"),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (403, "method_not_granted"),
        "{body}"
    );
    let (st, body) = curl_signed(
        &e.good,
        &scope,
        &[],
        &format!("http://127.0.0.1:{port}/admin"),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (403, "path_not_granted"),
        "{body}"
    );
    let (st, body) = curl_signed(
        &e.good,
        &scope,
        &[],
        &format!("http://127.0.0.1:{port}/apix"),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (403, "path_not_granted"),
        "{body}"
    );
    let (st, body) = raw(
        shim,
        &with_close(&captured.replacen("/api/pay", "/api/../admin", 1)),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (400, "non_canonical_path"),
        "{body}"
    );
    let bob = granted_key(&mut e.ks, "bob", "billing", &["*"], &["/"]).await;
    let url = format!("http://127.0.0.1:{port}/api/x");
    eventually(Duration::from_secs(5), "bob's key reaches the shim", || {
        let r = curl_signed(&bob, &scope, &[], &url);
        async move { r.0 != 401 }
    })
    .await;
    let (st, body) = curl_signed(&bob, &scope, &[], &url);
    assert_eq!((st, error_of(&body).as_str()), (403, "no_grant"), "{body}");

    // Nonce: first use fine, replay rejected.
    let (st, body) = signed_at(
        &c,
        shim,
        "GET",
        "/api/x",
        b"",
        &e.good,
        SVC,
        now,
        &[("x-headroom-nonce", "n-1")],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = signed_at(
        &c,
        shim,
        "GET",
        "/api/x",
        b"",
        &e.good,
        SVC,
        now,
        &[("x-headroom-nonce", "n-1")],
    )
    .await;
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "replayed_nonce"),
        "{body}"
    );

    // Body limit, with curl: it sends `Expect: 100-continue` for a body this
    // large, so the 413 arrives before the body is sent. (A client that
    // pushes the whole body regardless may see the connection close under
    // it: the shim does not read what it will not accept.)
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, "x".repeat((1 << 20) + 1)).unwrap();
    let data = format!("@{}", big.display());
    let (st, body) = curl_signed(
        &e.good,
        &format!("aws:amz:{REGION}:{SVC}"),
        &["--data-binary", &data],
        &format!("http://{shim}/api/x"),
    );
    assert_eq!(
        (st, error_of(&body).as_str()),
        (413, "body_too_large"),
        "{body}"
    );

    // Revoked key: rejected with its own reason.
    e.ks.revoke_key(&e.good.akid).await.unwrap();
    let good = e.good.clone();
    eventually(
        Duration::from_secs(5),
        "revocation reaches the shim",
        || {
            let r = curl_signed(&good, &scope, &[], &url);
            async move { r.0 == 401 }
        },
    )
    .await;
    let (st, body) = curl_signed(&e.good, &scope, &[], &url);
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "key_revoked"),
        "{body}"
    );
    e.shim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_secret_for_the_overlap_only() {
    let mut e = env().await;
    let c = client();
    let shim = e.shim.local_addr;
    let old = e.good.clone();
    let rotated =
        e.ks.rotate_key(&old.akid, Duration::from_secs(3600))
            .await
            .unwrap();
    let new = Creds {
        akid: old.akid.clone(),
        secret: rotated.secret,
    };
    eventually(Duration::from_secs(5), "new secret accepted", || {
        let (c, new) = (c.clone(), new.clone());
        async move { signed(&c, shim, "GET", "/api/x", b"", &new, SVC).await.0 == 200 }
    })
    .await;
    let (st, body) = signed(&c, shim, "GET", "/api/x", b"", &old, SVC).await;
    assert_eq!(st, 200, "old secret inside the overlap: {body}");
    // Rotate again with no overlap: only the newest secret works.
    let rotated = e.ks.rotate_key(&old.akid, Duration::ZERO).await.unwrap();
    let newest = Creds {
        akid: old.akid.clone(),
        secret: rotated.secret,
    };
    eventually(Duration::from_secs(5), "newest secret accepted", || {
        let (c, n) = (c.clone(), newest.clone());
        async move { signed(&c, shim, "GET", "/api/x", b"", &n, SVC).await.0 == 200 }
    })
    .await;
    let (st, body) = signed(&c, shim, "GET", "/api/x", b"", &new, SVC).await;
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "signature_mismatch"),
        "{body}"
    );
    e.shim.shutdown().await;
}
