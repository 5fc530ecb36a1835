//! A throwaway `redis-server` on loopback: the scoreboard of a test.
use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::free_port;

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// How long a fresh server gets to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with a new port when the server exits at once (port taken
/// between [`free_port`] and the server's bind).
const START_ATTEMPTS: u32 = 3;

/// A `redis-server` process on `127.0.0.1`, without persistence, in its own
/// temporary directory. Killed and its directory removed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Addresses it listens on besides 127.0.0.1.
    also_on: Vec<IpAddr>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Result<RedisServer> {
        Self::start_also_on(&[])
    }

    /// Like [`RedisServer::start`], listening on `also_on` too (addresses
    /// of the caller's network namespace, for clients in other namespaces).
    pub fn start_also_on(also_on: &[IpAddr]) -> Result<RedisServer> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hr-redis-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut server = RedisServer {
            port: 0,
            dir,
            child: None,
            also_on: also_on.to_vec(),
        };
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            server.port = free_port()?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .context("starting redis-server")
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:port`, for clients.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// True if the server answers PING now.
    pub fn ping(&self) -> bool {
        ping(self.addr())
    }

    /// Kills the server with SIGKILL (an outage, not a shutdown). The port
    /// stays reserved for [`RedisServer::restart`].
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            child
                .kill()
                .with_context(|| format!("killing redis-server {pid}"))?;
            child
                .wait()
                .with_context(|| format!("reaping redis-server {pid}"))?;
        }
        Ok(())
    }

    /// Kills the server if it runs, then starts an empty one on the same
    /// port and waits until it answers PING.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last_err = Some(e);
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .with_context(|| format!("restarting redis-server on port {}", self.port))
    }

    /// Starts the process on `self.port` and waits for PING.
    fn launch(&mut self) -> Result<()> {
        let log = self.dir.join("redis.log");
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(self.also_on.iter().map(|a| a.to_string()))
            // Clients from other namespaces are not "loopback" to Redis;
            // it listens only where the test says, in the test's namespaces.
            .args(if self.also_on.is_empty() {
                &[][..]
            } else {
                &["--protected-mode", "no"][..]
            })
            // Nothing written to disk: restart() must come back empty.
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning redis-server (is the Debian package redis-server installed?)")?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for redis-server")? {
                bail!(
                    "redis-server on port {} exited at once ({status}); log:\n{}",
                    self.port,
                    log_tail(&log)
                );
            }
            if ping(self.addr()) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                // Best effort: the error below is what matters.
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    log_tail(&log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("RedisServer: {e:#}");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One inline-protocol PING; true on `+PONG`.
fn ping(addr: SocketAddr) -> bool {
    let timeout = Duration::from_millis(500);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    if stream.set_read_timeout(Some(timeout)).is_err() || stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

fn log_tail(path: &std::path::Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_and_get(addr: SocketAddr, value: Option<&str>) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        if let Some(v) = value {
            s.write_all(format!("SET hr-key {v}\r\n").as_bytes())
                .expect("write");
            let mut ok = [0u8; 5];
            s.read_exact(&mut ok).expect("read +OK");
            assert_eq!(&ok, b"+OK\r\n");
        }
        s.write_all(b"GET hr-key\r\n").expect("write");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn redis_starts_answers_and_stops() {
        let server = RedisServer::start().expect("start redis-server");
        assert!(server.port() > 0);
        assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
        assert!(server.ping());
        assert_eq!(set_and_get(server.addr(), Some("42")), "$2\r\n42\r\n");
        let (addr, dir) = (server.addr(), server.dir.clone());
        assert!(dir.is_dir());
        drop(server);
        assert!(!ping(addr), "redis still answers after drop");
        assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
        assert!(!dir.exists(), "temp dir left behind");
    }

    #[test]
    fn redis_kill_and_restart_keep_the_port_and_lose_the_data() {
        let mut server = RedisServer::start().expect("start redis-server");
        let port = server.port();
        assert_eq!(set_and_get(server.addr(), Some("1")), "$1\r\n1\r\n");
        server.kill().expect("kill");
        assert!(!server.ping(), "answers after kill");
        server.kill().expect("kill twice is fine");
        server.restart().expect("restart");
        assert_eq!(server.port(), port);
        assert!(server.ping());
        // Empty after restart: nothing was persisted.
        assert_eq!(set_and_get(server.addr(), None), "$-1\r\n");
        // restart() on a running server replaces it.
        server.restart().expect("restart while running");
        assert!(server.ping());
    }
}
