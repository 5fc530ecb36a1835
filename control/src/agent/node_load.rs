//! The node's resource use, read from /proc and statvfs: cpu busy share
//! between two samples, memory, network byte rates (non-loopback) and the
//! disk holding the agent's state dir.

use std::path::Path;

use crate::node_report::NodeReport;

/// Cumulative counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When, ms since the epoch.
    pub ts_ms: i64,
    /// Busy jiffies over all cpus.
    pub cpu_busy: u64,
    /// Total jiffies over all cpus.
    pub cpu_total: u64,
    /// Received bytes, non-loopback interfaces.
    pub rx_bytes: u64,
    /// Transmitted bytes, non-loopback interfaces.
    pub tx_bytes: u64,
}

/// Why a sample could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    /// A file did not have the expected format.
    #[error("unexpected format of {0}")]
    Format(&'static str),
}

/// `(busy, total)` jiffies from the aggregate `cpu` line of /proc/stat.
pub fn parse_proc_stat(text: &str) -> Result<(u64, u64), LoadError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or(LoadError::Format("/proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().map_err(|_| LoadError::Format("/proc/stat")))
        .collect::<Result<_, _>>()?;
    if v.len() < 4 {
        return Err(LoadError::Format("/proc/stat"));
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Ok((total.saturating_sub(idle), total))
}

/// `(total, used)` bytes from /proc/meminfo (used = MemTotal − MemAvailable).
pub fn parse_meminfo(text: &str) -> Result<(u64, u64), LoadError> {
    let kib = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    let total = kib("MemTotal:").ok_or(LoadError::Format("/proc/meminfo"))?;
    let avail = kib("MemAvailable:").ok_or(LoadError::Format("/proc/meminfo"))?;
    Ok((total * 1024, total.saturating_sub(avail) * 1024))
}

/// `(rx, tx)` bytes summed over all interfaces but `lo` from /proc/net/dev.
pub fn parse_net_dev(text: &str) -> Result<(u64, u64), LoadError> {
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in text.lines().skip(2) {
        let (name, rest) = line
            .split_once(':')
            .ok_or(LoadError::Format("/proc/net/dev"))?;
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 9 {
            return Err(LoadError::Format("/proc/net/dev"));
        }
        rx = rx.saturating_add(
            f[0].parse()
                .map_err(|_| LoadError::Format("/proc/net/dev"))?,
        );
        tx = tx.saturating_add(
            f[8].parse()
                .map_err(|_| LoadError::Format("/proc/net/dev"))?,
        );
    }
    Ok((rx, tx))
}

fn read(path: &str) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError::Io(path.into(), e))
}

/// `(total, used)` bytes of the filesystem holding `path`.
pub fn disk_usage(path: &Path) -> Result<(u64, u64), LoadError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| LoadError::Format("state dir path"))?;
    // SAFETY: statvfs writes only into `st`, which outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(LoadError::Io(
            path.display().to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    let frsize = st.f_frsize as u64;
    let total = (st.f_blocks as u64).saturating_mul(frsize);
    let free = (st.f_bfree as u64).saturating_mul(frsize);
    Ok((total, total.saturating_sub(free)))
}

/// Read the cumulative counters now.
pub fn sample() -> Result<Sample, LoadError> {
    let (cpu_busy, cpu_total) = parse_proc_stat(&read("/proc/stat")?)?;
    let (rx_bytes, tx_bytes) = parse_net_dev(&read("/proc/net/dev")?)?;
    Ok(Sample {
        ts_ms: crate::sigv4::unix_now_ms(),
        cpu_busy,
        cpu_total,
        rx_bytes,
        tx_bytes,
    })
}

/// Build the report for the interval `prev` → `now`.
pub fn report(
    node: &str,
    prev: &Sample,
    now: &Sample,
    disk_dir: &Path,
) -> Result<NodeReport, LoadError> {
    let (mem_total_bytes, mem_used_bytes) = parse_meminfo(&read("/proc/meminfo")?)?;
    let (disk_total_bytes, disk_used_bytes) = disk_usage(disk_dir)?;
    let dt_total = now.cpu_total.saturating_sub(prev.cpu_total);
    let dt_busy = now.cpu_busy.saturating_sub(prev.cpu_busy);
    let cpu_pct = if dt_total == 0 {
        0.0
    } else {
        (dt_busy as f64 * 100.0 / dt_total as f64).clamp(0.0, 100.0)
    };
    let secs = (now.ts_ms - prev.ts_ms).max(1) as f64 / 1000.0;
    // Counters can reset (interface gone): saturate to 0 rather than wrap.
    let net_rx_bps = now.rx_bytes.saturating_sub(prev.rx_bytes) as f64 / secs;
    let net_tx_bps = now.tx_bytes.saturating_sub(prev.tx_bytes) as f64 / secs;
    Ok(NodeReport {
        node: node.to_string(),
        ts_ms: now.ts_ms,
        cpu_pct,
        mem_used_bytes,
        mem_total_bytes,
        net_rx_bps,
        net_tx_bps,
        disk_used_bytes,
        disk_total_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let (busy, total) =
            parse_proc_stat("cpu  10 0 5 80 5 0 0 0 0 0\ncpu0 1 1 1 1 1 1 1 1 1 1\n").unwrap();
        assert_eq!((busy, total), (15, 100));
        let (t, u) =
            parse_meminfo("MemTotal:       1000 kB\nMemFree:  10 kB\nMemAvailable:    400 kB\n")
                .unwrap();
        assert_eq!((t, u), (1000 * 1024, 600 * 1024));
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n  eth0: 200 2 0 0 0 0 0 0 300 3 0 0 0 0 0 0\n  eth1: 1 2 0 0 0 0 0 0 2 3 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(dev).unwrap(), (201, 302));
        assert!(parse_proc_stat("intr 1").is_err());
    }

    #[test]
    fn live_sample_is_plausible() {
        let a = sample().unwrap();
        let b = sample().unwrap();
        let r = report("n", &a, &b, Path::new("/")).unwrap();
        assert!(r.validate().is_ok(), "{r:?}");
        assert!(r.mem_total_bytes > 0 && r.disk_total_bytes > 0);
    }
}
