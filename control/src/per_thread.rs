//! Thread-per-core HTTP/1.1 serving: N OS threads, each running its own
//! single-threaded tokio runtime. An accepted connection is handed to one
//! thread (the one with the fewest open connections) and served there start
//! to finish, together with any upstream connections its handler opens (a
//! per-thread client pool), so a request never crosses threads: no futex
//! wake-up or IPI per request, which is what a multi-thread runtime pays when
//! the server task and the pooled client's connection task run on different
//! workers.
//!
//! Shutdown: [`Workers::serve`] stops accepting when told (connections
//! already queued by the kernel are still taken and served), closes idle
//! keep-alive connections at once, gives connections that have not sent
//! their first request yet [`FIRST_REQUEST_WAIT`] to do so, lets requests in
//! progress finish (at most [`DRAIN_GRACE`]) and returns only when every
//! worker thread has ended.
//!
//! Closing: a connection ends with a lingering close (see `linger`), so a
//! client still sending a body the server refused (413) reads the answer
//! instead of a connection reset.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument, Span};

use crate::gate::Body;

/// How long a worker keeps serving its open connections once the accept
/// loop has stopped, before closing them.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long, once draining, a connection that has not sent its first
/// request yet is kept open for it. Such a connection was typically let in
/// during the shim's drain notice, just before the stop; closing it at once
/// would drop a request that is already on its way.
pub const FIRST_REQUEST_WAIT: Duration = Duration::from_millis(250);

// The wait is part of the grace, never beyond it.
const _: () = assert!(FIRST_REQUEST_WAIT.as_nanos() <= DRAIN_GRACE.as_nanos());

/// At most this many connections already queued by the kernel are taken at
/// stop (the default `somaxconn`), so a flood cannot hold the stop forever.
const STOP_ACCEPT_LIMIT: usize = 4096;

/// How much longer than [`DRAIN_GRACE`] [`Workers::serve`] waits for the
/// worker threads to end (their runtimes still have to shut down).
pub const DRAIN_MARGIN: Duration = Duration::from_secs(1);

/// Lingering close: how long a closed connection waits for each further
/// read of what its client still sends (Apache's `SECONDS_TO_LINGER`).
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// Lingering close: how long a closed connection reads and discards in all
/// (Apache's and nginx's 30 s); a shutdown cuts it at [`DRAIN_GRACE`].
pub const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// Lingering close: how many bytes at most are read and discarded before
/// the socket is closed anyway.
pub const LINGER_BYTES: usize = 8 << 20;

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
    /// Workers running as tasks ([`Workers::in_task`]): aborted with the
    /// serving future, so aborting a server stops it as a crash would.
    tasks: Vec<AbortOnDrop>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
            tasks: Vec::new(),
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

    /// One worker running as a task on the current runtime instead of on a
    /// thread of its own, for servers whose handlers belong to the caller's
    /// runtime. [`Workers::serve`] drains it exactly like the threads.
    /// Must be called within a tokio runtime (it spawns there).
    pub fn in_task<F, Fut>(handler: F) -> Workers
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = oneshot::channel();
        let task = tokio::spawn(
            async move {
                worker(rx, handler).await;
                let _ = done_tx.send(());
            }
            .instrument(Span::current()),
        );
        Workers {
            slots: vec![Slot {
                tx,
                open: Arc::new(AtomicUsize::new(0)),
            }],
            done: vec![done_rx],
            next: 0,
            tasks: vec![AbortOnDrop(task.abort_handle())],
        }
    }

    /// Accept on `listener` until `stop` changes, handing each connection to
    /// the worker with the fewest open connections. Then take the
    /// connections the kernel already completed but not yet handed over,
    /// stop listening, close idle keep-alive connections, give connections
    /// without a request yet [`FIRST_REQUEST_WAIT`] to send one, let
    /// requests in progress finish (at most [`DRAIN_GRACE`], then the rest
    /// are closed) and return once every worker thread has ended (waiting at
    /// most [`DRAIN_GRACE`] + [`DRAIN_MARGIN`]). Dropped instead, the
    /// workers drain the same way but nobody waits for them.
    pub async fn serve(mut self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                // Stop first: under a steady stream of connections the loop
                // must still end; what is queued is taken just below.
                biased;
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
        self.accept_queued(listener);
        // `tasks` lives to the end: dropped early (this future aborted), it
        // takes the task workers and their connections with it.
        let Workers {
            slots, done, tasks, ..
        } = self;
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
        drop(tasks);
    }

    /// Hand over every connection whose handshake the kernel completed but
    /// that was not accepted yet, without waiting for more, then close the
    /// listener: closing it with connections still queued would reset them.
    fn accept_queued(&mut self, listener: TcpListener) {
        // Non-blocking (tokio's socket already is): accept until it would block.
        let listener = match listener.into_std() {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "could not take queued connections at stop");
                return;
            }
        };
        for _ in 0..STOP_ACCEPT_LIMIT {
            match listener.accept() {
                // An accepted std socket is blocking; tokio needs it not to be.
                Ok((s, _)) => match s.set_nonblocking(true) {
                    Ok(()) => self.hand_off(s),
                    Err(e) => warn!(error = %e, "could not take a queued connection at stop"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ECONNABORTED and the like: that one connection is gone.
                    debug!(error = %e, "accept at stop failed");
                }
            }
        }
        // New connections are refused from here on.
        drop(listener);
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
            // Received connections first, so every one handed off before the
            // close is started before the drain begins.
            biased;
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

/// What a connection's service and its drain tell each other. Both run on
/// the connection's own task, so relaxed ordering is enough.
#[derive(Default)]
struct ConnState {
    /// A request has been read.
    seen: AtomicBool,
    /// Woken once, when the first request is read.
    first: Notify,
    /// The drain has begun: answers say `Connection: close`.
    draining: AtomicBool,
}

impl ConnState {
    /// Called for every request: only the first one writes anything.
    fn request_read(&self) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
            self.first.notify_one();
        }
    }

    /// Mark `resp` as the connection's last if the drain has begun. hyper
    /// only does so itself for a request in progress when the drain starts,
    /// not for one read and answered within a single poll during the wait.
    fn finish(&self, mut resp: Response<Body>) -> Response<Body> {
        if self.draining.load(Ordering::Relaxed) {
            resp.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

async fn serve_connection<F, Fut>(h: Handoff, handler: F, mut stop: oneshot::Receiver<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let Handoff { stream, open } = h;
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "could not register an accepted connection");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState::default());
    let svc = {
        let state = state.clone();
        service_fn(move |req| {
            state.request_read();
            let (h, state) = (handler.clone(), state.clone());
            async move { Ok::<_, Infallible>(state.finish(h(req).await)) }
        })
    };
    let mut conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    let r = tokio::select! {
        // The connection first: a request it can already read when the stop
        // comes is taken (and so answered) first. One whose bytes the
        // reactor has not reported yet (a connection just registered) is
        // what the wait below is for.
        biased;
        r = &mut conn => r,
        _ = &mut stop => 'drain: {
            state.draining.store(true, Ordering::Relaxed);
            if !state.seen.load(Ordering::Relaxed) {
                // hyper closes a connection that has read nothing at once:
                // give its first request a moment to arrive, serving on.
                let wait = tokio::time::timeout(FIRST_REQUEST_WAIT, state.first.notified());
                tokio::select! {
                    biased;
                    r = &mut conn => break 'drain r,
                    _ = wait => {}
                }
            }
            // Idle keep-alive or still nothing read: closes now;
            // mid-request: answers (`Connection: close`), then closes.
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            (&mut conn).await
        }
    };
    if let Err(e) = r {
        debug!(error = %e, "connection ended with error");
    }
    // hyper has written its last answer and (after a clean end) shut the
    // write side down, but still holds the socket: take it back to close it
    // gracefully rather than drop it. A lingering connection serves nothing:
    // it no longer counts against its worker.
    let stream = conn.into_parts().io.into_inner();
    drop(open);
    linger(stream).await;
}

/// Waits for a task running [`Workers::serve`] to return after its stop,
/// bounded: `serve` gives up on its workers after [`DRAIN_GRACE`] +
/// [`DRAIN_MARGIN`], so a task still running a second later is aborted.
pub async fn join_drained(mut server: tokio::task::JoinHandle<()>, what: &str) {
    let bound = DRAIN_GRACE + DRAIN_MARGIN + Duration::from_secs(1);
    if tokio::time::timeout(bound, &mut server).await.is_err() {
        warn!("{what} did not drain in time");
        server.abort();
    }
}

/// Close `stream` the way nginx and Apache do ("lingering close"): send FIN,
/// then read and discard what the client still sends until it closes too,
/// while each read comes within [`LINGER_TIME`], for at most
/// [`LINGER_TOTAL`] and [`LINGER_BYTES`]. Closing a socket with unread data,
/// or with data still arriving, makes the kernel answer with a reset: the
/// client's upload fails (broken pipe) before it reads the answer (e.g. a
/// 413 for a body it is still sending), and answer bytes not yet delivered
/// are discarded. Only reached when a connection ends: keep-alive requests
/// pay nothing; a client that already closed costs a shutdown and one read.
/// Nothing is allocated: a connection waiting here holds only its socket.
async fn linger(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    // Err: the client reset the connection; there is nothing to wait for.
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut left = LINGER_BYTES;
    let deadline = tokio::time::Instant::now() + LINGER_TOTAL;
    loop {
        match discard(&stream, &mut left) {
            Some(Discarded::Closed) => return,
            Some(Discarded::Enough) => break,
            None => {}
        }
        let wait = LINGER_TIME.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        if wait.is_zero() {
            break;
        }
        match tokio::time::timeout(wait, stream.readable()).await {
            Ok(Ok(())) => {}
            // Silent for LINGER_TIME, or the socket failed.
            _ => break,
        }
    }
    debug!("client still sending (or silent) after the lingering close; closing anyway");
}

/// How [`discard`] ended.
enum Discarded {
    /// The client closed (or reset) the connection.
    Closed,
    /// [`LINGER_BYTES`] were read.
    Enough,
}

/// Reads and throws away what `stream` has now, counting it off `left`;
/// `None` when nothing more is there yet. Not async, so its buffer is never
/// part of a connection task's state: every connection's task is sized for
/// its largest state, lingering or not.
fn discard(stream: &tokio::net::TcpStream, left: &mut usize) -> Option<Discarded> {
    let mut buf = [0u8; 4096];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return Some(Discarded::Closed),
            Ok(n) => {
                *left = left.saturating_sub(n);
                if *left == 0 {
                    return Some(Discarded::Enough);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(_) => return Some(Discarded::Closed),
        }
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

    /// `workers` serving a fresh loopback listener: its address, the stop
    /// switch and the serving task.
    async fn serve_on_loopback(
        workers: Workers,
    ) -> (
        std::net::SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        (addr, stop, tokio::spawn(workers.serve(listener, stop_rx)))
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
    async fn least_connections_dispatch_rotates_ties_and_keeps_each_connection_on_its_thread() {
        let workers = start_named(2, "ptest");
        let (addr, stop, server) = serve_on_loopback(workers).await;

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
        // Accepted in order; each found both workers equally loaded, and
        // the tie went to the next worker in turn.
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
        let (addr, stop, server) = serve_on_loopback(workers).await;

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
        let (addr, stop, server) = serve_on_loopback(workers).await;

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
        let (addr, stop, server) = serve_on_loopback(workers).await;

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

    /// A whole HTTP/1.1 request for `/`, as a client writes it.
    const RAW_GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";

    /// Everything the server sends on `s` until it closes the connection
    /// (bounded: panics after 10 s).
    async fn read_to_close(s: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("the server did not close the connection")
            .expect("the connection was reset instead of answered and closed");
        String::from_utf8(buf).unwrap()
    }

    /// Polls until nothing listens on `addr` any more (bounded).
    async fn wait_refused(addr: std::net::SocketAddr) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "still listening after the stop"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_whose_first_request_comes_just_after_the_stop_is_answered() {
        use tokio::io::AsyncWriteExt;
        let workers = start_named(1, "late");
        let open = workers.open_counts();
        let (addr, stop, server) = serve_on_loopback(workers).await;

        // Connected and handed to the worker, but no request sent yet (as a
        // connection let in during the shim's drain notice) ...
        let mut late = tokio::net::TcpStream::connect(addr).await.unwrap();
        // ... and one that never sends anything.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        wait_until(
            "both connections at the worker",
            Duration::from_secs(5),
            || open() == [2],
        )
        .await;

        stop.send(true).unwrap();
        wait_refused(addr).await;
        // The accept loop has closed the listener and so released the
        // workers; nothing outside shows the stop reaching the connection,
        // so give it a moment (well inside FIRST_REQUEST_WAIT).
        tokio::time::sleep(Duration::from_millis(30)).await;
        late.write_all(RAW_GET).await.unwrap();
        let answer = read_to_close(&mut late).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{answer:?}"
        );
        assert!(answer.ends_with("\r\n\r\nlate-0"), "{answer:?}");

        // The silent one is closed without an answer once the wait is over.
        assert_eq!(read_to_close(&mut silent).await, "");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(open(), [0]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_queued_by_the_kernel_at_the_stop_are_accepted_and_answered() {
        use tokio::io::AsyncWriteExt;
        let workers = start_named(1, "queued");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);

        // Nothing accepts yet: the kernel completes these handshakes and
        // queues the connections, requests included.
        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(RAW_GET).await.unwrap();
            clients.push(s);
        }
        // Stopped before the accept loop runs: it sees the stop first, so
        // these connections are only served if the queue is taken at stop
        // (closing the listener with them queued would reset them).
        stop.send(true).unwrap();
        let server = tokio::spawn(workers.serve(listener, stop_rx));
        for s in &mut clients {
            let answer = read_to_close(s).await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
            assert!(answer.ends_with("\r\n\r\nqueued-0"), "{answer:?}");
        }
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    /// A connected pair: (server side, client side).
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    #[tokio::test]
    async fn linger_ends_at_once_when_the_client_closes_on_fin() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = pair().await;
        let t = std::time::Instant::now();
        let closer = tokio::spawn(async move {
            // Reads the FIN, then closes: what a well-behaved client does.
            let mut b = [0u8; 16];
            assert_eq!(client.read(&mut b).await.unwrap(), 0);
        });
        linger(server).await;
        closer.await.unwrap();
        assert!(t.elapsed() < LINGER_TIME / 2, "took {:?}", t.elapsed());
    }

    #[tokio::test]
    async fn linger_gives_up_on_a_silent_client_after_linger_time() {
        let (server, _client) = pair().await;
        let t = std::time::Instant::now();
        linger(server).await;
        let took = t.elapsed();
        assert!(took >= LINGER_TIME, "gave up after {took:?}");
        assert!(took < LINGER_TIME * 3, "waited {took:?}");
    }

    #[tokio::test]
    async fn linger_stops_reading_after_linger_bytes() {
        use tokio::io::AsyncWriteExt;
        let (server, mut client) = pair().await;
        // The client never closes and sends up to 8x the cap (bounded).
        let sender = tokio::spawn(async move {
            let chunk = vec![7u8; 64 << 10];
            let mut sent = 0usize;
            while sent < LINGER_BYTES * 8 {
                match tokio::time::timeout(Duration::from_secs(5), client.write_all(&chunk)).await {
                    Ok(Ok(())) => sent += chunk.len(),
                    _ => break,
                }
            }
            sent
        });
        let t = std::time::Instant::now();
        linger(server).await;
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        // The server stopped reading (and closed) well before the client was done.
        let sent = sender.await.unwrap();
        assert!(
            sent < LINGER_BYTES * 8,
            "the client sent everything: {sent} bytes"
        );
    }

    #[tokio::test]
    async fn aborting_a_server_of_task_workers_cuts_its_requests_as_a_crash_would() {
        let (entered_tx, mut entered) = mpsc::unbounded_channel::<()>();
        let (release, release_rx) = watch::channel(false);
        let workers = Workers::in_task(move |_req: Request<Incoming>| {
            let (entered, mut release) = (entered_tx.clone(), release_rx.clone());
            async move {
                let _ = entered.send(());
                let _ = release.wait_for(|r| *r).await;
                Response::new(crate::gate::full("answered"))
            }
        });
        let (addr, _stop, server) = serve_on_loopback(workers).await;
        let mut client = connect(addr).await;
        let held = tokio::spawn(async move { try_get(&mut client, "/").await });
        tokio::time::timeout(Duration::from_secs(10), entered.recv())
            .await
            .unwrap()
            .unwrap();
        // Aborted, not stopped: the request in progress is cut, not drained.
        server.abort();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // No receiver is left if the handler went with the abort.
        release.send_replace(true);
        let r = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_err(), "answered after the abort: {r:?}");
    }
}
