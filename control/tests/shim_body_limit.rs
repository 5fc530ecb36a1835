//! A body over the shim's limit gets a complete `413 body_too_large` (not a
//! connection reset) even while the client is still sending it: the shim
//! closes such a connection with a lingering close (docs/AUTH.md). Real
//! Redis, real shim, real sockets, and curl when it is installed.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use headroom_control::keystore::KeyStore;
use headroom_control::per_thread::LINGER_BYTES;
use headroom_control::shim::{start_shim, ShimArgs, ShimHandle};
use headroom_control::sigv4;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SVC: &str = "orders";
/// The shim's body limit in these tests.
const LIMIT: usize = 64 << 10;
/// The oversized bodies: several MiB, far over the limit, but within what
/// the lingering close discards (a client sending more is cut by design).
const BIG: usize = 6 << 20;
const _: () = assert!(BIG <= LINGER_BYTES);
/// Bounds every client exchange (generous: not a timing test).
const T: Duration = Duration::from_secs(30);

struct Env {
    _redis: RedisServer,
    shim: ShimHandle,
    creds: Creds,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let creds = granted_key(&mut ks, "alice", SVC, &["POST"], &["/api"]).await;
    let upstream = start_echo_upstream().await;
    let mut args = ShimArgs::new(SVC, "127.0.0.1:0".parse().unwrap(), upstream, &redis.url());
    args.snapshot = Some(dir.path().join("snap.json"));
    args.max_body_bytes = LIMIT;
    let shim = start_shim(args).await.unwrap();
    assert!(shim.state().is_ready());
    Env {
        _redis: redis,
        shim,
        creds,
        _dir: dir,
    }
}

/// How the body goes on the wire.
#[derive(Clone, Copy, Debug)]
enum Framing {
    /// `Content-Length` declared up front (refused before any body is read).
    Length,
    /// `Transfer-Encoding: chunked` (refused once the limit is read).
    Chunked,
}

/// The head of a signed `POST path` carrying `body` to `addr`.
fn signed_head(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    creds: &Creds,
    framing: Framing,
) -> Vec<u8> {
    let host = addr.to_string();
    let hdrs = sigv4::sign(
        "POST",
        path,
        "",
        &[("host", &host)],
        body,
        &creds.akid,
        &creds.secret,
        REGION,
        SVC,
        sigv4::unix_now(),
    );
    let mut head = format!("POST {path} HTTP/1.1\r\nhost: {host}\r\n");
    for (n, v) in &hdrs {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    match framing {
        Framing::Length => head.push_str(&format!("content-length: {}\r\n", body.len())),
        Framing::Chunked => head.push_str("transfer-encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// How a client sends its request.
#[derive(Clone, Copy, Debug)]
enum Style {
    /// Reads the answer while still writing the body (as curl does).
    Concurrent,
    /// Writes the whole body, then reads the answer (as Python's
    /// `http.client` and many simple clients do).
    SendThenRead,
}

/// What a client got that wrote a request as fast as it could.
struct Outcome {
    /// How the writing ended: `Ok` once the whole request was written.
    write_end: std::io::Result<()>,
    /// Every byte received.
    received: Vec<u8>,
    /// How the reading ended: `Ok` on a clean end of stream.
    read_end: std::io::Result<()>,
}

/// Writes `head` and `body` (framed as `framing`, in 64 KiB writes).
async fn write_request(
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    head: &[u8],
    body: &[u8],
    framing: Framing,
) -> std::io::Result<()> {
    wr.write_all(head).await?;
    for chunk in body.chunks(64 << 10) {
        match framing {
            Framing::Length => wr.write_all(chunk).await?,
            Framing::Chunked => {
                wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                wr.write_all(chunk).await?;
                wr.write_all(b"\r\n").await?;
            }
        }
    }
    if let Framing::Chunked = framing {
        wr.write_all(b"0\r\n\r\n").await?;
    }
    // Not shut down: the client waits for the answer.
    Ok(())
}

/// Reads until the server ends the stream; bounded by [`T`].
async fn read_answer(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
) -> (Vec<u8>, std::io::Result<()>) {
    let mut received = Vec::new();
    let end = tokio::time::timeout(T, async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the shim neither answered and closed nor reset within the bound");
    (received, end)
}

/// Send a request with `head` and `body` on a new connection to `addr`,
/// in `style`, and read the answer until the server ends the stream.
async fn upload(
    addr: SocketAddr,
    head: Vec<u8>,
    body: &[u8],
    framing: Framing,
    style: Style,
) -> Outcome {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    match style {
        Style::SendThenRead => {
            let write_end = tokio::time::timeout(T, write_request(&mut wr, &head, body, framing))
                .await
                .expect("the client's writes did not end");
            let (received, read_end) = read_answer(&mut rd).await;
            Outcome {
                write_end,
                received,
                read_end,
            }
        }
        Style::Concurrent => {
            let body = body.to_vec();
            let writer =
                tokio::spawn(async move { write_request(&mut wr, &head, &body, framing).await });
            let (received, read_end) = read_answer(&mut rd).await;
            let write_end = tokio::time::timeout(T, writer)
                .await
                .expect("the client's writes did not end")
                .unwrap();
            Outcome {
                write_end,
                received,
                read_end,
            }
        }
    }
}

/// The status, lower-cased head and body of one complete HTTP/1.1 response
/// in `raw`; panics (saying what was received) if it is not complete.
fn parse_response(raw: &[u8]) -> (u16, String, Vec<u8>) {
    let text = String::from_utf8_lossy(raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in {text:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = raw[split + 4..].to_vec();
    let status: u16 = head
        .strip_prefix("http/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {text:?}"));
    assert_eq!(body.len(), length, "incomplete response body: {text:?}");
    (status, head, body)
}

/// Asserts the client of `o` could send its whole request (not cut by a
/// reset), and got a complete 413 `body_too_large` then a clean close.
fn assert_413(o: &Outcome, what: &str) {
    assert!(
        o.write_end.is_ok(),
        "{what}: sending the body failed ({:?}): the shim closed the connection under it",
        o.write_end
    );
    assert!(
        o.read_end.is_ok(),
        "{what}: the connection was reset (error {:?}) after receiving {:?}",
        o.read_end,
        String::from_utf8_lossy(&o.received)
    );
    let (status, _, body) = parse_response(&o.received);
    assert_eq!(
        status,
        413,
        "{what}: {:?}",
        String::from_utf8_lossy(&o.received)
    );
    assert_eq!(
        error_of(&String::from_utf8_lossy(&body)),
        "body_too_large",
        "{what}"
    );
}

fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_sent_at_full_speed_gets_a_complete_413_every_time() {
    let e = env().await;
    let addr = e.shim.local_addr;
    let body = big_body();
    for style in [Style::SendThenRead, Style::Concurrent] {
        for framing in [Framing::Length, Framing::Chunked] {
            for i in 0..20 {
                let head = signed_head(addr, "/api/upload", &body, &e.creds, framing);
                let o = upload(addr, head, &body, framing, style).await;
                assert_413(&o, &format!("{style:?} {framing:?} upload #{i}"));
            }
        }
    }

    // The same shim still serves bodies up to the limit, the limit itself
    // included, and refuses one byte more.
    let c = client();
    for (n, want) in [(1000, 200), (LIMIT, 200), (LIMIT + 1, 413)] {
        let small = vec![b'a'; n];
        let (st, resp) = signed(&c, addr, "POST", "/api/small", &small, &e.creds, SVC).await;
        assert_eq!(st, want, "{n} bytes: {resp}");
        if want == 200 {
            let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
            assert_eq!(v["body"].as_str().map(str::len), Some(n));
            assert_eq!(v["principals"], serde_json::json!(["alice"]));
        } else {
            assert_eq!(error_of(&resp), "body_too_large");
        }
    }
    e.shim.shutdown().await;
}

/// `curl --aws-sigv4 … --data-binary @FILE` with `extra` arguments: curl's
/// exit code, the status it got and the body.
fn curl_upload(
    creds: &Creds,
    file: &std::path::Path,
    url: &str,
    extra: &[&str],
) -> (i32, u16, String) {
    let user = format!("{}:{}", creds.akid, creds.secret);
    let scope = format!("aws:amz:{REGION}:{SVC}");
    let data = format!("@{}", file.display());
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(["--aws-sigv4", &scope, "--user", &user])
        .args(["-H", "content-type: application/octet-stream"])
        .args(extra)
        .args(["--data-binary", &data, url])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    let exit = out.status.code().unwrap_or(-1);
    if exit != 0 {
        eprintln!("curl: {}", String::from_utf8_lossy(&out.stderr));
    }
    (exit, code, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_uploading_a_large_file_gets_the_413() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl is not installed: skipping (apt-get install curl)");
        return;
    }
    let e = env().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.bin");
    std::fs::write(&file, big_body()).unwrap();
    let url = format!("http://127.0.0.1:{}/api/upload", e.shim.local_addr.port());
    let creds = e.creds.clone();
    let runs = tokio::task::spawn_blocking(move || {
        let mut runs = Vec::new();
        for i in 0..5 {
            // curl's default (`Expect: 100-continue`: the shim answers before
            // the body is sent) and without it (the body is on its way).
            runs.push((i, "expect", curl_upload(&creds, &file, &url, &[])));
            runs.push((
                i,
                "no expect",
                curl_upload(&creds, &file, &url, &["-H", "Expect:"]),
            ));
        }
        runs
    })
    .await
    .unwrap();
    for (i, what, (exit, code, body)) in runs {
        assert_eq!((exit, code), (0, 413), "curl {what} #{i}: {body}");
        assert_eq!(error_of(&body), "body_too_large", "curl {what} #{i}");
    }
    e.shim.shutdown().await;
}
