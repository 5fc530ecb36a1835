//! `cargo xtask bench auth`: what authorising every request costs.
//!
//! 1. **Verification cost**: `headroom_control::bench::verify_cost` (parse,
//!    checks, canonical request, string to sign, HMAC with the cached derived
//!    signing key, constant-time compare, grant check), per request, median /
//!    min / max over `--verify-runs` runs of `--verify-iterations` requests,
//!    for an empty and a 1 KiB body.
//!
//! 2. **Proxied requests** on loopback, all in this one process, four paths:
//!    - `direct`: load generator → upstream;
//!    - `proxy without auth`: load generator → a plain reverse proxy built
//!      like the shim (hyper server on the shim's thread-per-core workers,
//!      `headroom_control::per_thread`, a pooled hyper-util client per
//!      worker thread built by `shim::upstream_client`, same header
//!      handling) but verifying nothing → upstream: what the extra hop alone
//!      costs, so that shim − proxy is what authorisation adds;
//!    - `shim`: load generator → the real shim (`start_shim`, keys from a real
//!      redis-server through the keystore, zero Redis calls per request) →
//!      upstream;
//!    - `naive`: the pattern paper §4 criticises: load generator → a proxy
//!      that, for every request, forwards its method, path, headers and body
//!      over HTTP (keep-alive pooled client) to an auth service, which reads
//!      the key record from Redis (one `HGETALL headroom:auth:key:AKID`) and
//!      verifies the signature with the same SigV4 code as the shim; on 200
//!      the proxy forwards upstream exactly as the shim does. To favour this
//!      pattern rather than the shim, the auth service caches derived signing
//!      keys (per key id and secret) and holds the grants in memory, so it
//!      makes one Redis round trip per request and no key derivation.
//!
//!    The upstream answers every request with a 3-byte body. Each server has
//!    its own tokio runtime (`--threads` workers, default nproc), as if it
//!    were its own process (the shim and the proxy without auth: `--threads`
//!    worker threads with one single-threaded runtime each, named
//!    `shim-N` / `proxy-N`, plus the runtime their accept loop runs on); so
//!    does the load generator: **everything shares
//!    the machine's cores**, so absolute figures are those of a small box
//!    running client, proxies and upstream at once, and the ratios within one
//!    invocation are what to compare.
//!
//!    Load generator: `K` concurrent keep-alive HTTP/1.1 connections (one per
//!    `--connections` value, a cell each), closed loop, each sending the same
//!    SigV4-signed `GET /api/items` (signed once per cell; no nonce, so the
//!    shim accepts the replay within its 300 s window, and still verifies
//!    every request in full). A cell runs `--warmup` seconds unrecorded, then
//!    `--seconds` recorded: every response completed inside the recorded
//!    window counts for throughput and its latency (request start → body
//!    read) goes into a sorted vector for p50/p99. Rounds interleave the
//!    cells (round r: every K, and the four paths in an order rotated by r)
//!    so drift on a noisy machine hits all paths alike. Ratios and added
//!    latencies are computed per round (same round, same K), then summarised
//!    as median (min–max) over rounds.
//!
//!    CPU time per request is measured too, by component: the on-CPU time of
//!    each runtime's threads (`/proc/self/task/*/schedstat`, summed by thread
//!    name) and of redis-server (`INFO cpu`), over the cell, divided by its
//!    requests. Wall-clock figures on a shared 2-core VM swing with whatever
//!    else runs; CPU per request swings much less, and says what each layer
//!    costs (shim − proxy = verification in situ; naive layer / shim = how
//!    much more the criticised pattern burns per request).
//!
//!    Every path is checked before measuring (200 and the upstream's body for
//!    a signed request, 401 for an unsigned one through `shim` and `naive`),
//!    any non-200 during a cell counts as an error and makes the run fail,
//!    and `INFO commandstats` deltas give Redis commands per request per path.
//!
//! Only loopback traffic; its own redis-server, stopped at the end. Bounded:
//! `--seconds` ≤ 60, `--rounds` ≤ 20, `K` ≤ 256, every request times out
//! after 5 s and every cell after its duration + 10 s.
//!
//! `cargo xtask bench auth -- [--seconds S] [--rounds N] [--connections 1,16,32]`

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use clap::Parser;
use headroom_control::{
    authz::decoded_path,
    bench::verify_cost,
    keystore::{self, Grant, KeyStore},
    per_thread::Workers,
    shim::{
        start_shim, strip_hop_by_hop, upstream_authority, upstream_client, upstream_uri, ShimArgs,
        DEFAULT_PRINCIPAL_HEADER,
    },
    sigv4::{self, CachedSecret, RequestParts, VerifyPolicy},
};
use headroom_tests::RedisServer;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, Limited};
use hyper::{
    body::Incoming,
    header::{HeaderMap, HeaderName, HeaderValue},
    http::uri::Authority,
    Method, Request, Response, StatusCode, Uri,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use tokio::{net::TcpListener, runtime::Runtime};

/// Service name, SigV4 credential-scope service.
const SERVICE: &str = "bench";
const REGION: &str = "headroom";
const PRINCIPAL: &str = "bench-client";
const PATH: &str = "/api/items";
const UPSTREAM_BODY: &[u8] = b"ok\n";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BODY: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    about = "Cost of the auth shim: verification, and proxied throughput/latency vs direct and vs a per-request auth service"
)]
struct Args {
    /// Recorded seconds per cell (one path, one K, one round).
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Unrecorded warm-up seconds before each cell.
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// Rounds; each runs every (K, path) cell once.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Concurrent keep-alive connections of the load generator, comma-separated (one cell per value).
    #[arg(long, value_delimiter = ',', default_value = "1,16,32")]
    connections: Vec<usize>,
    /// Runs of the verification micro-benchmark.
    #[arg(long, default_value_t = 7)]
    verify_runs: u32,
    /// Requests verified per run.
    #[arg(long, default_value_t = 100_000)]
    verify_iterations: u32,
    /// Worker threads of each server runtime and of the load generator (default: nproc).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Path {
    Direct,
    Proxy,
    Shim,
    Naive,
}

impl Path {
    const ALL: [Path; 4] = [Path::Direct, Path::Proxy, Path::Shim, Path::Naive];
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Proxy => "proxy without auth",
            Path::Shim => "shim",
            Path::Naive => "naive (auth service per request)",
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.seconds > 0.0 && args.seconds <= 60.0,
        "--seconds must be in (0, 60]"
    );
    ensure!(
        (0.0..=10.0).contains(&args.warmup),
        "--warmup must be in [0, 10]"
    );
    ensure!(
        (1..=20).contains(&args.rounds),
        "--rounds must be in 1..=20"
    );
    ensure!(
        !args.connections.is_empty() && args.connections.iter().all(|k| (1..=256).contains(k)),
        "--connections must list values in 1..=256"
    );
    ensure!(
        (1..=100).contains(&args.verify_runs),
        "--verify-runs must be in 1..=100"
    );
    ensure!(
        (1..=10_000_000).contains(&args.verify_iterations),
        "--verify-iterations must be in 1..=10000000"
    );
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = args.threads.unwrap_or(nproc).clamp(1, 64);
    let started = Instant::now();

    let machine = Machine::read(nproc);
    println!("# Auth shim benchmark\n");
    machine.print();
    println!("- command: `{}`", command_line());
    println!(
        "- setup: one process; upstream, shim, naive proxy, auth service and load generator each on its own tokio runtime with {threads} worker threads, all sharing the {nproc} cores; redis-server {} (own process)\n",
        redis_version()
    );

    // ---------------------------------------------------------------- 1
    let verify = bench_verify(args.verify_runs, args.verify_iterations)?;
    print_verify(&verify, args.verify_runs, args.verify_iterations);

    // ---------------------------------------------------------------- 2
    let results = bench_proxy(&args, threads)?;
    let summary = summarise(&results, &args);
    print_proxy(&summary, &args);
    print_targets(&verify, &summary);
    println!(
        "\nload average at end: {}; total runtime {:.0} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    ensure!(errors == 0, "{errors} requests failed during the cells");
    Ok(())
}

// ==================================================================== machine

struct Machine {
    nproc: usize,
    cpu: String,
    kernel: String,
    date: String,
    load: String,
}

impl Machine {
    fn read(nproc: usize) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            nproc,
            cpu,
            kernel,
            date: sigv4::format_amz_date(sigv4::unix_now()),
            load: loadavg(),
        }
    }

    fn print(&self) {
        println!(
            "- machine: nproc {}, CPU {}, kernel {}",
            self.nproc, self.cpu, self.kernel
        );
        println!(
            "- date (UTC): {}; load average at start: {}",
            self.date, self.load
        );
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn redis_version() -> String {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.split_whitespace()
                .find(|w| w.starts_with("v="))
                .map(|w| w[2..].to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn command_line() -> String {
    let rest: Vec<String> = std::env::args().skip(1).collect();
    if rest.is_empty() {
        "cargo xtask bench auth".into()
    } else {
        format!("cargo xtask bench auth -- {}", rest.join(" "))
    }
}

// ==================================================================== stats

/// Median, min, max of `v` (not empty).
fn mmm(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

/// Nearest-rank percentile of a sorted slice (not empty).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn fmt_mmm(v: &[f64], decimals: usize) -> String {
    let (m, lo, hi) = mmm(v);
    format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
}

// ==================================================================== 1. verify

struct VerifyRow {
    label: &'static str,
    per_request_us: Vec<f64>,
}

fn bench_verify(runs: u32, iterations: u32) -> Result<Vec<VerifyRow>> {
    let cases: [(&'static str, usize); 2] = [("GET, empty body", 0), ("GET, 1 KiB body", 1024)];
    let mut rows: Vec<VerifyRow> = cases
        .iter()
        .map(|(label, _)| VerifyRow {
            label,
            per_request_us: Vec::new(),
        })
        .collect();
    for _ in 0..runs {
        for (row, (_, body)) in rows.iter_mut().zip(cases) {
            let c = verify_cost(iterations, body);
            ensure!(
                c.accepted == c.iterations,
                "verify_cost accepted {} of {} requests",
                c.accepted,
                c.iterations
            );
            row.per_request_us.push(c.per_request.as_secs_f64() * 1e6);
        }
    }
    Ok(rows)
}

fn print_verify(rows: &[VerifyRow], runs: u32, iterations: u32) {
    println!("## Signature verification per request (cached derived signing key)\n");
    println!(
        "`headroom_control::bench::verify_cost`, {runs} runs × {iterations} requests, one thread; median (min–max) of the per-run means.\n"
    );
    println!("| request | µs per request | target |");
    println!("| --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | ≤ 10 µs |",
            r.label,
            fmt_mmm(&r.per_request_us, 2)
        );
    }
    println!();
}

// ==================================================================== 2. proxy

fn runtime(name: &str, threads: usize) -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("building the {name} runtime"))
}

/// One cell of one round.
struct CellResult {
    round: u32,
    k: usize,
    path: Path,
    /// Completed requests per second inside the recorded window.
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Redis commands (all but INFO) during the cell, per completed request
    /// (warm-up included in both counts).
    redis_per_req: f64,
    /// CPU time per completed request, µs, by component (threads of each
    /// runtime, and the redis-server process), warm-up included.
    cpu: HashMap<&'static str, f64>,
}

/// Components whose CPU time is measured: the runtimes' thread names, and Redis.
const COMPONENTS: [&str; 7] = [
    "load", "upstream", "proxy", "shim", "naive", "authsvc", "redis",
];

impl CellResult {
    fn cpu_of(&self, c: &str) -> f64 {
        self.cpu.get(c).copied().unwrap_or(0.0)
    }
    /// CPU per request of the layer between client and upstream.
    fn layer_cpu(&self) -> f64 {
        match self.path {
            Path::Direct => 0.0,
            Path::Proxy => self.cpu_of("proxy"),
            Path::Shim => self.cpu_of("shim"),
            Path::Naive => self.cpu_of("naive") + self.auth_service_cpu(),
        }
    }
    /// Of which the auth service and Redis (naive only).
    fn auth_service_cpu(&self) -> f64 {
        match self.path {
            Path::Naive => self.cpu_of("authsvc") + self.cpu_of("redis"),
            _ => 0.0,
        }
    }
    fn total_cpu(&self) -> f64 {
        self.cpu.values().sum()
    }
}

/// On-CPU nanoseconds of this process's threads, summed by thread name
/// (`/proc/self/task/*/schedstat`, first field); a `-N` suffix (worker
/// threads `shim-0`, `shim-1`, …) counts for its base name.
fn thread_cpu_ns() -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(p.join("comm")),
            std::fs::read_to_string(p.join("schedstat")),
        ) else {
            continue;
        };
        if let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            *out.entry(component_of(comm.trim()).to_string())
                .or_insert(0) += ns;
        }
    }
    out
}

/// `shim-1` → `shim`; other names unchanged.
fn component_of(thread: &str) -> &str {
    match thread.rsplit_once('-') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => thread,
    }
}

/// What is read before and after each cell.
struct Probe {
    redis_calls: u64,
    /// used_cpu_sys + used_cpu_user of redis-server, ns
    redis_cpu_ns: u64,
    threads: HashMap<String, u64>,
}

impl Probe {
    async fn read(conn: &mut redis::aio::MultiplexedConnection) -> Result<Probe> {
        let s: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
        let mut cpu = 0.0;
        for line in s.lines() {
            for f in ["used_cpu_sys:", "used_cpu_user:"] {
                if let Some(v) = line
                    .strip_prefix(f)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                {
                    cpu += v;
                }
            }
        }
        Ok(Probe {
            redis_calls: redis_calls(conn).await?,
            redis_cpu_ns: (cpu * 1e9) as u64,
            threads: thread_cpu_ns(),
        })
    }

    /// CPU µs per request by component between `self` (before) and `after`.
    fn cpu_per_req(&self, after: &Probe, requests: f64) -> HashMap<&'static str, f64> {
        COMPONENTS
            .iter()
            .map(|&c| {
                let ns = if c == "redis" {
                    after.redis_cpu_ns.saturating_sub(self.redis_cpu_ns)
                } else {
                    let get = |m: &HashMap<String, u64>| m.get(c).copied().unwrap_or(0);
                    get(&after.threads).saturating_sub(get(&self.threads))
                };
                (c, ns as f64 / 1e3 / requests)
            })
            .collect()
    }
}

/// Where the load generator sends its requests, and what it sends.
struct Target {
    addr: SocketAddr,
    uri: Uri,
    headers: HeaderMap,
}

fn signed_headers(host: SocketAddr, akid: &str, secret: &str) -> Result<HeaderMap> {
    let host = host.to_string();
    let signed = sigv4::sign(
        "GET",
        PATH,
        "",
        &[("host", &host)],
        b"",
        akid,
        secret,
        REGION,
        SERVICE,
        sigv4::unix_now(),
    );
    let mut h = HeaderMap::new();
    h.insert(hyper::header::HOST, HeaderValue::from_str(&host)?);
    for (n, v) in signed {
        h.insert(
            HeaderName::from_bytes(n.as_bytes())?,
            HeaderValue::from_str(&v)?,
        );
    }
    Ok(h)
}

fn bench_proxy(args: &Args, threads: usize) -> Result<Vec<CellResult>> {
    let redis = RedisServer::start()?;
    let url = redis.url();
    let dir = std::env::temp_dir().join(format!("hr-bench-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = bench_proxy_with(args, threads, &url, dir.join("keys.json"));
    let _ = std::fs::remove_dir_all(&dir);
    drop(redis);
    r
}

fn bench_proxy_with(
    args: &Args,
    threads: usize,
    url: &str,
    snapshot: PathBuf,
) -> Result<Vec<CellResult>> {
    let load_rt = runtime("load", threads)?;
    let upstream_rt = runtime("upstream", threads)?;
    let shim_rt = runtime("shim", threads)?;
    let naive_rt = runtime("naive", threads)?;
    let proxy_rt = runtime("proxy", threads)?;
    let auth_rt = runtime("authsvc", threads)?;
    let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));

    // The key and its grant, through the keystore (as `headroom keys` does).
    let key = load_rt.block_on(async {
        let mut ks = KeyStore::connect(url).await?;
        let key = ks.create_key(PRINCIPAL).await?;
        ks.set_grant(
            SERVICE,
            PRINCIPAL,
            &Grant {
                methods: vec!["GET".into()],
                prefixes: vec!["/api".into()],
            },
        )
        .await?;
        anyhow::Ok(key)
    })?;

    // Upstream.
    let upstream = upstream_rt.block_on(async {
        let l = TcpListener::bind(localhost).await?;
        let a = l.local_addr()?;
        tokio::spawn(serve(l, |_req| async {
            Response::new(full(Bytes::from_static(UPSTREAM_BODY)))
        }));
        anyhow::Ok(a)
    })?;

    // The real shim.
    let shim = shim_rt.block_on(async {
        let mut sa = ShimArgs::new(SERVICE, localhost, upstream, url);
        sa.snapshot = Some(snapshot);
        sa.threads = threads;
        let h = start_shim(sa).await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !h.state().is_ready() {
            ensure!(Instant::now() < deadline, "shim not ready after 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(h)
    })?;
    let shim_addr = shim.local_addr;

    // The criticised pattern: auth service + naive proxy.
    let auth_addr = auth_rt.block_on(async {
        let conn = keystore::connect(url, Duration::from_secs(5)).await?;
        let svc = Arc::new(AuthService {
            redis: conn,
            policy: VerifyPolicy {
                service: SERVICE.into(),
                region: REGION.into(),
                max_skew_secs: 300,
            },
            grants: [(
                PRINCIPAL.to_string(),
                Grant {
                    methods: vec!["GET".into()],
                    prefixes: vec!["/api".into()],
                },
            )]
            .into_iter()
            .collect(),
            secrets: RwLock::new(HashMap::new()),
        });
        let l = TcpListener::bind(localhost).await?;
        let a = l.local_addr()?;
        tokio::spawn(serve(l, move |req| auth_check(svc.clone(), req)));
        anyhow::Ok(a)
    })?;
    let naive_addr = naive_rt.block_on(async {
        let ctx = Arc::new(NaiveProxy {
            auth: Some(auth_addr),
            upstream: upstream_authority(upstream)?,
            principal_header: HeaderName::from_static(DEFAULT_PRINCIPAL_HEADER),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let l = TcpListener::bind(localhost).await?;
        let a = l.local_addr()?;
        tokio::spawn(serve(l, move |req| naive_handle(ctx.clone(), req)));
        anyhow::Ok(a)
    })?;
    // The same proxy without the auth call, served like the shim (worker
    // threads, an upstream client per thread built as the shim builds its
    // own): what the extra hop alone costs.
    let upstream_auth = upstream_authority(upstream)?;
    let proxy_addr = proxy_rt.block_on(async {
        let workers = Workers::start(threads, "proxy", move || {
            let ctx = Arc::new(NaiveProxy {
                auth: None,
                upstream: upstream_auth.clone(),
                principal_header: HeaderName::from_static(DEFAULT_PRINCIPAL_HEADER),
                client: upstream_client(),
            });
            move |req| naive_handle(ctx.clone(), req)
        })?;
        let l = TcpListener::bind(localhost).await?;
        let a = l.local_addr()?;
        tokio::spawn(async move {
            let (_keep, never) = tokio::sync::watch::channel(false);
            workers.serve(l, never).await
        });
        anyhow::Ok(a)
    })?;

    let addr_of = |p: Path| match p {
        Path::Direct => upstream,
        Path::Proxy => proxy_addr,
        Path::Shim => shim_addr,
        Path::Naive => naive_addr,
    };

    let result = load_rt.block_on(async {
        let mut info = keystore::connect(url, Duration::from_secs(5)).await?;
        // Each path works, and the proxies refuse what is not signed.
        for p in Path::ALL {
            let a = addr_of(p);
            let h = signed_headers(a, &key.access_key_id, &key.secret)?;
            let (status, body) = one_request(a, h).await?;
            ensure!(
                status == StatusCode::OK && body.as_ref() == UPSTREAM_BODY,
                "{}: signed request got {status} {body:?}",
                p.name()
            );
            if matches!(p, Path::Shim | Path::Naive) {
                let mut h = HeaderMap::new();
                h.insert(hyper::header::HOST, HeaderValue::from_str(&a.to_string())?);
                let (status, _) = one_request(a, h).await?;
                ensure!(
                    status == StatusCode::UNAUTHORIZED,
                    "{}: unsigned request got {status}, want 401",
                    p.name()
                );
            }
        }
        let warmup = Duration::from_secs_f64(args.warmup);
        let measure = Duration::from_secs_f64(args.seconds);
        let cells = args.rounds as usize * args.connections.len() * Path::ALL.len();
        let mut out = Vec::with_capacity(cells);
        for round in 0..args.rounds {
            for &k in &args.connections {
                for i in 0..Path::ALL.len() {
                    let p = Path::ALL[(i + round as usize) % Path::ALL.len()];
                    let a = addr_of(p);
                    let target = Arc::new(Target {
                        addr: a,
                        uri: Uri::from_static(PATH),
                        headers: signed_headers(a, &key.access_key_id, &key.secret)?,
                    });
                    let before = Probe::read(&mut info).await?;
                    let cell = tokio::time::timeout(
                        warmup + measure + Duration::from_secs(10),
                        run_cell(target, k, warmup, measure),
                    )
                    .await
                    .context("cell overran its time bound")??;
                    let after = Probe::read(&mut info).await?;
                    let total = cell.total_completed.max(1) as f64;
                    let r = CellResult {
                        round,
                        k,
                        path: p,
                        rps: cell.latencies_ns.len() as f64 / measure.as_secs_f64(),
                        p50_us: percentile(&cell.latencies_ns, 50.0) as f64 / 1e3,
                        p99_us: percentile(&cell.latencies_ns, 99.0) as f64 / 1e3,
                        errors: cell.errors,
                        redis_per_req: after.redis_calls.saturating_sub(before.redis_calls) as f64
                            / total,
                        cpu: before.cpu_per_req(&after, total),
                    };
                    eprintln!(
                        "round {}/{} K={k:>3} {:<32} {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  CPU/req: layer {:>6.1} µs, total {:>6.1} µs  errors {}",
                        round + 1,
                        args.rounds,
                        p.name(),
                        r.rps,
                        r.p50_us,
                        r.p99_us,
                        r.layer_cpu(),
                        r.total_cpu(),
                        r.errors
                    );
                    out.push(r);
                }
            }
        }
        anyhow::Ok(out)
    });

    shim_rt.block_on(shim.shutdown());
    for rt in [load_rt, upstream_rt, shim_rt, naive_rt, proxy_rt, auth_rt] {
        rt.shutdown_timeout(Duration::from_secs(2));
    }
    result
}

/// Sum of `calls=` over `INFO commandstats`, without INFO itself.
async fn redis_calls(conn: &mut redis::aio::MultiplexedConnection) -> Result<u64> {
    let s: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut total = 0;
    for line in s.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        if rest.starts_with("info:") {
            continue;
        }
        if let Some(n) = rest
            .split(',')
            .find_map(|f| f.split_once("calls=").map(|(_, n)| n))
            .and_then(|n| n.parse::<u64>().ok())
        {
            total += n;
        }
    }
    Ok(total)
}

// ------------------------------------------------------------------ servers

type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn status_only(code: u16) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// The shim's own accept loop, running until the process ends.
async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let (_keep, never) = tokio::sync::watch::channel(false);
    headroom_control::shim::serve_with(listener, never, handler).await
}

/// The auth service of the criticised pattern: every check reads the key
/// record from Redis, then verifies the signature like the shim does.
struct AuthService {
    redis: redis::aio::MultiplexedConnection,
    policy: VerifyPolicy,
    /// In memory (one Redis round trip per check, not two).
    grants: HashMap<String, Grant>,
    /// Derived signing keys cached per (key id, secret), as in the shim.
    secrets: RwLock<HashMap<String, Arc<CachedSecret>>>,
}

impl AuthService {
    fn cached(&self, akid: &str, secret: &str) -> Arc<CachedSecret> {
        if let Ok(g) = self.secrets.read() {
            if let Some(c) = g.get(akid).filter(|c| c.secret() == secret) {
                return c.clone();
            }
        }
        let c = Arc::new(CachedSecret::new(secret.to_string()));
        if let Ok(mut g) = self.secrets.write() {
            g.insert(akid.to_string(), c.clone());
        }
        c
    }
}

async fn auth_check(svc: Arc<AuthService>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return status_only(400),
    };
    let Ok(path) = decoded_path(parts.uri.path()) else {
        return status_only(400);
    };
    let rp = RequestParts::from_http(&parts, &body);
    let Ok((parsed, _)) = sigv4::precheck(&rp, &svc.policy, sigv4::unix_now()) else {
        return status_only(401);
    };
    let mut conn = svc.redis.clone();
    let rec: HashMap<String, String> = match redis::cmd("HGETALL")
        .arg(keystore::key_hash(&parsed.access_key_id))
        .query_async(&mut conn)
        .await
    {
        Ok(r) => r,
        Err(_) => return status_only(503),
    };
    let (Some("active"), Some(secret), Some(principal)) = (
        rec.get("status").map(String::as_str),
        rec.get("secret"),
        rec.get("principal"),
    ) else {
        return status_only(401);
    };
    let cs = svc.cached(&parsed.access_key_id, secret);
    if sigv4::verify_signature(&rp, &parsed, &[&cs]).is_err() {
        return status_only(401);
    }
    match svc.grants.get(principal) {
        Some(g) if g.allows_method(parts.method.as_str()) && g.allows_path(&path) => {}
        _ => return status_only(403),
    }
    let mut r = status_only(200);
    if let Ok(v) = HeaderValue::from_str(principal) {
        r.headers_mut().insert(DEFAULT_PRINCIPAL_HEADER, v);
    }
    r
}

/// The proxy of the criticised pattern: asks the auth service for every
/// request, then forwards upstream the way the shim does. Without `auth`:
/// a plain proxy (the shim's forwarding without its verification).
struct NaiveProxy {
    auth: Option<SocketAddr>,
    /// The upstream's `ip:port`, parsed once (as the shim does).
    upstream: Authority,
    principal_header: HeaderName,
    /// Built like the shim's upstream client; pooled keep-alive connections.
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn naive_handle(ctx: Arc<NaiveProxy>, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return status_only(400),
    };
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&ctx.principal_header);
    // 1. Ask the auth service (original method, path, headers incl. Host, body).
    let Some(auth) = ctx.auth else {
        return forward(&ctx, parts, body, HeaderValue::from_static(PRINCIPAL)).await;
    };
    let Ok(uri) = format!("http://{auth}{pq}").parse::<Uri>() else {
        return status_only(400);
    };
    let mut check = Request::new(Full::new(body.clone()));
    *check.method_mut() = parts.method.clone();
    *check.uri_mut() = uri;
    *check.headers_mut() = parts.headers.clone();
    let principal = match ctx.client.request(check).await {
        Ok(resp) => {
            let status = resp.status();
            let principal = resp.headers().get(DEFAULT_PRINCIPAL_HEADER).cloned();
            // read the answer to the end: the connection goes back to the pool
            if resp.into_body().collect().await.is_err() {
                return status_only(502);
            }
            if status != StatusCode::OK {
                return status_only(status.as_u16());
            }
            match principal {
                Some(p) => p,
                None => return status_only(502),
            }
        }
        Err(_) => return status_only(502),
    };
    forward(&ctx, parts, body, principal).await
}

/// 2. Forward upstream, as the shim does.
async fn forward(
    ctx: &NaiveProxy,
    mut parts: hyper::http::request::Parts,
    body: Bytes,
    principal: HeaderValue,
) -> Response<Body> {
    let Ok(uri) = upstream_uri(&ctx.upstream, &parts.uri) else {
        return status_only(400);
    };
    parts.uri = uri;
    parts.version = hyper::Version::HTTP_11;
    parts
        .headers
        .insert(ctx.principal_header.clone(), principal);
    let up = Request::from_parts(parts, Full::new(body));
    match ctx.client.request(up).await {
        Ok(resp) => {
            let (mut p, b) = resp.into_parts();
            strip_hop_by_hop(&mut p.headers);
            Response::from_parts(p, b.boxed())
        }
        Err(_) => status_only(502),
    }
}

// ------------------------------------------------------------------ load

struct CellRaw {
    /// Latencies of the requests completed inside the recorded window, sorted.
    latencies_ns: Vec<u64>,
    /// Requests completed, warm-up included.
    total_completed: u64,
    errors: u64,
}

/// One keep-alive HTTP/1.1 connection.
async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(uri: &Uri, headers: &HeaderMap) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    req
}

async fn one_request(addr: SocketAddr, headers: HeaderMap) -> Result<(StatusCode, Bytes)> {
    let mut s = connect(addr).await?;
    let resp = tokio::time::timeout(
        REQUEST_TIMEOUT,
        s.send_request(request(&Uri::from_static(PATH), &headers)),
    )
    .await
    .context("request timed out")??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// `k` connections in a closed loop for `warmup + measure`.
async fn run_cell(
    target: Arc<Target>,
    k: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<CellRaw> {
    let start = Instant::now();
    let t0 = start + warmup;
    let t1 = t0 + measure;
    let mut tasks = Vec::with_capacity(k);
    for _ in 0..k {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut completed = 0u64;
            let mut errors = 0u64;
            let mut sender = None;
            while Instant::now() < t1 {
                let s = match sender.take() {
                    Some(s) => s,
                    None => match connect(target.addr).await {
                        Ok(s) => s,
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let mut s = s;
                let begin = Instant::now();
                let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    s.ready().await?;
                    let resp = s
                        .send_request(request(&target.uri, &target.headers))
                        .await?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await?.to_bytes();
                    anyhow::Ok(status == StatusCode::OK && body.as_ref() == UPSTREAM_BODY)
                })
                .await;
                let end = Instant::now();
                match r {
                    Ok(Ok(true)) => {
                        completed += 1;
                        if end >= t0 && end <= t1 {
                            lat.push((end - begin).as_nanos() as u64);
                        }
                        sender = Some(s);
                    }
                    Ok(Ok(false)) => {
                        errors += 1;
                        sender = Some(s);
                    }
                    _ => errors += 1, // reconnect
                }
            }
            (lat, completed, errors)
        }));
    }
    let mut out = CellRaw {
        latencies_ns: Vec::new(),
        total_completed: 0,
        errors: 0,
    };
    for t in tasks {
        let (lat, completed, errors) = t.await?;
        out.latencies_ns.extend(lat);
        out.total_completed += completed;
        out.errors += errors;
    }
    if out.latencies_ns.is_empty() {
        bail!("no request completed in the recorded window");
    }
    out.latencies_ns.sort_unstable();
    Ok(out)
}

// ==================================================================== report

struct PathSummary {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    redis: Vec<f64>,
    layer_cpu: Vec<f64>,
    authsvc_cpu: Vec<f64>,
    edge_cpu: Vec<f64>,
    total_cpu: Vec<f64>,
    errors: u64,
}

/// Per-round comparisons, one value per round.
#[derive(Default)]
struct Compared {
    shim_over_direct: Vec<f64>,
    naive_over_direct: Vec<f64>,
    shim_over_naive: Vec<f64>,
    shim_over_proxy: Vec<f64>,
    proxy_over_naive: Vec<f64>,
    /// proxy without auth − direct: the hop alone
    hop_p50: Vec<f64>,
    hop_p99: Vec<f64>,
    /// shim − direct
    shim_p50: Vec<f64>,
    shim_p99: Vec<f64>,
    /// shim − proxy without auth: the verification inside the shim
    auth_p50: Vec<f64>,
    auth_p99: Vec<f64>,
    /// naive − direct
    naive_p50: Vec<f64>,
    naive_p99: Vec<f64>,
    /// CPU per request: shim − proxy (verification in situ), naive layer / shim
    auth_cpu: Vec<f64>,
    naive_over_shim_cpu: Vec<f64>,
}

struct KSummary {
    k: usize,
    paths: Vec<(Path, PathSummary)>,
    cmp: Compared,
}

fn summarise(results: &[CellResult], args: &Args) -> Vec<KSummary> {
    let mut out = Vec::new();
    for &k in &args.connections {
        let cell = |round: u32, p: Path| {
            results
                .iter()
                .find(|r| r.round == round && r.k == k && r.path == p)
        };
        let paths = Path::ALL
            .iter()
            .map(|&p| {
                let rs: Vec<&CellResult> =
                    results.iter().filter(|r| r.k == k && r.path == p).collect();
                (
                    p,
                    PathSummary {
                        rps: rs.iter().map(|r| r.rps).collect(),
                        p50: rs.iter().map(|r| r.p50_us).collect(),
                        p99: rs.iter().map(|r| r.p99_us).collect(),
                        redis: rs.iter().map(|r| r.redis_per_req).collect(),
                        layer_cpu: rs.iter().map(|r| r.layer_cpu()).collect(),
                        authsvc_cpu: rs.iter().map(|r| r.auth_service_cpu()).collect(),
                        edge_cpu: rs
                            .iter()
                            .map(|r| r.cpu_of("load") + r.cpu_of("upstream"))
                            .collect(),
                        total_cpu: rs.iter().map(|r| r.total_cpu()).collect(),
                        errors: rs.iter().map(|r| r.errors).sum(),
                    },
                )
            })
            .collect();
        let mut c = Compared::default();
        for round in 0..args.rounds {
            let (Some(d), Some(x), Some(s), Some(n)) = (
                cell(round, Path::Direct),
                cell(round, Path::Proxy),
                cell(round, Path::Shim),
                cell(round, Path::Naive),
            ) else {
                continue;
            };
            c.shim_over_direct.push(s.rps / d.rps);
            c.naive_over_direct.push(n.rps / d.rps);
            c.shim_over_naive.push(s.rps / n.rps);
            c.shim_over_proxy.push(s.rps / x.rps);
            c.proxy_over_naive.push(x.rps / n.rps);
            c.hop_p50.push(x.p50_us - d.p50_us);
            c.hop_p99.push(x.p99_us - d.p99_us);
            c.shim_p50.push(s.p50_us - d.p50_us);
            c.shim_p99.push(s.p99_us - d.p99_us);
            c.auth_p50.push(s.p50_us - x.p50_us);
            c.auth_p99.push(s.p99_us - x.p99_us);
            c.naive_p50.push(n.p50_us - d.p50_us);
            c.naive_p99.push(n.p99_us - d.p99_us);
            c.auth_cpu.push(s.layer_cpu() - x.layer_cpu());
            c.naive_over_shim_cpu.push(n.layer_cpu() / s.layer_cpu());
        }
        out.push(KSummary { k, paths, cmp: c });
    }
    out
}

fn print_proxy(summary: &[KSummary], args: &Args) {
    println!("## Proxied requests on loopback\n");
    println!(
        "Closed loop, K keep-alive connections, `GET {PATH}` signed (SigV4), upstream body {} bytes; {} rounds, each cell {} s recorded after {} s warm-up, paths interleaved. Median (min–max) over rounds. Load generator, proxies, auth service, upstream and Redis share the cores.\n",
        UPSTREAM_BODY.len(),
        args.rounds,
        args.seconds,
        args.warmup
    );
    println!("| K | path | req/s | p50 µs | p99 µs | Redis cmds/req | errors |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for ks in summary {
        for (p, s) in &ks.paths {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                ks.k,
                p.name(),
                fmt_mmm(&s.rps, 0),
                fmt_mmm(&s.p50, 1),
                fmt_mmm(&s.p99, 1),
                fmt_mmm(&s.redis, 4),
                s.errors
            );
        }
    }
    println!("\nCPU time per request in µs (on-CPU time of each runtime's threads, `/proc/self/task/*/schedstat`, and of redis-server, `INFO cpu`, over the cell incl. warm-up, / requests); less sensitive to the noise than wall-clock figures:\n");
    println!("| K | path | proxy layer | of which auth service + Redis | load generator + upstream | total |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for ks in summary {
        for (p, s) in &ks.paths {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                ks.k,
                p.name(),
                fmt_mmm(&s.layer_cpu, 1),
                fmt_mmm(&s.authsvc_cpu, 1),
                fmt_mmm(&s.edge_cpu, 1),
                fmt_mmm(&s.total_cpu, 1),
            );
        }
    }
    let rows: Vec<&KSummary> = summary
        .iter()
        .filter(|k| !k.cmp.shim_over_direct.is_empty())
        .collect();
    println!("\nThroughput ratios, per round, then median (min–max) over rounds:\n");
    println!(
        "| K | shim / direct | naive / direct | **shim / naive** | shim / proxy | proxy / naive |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for ks in &rows {
        let c = &ks.cmp;
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            ks.k,
            fmt_mmm(&c.shim_over_direct, 2),
            fmt_mmm(&c.naive_over_direct, 2),
            fmt_mmm(&c.shim_over_naive, 2),
            fmt_mmm(&c.shim_over_proxy, 2),
            fmt_mmm(&c.proxy_over_naive, 2),
        );
    }
    println!("\nCPU per request of the layer, per round, then median (min–max) over rounds:\n");
    println!("| K | shim − proxy µs (verification in situ) | naive layer / shim |");
    println!("| ---: | ---: | ---: |");
    for ks in &rows {
        let c = &ks.cmp;
        println!(
            "| {} | {} | {} |",
            ks.k,
            fmt_mmm(&c.auth_cpu, 1),
            fmt_mmm(&c.naive_over_shim_cpu, 2),
        );
    }
    println!("\nAdded latency in µs, per round, then median (min–max) over rounds:\n");
    println!("| K | **shim − direct p50** | **shim − direct p99** | proxy − direct p50 | proxy − direct p99 | shim − proxy p50 | shim − proxy p99 | naive − direct p50 | naive − direct p99 |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for ks in &rows {
        let c = &ks.cmp;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ks.k,
            fmt_mmm(&c.shim_p50, 1),
            fmt_mmm(&c.shim_p99, 1),
            fmt_mmm(&c.hop_p50, 1),
            fmt_mmm(&c.hop_p99, 1),
            fmt_mmm(&c.auth_p50, 1),
            fmt_mmm(&c.auth_p99, 1),
            fmt_mmm(&c.naive_p50, 1),
            fmt_mmm(&c.naive_p99, 1),
        );
    }
    println!("\n(proxy = proxy without auth. proxy − direct: the extra hop alone; shim − proxy: what verification adds inside the shim, hop excluded; proxy / naive: the most any local-auth proxy could gain over the naive pattern here.)\n");
}

fn print_targets(verify: &[VerifyRow], summary: &[KSummary]) {
    println!("## Targets\n");
    let (v, lo, hi) = mmm(&verify[0].per_request_us);
    println!(
        "- verification ≤ 10 µs: {} (median {v:.2} µs, runs {lo:.2}–{hi:.2}, empty body)",
        met(v <= 10.0)
    );
    for ks in summary {
        let c = &ks.cmp;
        if c.shim_over_direct.is_empty() {
            continue;
        }
        let (p99, p99_lo, p99_hi) = mmm(&c.shim_p99);
        let (ratio, r_lo, r_hi) = mmm(&c.shim_over_naive);
        let (cpu, cpu_lo, cpu_hi) = mmm(&c.naive_over_shim_cpu);
        let noisy = if p99_lo < 0.0 {
            " — a round with a negative value: noise exceeds the effect"
        } else {
            ""
        };
        println!(
            "- K={}: added p99 (shim − direct) ≤ 100 µs: {} (median {p99:.1} µs, rounds {p99_lo:.1}–{p99_hi:.1}{noisy}); shim ≥ 3× naive throughput: {} (median {ratio:.2}×, rounds {r_lo:.2}–{r_hi:.2}; CPU per request of the naive layer / the shim: {cpu:.2}×, {cpu_lo:.2}–{cpu_hi:.2})",
            ks.k,
            met(p99 <= 100.0),
            met(ratio >= 3.0)
        );
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}
