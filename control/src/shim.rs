//! `headroom shim`: a reverse proxy in front of one service instance. Every
//! request is authenticated (SigV4) and authorised (grant: service, method,
//! path prefix) against the local key cache — zero Redis calls per request —
//! then forwarded with the caller's principal in a header the shim sets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::gate::{json_error, json_response, Body, Gate};
use crate::keysync::{KeySync, KeySyncConfig};
use crate::load_report::{LoadReporter, ReportConfig};
use crate::per_thread::{self, Workers};
use crate::sigv4::VerifyPolicy;
use crate::{keystore, scoreboard};

pub const DEFAULT_PRINCIPAL_HEADER: &str = "x-headroom-principal";
/// Reserved path answering readiness (200 ready / 503 not ready).
pub const READY_PATH: &str = "/_headroom/ready";

#[derive(Debug, Clone, clap::Args)]
pub struct ShimArgs {
    /// Service name (also the SigV4 credential-scope service).
    #[arg(long)]
    pub service: String,
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The instance behind this shim (`ip:port`).
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Permission DB / scoreboard.
    #[arg(long, env = "HEADROOM_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// SigV4 region accepted in the credential scope.
    #[arg(long, default_value = "headroom")]
    pub region: String,
    /// Accepted clock skew of x-amz-date, seconds.
    #[arg(long, default_value_t = 300)]
    pub max_skew_secs: i64,
    /// Largest request body accepted, bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// File for the last good key snapshot (default:
    /// /var/lib/headroom/keys-SERVICE-INSTANCE.json).
    #[arg(long)]
    pub snapshot: Option<PathBuf>,
    /// Instance id in the scoreboard (default: the advertised address).
    #[arg(long)]
    pub instance: Option<String>,
    /// Address the balancer should send traffic to (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Node name appended to the scoreboard address as `;node=NAME`.
    #[arg(long)]
    pub node: Option<String>,
    /// Header carrying the authenticated principal upstream.
    #[arg(long, default_value = DEFAULT_PRINCIPAL_HEADER)]
    pub principal_header: String,
    /// Load-receiver base URL (e.g. http://127.0.0.1:7070); no reports if unset.
    #[arg(long)]
    pub load_receiver: Option<String>,
    /// Report interval, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub report_interval_ms: u64,
    /// In-flight requests that mean 100 % load.
    #[arg(long, default_value_t = 100)]
    pub capacity: u32,
    /// Local endpoint of the service returning its own load (0–100) as a
    /// plain number or {"load": N}; replaces the in-flight measure.
    #[arg(long)]
    pub load_url: Option<String>,
    /// Access key id used to sign load reports.
    #[arg(long, env = "HEADROOM_REPORT_KEY_ID")]
    pub report_key_id: Option<String>,
    /// Secret used to sign load reports.
    #[arg(long, env = "HEADROOM_REPORT_SECRET", hide_env_values = true)]
    pub report_secret: Option<String>,
    /// Key-sync XREAD block time, milliseconds.
    #[arg(long, default_value_t = 2000, hide = true)]
    pub sync_block_ms: u64,
    /// Worker threads, each serving its connections and their upstream
    /// requests on its own (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl ShimArgs {
    /// Minimal arguments (defaults for everything else), for embedding/tests.
    pub fn new(service: &str, listen: SocketAddr, upstream: SocketAddr, redis: &str) -> Self {
        ShimArgs {
            service: service.into(),
            listen,
            upstream,
            redis: redis.into(),
            region: "headroom".into(),
            max_skew_secs: 300,
            max_body_bytes: 1 << 20,
            snapshot: None,
            instance: None,
            advertise: None,
            node: None,
            principal_header: DEFAULT_PRINCIPAL_HEADER.into(),
            load_receiver: None,
            report_interval_ms: 1000,
            capacity: 100,
            load_url: None,
            report_key_id: None,
            report_secret: None,
            sync_block_ms: 2000,
            threads: 0,
        }
    }
}

/// What every worker thread shares; each has its own [`UpstreamClient`].
struct Ctx {
    gate: Gate,
    /// The upstream's `ip:port`, parsed once.
    authority: Authority,
    principal_header: hyper::header::HeaderName,
    in_flight: Arc<AtomicI64>,
}

/// Pooled keep-alive HTTP/1.1 client to the upstream.
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// The upstream client the shim builds on each worker thread: keep-alive
/// pool, TCP_NODELAY (a request's head and body may leave in two writes;
/// Nagle would hold the second until the first is acknowledged).
pub fn upstream_client() -> UpstreamClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(conn)
}

/// How long a stopping shim keeps accepting after marking itself draining:
/// three of the balancer's default 100 ms refreshes.
pub const DRAIN_NOTICE: Duration = Duration::from_millis(300);

/// A running shim.
pub struct ShimHandle {
    /// The address the shim listens on.
    pub local_addr: SocketAddr,
    /// The instance id in the scoreboard.
    pub instance: String,
    /// The key sync feeding the shim's key cache.
    pub keysync: KeySync,
    /// Requests being answered right now (the load measure).
    pub in_flight: Arc<AtomicI64>,
    service: String,
    redis: String,
    stop: watch::Sender<bool>,
    /// The accept loop; ends once the worker threads have drained.
    server: tokio::task::JoinHandle<()>,
    background: Vec<tokio::task::JoinHandle<()>>,
    reporter: Option<tokio::task::JoinHandle<()>>,
}

impl ShimHandle {
    /// The shim's key cache and readiness.
    pub fn state(&self) -> &Arc<crate::authz::AuthState> {
        &self.keysync.state
    }

    /// Stop the registration loop, mark the instance draining (balancers
    /// stop sending it new flows), stop accepting, let the requests in
    /// flight finish (idle keep-alive connections close at once; at most
    /// [`DRAIN_GRACE`](per_thread::DRAIN_GRACE)), then unregister the instance and stop key sync.
    /// Bounded: about 8 s with Redis unreachable (each Redis step has its
    /// own timeout), under the agent's default 10 s stop grace.
    pub async fn shutdown(self) {
        // First, and awaited, so no registration write can land after the
        // unregistration below.
        for t in self.background {
            t.abort();
            let _ = t.await;
        }
        let mark = async {
            let mut c = keystore::connect(&self.redis, Duration::from_secs(1)).await?;
            scoreboard::mark_draining(&mut c, &self.service, &self.instance).await
        };
        match tokio::time::timeout(Duration::from_secs(1), mark).await {
            // Still accepting while balancers catch up, so the new flows
            // they send meanwhile are served, not refused.
            Ok(Ok(())) => tokio::time::sleep(DRAIN_NOTICE).await,
            _ => warn!(instance = %self.instance, "could not mark the instance draining"),
        }
        let _ = self.stop.send(true);
        // Drain before unregistering: the balancer removes an instance that
        // has no address and re-selects its established flows
        // (docs/SCOREBOARD.md), which would cut the requests still in flight.
        per_thread::join_drained(self.server, "shim").await;
        // Load reports go with the instance's records below: one in flight
        // now is of no use.
        if let Some(r) = self.reporter {
            r.abort();
            let _ = r.await;
        }
        let unreg = async {
            let mut c = keystore::connect(&self.redis, Duration::from_secs(2)).await?;
            scoreboard::unregister(&mut c, &self.service, &self.instance).await?;
            keystore::unregister_instance(&mut c, &self.service, &self.instance)
                .await
                .map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())))?;
            Ok::<_, redis::RedisError>(())
        };
        match tokio::time::timeout(Duration::from_secs(3), unreg).await {
            Ok(Ok(())) => info!(instance = %self.instance, "unregistered"),
            _ => warn!(instance = %self.instance, "could not unregister"),
        }
        self.keysync.stop().await;
    }
}

/// Start a shim: bind, sync keys, register, serve. Returns once listening.
pub async fn start_shim(args: ShimArgs) -> anyhow::Result<ShimHandle> {
    let listener = TcpListener::bind(args.listen).await?;
    let local_addr = listener.local_addr()?;
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| local_addr.to_string());
    let instance = args.instance.clone().unwrap_or_else(|| advertise.clone());
    if !scoreboard::valid_service(&args.service) {
        anyhow::bail!("invalid service name {:?}", args.service);
    }
    if !scoreboard::valid_instance(&instance) {
        anyhow::bail!("invalid instance id {instance:?}");
    }
    let snapshot = args.snapshot.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "/var/lib/headroom/keys-{}-{}.json",
            args.service,
            instance.replace([':', '[', ']'], "_")
        ))
    });
    let mut kcfg = KeySyncConfig::new(&args.redis, &args.service);
    kcfg.snapshot_path = Some(snapshot);
    kcfg.block = Duration::from_millis(args.sync_block_ms.max(10));
    let keysync = KeySync::start(kcfg).await;
    let policy = VerifyPolicy {
        service: args.service.clone(),
        region: args.region.clone(),
        max_skew_secs: args.max_skew_secs,
    };
    let in_flight = Arc::new(AtomicI64::new(0));
    let ctx = Arc::new(Ctx {
        gate: Gate::new(keysync.state.clone(), policy, args.max_body_bytes),
        authority: upstream_authority(args.upstream)?,
        principal_header: hyper::header::HeaderName::from_bytes(args.principal_header.as_bytes())?,
        in_flight: in_flight.clone(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let span = info_span!("shim", service = %args.service, instance = %instance);
    let workers = span.in_scope(|| {
        Workers::start(args.threads, "shim", move || {
            // Built on the worker thread: its pool's connections live there.
            let client = upstream_client();
            let ctx = ctx.clone();
            move |req| {
                let (ctx, client) = (ctx.clone(), client.clone());
                async move { handle(&ctx, &client, req).await }
            }
        })
    })?;
    let server = tokio::spawn(
        workers
            .serve(listener, stop_rx.clone())
            .instrument(span.clone()),
    );

    let mut background = Vec::new();
    let mut reporter = None;
    // Registration: retried in the background until Redis answers.
    let addr_value = match &args.node {
        Some(n) => format!("{advertise};node={n}"),
        None => advertise.clone(),
    };
    background.push(tokio::spawn(
        register_loop(
            args.redis.clone(),
            args.service.clone(),
            instance.clone(),
            addr_value,
        )
        .instrument(span.clone()),
    ));
    if let Some(url) = &args.load_receiver {
        match (&args.report_key_id, &args.report_secret) {
            (Some(k), Some(s)) => {
                let rep = LoadReporter::new(ReportConfig {
                    receiver_url: url.clone(),
                    service: args.service.clone(),
                    instance: instance.clone(),
                    interval: Duration::from_millis(args.report_interval_ms.max(10)),
                    capacity: args.capacity.max(1),
                    load_url: args.load_url.clone(),
                    access_key_id: k.clone(),
                    secret: s.clone(),
                    region: args.region.clone(),
                })?;
                reporter = Some(tokio::spawn(
                    rep.run(in_flight.clone(), stop_rx.clone())
                        .instrument(span.clone()),
                ));
            }
            _ => anyhow::bail!("--load-receiver needs --report-key-id and --report-secret"),
        }
    }
    span.in_scope(|| info!(%local_addr, upstream = %args.upstream, "shim listening"));
    Ok(ShimHandle {
        local_addr,
        instance,
        keysync,
        in_flight,
        service: args.service,
        redis: args.redis,
        stop,
        server,
        background,
        reporter,
    })
}

/// `headroom shim …`: run until SIGINT/SIGTERM, then unregister.
pub async fn run_shim(args: ShimArgs) -> anyhow::Result<()> {
    let h = start_shim(args).await?;
    crate::wait_for_shutdown_signal().await;
    h.shutdown().await;
    Ok(())
}

/// How often a running shim writes its registration again.
pub const REREGISTER_EVERY: Duration = Duration::from_secs(5);

/// Registers the instance (scoreboard address, permission-DB observer) until
/// shutdown aborts it: first with backoff until Redis answers, then every
/// [`REREGISTER_EVERY`].
async fn register_loop(redis: String, service: String, instance: String, addr: String) {
    let info =
        serde_json::json!({ "addr": addr, "started_ms": crate::sigv4::unix_now_ms() }).to_string();
    let mut backoff = Duration::from_millis(100);
    let mut registered = false;
    loop {
        let r = async {
            let mut c = keystore::connect(&redis, Duration::from_secs(2)).await?;
            scoreboard::register(&mut c, &service, &instance, &addr, !registered).await?;
            keystore::register_instance(&mut c, &service, &instance, &info)
                .await
                .map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())))?;
            Ok::<_, redis::RedisError>(())
        }
        .await;
        match r {
            Ok(()) => {
                if !registered {
                    info!("registered");
                    registered = true;
                }
                backoff = Duration::from_millis(100);
                // Again later: a Redis restarted empty (or failed over) must
                // learn this instance's address again. Writing it is idempotent.
                tokio::time::sleep(REREGISTER_EVERY).await;
            }
            Err(e) => {
                debug!(error = %e, "registration failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Serve HTTP/1.1 on `listener` with `handler` on the current runtime (the
/// load-receiver, agent and machine-manager APIs) until `stop` changes,
/// then drain like the shim's workers: stop accepting, close idle
/// keep-alive connections, let requests in flight finish (at most
/// [`DRAIN_GRACE`](per_thread::DRAIN_GRACE)) and return; connections end with a lingering close.
pub async fn serve_with<F, Fut>(listener: TcpListener, stop: watch::Receiver<bool>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    Workers::in_task(handler).serve(listener, stop).await
}

struct InFlight(Arc<AtomicI64>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Hop-by-hop headers, never forwarded either way.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes the hop-by-hop headers from `headers`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually none is there: one pass over the names (compared without
    // hashing) instead of nine hashed removals per message.
    if headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for h in &HOP_BY_HOP {
            headers.remove(h);
        }
    }
}

/// The URI of the upstream request: `http://AUTHORITY` + the received
/// path and query (shared, not copied).
pub fn upstream_uri(authority: &Authority, received: &Uri) -> Result<Uri, hyper::http::Error> {
    let mut p = hyper::http::uri::Parts::default();
    p.scheme = Some(Scheme::HTTP);
    p.authority = Some(authority.clone());
    p.path_and_query = Some(
        received
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Ok(Uri::from_parts(p)?)
}

/// The upstream `host:port` as a URI authority.
pub fn upstream_authority(upstream: SocketAddr) -> Result<Authority, hyper::http::Error> {
    Ok(Authority::try_from(upstream.to_string())?)
}

async fn handle(ctx: &Ctx, client: &UpstreamClient, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == READY_PATH {
        let ready = ctx.gate.state.is_ready();
        return json_response(
            if ready { 200 } else { 503 },
            &serde_json::json!({ "ready": ready }),
        );
    }
    ctx.in_flight.fetch_add(1, Ordering::Relaxed);
    let _guard = InFlight(ctx.in_flight.clone());
    let admitted = match ctx.gate.admit(req).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if let Err(r) = ctx.gate.state.authorise(
        &admitted.principal,
        admitted.parts.method.as_str(),
        &admitted.path,
    ) {
        return crate::gate::reject(&r);
    }
    let mut parts = admitted.parts;
    parts.uri = match upstream_uri(&ctx.authority, &parts.uri) {
        Ok(u) => u,
        Err(_) => return json_error(400, "bad_uri"),
    };
    parts.version = hyper::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    // Strip anything the caller claims, then set what we verified.
    parts.headers.remove(&ctx.principal_header);
    match hyper::header::HeaderValue::from_str(&admitted.principal) {
        Ok(v) => {
            parts.headers.insert(ctx.principal_header.clone(), v);
        }
        Err(_) => return json_error(500, "bad_principal"),
    }
    let up = Request::from_parts(parts, Full::new(admitted.body));
    match client.request(up).await {
        Ok(resp) => {
            let (mut p, b) = resp.into_parts();
            strip_hop_by_hop(&mut p.headers);
            Response::from_parts(p, b.boxed())
        }
        Err(e) => {
            warn!(error = %e, "upstream request failed");
            json_error(502, "upstream_unavailable")
        }
    }
}
