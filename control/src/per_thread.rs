//! Thread-per-core HTTP/1.1 serving: N OS threads, each running its own
//! single-threaded tokio runtime. An accepted connection is handed to one
//! thread (the one with the fewest open connections) and served there start
//! to finish, together with any upstream connections its handler opens (a
//! per-thread client pool), so a request never crosses threads: no futex
//! wake-up or IPI per request, which is what a multi-thread runtime pays when
//! the server task and the pooled client's connection task run on different
//! workers.
//!
//! Shutdown: [`Workers::serve`] stops accepting when told, closes idle
//! keep-alive connections at once, lets requests in progress finish (at most
//! [`DRAIN_GRACE`]) and returns only when every worker thread has ended.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument, Span};

use crate::gate::Body;

/// How long a worker keeps serving its open connections once the accept
/// loop has stopped, before closing them.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How much longer than [`DRAIN_GRACE`] [`Workers::serve`] waits for the
/// worker threads to end (their runtimes still have to shut down).
pub const DRAIN_MARGIN: Duration = Duration::from_secs(1);

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

/// Counts one open connection of a worker while it lives: taken at hand-off,
/// dropped when the connection ends however it ends (closed, aborted at the
/// end of the grace, or never received because the worker is gone).
struct OpenConn(Arc<AtomicUsize>);

impl OpenConn {
    fn new(open: &Arc<AtomicUsize>) -> OpenConn {
        // Relaxed: the count only steers the choice of worker.
        open.fetch_add(1, Ordering::Relaxed);
        OpenConn(open.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection on its way to a worker.
struct Handoff {
    stream: std::net::TcpStream,
    open: OpenConn,
}

/// The accept loop's end of one worker thread.
struct Slot {
    tx: mpsc::UnboundedSender<Handoff>,
    /// Connections handed to this worker and not yet ended.
    open: Arc<AtomicUsize>,
}

/// A worker's runtime until its thread owns it. Dropped unused (the thread
/// could not be spawned) it shuts down without blocking: `start` may run
/// inside an async context, where a plain drop of a runtime panics.
struct Unstarted(Option<tokio::runtime::Runtime>);

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Running worker threads, fed accepted connections by [`Workers::serve`].
pub struct Workers {
    slots: Vec<Slot>,
    /// One per thread, fired (or dropped, on a panic) when the thread ends.
    done: Vec<oneshot::Receiver<()>>,
    /// Rotates where the search for the least-loaded worker starts.
    next: usize,
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
        let count = thread_count(threads);
        let mut workers = Workers {
            slots: Vec::with_capacity(count),
            done: Vec::with_capacity(count),
            next: 0,
        };
        for index in 0..count {
            // On an error below, `workers` is dropped on return: the hand-off
            // senders of threads 0..index close, so those threads, which have
            // no connection yet, see their channel end and exit at once.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| WorkerError::Runtime { index, source })?;
            let mut rt = Unstarted(Some(rt));
            let (tx, rx) = mpsc::unbounded_channel();
            let (done_tx, done_rx) = oneshot::channel();
            let make = make.clone();
            let span = span.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    if let Some(rt) = rt.0.take() {
                        // `make` runs inside the runtime: what it builds may spawn.
                        rt.block_on(async move { worker(rx, make()).await }.instrument(span));
                        // Ends what the handler spawned (pooled upstream
                        // connections) before the thread counts as done.
                        drop(rt);
                    }
                    let _ = done_tx.send(());
                })
                .map_err(|source| WorkerError::Spawn { index, source })?;
            workers.slots.push(Slot {
                tx,
                open: Arc::new(AtomicUsize::new(0)),
            });
            workers.done.push(done_rx);
        }
        Ok(workers)
    }

    /// Accept on `listener` until `stop` changes, handing each connection to
    /// the worker with the fewest open connections. Then stop listening,
    /// close idle keep-alive connections, let requests in progress finish
    /// (at most [`DRAIN_GRACE`], then the rest are closed) and return once
    /// every worker thread has ended (waiting at most [`DRAIN_GRACE`] +
    /// [`DRAIN_MARGIN`]). Dropped instead, the workers drain the same way
    /// but nobody waits for them.
    pub async fn serve(mut self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                acc = listener.accept() => match acc.and_then(|(s, _)| s.into_std()) {
                    Ok(stream) => self.hand_off(stream),
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        // New connections are refused from here on.
        drop(listener);
        let Workers { slots, done, .. } = self;
        // The hand-off channels closing is the workers' signal to drain.
        drop(slots);
        let all = async {
            for d in done {
                // Err: the thread panicked; it has ended all the same.
                let _ = d.await;
            }
        };
        if tokio::time::timeout(DRAIN_GRACE + DRAIN_MARGIN, all)
            .await
            .is_err()
        {
            warn!("worker threads still running after the drain grace; not waiting longer");
        }
    }

    /// Give `stream` to the live worker with the fewest open connections;
    /// ties go to the first found from a start index that rotates, so equal
    /// workers still take turns.
    fn hand_off(&mut self, stream: std::net::TcpStream) {
        let n = self.slots.len();
        let start = self.next;
        self.next = self.next.wrapping_add(1);
        let mut stream = Some(stream);
        // A worker only goes away if its thread panicked: skip it.
        while let Some(s) = stream.take() {
            let best = (0..n)
                .map(|i| (start + i) % n)
                .filter(|&i| !self.slots[i].tx.is_closed())
                .min_by_key(|&i| self.slots[i].open.load(Ordering::Relaxed));
            let Some(i) = best else {
                warn!("no worker thread left; connection dropped");
                return;
            };
            let slot = &self.slots[i];
            let h = Handoff {
                stream: s,
                open: OpenConn::new(&slot.open),
            };
            if let Err(mpsc::error::SendError(h)) = slot.tx.send(h) {
                stream = Some(h.stream);
            }
        }
    }

    /// The open-connection count of each worker, readable after `serve`
    /// took the workers.
    #[cfg(test)]
    fn open_counts(&self) -> impl Fn() -> Vec<usize> + Send + 'static {
        let open: Vec<_> = self.slots.iter().map(|s| s.open.clone()).collect();
        move || open.iter().map(|o| o.load(Ordering::Relaxed)).collect()
    }
}

/// One worker: serve each connection it is given on this thread. When the
/// accept loop is gone, ask every connection to close once its request in
/// progress is answered (idle ones close at once), wait for them at most
/// [`DRAIN_GRACE`], then close the rest.
async fn worker<F, Fut>(mut rx: mpsc::UnboundedReceiver<Handoff>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    // Per connection, not one shared signal: polling a oneshot receiver is an
    // atomic load, while a watch shared by all threads takes a lock that
    // every connection on every thread would contend for on each poll.
    let mut stops: HashMap<tokio::task::Id, oneshot::Sender<()>> = HashMap::new();
    loop {
        tokio::select! {
            h = rx.recv() => match h {
                Some(h) => {
                    let (tx, stop) = oneshot::channel();
                    let id = conns.spawn(serve_connection(h, handler.clone(), stop)).id();
                    stops.insert(id, tx);
                }
                // Every connection handed off before the close was received.
                None => break,
            },
            Some(r) = conns.join_next_with_id(), if !conns.is_empty() => {
                let id = match r {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                stops.remove(&id);
            }
        }
    }
    // Dropping the senders wakes every connection's stop.
    drop(stops);
    let _ = tokio::time::timeout(DRAIN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    // `conns` dropped here: connections still open after the grace are closed.
}

async fn serve_connection<F, Fut>(h: Handoff, handler: F, mut stop: oneshot::Receiver<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let Handoff {
        stream,
        open: _open,
    } = h;
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
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = &mut stop => {
            // Idle keep-alive: closes now; mid-request: answers, then closes.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        debug!(error = %e, "connection ended with error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;

    type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

    /// One request for `path` on a keep-alive connection; the body the
    /// server sent, or the error if the connection is gone.
    async fn try_get(sender: &mut Sender, path: &str) -> Result<String, hyper::Error> {
        let req = Request::builder()
            .uri(path)
            .header("host", "x")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }

    /// One request for `/`; the body the server sent.
    async fn get(sender: &mut Sender) -> String {
        try_get(sender, "/").await.unwrap()
    }

    /// A new client connection, and the task driving it, which ends when
    /// the connection closes.
    async fn connect_tracked(addr: std::net::SocketAddr) -> (Sender, tokio::task::JoinHandle<()>) {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender, task)
    }

    async fn connect(addr: std::net::SocketAddr) -> Sender {
        connect_tracked(addr).await.0
    }

    /// Workers answering every request with the name of their thread.
    fn start_named(threads: usize, name: &str) -> Workers {
        Workers::start(threads, name, || {
            |_req: Request<Incoming>| async {
                let name = std::thread::current().name().unwrap_or("").to_string();
                Response::new(crate::gate::full(name))
            }
        })
        .unwrap()
    }

    /// Polls `f` every 10 ms until it holds; panics after `limit`.
    async fn wait_until(what: &str, limit: Duration, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + limit;
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn connections_are_served_round_robin_each_on_one_worker_thread() {
        let workers = start_named(2, "ptest");
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

        // Stopped: no new connections; the open ones, idle between
        // requests, are closed by the drain rather than kept for the grace.
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        assert!(try_get(&mut conns[0], "/").await.is_err());
    }

    #[tokio::test]
    async fn a_connection_goes_to_the_worker_with_the_fewest_open_connections() {
        let workers = start_named(2, "lctest");
        let open = workers.open_counts();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(workers.serve(listener, stop_rx));

        let mut a = connect(addr).await;
        assert_eq!(get(&mut a).await, "lctest-0");
        let (mut b, b_task) = connect_tracked(addr).await;
        assert_eq!(get(&mut b).await, "lctest-1");
        assert_eq!(open(), [1, 1]);
        // B's client closes; wait until worker 1 has seen it end.
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), b_task)
            .await
            .unwrap()
            .unwrap();
        wait_until("worker 1 to see B end", Duration::from_secs(5), || {
            open() == [1, 0]
        })
        .await;
        // The third connection: round-robin would give it to worker 0,
        // which still serves A.
        let mut c = connect(addr).await;
        assert_eq!(get(&mut c).await, "lctest-1");
        assert_eq!(get(&mut a).await, "lctest-0");
        assert_eq!(open(), [1, 1]);

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        // Every connection was closed by the drain, and counted as ended.
        assert_eq!(open(), [0, 0]);
    }

    /// Workers whose `/slow` tells `entered` it started, then answers
    /// "slow done" once `release` turns true; every other path answers
    /// "fast" at once.
    fn start_gated(
        name: &str,
        entered: mpsc::UnboundedSender<()>,
        release: watch::Receiver<bool>,
    ) -> Workers {
        Workers::start(1, name, move || {
            let (entered, release) = (entered.clone(), release.clone());
            move |req: Request<Incoming>| {
                let (entered, mut release) = (entered.clone(), release.clone());
                async move {
                    if req.uri().path() != "/slow" {
                        return Response::new(crate::gate::full("fast"));
                    }
                    let _ = entered.send(());
                    let _ = release.wait_for(|r| *r).await;
                    Response::new(crate::gate::full("slow done"))
                }
            }
        })
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_closes_idle_connections_at_once_and_waits_for_requests_in_flight() {
        let (entered_tx, mut entered) = mpsc::unbounded_channel();
        let (release, release_rx) = watch::channel(false);
        let workers = start_gated("drain", entered_tx, release_rx);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(workers.serve(listener, stop_rx));

        // An idle keep-alive connection (one request answered) ...
        let (mut idle, idle_task) = connect_tracked(addr).await;
        assert_eq!(get(&mut idle).await, "fast");
        // ... and one with a request in progress.
        let mut busy = connect(addr).await;
        let slow = tokio::spawn(async move { try_get(&mut busy, "/slow").await });
        tokio::time::timeout(Duration::from_secs(10), entered.recv())
            .await
            .unwrap()
            .unwrap();

        stop.send(true).unwrap();
        // The server closes the idle connection without waiting out the
        // grace: if it only did at the end of the grace, the request in
        // progress would be cut too and not answered below.
        tokio::time::timeout(Duration::from_secs(10), idle_task)
            .await
            .unwrap()
            .unwrap();
        assert!(try_get(&mut idle, "/").await.is_err());
        // No longer listening, but still draining: `serve` has not returned
        // while the response is held back.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        assert!(!server.is_finished());
        assert!(!slow.is_finished());

        release.send(true).unwrap();
        let body = tokio::time::timeout(Duration::from_secs(10), slow)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(body, "slow done");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_outlasting_the_grace_is_cut_and_serve_still_returns() {
        let (entered_tx, mut entered) = mpsc::unbounded_channel();
        // Never released.
        let (_release, release_rx) = watch::channel(false);
        let workers = start_gated("grace", entered_tx, release_rx);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(workers.serve(listener, stop_rx));

        let mut busy = connect(addr).await;
        let slow = tokio::spawn(async move { try_get(&mut busy, "/slow").await });
        tokio::time::timeout(Duration::from_secs(10), entered.recv())
            .await
            .unwrap()
            .unwrap();
        stop.send(true).unwrap();
        // Bounded by the grace (generous limit: this is not a timing test).
        tokio::time::timeout(DRAIN_GRACE + DRAIN_MARGIN + Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), slow)
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_err(), "the held request was answered: {r:?}");
    }
}
