//! The service instance of the scale-in test and `cargo xtask bench scale`,
//! started by a real `headroom agent` from the registered template.
//!
//! - Listens on `0.0.0.0:--port` (inside the agent's node namespace) and
//!   answers every line `L` of a connection with `ID L`, so a client knows
//!   which instance serves it; a connection lasts until the client closes.
//! - Reports its custom metric itself, as docs/CONTAINER_MANAGER.md asks of
//!   instances: every `--report-ms` the number in `--load-file` (a file the
//!   test controls; missing or bad: 0) goes to the scoreboard with plain
//!   Redis commands (`ZADD :load`, `ZADD :seen`, `SADD headroom:services`
//!   in one MULTI/EXEC).
//! - Prints `listening at_ms=T` once it accepts connections and
//!   `first report seen_ms=T` after its first report (stdout: the agent's
//!   log of the instance), which the benchmark reads for its phases.
//!
//! Bounded: it exits by itself after `--lifetime-secs`.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use clap::Parser;
use headroom_control::scoreboard::{load_key, seen_key, SERVICES_SET};

/// Command line of one instance.
#[derive(Debug, Parser)]
#[command(about = "A scale-test service instance: line echo + load reports")]
struct Args {
    /// Instance id (the scoreboard member and the answer prefix).
    #[arg(long)]
    id: String,
    /// TCP port to listen on (all addresses of the namespace).
    #[arg(long)]
    port: u16,
    /// Redis URL of the scoreboard.
    #[arg(long)]
    redis: String,
    /// Scoreboard service name.
    #[arg(long)]
    service: String,
    /// File holding the load (0–100) to report.
    #[arg(long)]
    load_file: PathBuf,
    /// Time between reports, ms.
    #[arg(long, default_value_t = 100)]
    report_ms: u64,
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 1800)]
    lifetime_secs: u64,
}

/// Idle time after which a connection is closed (frees its thread).
const IDLE: Duration = Duration::from_secs(120);
/// Longest line accepted.
const MAX_LINE: usize = 4096;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, args.port))
        .with_context(|| format!("listening on port {}", args.port))?;
    println!("listening at_ms={} port={}", now_ms(), args.port);
    std::io::stdout().flush()?;
    {
        let id = args.id.clone();
        let (url, svc, file) = (args.redis.clone(), args.service.clone(), args.load_file);
        let (every, lifetime) = (
            Duration::from_millis(args.report_ms.max(10)),
            Duration::from_secs(args.lifetime_secs),
        );
        thread::Builder::new()
            .name("reporter".into())
            .spawn(move || {
                report_loop(&url, &svc, &id, &file, every, lifetime);
                // The lifetime cap ends the whole instance.
                std::process::exit(0);
            })
            .context("starting the reporter")?;
    }
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let id = args.id.clone();
                thread::spawn(move || {
                    if let Err(e) = serve(stream, &id) {
                        eprintln!("connection: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(())
}

/// Answers each line with `ID line` until the client closes.
fn serve(stream: TcpStream, id: &str) -> Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(IDLE))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .context("reading a line")?;
        if n == 0 {
            // Clean close by the client: close our side too.
            return Ok(());
        }
        let text = line.trim_end_matches('\n');
        out.write_all(format!("{id} {text}\n").as_bytes())
            .context("answering")?;
    }
}

/// The load in `file`, 0 if missing or not a number in 0–100.
fn read_load(file: &Path) -> f64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|l| l.is_finite() && (0.0..=100.0).contains(l))
        .unwrap_or(0.0)
}

/// Reports every `every` until `lifetime` has passed, reconnecting after
/// failures (a report missed is only a report missed).
fn report_loop(url: &str, svc: &str, id: &str, file: &Path, every: Duration, lifetime: Duration) {
    let born = Instant::now();
    let mut conn: Option<redis::Connection> = None;
    let mut first = true;
    let mut failures = 0u64;
    while born.elapsed() < lifetime {
        let started = Instant::now();
        let seen = now_ms();
        match report(url, &mut conn, svc, id, read_load(file), seen) {
            Ok(()) => {
                if first {
                    println!("first report seen_ms={seen}");
                    let _ = std::io::stdout().flush();
                    first = false;
                }
            }
            Err(e) => {
                conn = None;
                failures += 1;
                if failures == 1 || failures.is_multiple_of(100) {
                    eprintln!("report failed ({failures} so far): {e}");
                }
            }
        }
        if let Some(rest) = every.checked_sub(started.elapsed()) {
            thread::sleep(rest);
        }
    }
}

fn report(
    url: &str,
    conn: &mut Option<redis::Connection>,
    svc: &str,
    id: &str,
    load: f64,
    seen: i64,
) -> redis::RedisResult<()> {
    if conn.is_none() {
        let c = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(1))?;
        c.set_read_timeout(Some(Duration::from_secs(1)))?;
        c.set_write_timeout(Some(Duration::from_secs(1)))?;
        *conn = Some(c);
    }
    let Some(c) = conn.as_mut() else {
        return Ok(());
    };
    redis::pipe()
        .atomic()
        .cmd("ZADD")
        .arg(load_key(svc))
        .arg(load)
        .arg(id)
        .ignore()
        .cmd("ZADD")
        .arg(seen_key(svc))
        .arg(seen)
        .arg(id)
        .ignore()
        .cmd("SADD")
        .arg(SERVICES_SET)
        .arg(svc)
        .ignore()
        .query::<()>(c)
}
