//! The backends' servers of the end-to-end benchmark: a minimal HTTP/1.1
//! responder (keep-alive, or close when asked) for wrk, and a byte sink for
//! the bulk-throughput streams. All run on one tokio runtime of the bench
//! process; each listener was created inside its backend's namespace, so its
//! connections live there whichever thread serves them.

use std::{
    net::{Ipv4Addr, TcpListener as StdListener},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};

use crate::Netns;

/// Largest request head the responder accepts.
const MAX_HEAD: usize = 8192;
/// A connection idle this long is closed (frees its task after a stuck run).
const IDLE: Duration = Duration::from_secs(30);

/// Per-backend counters the benchmark reads to check the balancing.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// HTTP requests answered.
    pub requests: AtomicU64,
    /// Bytes the bulk sink received.
    pub bulk_bytes: AtomicU64,
}

/// The servers of every backend; stopped when dropped (the runtime shuts
/// down and every socket closes).
pub struct Servers {
    runtime: Option<Runtime>,
    counters: Vec<Arc<BackendCounters>>,
}

impl Servers {
    /// Starts, in each of `backends`, HTTP responders on `http_ports` and a
    /// bulk sink on `bulk_port` (all on 0.0.0.0, so both the backend's own
    /// address and a VIP on its `lo` reach them).
    pub fn start(backends: &[Netns], http_ports: &[u16], bulk_port: u16) -> Result<Servers> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-backend")
            .enable_io()
            .enable_time()
            .build()
            .context("starting the backends' runtime")?;
        let mut counters = Vec::new();
        for (i, ns) in backends.iter().enumerate() {
            let c = Arc::new(BackendCounters::default());
            let body: Arc<[u8]> = format!("backend-{i}\n").into_bytes().into();
            for &port in http_ports {
                let l = listen_in(ns, port)?;
                let (c, body) = (c.clone(), body.clone());
                let _guard = runtime.enter();
                let l = TcpListener::from_std(l).context("registering a listener")?;
                runtime.spawn(accept_loop(l, move |s| {
                    let (c, body) = (c.clone(), body.clone());
                    async move { http_conn(s, &body, &c).await }
                }));
            }
            let l = listen_in(ns, bulk_port)?;
            let c2 = c.clone();
            let _guard = runtime.enter();
            let l = TcpListener::from_std(l).context("registering a listener")?;
            runtime.spawn(accept_loop(l, move |s| {
                let c = c2.clone();
                async move { sink_conn(s, &c).await }
            }));
            counters.push(c);
        }
        Ok(Servers {
            runtime: Some(runtime),
            counters,
        })
    }

    /// Counters of backend `i`.
    pub fn counters(&self, i: usize) -> &BackendCounters {
        &self.counters[i]
    }

    /// Requests answered so far, per backend.
    pub fn requests(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .collect()
    }

    /// Bulk bytes received so far, per backend.
    pub fn bulk_bytes(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.bulk_bytes.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A non-blocking listener on `0.0.0.0:port` created inside `ns`.
fn listen_in(ns: &Netns, port: u16) -> Result<StdListener> {
    let _inside = ns.enter_thread()?;
    let l = StdListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("listening on port {port} in {}", ns.name()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Accepts forever, one task per connection.
async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(serve(s));
            }
            // EMFILE and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Answers every request head on `s` with `200 OK` and `body`; closes after
/// a request that asked for it (`Connection: close`), at EOF, or when idle.
async fn http_conn(mut s: TcpStream, body: &[u8], c: &BackendCounters) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(p) = find_head_end(&buf) {
                break p;
            }
            if buf.len() > MAX_HEAD {
                return Ok(());
            }
            let n = match tokio::time::timeout(IDLE, s.read(&mut chunk)).await {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let close = wants_close(&buf[..head_end]);
        buf.drain(..head_end);
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        reply.extend_from_slice(body);
        s.write_all(&reply).await?;
        c.requests.fetch_add(1, Ordering::Relaxed);
        if close {
            // The server closes first, as with any HTTP/1.1 server: its side
            // keeps TIME_WAIT, the client's ports are free at once.
            return s.shutdown().await;
        }
    }
}

/// Index just past the `\r\n\r\n` ending a request head.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// True if the head has a `Connection: close` header.
fn wants_close(head: &[u8]) -> bool {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    head.lines().any(|l| {
        l.strip_prefix("connection:")
            .is_some_and(|v| v.trim() == "close")
    })
}

/// Reads `s` to its end, counting the bytes.
async fn sink_conn(mut s: TcpStream, c: &BackendCounters) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match tokio::time::timeout(IDLE, s.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        c.bulk_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET"),
            Some(27)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert!(wants_close(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!wants_close(
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!wants_close(b"GET /close HTTP/1.1\r\n\r\n"));
    }
}
