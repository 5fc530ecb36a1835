//! One measurement each: wrk (new connections or keep-alive requests, with
//! latency percentiles), bulk TCP streams, and the whole machine's CPU time
//! from `/proc/stat`.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpStream},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::servers::Servers;
use crate::{cmd::output as output_of, Netns};

/// Extra time a tool gets beyond its own duration before it is killed.
const GRACE: Duration = Duration::from_secs(30);

/// What a wrk run reported.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkResult {
    /// Requests completed.
    pub requests: u64,
    /// Requests per second.
    pub rate: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx answers.
    pub errors: u64,
}

/// Runs wrk from the client namespace against `url` for `secs` with
/// `connections` connections on `threads` threads; `close` adds
/// `Connection: close` (one new connection per request).
pub fn wrk(
    client: &Netns,
    url: &str,
    secs: u64,
    threads: u32,
    connections: u32,
    close: bool,
) -> Result<WrkResult> {
    let d = format!("{secs}s");
    let (t, c) = (threads.to_string(), connections.to_string());
    let kill_after = (secs + GRACE.as_secs()).to_string();
    let mut argv = vec![
        "timeout",
        "-k",
        "5",
        &kill_after,
        "wrk",
        "-t",
        &t,
        "-c",
        &c,
        "-d",
        &d,
        "--latency",
        "--timeout",
        "5s",
    ];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(url);
    let mut cmd = client.command(&argv);
    cmd.stdin(Stdio::null());
    let out = match output_of(&mut cmd) {
        Ok(out) => out,
        // Rarely, on this busy machine, wrk outlives its duration and is
        // killed by `timeout`; one retry, said on stderr.
        Err(e) => {
            eprintln!("    wrk failed, retrying once: {e:#}");
            let mut cmd = client.command(&argv);
            cmd.stdin(Stdio::null());
            output_of(&mut cmd).context("running wrk (second attempt)")?
        }
    };
    parse_wrk(&out).with_context(|| format!("parsing wrk's output:\n{out}"))
}

/// Parses wrk's text report (`--latency`).
pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut seen_rate = false;
    let (mut p50, mut p99) = (None, None);
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => {
                r.rate = v.parse().context("Requests/sec")?;
                seen_rate = true;
            }
            [n, "requests", "in", ..] => r.requests = n.parse().context("requests")?,
            ["50%", v] => p50 = Some(parse_duration_us(v)?),
            ["99%", v] => p99 = Some(parse_duration_us(v)?),
            ["Socket", "errors:", rest @ ..] => {
                for w in rest {
                    if let Ok(n) = w.trim_end_matches(',').parse::<u64>() {
                        r.errors += n;
                    }
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            _ => {}
        }
    }
    ensure!(seen_rate, "no Requests/sec line");
    r.p50_us = p50.context("no 50% line")?;
    r.p99_us = p99.context("no 99% line")?;
    Ok(r)
}

/// `123.45us`, `1.20ms`, `2.00s` → µs.
fn parse_duration_us(s: &str) -> Result<f64> {
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60e6)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else {
        bail!("duration {s:?} has no unit")
    };
    Ok(num
        .parse::<f64>()
        .with_context(|| format!("duration {s:?}"))?
        * mult)
}

/// Opens `streams` TCP connections from the client namespace to `target`
/// and writes to them as fast as they take it for `secs`; returns the
/// goodput in Gbit/s as the backends' sinks counted it, after a 0.5 s
/// warm-up (slow start) that is not counted.
pub fn bulk(
    client: &Netns,
    servers: &Servers,
    target: SocketAddr,
    streams: usize,
    secs: u64,
) -> Result<f64> {
    const WARMUP: Duration = Duration::from_millis(500);
    let sockets = {
        let _inside = client.enter_thread()?;
        (0..streams)
            .map(|k| {
                let s = TcpStream::connect_timeout(&target, Duration::from_secs(3))
                    .with_context(|| format!("bulk stream {k} to {target}"))?;
                s.set_write_timeout(Some(Duration::from_secs(5)))?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?
    };
    let total = Duration::from_secs(secs) + WARMUP;
    let start = Instant::now();
    let writers: Vec<_> = sockets
        .into_iter()
        .map(|mut s| {
            thread::spawn(move || -> std::io::Result<()> {
                let buf = vec![0x5au8; 128 * 1024];
                while start.elapsed() < total {
                    s.write_all(&buf)?;
                }
                Ok(())
            })
        })
        .collect();
    thread::sleep(WARMUP);
    let b0: u64 = servers.bulk_bytes().iter().sum();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(secs));
    let b1: u64 = servers.bulk_bytes().iter().sum();
    let elapsed = t0.elapsed();
    for (k, w) in writers.into_iter().enumerate() {
        match w.join() {
            Ok(r) => r.with_context(|| format!("bulk stream {k}"))?,
            Err(_) => bail!("bulk stream {k} panicked"),
        }
    }
    Ok((b1 - b0) as f64 * 8.0 / elapsed.as_secs_f64() / 1e9)
}

/// Busy and total CPU time of the whole machine (all CPUs), in ticks.
#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq.
    pub busy: u64,
    /// busy + idle + iowait (steal excluded: another VM's time).
    pub total: u64,
    /// irq + softirq: where packet forwarding (XDP, routing, netfilter) is
    /// charged; tasks are not charged for it.
    pub irq: u64,
}

impl CpuTimes {
    /// Reads the `cpu` line of `/proc/stat`.
    pub fn now() -> Result<CpuTimes> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_stat(&stat)
    }

    /// CPU seconds spent busy since `before`.
    pub fn busy_secs_since(&self, before: &CpuTimes) -> f64 {
        self.busy.saturating_sub(before.busy) as f64 / ticks_per_sec()
    }

    /// CPU seconds spent in irq and softirq since `before`.
    pub fn irq_secs_since(&self, before: &CpuTimes) -> f64 {
        self.irq.saturating_sub(before.irq) as f64 / ticks_per_sec()
    }
}

/// USER_HZ, the unit of `/proc/stat` and `/proc/PID/stat` times.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// CPU seconds (user + system) used by this process, its reaped children
/// (wrk) and the still running processes `pids` (HAProxy).
pub fn own_cpu_secs(pids: &[u32]) -> Result<f64> {
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: a zeroed rusage is valid; getrusage only writes it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage.
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return Err(std::io::Error::last_os_error()).context("getrusage");
        }
        total += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    for pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        total += parse_pid_stat(&stat)? as f64 / ticks_per_sec();
    }
    Ok(total)
}

/// utime + stime (ticks) of a `/proc/PID/stat` line.
fn parse_pid_stat(stat: &str) -> Result<u64> {
    // The command name may hold spaces: fields are counted after its ')'.
    let rest = stat.rsplit_once(')').context("no ')' in /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 13, "short /proc/PID/stat");
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn parse_stat(stat: &str) -> Result<CpuTimes> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse().context("a /proc/stat field"))
        .collect::<Result<_>>()?;
    ensure!(v.len() >= 7, "short cpu line {line:?}");
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    Ok(CpuTimes {
        busy,
        total: busy + v[3] + v[4],
        irq: v[5] + v[6],
    })
}

/// Headroom's BPF programs: the balancer at XDP and at TC, and the pass
/// program XDP needs on veth peers (its runs are the balancer's cost).
pub const PROGRAMS: [&str; 3] = [
    lb_common::programs::BALANCER,
    lb_common::programs::TC,
    lb_common::programs::PASS,
];

/// Run time and run count, summed over every loaded BPF program named in
/// `names`, as the kernel counts them while `aya::sys::enable_stats` is on.
/// A program unloaded while the list is read is skipped.
pub fn prog_stats(names: &[&str]) -> (std::time::Duration, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| info.name_as_str().is_some_and(|n| names.contains(&n)))
        .fold((std::time::Duration::ZERO, 0), |(t, n), info| {
            (t + info.run_time(), n + info.run_count())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://10.99.0.1:80/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   1.23ms  456.00us  20.00ms   90.00%
    Req/Sec     6.50k   300.00     7.00k    70.00%
  Latency Distribution
     50%    1.10ms
     75%    1.40ms
     90%    1.80ms
     99%    3.20ms
  64712 requests in 5.00s, 5.99MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
Requests/sec:  12942.40
Transfer/sec:      1.20MB
";

    #[test]
    fn wrk_output_parses() {
        let r = parse_wrk(WRK).expect("parse");
        assert_eq!(r.requests, 64712);
        assert!((r.rate - 12942.40).abs() < 1e-6);
        assert!((r.p50_us - 1100.0).abs() < 1e-6);
        assert!((r.p99_us - 3200.0).abs() < 1e-6);
        assert_eq!(r.errors, 5);
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_us("850.00us").ok(), Some(850.0));
        assert_eq!(parse_duration_us("2.00s").ok(), Some(2e6));
        assert!(parse_duration_us("12").is_err());
    }

    #[test]
    fn proc_stat_parses() {
        let t =
            parse_stat("cpu  10 1 5 100 2 3 4 7 0 0\ncpu0 1 1 1 1 1 1 1 1 1 1\n").expect("parse");
        assert_eq!(t.busy, 10 + 1 + 5 + 3 + 4);
        assert_eq!(t.total, t.busy + 100 + 2);
        assert_eq!(t.irq, 7);
    }

    #[test]
    fn pid_stat_parses() {
        let line = "4242 (ha proxy) S 1 2 3 4 5 6 7 8 9 10 31 17 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_pid_stat(line).ok(), Some(48));
        assert!(parse_pid_stat("4242 (x) S 1").is_err());
    }
}
