//! The balancers the benchmark compares, each installed on [`BenchNet`] for
//! one measurement and removed again when its guard drops.

use std::{
    fmt, fs, io::Write, net::SocketAddr, path::PathBuf, str::FromStr, thread, time::Duration,
};

use anyhow::{bail, Context, Result};
use headroom::{
    config::Config,
    daemon::{Daemon, DaemonHandle, RunOptions},
};

use super::net::{lb_backend_if, BenchNet, Offloads};
use crate::{
    topology::{backend_addr, VIP},
    ChildGuard, Netns, PrivateBpffs,
};

/// The VIP's HTTP port.
pub const HTTP_PORT: u16 = 80;
/// The backends' HTTP port behind nat balancers (a port rewrite, as in
/// the tests); backends listen on both.
pub const BACKEND_HTTP_PORT: u16 = 8080;
/// The bulk-throughput port (VIP and backends).
pub const BULK_PORT: u16 = 5201;
/// Bound on waiting for a balancer to answer after its setup.
const READY_WAIT: Duration = Duration::from_secs(15);

/// One way of balancing the VIP over the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// The kernel's multipath route, L4 hash; the VIP on the backends.
    Ecmp,
    /// nftables DNAT, `numgen random` over the backends (kube-proxy's way).
    Nft,
    /// HAProxy, mode tcp, round robin.
    Haproxy,
    /// No balancing: the VIP routed to backend 0.
    Direct,
    /// Headroom, nat mode.
    HeadroomNat,
    /// Headroom, dsr mode.
    HeadroomDsr,
    /// Headroom, nat mode, at TC ingress (`mode = "tc"`): offloads untouched.
    HeadroomNatTc,
    /// Headroom, dsr mode, at TC ingress.
    HeadroomDsrTc,
}

impl Variant {
    /// All variants, in report order.
    pub const ALL: [Variant; 8] = [
        Variant::Ecmp,
        Variant::Nft,
        Variant::Haproxy,
        Variant::Direct,
        Variant::HeadroomNat,
        Variant::HeadroomDsr,
        Variant::HeadroomNatTc,
        Variant::HeadroomDsrTc,
    ];

    /// Name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Ecmp => "ecmp",
            Variant::Nft => "nftables",
            Variant::Haproxy => "haproxy",
            Variant::Direct => "direct",
            Variant::HeadroomNat => "headroom-nat",
            Variant::HeadroomDsr => "headroom-dsr",
            Variant::HeadroomNatTc => "headroom-nat-tc",
            Variant::HeadroomDsrTc => "headroom-dsr-tc",
        }
    }

    /// A Headroom variant (our programs do its balancing).
    pub fn is_headroom(self) -> bool {
        matches!(
            self,
            Variant::HeadroomNat
                | Variant::HeadroomDsr
                | Variant::HeadroomNatTc
                | Variant::HeadroomDsrTc
        )
    }

    /// The offloads the variant runs with by default.
    pub fn offloads(self) -> Offloads {
        match self {
            Variant::HeadroomNat | Variant::HeadroomDsr => Offloads::HEADROOM,
            _ => Offloads::DEFAULT,
        }
    }

    /// How many backends the variant spreads connections over.
    pub fn spreads(self) -> bool {
        self != Variant::Direct
    }

    /// Installs the variant on `net`; it is removed when the guard drops.
    pub fn install<'a>(
        self,
        net: &'a BenchNet,
        redis_url: &str,
        tag: &str,
    ) -> Result<Installed<'a>> {
        let lb = &net.lb;
        let n = net.backends.len();
        let mut g = Installed {
            lb,
            undo: Vec::new(),
            haproxy: None,
            daemon: None,
            pins: None,
            dir: None,
        };
        match self {
            Variant::Ecmp => {
                lb.exec(&["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"])?;
                let mut argv: Vec<String> = ["ip", "route", "replace", &format!("{VIP}/32")]
                    .map(String::from)
                    .to_vec();
                for i in 0..n {
                    argv.extend([
                        "nexthop".to_string(),
                        "via".into(),
                        backend_addr(i).to_string(),
                        "dev".into(),
                        lb_backend_if(i),
                        "weight".into(),
                        "1".into(),
                    ]);
                }
                g.undo.push(vec![
                    "ip".into(),
                    "route".into(),
                    "del".into(),
                    format!("{VIP}/32"),
                ]);
                let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                lb.exec(&argv).context("adding the multipath route")?;
            }
            Variant::Direct => {
                g.undo.push(vec![
                    "ip".into(),
                    "route".into(),
                    "del".into(),
                    format!("{VIP}/32"),
                ]);
                lb.exec(&[
                    "ip",
                    "route",
                    "replace",
                    &format!("{VIP}/32"),
                    "via",
                    &backend_addr(0).to_string(),
                ])?;
            }
            Variant::Nft => {
                let dir = g.tempdir(tag)?;
                let file = dir.join("dnat.nft");
                fs::write(&file, nft_rules(n)).context("writing the nftables rules")?;
                lb.exec(&["nft", "-f", &file.to_string_lossy()])
                    .context("loading the nftables rules")?;
                g.undo.push(
                    ["nft", "delete", "table", "ip", "hrbench"]
                        .map(String::from)
                        .to_vec(),
                );
            }
            Variant::Haproxy => {
                // HAProxy closes first towards the client: its TIME_WAIT
                // sockets on VIP:80 would stay in this namespace for 60 s,
                // and early demux matches a forwarded SYN of a later variant
                // reusing that tuple to them, after which ip_forward drops
                // it. Killing them (`ss -K`, SOCK_DESTROY) ends that.
                g.undo.push(
                    ["ss", "-K", "state", "time-wait"]
                        .map(String::from)
                        .to_vec(),
                );
                g.undo.push(vec![
                    "ip".into(),
                    "addr".into(),
                    "del".into(),
                    format!("{VIP}/32"),
                    "dev".into(),
                    "lo".into(),
                ]);
                lb.add_addr("lo", &format!("{VIP}/32"))?;
                let dir = g.tempdir(tag)?;
                let file = dir.join("haproxy.cfg");
                fs::write(&file, haproxy_config(n)).context("writing haproxy.cfg")?;
                let mut cmd = lb.command(&["haproxy", "-db", "-f", &file.to_string_lossy()]);
                cmd.stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null());
                g.haproxy = Some(ChildGuard::new(cmd.spawn().context("starting haproxy")?));
            }
            Variant::HeadroomNat
            | Variant::HeadroomDsr
            | Variant::HeadroomNatTc
            | Variant::HeadroomDsrTc => {
                let config = daemon_config(self, &net.lb_interfaces(), redis_url, tag)?;
                // The daemon pins its maps and links and leaves XDP attached
                // when it stops (restarts keep flows): a private bpffs, whose
                // drop detaches everything, makes the variant removable.
                let pins = PrivateBpffs::mount("bench-e2e")?;
                let opts = RunOptions {
                    pin_root: Some(pins.root().to_path_buf()),
                    ..RunOptions::default()
                };
                g.pins = Some(pins);
                let _inside = lb.enter_thread()?;
                g.daemon =
                    Some(Daemon::start(config, opts).context("starting the headroom daemon")?);
            }
        }
        wait_ready(&net.client, g.haproxy.as_mut())?;
        Ok(g)
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Variant::ALL
            .into_iter()
            .find(|v| v.name() == s || (s == "nft" && *v == Variant::Nft))
            .with_context(|| {
                let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
                format!(
                    "unknown variant {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// A variant installed in the balancer namespace; removed on drop.
pub struct Installed<'a> {
    lb: &'a Netns,
    undo: Vec<Vec<String>>,
    haproxy: Option<ChildGuard>,
    daemon: Option<DaemonHandle>,
    pins: Option<PrivateBpffs>,
    dir: Option<PathBuf>,
}

impl Installed<'_> {
    fn tempdir(&mut self, tag: &str) -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("hr-bench-e2e-{}-{tag}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.dir = Some(dir.clone());
        Ok(dir)
    }

    /// The running daemon (headroom variants).
    pub fn daemon(&self) -> Option<&DaemonHandle> {
        self.daemon.as_ref()
    }

    /// Processes the variant runs besides the bench process (HAProxy).
    pub fn pids(&self) -> Vec<u32> {
        self.haproxy.iter().map(|h| h.id()).collect()
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            if let Err(e) = d.shutdown() {
                eprintln!("stopping the daemon: {e:#}");
            }
        }
        // Detaches what the daemon left attached and pinned.
        drop(self.pins.take());
        if let Some(mut h) = self.haproxy.take() {
            if let Err(e) = h.kill() {
                eprintln!("stopping haproxy: {e:#}");
            }
        }
        for argv in self.undo.drain(..) {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            if let Err(e) = self.lb.exec(&argv) {
                eprintln!("undoing a variant: {e:#}");
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Waits until a connection from the client to `VIP:HTTP_PORT` gets an
/// HTTP answer (the balancer is in place), or fails after [`READY_WAIT`].
fn wait_ready(client: &Netns, mut haproxy: Option<&mut ChildGuard>) -> Result<()> {
    use std::io::Read;
    let vip = SocketAddr::from((VIP, HTTP_PORT));
    let _inside = client.enter_thread()?;
    let deadline = std::time::Instant::now() + READY_WAIT;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        if let Some(h) = haproxy.as_deref_mut() {
            if let Some(st) = h.try_wait()? {
                bail!("haproxy exited: {st}");
            }
        }
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
            let mut r = String::new();
            s.read_to_string(&mut r)?;
            Ok(r)
        })();
        match attempt {
            Ok(r) if r.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(r) => last = format!("answer {r:?}"),
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("the VIP did not answer within {READY_WAIT:?}: {last}")
}

/// nftables DNAT as kube-proxy's nftables mode writes it: a random pick
/// among per-endpoint chains, each a `dnat to`.
fn nft_rules(n: usize) -> String {
    let mut s = String::from("table ip hrbench {\n");
    for i in 0..n {
        s.push_str(&format!(
            "  chain ep{i}_http {{\n    meta l4proto tcp dnat to {}:{BACKEND_HTTP_PORT}\n  }}\n  chain ep{i}_bulk {{\n    meta l4proto tcp dnat to {}:{BULK_PORT}\n  }}\n",
            backend_addr(i),
            backend_addr(i)
        ));
    }
    let vmap = |suffix: &str| {
        (0..n)
            .map(|i| format!("{i} : goto ep{i}_{suffix}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    s.push_str(&format!(
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} tcp dport {HTTP_PORT} numgen random mod {n} vmap {{ {} }}\n    \
         ip daddr {VIP} tcp dport {BULK_PORT} numgen random mod {n} vmap {{ {} }}\n  }}\n}}\n",
        vmap("http"),
        vmap("bulk")
    ));
    s
}

/// HAProxy in TCP mode, round robin, on the VIP.
fn haproxy_config(n: usize) -> String {
    let servers = |port: u16| {
        (0..n)
            .map(|i| format!("  server b{i} {}:{port}\n", backend_addr(i)))
            .collect::<String>()
    };
    format!(
        "global\n  maxconn 8000\n\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n\
         frontend http\n  bind {VIP}:{HTTP_PORT}\n  default_backend http\n\n\
         backend http\n  balance roundrobin\n{}\n\
         frontend bulk\n  bind {VIP}:{BULK_PORT}\n  default_backend bulk\n\n\
         backend bulk\n  balance roundrobin\n{}",
        servers(BACKEND_HTTP_PORT),
        servers(BULK_PORT)
    )
}

/// The daemon's config: two static services (HTTP and bulk) over the
/// backends with equal weights.
fn daemon_config(v: Variant, interfaces: &[String], redis_url: &str, tag: &str) -> Result<Config> {
    let (mode, http_port) = match v {
        Variant::HeadroomNat | Variant::HeadroomNatTc => ("nat", BACKEND_HTTP_PORT),
        _ => ("dsr", HTTP_PORT),
    };
    let hook = match v {
        Variant::HeadroomNatTc | Variant::HeadroomDsrTc => "tc",
        _ => "native",
    };
    let mut text = format!(
        "name = \"bench-{}-{tag}\"\n\n[scoreboard]\nredis_url = \"{redis_url}\"\n\n\
         [datapath]\nconntrack_size = 262144\nmax_services = 4\nmax_backends = 64\n\n\
         [[group]]\nname = \"bench\"\n",
        std::process::id()
    );
    for i in interfaces {
        text.push_str(&format!(
            "[[group.interface]]\nname = \"{i}\"\nmode = \"{hook}\"\n"
        ));
    }
    for (name, vport, bport) in [
        ("web", HTTP_PORT, http_port),
        ("bulk", BULK_PORT, BULK_PORT),
    ] {
        text.push_str(&format!(
            "[[group.service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {vport}\nmode = \"{mode}\"\n"
        ));
        for i in 0..interfaces.len() - 1 {
            text.push_str(&format!(
                "[[group.service.backend]]\naddress = \"{}:{bport}\"\n",
                backend_addr(i)
            ));
        }
    }
    text.parse::<Config>()
        .map_err(|e| anyhow::anyhow!("bench daemon config: {e}\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_round_trip() {
        for v in Variant::ALL {
            assert_eq!(v.name().parse::<Variant>().ok(), Some(v));
        }
        assert!("ipvs".parse::<Variant>().is_err());
    }

    #[test]
    fn daemon_configs_validate() {
        let ifs = ["lb-c", "lb-b0", "lb-b1", "lb-b2"].map(String::from);
        for v in [
            Variant::HeadroomNat,
            Variant::HeadroomDsr,
            Variant::HeadroomNatTc,
            Variant::HeadroomDsrTc,
        ] {
            daemon_config(v, &ifs, "redis://127.0.0.1:6379", "t").expect("valid config");
        }
    }

    #[test]
    fn nft_rules_name_every_backend() {
        let r = nft_rules(3);
        for i in 0..3 {
            assert!(r.contains(&format!("dnat to {}:{BACKEND_HTTP_PORT}", backend_addr(i))));
        }
        assert!(r.contains("numgen random mod 3 vmap"));
    }
}
