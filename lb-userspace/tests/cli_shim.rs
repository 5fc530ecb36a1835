//! The `headroom` binary as a user runs it: keys made with `headroom keys`,
//! a `headroom shim` process in front of a real upstream, real `curl
//! --aws-sigv4` calls, a revocation, and a clean shutdown.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpListener},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use headroom_tests::{free_port, ChildGuard, RedisServer};

const HEADROOM: &str = env!("CARGO_BIN_EXE_headroom");

fn headroom(redis: &str, args: &[&str]) -> Output {
    Command::new(HEADROOM)
        .args(args)
        .env("HEADROOM_REDIS", redis)
        .output()
        .expect("run headroom")
}

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {out:?}"))
}

/// A one-line HTTP upstream: answers every request with the principal the
/// shim passed in `x-headroom-principal`.
fn upstream() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind upstream");
    let port = l.local_addr().expect("addr").port();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s);
            let mut principal = String::from("-");
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(v) = line
                    .to_ascii_lowercase()
                    .strip_prefix("x-headroom-principal:")
                {
                    principal = v.trim().to_string();
                }
                line.clear();
            }
            let body = format!("hello {principal}");
            let _ = write!(
                r.get_mut(),
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// curl's status code and body; `user` signs with SigV4.
fn curl(url: &str, user: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-m", "5", "-w", "\n%{http_code}", url]);
    if let Some(u) = user {
        c.args(["--aws-sigv4", "aws:amz:headroom:api", "--user", u]);
    }
    let out = c.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status code"), body.to_string())
}

#[test]
fn shim_binary_authorises_curl_and_follows_revocation() {
    let redis = RedisServer::start().expect("redis-server");
    let url = redis.url();
    let created = headroom(&url, &["keys", "create", "--principal", "alice"]);
    assert!(created.status.success(), "keys create: {created:?}");
    let out = String::from_utf8_lossy(&created.stdout).to_string();
    let (id, secret) = (
        field(&out, "access_key_id").to_string(),
        field(&out, "secret").to_string(),
    );
    let granted = headroom(
        &url,
        &["keys", "grant", "--principal", "alice", "--service", "api"],
    );
    assert!(granted.status.success(), "keys grant: {granted:?}");

    let up = upstream();
    let port = free_port().expect("port");
    let dir = std::env::temp_dir().join(format!("headroom-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut shim = ChildGuard::new(
        Command::new(HEADROOM)
            .args([
                "shim",
                "--service",
                "api",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--upstream", &format!("127.0.0.1:{up}"), "--redis", &url])
            .arg("--snapshot")
            .arg(dir.join("keys.json"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start headroom shim"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while curl(&format!("{base}/_headroom/ready"), None).0 != 200 {
        assert!(Instant::now() < deadline, "shim never became ready");
        thread::sleep(Duration::from_millis(50));
    }

    let user = format!("{id}:{secret}");
    assert_eq!(
        curl(&format!("{base}/hello"), Some(&user)),
        (200, "hello alice".into())
    );
    let (code, _) = curl(&format!("{base}/hello"), None);
    assert_eq!(code, 401, "unsigned request");
    let (code, _) = curl(
        &format!("{base}/hello"),
        Some(&format!("{id}:wrong-secret")),
    );
    assert_eq!(code, 401, "wrong secret");

    let revoked = headroom(&url, &["keys", "revoke", "--access-key-id", &id]);
    assert!(revoked.status.success(), "keys revoke: {revoked:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while curl(&format!("{base}/hello"), Some(&user)).0 != 401 {
        assert!(
            Instant::now() < deadline,
            "revocation never reached the shim"
        );
        thread::sleep(Duration::from_millis(20));
    }

    // SIGTERM: the shim unregisters and exits cleanly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(shim.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = shim.try_wait().expect("wait shim") {
            break s;
        }
        assert!(Instant::now() < deadline, "shim did not exit on SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "shim exit status {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
