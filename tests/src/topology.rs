//! A real topology for end-to-end tests and the demo: a client, the balancer
//! and N backends, each in its own network namespace, joined by veth pairs.
//! The balancer's XDP program runs in native mode on every interface of the
//! balancer namespace, and every backend runs a TCP server.
//!
//! ```text
//!  client ns                 balancer ns                          backend ns i
//!  c-lb 10.90.0.2 ──── lb-c 10.90.0.1      lb-b<i> 10.91.<i>.1 ──── b-lb 10.91.<i>.2
//!  [XDP pass]          [XDP headroom]      [XDP headroom]           [XDP pass]
//!  VIP via 10.90.0.1                                                default via 10.91.<i>.1
//!                                                                   (dsr: VIP on lo)
//! ```
//!
//! nat: the client's packets are rewritten to `backend:8080`; the backends'
//! replies come back through the XDP program (reverse NAT) and leave as
//! `VIP:80`. dsr: the backends own the VIP and answer as the VIP; their
//! replies cross the balancer namespace's kernel forwarding untouched.
//!
//! With [`Hook::Tc`] the balancer runs on the TC ingress hook (tcx links,
//! `Balancer::attach_tc`) of its veths instead: the peers run nothing and
//! keep Linux's offload defaults (TX checksum offload and TSO on), as a
//! container's veth would.
//!
//! Everything is torn down on drop, also when a test panics: servers stop,
//! XDP detaches, namespaces (and the veths inside them) are deleted.

use std::{
    fmt,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::programs::XdpMode;
use headroom::{
    maglev::{self, MaglevBackend},
    Balancer, LoadOptions,
};
use lb_common::{counter, Counters, FlowKey, DEFAULT_TABLE_SIZE, MODE_DSR, MODE_NAT, PROTO_TCP};

use crate::{
    fixture_env::{backend, service_key},
    run_cmd, veth_pair, Netns,
};

/// The service's virtual IP. Nobody owns it in nat mode; in dsr mode every
/// backend has it on `lo`.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The service's port.
pub const VIP_PORT: u16 = 80;
/// The backends' port in nat mode (differs from [`VIP_PORT`] so the port
/// rewrite is exercised). In dsr mode backends listen on [`VIP_PORT`].
pub const BACKEND_PORT: u16 = 8080;
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 2);
/// The balancer's address on the client link (the client's gateway to the VIP).
const LB_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
/// Most backends a topology holds (one /24 per backend link).
pub const MAX_BACKENDS: usize = 250;
/// Maglev table size of the service (prime).
pub const TABLE_SIZE: u32 = DEFAULT_TABLE_SIZE;
/// Service id of the VIP (index of its counters).
pub const SERVICE_ID: u32 = 0;

/// Client-side interface names (each only needs to be unique in its namespace).
const CLIENT_IF: &str = "c-lb";
const LB_CLIENT_IF: &str = "lb-c";
const BACKEND_IF: &str = "b-lb";

/// Longest request or reply either side accepts.
const MAX_MESSAGE: u64 = 4096;
/// I/O timeout of the servers' sockets: a stuck connection frees its thread.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Address of backend `i`.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, i as u8, 2)
}

/// The balancer's address on backend `i`'s link (that backend's gateway).
fn lb_backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, i as u8, 1)
}

/// The balancer namespace's interfaces for `backends` backends.
fn balancer_ifs(backends: usize) -> Vec<String> {
    let mut ifs = vec![LB_CLIENT_IF.to_string()];
    ifs.extend((0..backends).map(lb_backend_if));
    ifs
}

/// The balancer's interface towards backend `i`.
fn lb_backend_if(i: usize) -> String {
    format!("lb-b{i}")
}

/// Name of backend `i`: what its server puts first in every reply.
pub fn backend_name(i: usize) -> String {
    format!("backend-{i}")
}

/// The port of the bulk echo service on the VIP ([`Topology::start_bulk`]).
pub const BULK_VIP_PORT: u16 = 81;
/// The backends' port of the bulk echo service in nat mode (dsr: the VIP's).
pub const BULK_BACKEND_PORT: u16 = 8081;
/// Service id of the bulk echo service.
pub const BULK_SERVICE_ID: u32 = 1;

/// Backend id of backend `i` in the bulk echo service (its own ids: the
/// port differs from the main service's).
pub fn bulk_backend_id(i: usize) -> u32 {
    128 + i as u32
}

/// Where the balancer runs on the balancer namespace's interfaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hook {
    /// XDP, native mode. The peers run the pass program (redirected frames
    /// need NAPI there) and send with TX checksum offload off.
    #[default]
    Xdp,
    /// TC ingress (tcx links). Nothing on the peers, offloads as Linux
    /// sets them.
    Tc,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        })
    }
}

/// Offload features of an interface, as `ethtool -k` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    /// `tx-checksumming`.
    pub tx_checksum: bool,
    /// `tcp-segmentation-offload`.
    pub tso: bool,
}

impl Offloads {
    /// Reads them for `ifname` in `ns`.
    pub fn read(ns: &Netns, ifname: &str) -> Result<Self> {
        let out = ns.exec(&["ethtool", "-k", ifname])?;
        Self::parse(&out).with_context(|| format!("`ethtool -k {ifname}` in {}", ns.name()))
    }

    fn parse(text: &str) -> Result<Self> {
        let on = |feature: &str| -> Result<bool> {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{feature}:")))
                .with_context(|| format!("no {feature} line"))?;
            Ok(line
                .split_once(':')
                .is_some_and(|(_, v)| v.trim_start().starts_with("on")))
        };
        Ok(Offloads {
            tx_checksum: on("tx-checksumming")?,
            tso: on("tcp-segmentation-offload")?,
        })
    }
}

/// What a bulk transfer saw ([`Topology::send_bulk`]).
#[derive(Clone, Copy, Debug)]
pub struct BulkRun {
    /// Bytes sent, and echoed back identical.
    pub bytes: u64,
    /// Wall time of the transfer.
    pub elapsed: Duration,
}

/// Forwarding mode of the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Destination rewritten to the backend; replies rewritten back.
    Nat,
    /// Only MACs change; backends own the VIP and answer directly.
    Dsr,
}

impl Mode {
    /// The `MODE_*` value of the services map.
    pub fn raw(self) -> u8 {
        match self {
            Mode::Nat => MODE_NAT,
            Mode::Dsr => MODE_DSR,
        }
    }

    /// The port backends listen on: dsr keeps the VIP's port.
    pub fn server_port(self) -> u16 {
        match self {
            Mode::Nat => BACKEND_PORT,
            Mode::Dsr => VIP_PORT,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Nat => "nat",
            Mode::Dsr => "dsr",
        })
    }
}

/// Limits of a client run.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    /// Timeout of the connect and of every read and write of one connection.
    pub per_connection: Duration,
    /// The run fails once it has taken longer than this.
    pub total: Duration,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            per_connection: Duration::from_secs(3),
            total: Duration::from_secs(30),
        }
    }
}

/// What a client run saw.
#[derive(Clone, Debug)]
pub struct Tally {
    /// Connections answered by each backend, by index.
    pub per_backend: Vec<u64>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Tally {
    /// Connections that completed.
    pub fn total(&self) -> u64 {
        self.per_backend.iter().sum()
    }
}

/// The balancer's counters at one moment.
#[derive(Clone, Debug)]
pub struct LbCounters {
    /// Global counters, indexed by [`lb_common::counter`].
    pub global: [u64; counter::COUNT as usize],
    /// Per-backend counters, by backend index.
    pub backends: Vec<Counters>,
}

impl LbCounters {
    /// Global counter `c`.
    pub fn get(&self, c: u32) -> u64 {
        self.global[c as usize]
    }

    /// What was counted after `before` was taken.
    pub fn since(&self, before: &LbCounters) -> LbCounters {
        let mut global = self.global;
        for (g, b) in global.iter_mut().zip(&before.global) {
            *g = g.saturating_sub(*b);
        }
        let backends = self
            .backends
            .iter()
            .zip(&before.backends)
            .map(|(a, b)| Counters {
                packets: a.packets.saturating_sub(b.packets),
                bytes: a.bytes.saturating_sub(b.bytes),
                new_flows: a.new_flows.saturating_sub(b.new_flows),
            })
            .collect();
        LbCounters { global, backends }
    }

    /// The non-zero global counters as `name=value`, space separated.
    pub fn summary(&self) -> String {
        counter::NAMES
            .iter()
            .zip(&self.global)
            .filter(|(_, &v)| v != 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A namespace's TCP counters (`/proc/net/snmp`, `Tcp:` lines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connections this side opened (SYN sent).
    pub active_opens: u64,
    /// Connections this side accepted (SYN received).
    pub passive_opens: u64,
    /// Connections that failed while opening (reset or timed out).
    pub attempt_fails: u64,
    /// Established connections reset by the peer or locally.
    pub estab_resets: u64,
    /// Segments sent with RST.
    pub out_rsts: u64,
    /// Segments retransmitted.
    pub retrans_segs: u64,
}

impl TcpStats {
    /// Reads the counters of namespace `ns`.
    pub fn read(ns: &Netns) -> Result<Self> {
        // `ip netns exec` runs cat inside `ns`, and /proc/net follows the
        // reader's namespace.
        let snmp = ns.exec(&["cat", "/proc/net/snmp"])?;
        Self::parse(&snmp).with_context(|| format!("parsing /proc/net/snmp of {}", ns.name()))
    }

    fn parse(snmp: &str) -> Result<Self> {
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = tcp.next().zip(tcp.next()).context("no Tcp: lines")?;
        let mut stats = TcpStats::default();
        for (name, value) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            let slot = match name {
                "ActiveOpens" => &mut stats.active_opens,
                "PassiveOpens" => &mut stats.passive_opens,
                "AttemptFails" => &mut stats.attempt_fails,
                "EstabResets" => &mut stats.estab_resets,
                "OutRsts" => &mut stats.out_rsts,
                "RetransSegs" => &mut stats.retrans_segs,
                _ => continue,
            };
            *slot = value.parse().with_context(|| format!("{name}={value}"))?;
        }
        Ok(stats)
    }

    /// What was counted after `before` was taken.
    pub fn since(&self, before: &TcpStats) -> TcpStats {
        TcpStats {
            active_opens: self.active_opens.saturating_sub(before.active_opens),
            passive_opens: self.passive_opens.saturating_sub(before.passive_opens),
            attempt_fails: self.attempt_fails.saturating_sub(before.attempt_fails),
            estab_resets: self.estab_resets.saturating_sub(before.estab_resets),
            out_rsts: self.out_rsts.saturating_sub(before.out_rsts),
            retrans_segs: self.retrans_segs.saturating_sub(before.retrans_segs),
        }
    }
}

/// Client, balancer and backends, wired and running. See the module docs.
///
/// Field order is drop order: servers close their sockets first, then the
/// balancer detaches its programs, then the namespaces go.
pub struct Topology {
    servers: Vec<EchoServer>,
    bulk_servers: Vec<EchoServer>,
    lb: Balancer,
    mode: Mode,
    hook: Hook,
    client: Netns,
    balancer: Netns,
    backends: Vec<Netns>,
    _backstop: NetnsBackstop,
}

impl Topology {
    /// Builds the namespaces and links for `mode` with `backends` backends,
    /// loads and attaches the balancer, registers the backends (ids
    /// `0..backends`) and starts their servers. The service is not
    /// published yet: see [`Topology::publish`].
    pub fn new(mode: Mode, backends: usize) -> Result<Self> {
        Self::build(mode, backends, true, Hook::Xdp)
    }

    /// Like [`Topology::new`], with the balancer on `hook`.
    pub fn with_hook(mode: Mode, backends: usize, hook: Hook) -> Result<Self> {
        Self::build(mode, backends, true, hook)
    }

    /// Like [`Topology::new`], but the balancer namespace's interfaces
    /// ([`Topology::balancer_interfaces`]) are left without XDP and no
    /// backend is registered: for a daemon (`headroom lb run`) to attach and
    /// fill its own maps. The peers still run the pass program (redirected
    /// frames need it), and the servers run. [`Topology::lb`] and
    /// [`Topology::counters`] then see an idle balancer, not the daemon's.
    pub fn new_for_daemon(mode: Mode, backends: usize) -> Result<Self> {
        Self::build(mode, backends, false, Hook::Xdp)
    }

    /// Like [`Topology::new_for_daemon`], for a daemon attaching on `hook`:
    /// with [`Hook::Tc`] (interfaces with `mode = "tc"`) the peers run no
    /// program and keep their offloads.
    pub fn for_daemon_with_hook(mode: Mode, backends: usize, hook: Hook) -> Result<Self> {
        Self::build(mode, backends, false, hook)
    }

    fn build(mode: Mode, backends: usize, attach: bool, hook: Hook) -> Result<Self> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&backends),
            "a topology holds 1..={MAX_BACKENDS} backends, not {backends}"
        );
        // Declared first, so on an early error it drops last, after the
        // namespaces created so far.
        let mut backstop = NetnsBackstop::default();
        let client = backstop.track(Netns::with_tag("client")?);
        let balancer = backstop.track(Netns::with_tag("lb")?);
        let mut nodes = Vec::with_capacity(backends);
        for i in 0..backends {
            nodes.push(backstop.track(Netns::with_tag(&format!("be{i}"))?));
        }

        wire(&client, &balancer, &nodes).context("wiring the topology")?;
        configure_balancer_ns(&balancer, backends)?;
        for (i, ns) in nodes.iter().enumerate() {
            configure_backend_ns(ns, i, mode)?;
        }
        // Sockets on the client and the backends hand veth frames whose TCP
        // checksum is left for "hardware" (CHECKSUM_PARTIAL). That promise
        // lives in skb metadata, which XDP_REDIRECT drops: the frame would
        // arrive with a bad checksum. Real NICs deliver complete checksums,
        // so make the senders compute them. TC keeps the skb, and the mark.
        if hook == Hook::Xdp {
            disable_tx_checksum(&client, CLIENT_IF)?;
            for ns in &nodes {
                disable_tx_checksum(ns, BACKEND_IF)?;
            }
        }
        pin_neighbours(&balancer, &client, &nodes)?;

        let mut lb = load_balancer()?;
        if attach {
            match hook {
                Hook::Xdp => attach_balancer(&mut lb, &balancer, &balancer_ifs(backends))?,
                Hook::Tc => attach_balancer_tc(&mut lb, &balancer, &balancer_ifs(backends))?,
            }
        }
        // A veth only takes XDP_REDIRECTed frames if its peer runs NAPI,
        // which an XDP program (or GRO) turns on. We attach the pass
        // program: it also keeps the receiving side the same in both
        // directions and in every mode. bpf_redirect from TC hands the skb
        // to the veth's own transmit, which needs nothing on the peer.
        if hook == Hook::Xdp {
            attach_pass(&mut lb, &client, CLIENT_IF)?;
            for ns in &nodes {
                attach_pass(&mut lb, ns, BACKEND_IF)?;
            }
        }
        for i in (0..backends).filter(|_| attach) {
            let b = backend(IpAddr::V4(backend_addr(i)), mode.server_port());
            lb.set_backend(i as u32, b)
                .with_context(|| format!("registering {} as backend id {i}", backend_name(i)))?;
        }

        let mut servers = Vec::with_capacity(backends);
        for (i, ns) in nodes.iter().enumerate() {
            servers.push(EchoServer::start(ns, backend_name(i), mode.server_port())?);
        }
        Ok(Topology {
            servers,
            bulk_servers: Vec::new(),
            lb,
            mode,
            hook,
            client,
            balancer,
            backends: nodes,
            _backstop: backstop,
        })
    }

    /// Publishes the service `VIP:VIP_PORT/tcp` with a Maglev table of
    /// [`TABLE_SIZE`] slots, backend `i` with weight `weights[i]`. Returns
    /// the table.
    pub fn publish(&mut self, weights: &[u32]) -> Result<Vec<u32>> {
        ensure!(
            weights.len() == self.backends.len(),
            "{} weights for {} backends",
            weights.len(),
            self.backends.len()
        );
        let keys: Vec<String> = (0..weights.len())
            .map(|i| format!("{}:{}", backend_addr(i), self.mode.server_port()))
            .collect();
        let members: Vec<MaglevBackend> = keys
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (key, &weight))| MaglevBackend {
                key: key.as_bytes(),
                id: i as u32,
                weight,
            })
            .collect();
        let table = maglev::build(&members, TABLE_SIZE).context("building the Maglev table")?;
        let key = service_key(IpAddr::V4(VIP), VIP_PORT, PROTO_TCP);
        self.lb
            .publish(key, SERVICE_ID, self.mode.raw(), &table)
            .context("publishing the service")?;
        Ok(table)
    }

    /// The balancer namespace's interfaces: towards the client, then towards
    /// each backend.
    pub fn balancer_interfaces(&self) -> Vec<String> {
        balancer_ifs(self.backends.len())
    }

    /// Registers every backend for a second service, `VIP:BULK_VIP_PORT`
    /// (backend ids [`bulk_backend_id`], equal weights, service id
    /// [`BULK_SERVICE_ID`]), and starts on each backend a server that
    /// echoes every byte it reads, for [`Topology::send_bulk`].
    pub fn start_bulk(&mut self) -> Result<()> {
        ensure!(
            self.bulk_servers.is_empty(),
            "the bulk service runs already"
        );
        let port = self.bulk_server_port();
        let keys: Vec<String> = (0..self.backends.len())
            .map(|i| format!("{}:{port}", backend_addr(i)))
            .collect();
        let mut members = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let id = bulk_backend_id(i);
            self.lb
                .set_backend(id, backend(IpAddr::V4(backend_addr(i)), port))
                .with_context(|| format!("registering bulk backend id {id}"))?;
            members.push(MaglevBackend {
                key: key.as_bytes(),
                id,
                weight: 1,
            });
        }
        let table = maglev::build(&members, TABLE_SIZE).context("building the bulk table")?;
        let key = service_key(IpAddr::V4(VIP), BULK_VIP_PORT, PROTO_TCP);
        self.lb
            .publish(key, BULK_SERVICE_ID, self.mode.raw(), &table)
            .context("publishing the bulk service")?;
        for (i, ns) in self.backends.iter().enumerate() {
            self.bulk_servers.push(EchoServer::start_with(
                ns,
                format!("bulk-{i}"),
                port,
                Reply::Mirror,
            )?);
        }
        Ok(())
    }

    /// The port the bulk servers listen on: dsr keeps the VIP's port.
    fn bulk_server_port(&self) -> u16 {
        match self.mode {
            Mode::Nat => BULK_BACKEND_PORT,
            Mode::Dsr => BULK_VIP_PORT,
        }
    }

    /// Sends `bytes` pseudo-random bytes from the client through
    /// `VIP:BULK_VIP_PORT` over one TCP connection while reading the echo,
    /// and checks that every byte came back identical and in order. Fails on
    /// a mismatch, a reset, or when `timeout` passes (every read and write
    /// has it too). Needs [`Topology::start_bulk`].
    pub fn send_bulk(&self, bytes: u64, timeout: Duration) -> Result<BulkRun> {
        ensure!(!self.bulk_servers.is_empty(), "start_bulk first");
        let vip = SocketAddr::from((VIP, BULK_VIP_PORT));
        let stream = {
            let _inside = self.client.enter_thread()?;
            TcpStream::connect_timeout(&vip, timeout)
                .with_context(|| format!("connecting to {vip}"))?
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let start = Instant::now();
        let mut writer = stream.try_clone().context("cloning the bulk socket")?;
        let sender = thread::Builder::new()
            .name("bulk-sender".into())
            .spawn(move || -> io::Result<()> {
                let mut gen = BulkBytes::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    gen.fill(&mut buf[..n]);
                    writer.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                writer.shutdown(Shutdown::Write)
            })
            .context("starting the bulk sender")?;
        let received = check_echo(&stream, bytes, start + timeout);
        let sent = sender
            .join()
            .map_err(|_| anyhow!("the bulk sender panicked"))?;
        let received = received.context("reading the echo")?;
        sent.context("sending")?;
        ensure!(
            received == bytes,
            "{received} of {bytes} bytes came back before the end of the stream"
        );
        Ok(BulkRun {
            bytes,
            elapsed: start.elapsed(),
        })
    }

    /// Calls `f` with the balancer from a thread inside the balancer's
    /// namespace (test runs resolve interface indexes there).
    pub fn in_balancer_ns<T>(&mut self, f: impl FnOnce(&mut Balancer) -> T) -> Result<T> {
        let _inside = self.balancer.enter_thread()?;
        Ok(f(&mut self.lb))
    }

    /// Where the balancer runs.
    pub fn hook(&self) -> Hook {
        self.hook
    }

    /// The client's interface, towards the balancer.
    pub fn client_interface(&self) -> &'static str {
        CLIENT_IF
    }

    /// Each backend's interface, towards the balancer (in its namespace).
    pub fn backend_interface(&self) -> &'static str {
        BACKEND_IF
    }

    /// The forwarding mode the topology was built for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The client's namespace.
    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    /// The balancer's namespace.
    pub fn balancer_ns(&self) -> &Netns {
        &self.balancer
    }

    /// Backend `i`'s namespace.
    pub fn backend_ns(&self, i: usize) -> &Netns {
        &self.backends[i]
    }

    /// The balancer (its maps and programs).
    pub fn lb(&mut self) -> &mut Balancer {
        &mut self.lb
    }

    /// Connections backend `i`'s server has answered.
    pub fn served(&self, i: usize) -> u64 {
        self.servers[i].served.load(Ordering::SeqCst)
    }

    /// Makes `count` TCP connections from the client to `VIP:VIP_PORT`, one
    /// after the other. Each sends a request, half-closes, reads the reply
    /// to the end and checks it: the serving backend's name, then the
    /// request echoed. Fails on the first connection that fails (refused,
    /// reset, timed out, wrong reply), when `limits.total` is exceeded, or
    /// when `stop` is set.
    pub fn run_clients(
        &self,
        count: usize,
        limits: ClientLimits,
        stop: &AtomicBool,
    ) -> Result<Tally> {
        let vip = SocketAddr::from((VIP, VIP_PORT));
        let names: Vec<String> = (0..self.backends.len()).map(backend_name).collect();
        let mut per_backend = vec![0u64; names.len()];
        // Sockets this thread makes from here on belong to the client namespace.
        let _inside = self.client.enter_thread()?;
        let start = Instant::now();
        for n in 1..=count {
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted after {} of {count} connections", n - 1);
            }
            ensure!(
                start.elapsed() < limits.total,
                "only {} of {count} connections done within {:?}",
                n - 1,
                limits.total
            );
            let request = format!("request {n} from {CLIENT_ADDR}");
            let reply = exchange(vip, &request, limits.per_connection).map_err(|e| {
                anyhow!(
                    "connection {n} of {count} to {vip}: {e} ({:?}); answered so far per backend: {per_backend:?}",
                    e.kind()
                )
            })?;
            let i = parse_reply(&reply, &request, &names)
                .with_context(|| format!("connection {n} of {count} to {vip}"))?;
            per_backend[i] += 1;
        }
        Ok(Tally {
            per_backend,
            elapsed: start.elapsed(),
        })
    }

    /// The balancer's global and per-backend counters.
    pub fn counters(&self) -> Result<LbCounters> {
        let global = self
            .lb
            .global_counters()
            .context("reading global counters")?;
        let backends = (0..self.backends.len())
            .map(|i| {
                self.lb
                    .backend_counters(i as u32)
                    .with_context(|| format!("reading counters of backend id {i}"))
            })
            .collect::<Result<_>>()?;
        Ok(LbCounters { global, backends })
    }

    /// The connection table: every tracked flow (client → VIP 5-tuple) and
    /// the backend id it is pinned to.
    pub fn flows(&mut self) -> Result<Vec<(FlowKey, u32)>> {
        self.lb
            .conntrack()
            .iter()
            .map(|entry| {
                let (key, flow) = entry.context("reading the connection table")?;
                Ok((key, flow.backend))
            })
            .collect()
    }

    /// TCP counters of the client (first, labelled `client`) and of every
    /// backend (labelled with its name).
    pub fn tcp_stats(&self) -> Result<Vec<(String, TcpStats)>> {
        let mut out = vec![("client".to_string(), TcpStats::read(&self.client)?)];
        for (i, ns) in self.backends.iter().enumerate() {
            out.push((backend_name(i), TcpStats::read(ns)?));
        }
        Ok(out)
    }
}

/// The bulk transfer's content: a xorshift stream, so a dropped, repeated
/// or corrupted byte shows at its offset.
struct BulkBytes(u64);

impl BulkBytes {
    fn new() -> Self {
        BulkBytes(0x9e37_79b9_7f4a_7c15)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Reads the echo of a bulk transfer of `bytes` to its end and compares it
/// with what was sent. Returns the bytes read.
fn check_echo(mut stream: &TcpStream, bytes: u64, deadline: Instant) -> Result<u64> {
    let mut expected = BulkBytes::new();
    // Chunks of 8 keep the generator aligned whatever the reads return.
    let mut want = [0u8; 8];
    let mut want_len = 0usize;
    let mut want_pos = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        ensure!(
            Instant::now() < deadline,
            "only {total} of {bytes} bytes echoed in time"
        );
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        for &b in &buf[..n] {
            if want_pos == want_len {
                let left = (bytes - total).min(8) as usize;
                ensure!(left > 0, "more than the {bytes} bytes sent came back");
                expected.fill(&mut want[..left]);
                // The sender fills whole 64 KiB writes in chunks of 8: only
                // its very last chunk is short, as is ours.
                want_len = left;
                want_pos = 0;
            }
            ensure!(
                b == want[want_pos],
                "byte {total} came back as {b:#04x}, {:#04x} was sent",
                want[want_pos]
            );
            want_pos += 1;
            total += 1;
        }
    }
}

/// One request/response exchange with the server behind `vip`.
fn exchange(vip: SocketAddr, request: &str, timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&vip, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request.as_bytes())?;
    // Half-close: the server answers at the end of the request. Each side
    // reads everything before closing, so a clean exchange has no reason
    // to end in a reset.
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.take(MAX_MESSAGE).read_to_string(&mut reply)?;
    Ok(reply)
}

/// The index of the backend that answered `reply` to `request`.
fn parse_reply(reply: &str, request: &str, names: &[String]) -> Result<usize> {
    let (name, echoed) = reply
        .split_once('\n')
        .with_context(|| format!("reply {reply:?} lacks the backend name line"))?;
    ensure!(
        echoed == request,
        "reply {reply:?} does not echo {request:?}"
    );
    names
        .iter()
        .position(|n| n == name)
        .with_context(|| format!("reply from unknown backend {name:?}"))
}

/// Runs `argv` (split on whitespace) inside `ns`.
fn sh(ns: &Netns, command: &str) -> Result<()> {
    let argv: Vec<&str> = command.split_whitespace().collect();
    ns.exec(&argv).map(drop)
}

/// Creates the veth pairs, addresses and routes of the diagram.
fn wire(client: &Netns, balancer: &Netns, backends: &[Netns]) -> Result<()> {
    veth_pair(balancer, LB_CLIENT_IF, client, CLIENT_IF)?;
    balancer.add_addr(LB_CLIENT_IF, &format!("{LB_CLIENT_ADDR}/24"))?;
    client.add_addr(CLIENT_IF, &format!("{CLIENT_ADDR}/24"))?;
    // Only the VIP goes through the balancer; the client's own link stays direct.
    client.add_route(&format!("{VIP}/32"), &LB_CLIENT_ADDR.to_string())?;
    for (i, ns) in backends.iter().enumerate() {
        let lb_if = lb_backend_if(i);
        veth_pair(balancer, &lb_if, ns, BACKEND_IF)?;
        balancer.add_addr(&lb_if, &format!("{}/24", lb_backend_addr(i)))?;
        ns.add_addr(BACKEND_IF, &format!("{}/24", backend_addr(i)))?;
        // Replies (nat: to be un-NATed by XDP; dsr: forwarded by the
        // balancer's kernel) go back through the balancer.
        ns.add_route("default", &lb_backend_addr(i).to_string())?;
    }
    Ok(())
}

/// Forwarding on, reverse-path filtering off in the balancer namespace.
fn configure_balancer_ns(balancer: &Netns, backends: usize) -> Result<()> {
    // bpf_fib_lookup refuses to route for an ingress device without
    // forwarding, and dsr replies are forwarded by this kernel.
    sh(balancer, "sysctl -qw net.ipv4.ip_forward=1")?;
    // dsr replies come from the VIP, which this namespace has no route to:
    // a reverse-path filter would drop them. The effective value is the
    // maximum of `all` and the device's, so set both.
    let mut devs = vec![
        "all".to_string(),
        "default".to_string(),
        LB_CLIENT_IF.to_string(),
    ];
    devs.extend((0..backends).map(lb_backend_if));
    for dev in devs {
        sh(
            balancer,
            &format!("sysctl -qw net.ipv4.conf.{dev}.rp_filter=0"),
        )?;
    }
    Ok(())
}

/// dsr: the backend owns the VIP on `lo` but never answers ARP for it.
fn configure_backend_ns(ns: &Netns, i: usize, mode: Mode) -> Result<()> {
    if mode == Mode::Dsr {
        // arp_ignore=1: answer ARP only for addresses of the asking link;
        // arp_announce=2: never source ARP from the VIP. Only the balancer
        // may attract the VIP's traffic.
        sh(ns, "sysctl -qw net.ipv4.conf.all.arp_ignore=1")?;
        sh(ns, "sysctl -qw net.ipv4.conf.all.arp_announce=2")?;
        ns.add_addr("lo", &format!("{VIP}/32"))
            .with_context(|| format!("adding the VIP to lo of {}", backend_name(i)))?;
    }
    Ok(())
}

/// Makes `ifname`'s sender compute full checksums (see the call site).
fn disable_tx_checksum(ns: &Netns, ifname: &str) -> Result<()> {
    sh(ns, &format!("ethtool -K {ifname} tx off")).with_context(|| {
        format!(
            "turning tx checksum offload off on {ifname} in {}",
            ns.name()
        )
    })
}

/// Permanent neighbour entries in the balancer for the client and the
/// backends. bpf_fib_lookup does not resolve neighbours: without an entry
/// it fails and the packet would go to the kernel instead (pass_fib), so
/// the first packets of the test would take another path.
fn pin_neighbours(balancer: &Netns, client: &Netns, backends: &[Netns]) -> Result<()> {
    let pin = |addr: Ipv4Addr, mac: [u8; 6], dev: &str| {
        let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        sh(
            balancer,
            &format!(
                "ip neigh replace {addr} lladdr {} dev {dev} nud permanent",
                mac.join(":")
            ),
        )
    };
    pin(CLIENT_ADDR, client.mac(CLIENT_IF)?, LB_CLIENT_IF)?;
    for (i, ns) in backends.iter().enumerate() {
        pin(backend_addr(i), ns.mac(BACKEND_IF)?, &lb_backend_if(i))?;
    }
    Ok(())
}

/// Loads the balancer with maps sized for a test, not for production (the
/// default million-flow tables would cost hundreds of MB per test).
fn load_balancer() -> Result<Balancer> {
    let opts = LoadOptions {
        conntrack_size: 1 << 16,
        max_services: 4,
        max_backends: 256,
        max_table_size: TABLE_SIZE,
        ..LoadOptions::default()
    };
    Balancer::load(&opts)
        .context("loading the balancer (is the XDP object built? `cargo xtask build-ebpf`)")
}

/// Attaches the balancer in native mode to `ifnames` of `ns` and allows
/// redirects to them.
fn attach_balancer(lb: &mut Balancer, ns: &Netns, ifnames: &[String]) -> Result<()> {
    let indexes = ifnames
        .iter()
        .map(|n| ns.ifindex(n))
        .collect::<Result<Vec<_>>>()?;
    // The XDP link and the devmap both resolve ifindexes in the calling
    // thread's namespace.
    let _inside = ns.enter_thread()?;
    for (name, &ifindex) in ifnames.iter().zip(&indexes) {
        lb.program()
            .attach_to_if_index(ifindex, XdpMode::Driver)
            .with_context(|| format!("attaching the balancer to {name} in {}", ns.name()))?;
        lb.add_tx_port(ifindex)
            .with_context(|| format!("adding {name} of {} to the devmap", ns.name()))?;
    }
    Ok(())
}

/// Attaches the balancer's TC program to the ingress of `ifnames` of `ns`.
fn attach_balancer_tc(lb: &mut Balancer, ns: &Netns, ifnames: &[String]) -> Result<()> {
    let indexes = ifnames
        .iter()
        .map(|n| ns.ifindex(n))
        .collect::<Result<Vec<_>>>()?;
    // The tcx link resolves names and indexes in the calling thread's
    // namespace.
    let _inside = ns.enter_thread()?;
    for (name, &ifindex) in ifnames.iter().zip(&indexes) {
        lb.attach_tc(name, ifindex)
            .with_context(|| format!("attaching the TC balancer to {name} in {}", ns.name()))?;
    }
    Ok(())
}

/// Attaches the pass program in native mode to `ifname` of `ns`.
fn attach_pass(lb: &mut Balancer, ns: &Netns, ifname: &str) -> Result<()> {
    let ifindex = ns.ifindex(ifname)?;
    let _inside = ns.enter_thread()?;
    lb.pass_program()
        .attach_to_if_index(ifindex, XdpMode::Driver)
        .with_context(|| format!("attaching the pass program to {ifname} in {}", ns.name()))?;
    Ok(())
}

/// How an [`EchoServer`] answers a connection.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// Reads the request to its end (at most `MAX_MESSAGE`), answers
    /// `NAME\nREQUEST`.
    Named,
    /// Writes back every byte as it arrives, whatever the length.
    Mirror,
}

/// A TCP server in a backend namespace: reads a request to its end, answers
/// `NAME\nREQUEST` and closes (or mirrors a bulk stream, [`Reply::Mirror`]).
/// One thread per connection. Stopped on drop.
struct EchoServer {
    listener: Arc<TcpListener>,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `0.0.0.0:port` inside `ns`. Listening before returning
    /// means clients never race the server's start.
    fn start(ns: &Netns, name: String, port: u16) -> Result<Self> {
        Self::start_with(ns, name, port, Reply::Named)
    }

    /// Like [`EchoServer::start`], answering as `reply` says.
    fn start_with(ns: &Netns, name: String, port: u16, reply: Reply) -> Result<Self> {
        let listener = {
            // A socket stays in the namespace it was created in, whichever
            // thread uses it later.
            let _inside = ns.enter_thread()?;
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .with_context(|| format!("{name}: listening on port {port} in {}", ns.name()))?
        };
        let listener = Arc::new(listener);
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, served, stop) = (listener.clone(), served.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("{name}-server"))
                .spawn(move || serve(&listener, &name, reply, &served, &stop))
                .context("starting a server thread")?
        };
        Ok(EchoServer {
            listener,
            served,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On Linux, shutting a listening socket down wakes a blocked
        // accept() with EINVAL; the loop then sees `stop`.
        // SAFETY: the fd is valid while `self.listener` lives.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("echo server thread panicked");
            }
        }
    }
}

/// Accept loop; returns when `stop` is set (after the open connections end).
fn serve(listener: &TcpListener, name: &str, reply: Reply, served: &AtomicU64, stop: &AtomicBool) {
    thread::scope(|s| loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match accepted {
            Ok((stream, _)) => {
                s.spawn(move || {
                    let answered = match reply {
                        Reply::Named => answer(stream, name, served),
                        Reply::Mirror => mirror(stream, served),
                    };
                    if let Err(e) = answered {
                        eprintln!("{name}: {e}");
                    }
                });
            }
            Err(e) => {
                // E.g. ECONNABORTED: the next connection is not affected.
                // Back off a little in case the error repeats (EMFILE).
                eprintln!("{name}: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    });
}

/// Serves one connection.
fn answer(mut stream: TcpStream, name: &str, served: &AtomicU64) -> io::Result<()> {
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut request = Vec::new();
    (&mut stream).take(MAX_MESSAGE).read_to_end(&mut request)?;
    // Counted before the reply is written, so a client holding the reply
    // always finds it counted.
    served.fetch_add(1, Ordering::SeqCst);
    let mut reply = format!("{name}\n").into_bytes();
    reply.extend_from_slice(&request);
    stream.write_all(&reply)
}

/// Writes back everything read, until the client half-closes.
fn mirror(mut stream: TcpStream, served: &AtomicU64) -> io::Result<()> {
    // Bulk transfers take longer than a request: a stall of this long is
    // a failure all the same.
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT * 6))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT * 6))?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
    }
    served.fetch_add(1, Ordering::SeqCst);
    stream.shutdown(Shutdown::Write)
}

/// Deletes, when dropped, the namespaces it tracks that still exist.
///
/// `Netns`'s Drop is what should delete them; this is a backstop for the
/// safety rule that a test's namespaces never outlive it. It is declared
/// after the `Netns` values it tracks, so it runs after their drops and
/// finds nothing to do when they did their job. Our namespaces hold no
/// processes (servers are threads of this process), so deleting is enough.
#[derive(Default)]
struct NetnsBackstop(Vec<String>);

impl NetnsBackstop {
    fn track(&mut self, ns: Netns) -> Netns {
        self.0.push(ns.name().to_string());
        ns
    }
}

impl Drop for NetnsBackstop {
    fn drop(&mut self) {
        for name in &self.0 {
            if Path::new("/run/netns").join(name).exists() {
                if let Err(e) = run_cmd(&["ip", "netns", "del", name]) {
                    eprintln!("deleting network namespace {name}: {e:#}");
                }
            }
        }
    }
}

/// The config text of a daemon that follows the scoreboard for one service
/// (`web`-style: `service` on VIP:VIP_PORT in `mode`) on `interfaces`, with
/// the test knobs: no smoothing (`ewma_alpha = 1`), a 1 % dead-band and no
/// ramp-up, so a new load shows in the weights at the next refresh.
#[allow(clippy::too_many_arguments)] // one test knob each, named at the call
pub fn scoreboard_daemon_config(
    name: &str,
    metrics_listen: Option<std::net::SocketAddr>,
    redis_url: &str,
    refresh: Duration,
    ttl: Duration,
    interfaces: &[String],
    service: &str,
    mode: &str,
) -> String {
    scoreboard_daemon_config_on(
        name,
        metrics_listen,
        redis_url,
        refresh,
        ttl,
        interfaces,
        "native",
        service,
        mode,
    )
}

/// [`scoreboard_daemon_config`] with the interfaces' `attach_mode`
/// (`native`, `tc`, ...).
#[allow(clippy::too_many_arguments)] // one test knob each, named at the call
pub fn scoreboard_daemon_config_on(
    name: &str,
    metrics_listen: Option<std::net::SocketAddr>,
    redis_url: &str,
    refresh: Duration,
    ttl: Duration,
    interfaces: &[String],
    attach_mode: &str,
    service: &str,
    mode: &str,
) -> String {
    let listen = metrics_listen.map_or(String::new(), |a| format!("metrics_listen = \"{a}\"\n"));
    let mut text = format!(
        "name = \"{name}\"\n{listen}\n[scoreboard]\nredis_url = \"{redis_url}\"\n\
         refresh_interval = \"{}ms\"\nttl = \"{}ms\"\n\n\
         [weights]\newma_alpha = 1\ndead_band = 0.01\nramp_up = \"0s\"\n\n\
         [datapath]\nconntrack_size = 65536\nmax_services = 2\nmax_backends = 64\n\n\
         [[group]]\nname = \"{name}\"\n",
        refresh.as_millis(),
        ttl.as_millis()
    );
    for i in interfaces {
        text.push_str(&format!(
            "[[group.interface]]\nname = \"{i}\"\nmode = \"{attach_mode}\"\n"
        ));
    }
    text.push_str(&format!(
        "[[group.service]]\nname = \"{service}\"\nvip = \"{VIP}\"\nport = {VIP_PORT}\nmode = \"{mode}\"\n"
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_stats_parse() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
            Tcp: 1 200 120000 -1 7 3 1 2 0 10 11 4 0 5 0\n";
        let s = TcpStats::parse(snmp).expect("parse");
        assert_eq!(
            s,
            TcpStats {
                active_opens: 7,
                passive_opens: 3,
                attempt_fails: 1,
                estab_resets: 2,
                out_rsts: 5,
                retrans_segs: 4,
            }
        );
        assert_eq!(s.since(&s), TcpStats::default());
    }

    #[test]
    fn offloads_parse() {
        let text = "Features for c-lb:\nrx-checksumming: on\ntx-checksumming: on\n\
            \ttx-checksum-ipv4: off [fixed]\nscatter-gather: on\n\
            tcp-segmentation-offload: off\n\ttx-tcp-segmentation: off\n";
        let o = Offloads::parse(text).expect("parse");
        assert_eq!(
            o,
            Offloads {
                tx_checksum: true,
                tso: false
            }
        );
        assert!(Offloads::parse("rx-checksumming: on\n").is_err());
    }

    #[test]
    fn bulk_bytes_check_catches_a_changed_byte() {
        let mut gen = BulkBytes::new();
        let mut a = vec![0u8; 100];
        gen.fill(&mut a[..64]);
        gen.fill(&mut a[64..]);
        // Filled in one go or in parts of multiples of 8: the same stream.
        let mut b = vec![0u8; 100];
        BulkBytes::new().fill(&mut b);
        assert_eq!(a, b);
        assert_ne!(a[..8], a[8..16]);
    }

    #[test]
    fn replies_parse() {
        let names = vec![backend_name(0), backend_name(1)];
        assert_eq!(parse_reply("backend-1\nhi", "hi", &names).ok(), Some(1));
        assert!(parse_reply("backend-1\nho", "hi", &names).is_err());
        assert!(parse_reply("backend-7\nhi", "hi", &names).is_err());
        assert!(parse_reply("hi", "hi", &names).is_err());
    }
}
