//! Thread-per-core HTTP/1.1 serving: N OS threads, each running its own
//! single-threaded tokio runtime. An accepted connection is handed to one
//! thread (round-robin) and served there start to finish, together with any
//! upstream connections its handler opens (a per-thread client pool), so a
//! request never crosses threads: no futex wake-up or IPI per request, which
//! is what a multi-thread runtime pays when the server task and the pooled
//! client's connection task run on different workers.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument, Span};

use crate::gate::Body;

/// How long a worker keeps serving its open connections once the accept
/// loop has stopped, before closing them.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Why the worker threads could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Building a worker's runtime failed.
    #[error("building the runtime of worker thread {index}: {source}")]
    Runtime {
        /// Which worker.
        index: usize,
        /// The cause.
        source: std::io::Error,
    },
    /// The OS refused to start a worker thread.
    #[error("starting worker thread {index}: {source}")]
    Spawn {
        /// Which worker.
        index: usize,
        /// The cause.
        source: std::io::Error,
    },
}

/// The number of worker threads to use for `requested` (0: one per CPU).
pub fn thread_count(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Running worker threads, fed accepted connections by [`Workers::serve`].
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<std::net::TcpStream>>,
}

impl Workers {
    /// Start `threads` (0: one per CPU) threads named `NAME-i`. `make` runs
    /// once on each thread and builds that thread's request handler (so
    /// per-thread state, e.g. an upstream connection pool, stays local).
    /// The workers log inside the span current at the call.
    pub fn start<M, F, Fut>(threads: usize, name: &str, make: M) -> Result<Workers, WorkerError>
    where
        M: Fn() -> F + Send + Sync + 'static,
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let make = Arc::new(make);
        let span = Span::current();
        let mut senders = Vec::new();
        for index in 0..thread_count(threads) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| WorkerError::Runtime { index, source })?;
            let (tx, rx) = mpsc::unbounded_channel();
            let make = make.clone();
            let span = span.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    // `make` runs inside the runtime: what it builds may spawn.
                    rt.block_on(async move { worker(rx, make()).await }.instrument(span))
                })
                .map_err(|source| WorkerError::Spawn { index, source })?;
            senders.push(tx);
        }
        Ok(Workers { senders })
    }

    /// Accept on `listener` until `stop` changes (or this future is
    /// dropped), handing connections to the workers round-robin. The
    /// workers then finish their open connections (at most
    /// [`DRAIN_GRACE`]) and exit.
    pub async fn serve(self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let mut next = 0usize;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                acc = listener.accept() => {
                    let stream = match acc.and_then(|(s, _)| s.into_std()) {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    // A worker only goes away if its thread panicked: skip it.
                    let mut stream = Some(stream);
                    for _ in 0..self.senders.len() {
                        let tx = &self.senders[next % self.senders.len()];
                        next = next.wrapping_add(1);
                        match stream.take().map(|s| tx.send(s)) {
                            Some(Err(mpsc::error::SendError(s))) => stream = Some(s),
                            _ => break,
                        }
                    }
                    if stream.is_some() {
                        warn!("no worker thread left; connection dropped");
                    }
                }
            }
        }
    }
}

/// One worker: serve each connection it is given on this thread; when the
/// accept loop is gone, drain for [`DRAIN_GRACE`], then close the rest.
async fn worker<F, Fut>(mut rx: mpsc::UnboundedReceiver<std::net::TcpStream>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => {
                    let h = handler.clone();
                    conns.spawn(serve_connection(s, h));
                }
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let _ = tokio::time::timeout(DRAIN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

async fn serve_connection<F, Fut>(stream: std::net::TcpStream, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "could not register an accepted connection");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let svc = service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h(req).await) }
    });
    if let Err(e) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        debug!(error = %e, "connection ended with error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;

    /// One request on a new keep-alive connection; the body the server sent.
    async fn get(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> String {
        let req = Request::builder()
            .uri("/")
            .header("host", "x")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    async fn connect(
        addr: std::net::SocketAddr,
    ) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    #[tokio::test]
    async fn connections_are_served_round_robin_each_on_one_worker_thread() {
        let workers = Workers::start(2, "ptest", || {
            |_req: Request<Incoming>| async {
                let name = std::thread::current().name().unwrap_or("").to_string();
                Response::new(crate::gate::full(name))
            }
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(workers.serve(listener, stop_rx));

        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(connect(addr).await);
        }
        let mut seen = Vec::new();
        for c in &mut conns {
            let first = get(c).await;
            // Every request of a connection runs on the thread it was given.
            for _ in 0..3 {
                assert_eq!(get(c).await, first);
            }
            seen.push(first);
        }
        // Accepted in order, handed out in turn.
        assert_eq!(seen, ["ptest-0", "ptest-1", "ptest-0", "ptest-1"]);

        // Stopped: no new connections, open ones still answered (drain).
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        assert_eq!(get(&mut conns[0]).await, "ptest-0");
    }
}
