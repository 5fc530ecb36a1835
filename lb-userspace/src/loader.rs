//! Loads the XDP program and owns its maps: services, backends, tables,
//! configuration and counters. Everything the data path decides is decided
//! here, as map contents.

use std::{
    collections::HashMap as StdHashMap,
    mem::size_of,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    counter, maps, programs, Backend, Config, Counters, Flow, FlowKey, RevNat, ServiceKey,
    ServiceValue, BACKEND_ACTIVE, BACKEND_DSR, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_SERVICES, DEFAULT_TABLE_SIZE, DEFAULT_UDP_IDLE_TIMEOUT_NS,
};
use thiserror::Error;

use crate::tables::{TableError, TableMem};

/// The TC ingress program of the object: the balancer's code on the skb
/// (`mode = "tc"`), loaded only when an interface asks for it.
pub const TC_PROGRAM: &str = programs::TC;

/// TC verdicts (`TC_ACT_*`, linux/pkt_cls.h) that [`run_tc`] returns.
pub mod tc_act {
    /// `TC_ACT_UNSPEC` (-1): not ours, the next tcx program, tc filter or
    /// the stack decides (XDP_PASS).
    pub const NEXT: u32 = u32::MAX;
    /// `TC_ACT_OK`: pass and stop the chain (the program never returns it).
    pub const OK: u32 = 0;
    /// Drop (XDP_DROP).
    pub const SHOT: u32 = 2;
    /// `bpf_redirect` to an egress (XDP_TX and XDP_REDIRECT).
    pub const REDIRECT: u32 = 7;
}

/// The XDP object built by `cargo xtask build-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

/// Sizes and knobs fixed when the program is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Connection-table (and reverse-NAT table) size in flows.
    pub conntrack_size: u32,
    /// Services the table map has room for.
    pub max_services: u32,
    /// Backend slots.
    pub max_backends: u32,
    /// Largest table size M any service may use; each service gets two buffers of it.
    pub max_table_size: u32,
    /// Idle time after which a UDP flow is re-selected.
    pub udp_idle_timeout: Duration,
    /// In-kernel log level (0 off … 5 trace); per-packet logs are debug (4).
    pub log_level: u8,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_size: DEFAULT_CONNTRACK_SIZE,
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_table_size: DEFAULT_TABLE_SIZE,
            udp_idle_timeout: Duration::from_nanos(DEFAULT_UDP_IDLE_TIMEOUT_NS),
            log_level: 0,
        }
    }
}

/// What went wrong talking to the kernel.
#[derive(Debug, Error)]
pub enum BalancerError {
    /// Loading the object (maps, relocations) failed.
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load (verifier) or attach.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// The error, with the verifier log for load failures.
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The error.
        source: MapError,
    },
    /// A map is missing from the object (object and userspace disagree).
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    /// A program is missing from the object (an object older than this
    /// build, e.g. one without the TC program).
    #[error(
        "program {0} is missing from the embedded eBPF object: rebuild it with \
         `cargo xtask build-ebpf` and then this binary"
    )]
    MissingProgram(&'static str),
    /// The table memory could not be used.
    #[error(transparent)]
    Table(#[from] TableError),
    /// Filling a table failed; the service kept its previous table.
    #[error("building the table: {0}")]
    Fill(String),
    /// Pinning, or reusing what an earlier run pinned, failed.
    #[error("pinning: {0}")]
    Pin(String),
    /// The in-kernel log could not be set up.
    #[error("setting up the XDP program's log: {0}")]
    Log(String),
    /// An argument is out of the range the maps were sized for.
    #[error("{what} {value} is out of range (limit {limit})")]
    OutOfRange {
        /// What was out of range.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The limit.
        limit: u64,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BalancerError {
    move |source| BalancerError::Map { name, source }
}

/// The ports (host order) whose bits are set in a port bitmap.
fn ports_of(bits: &[u64; 1024]) -> Vec<u16> {
    (0..=u16::MAX)
        .filter(|&p| bits[usize::from(p) >> 6] & (1 << (p & 63)) != 0)
        .collect()
}

/// The port (network order) replies of `b` come from, if they can be nat
/// replies: active, and not a dsr backend (whose replies bypass us).
fn nat_port(b: Backend) -> Option<u16> {
    (b.flags & BACKEND_ACTIVE != 0 && b.flags & BACKEND_DSR == 0).then_some(b.port)
}

/// Result of running one frame through the program (BPF_PROG_TEST_RUN).
#[derive(Debug, Clone)]
pub struct RunResult {
    /// XDP action (`XDP_PASS` = 2, …), or for [`run_tc`] the TC verdict
    /// ([`tc_act`]).
    pub action: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Kernel-measured run time.
    pub duration: Duration,
}

/// The loaded balancer: its programs and typed handles on its maps.
pub struct Balancer {
    ebpf: Ebpf,
    opts: LoadOptions,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    conntrack: HashMap<MapData, FlowKey, Flow>,
    nat_rev: HashMap<MapData, FlowKey, RevNat>,
    config_map: Array<MapData, Config>,
    global: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    tx_ports: DevMapHash<MapData>,
    nat_ports: Array<MapData, [u64; 1024]>,
    vip_ports: Array<MapData, [u64; 1024]>,
    tables: TableMem,
    _tables_map: MapData,
    config: Config,
    published: StdHashMap<ServiceKey, ServiceValue>,
    /// What `BACKENDS` holds, to derive `NAT_PORTS` without reading it back.
    backends_set: StdHashMap<u32, Backend>,
    /// Where maps and links are pinned ([`Self::load_pinned`]).
    pin_dir: Option<PathBuf>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Balancer {
    /// Creates the maps at the sizes in `opts` and loads both programs.
    /// Nothing is pinned: the balancer's state dies with this value.
    pub fn load(opts: &LoadOptions) -> Result<Self, BalancerError> {
        Self::load_inner(opts, None)
    }

    /// Like [`Self::load`], but the maps live pinned in `dir` (on a bpffs):
    /// maps pinned there by an earlier run are reused as they are — services,
    /// tables, backends, connection tables, counters — so a restart or a newer
    /// program keeps every flow. [`Self::attach`] pins the XDP links there too.
    pub fn load_pinned(opts: &LoadOptions, dir: &Path) -> Result<Self, BalancerError> {
        pin::check_bpffs(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| BalancerError::Pin(format!("creating {}: {e}", dir.display())))?;
        let mut lb = Self::load_inner(opts, Some(dir))?;
        lb.pin_dir = Some(dir.to_path_buf());
        lb.check_pinned()?;
        lb.recover()?;
        Ok(lb)
    }

    fn load_inner(opts: &LoadOptions, dir: Option<&Path>) -> Result<Self, BalancerError> {
        let table_entries = u64::from(opts.max_services) * 2 * u64::from(opts.max_table_size);
        let table_entries =
            u32::try_from(table_entries).map_err(|_| BalancerError::OutOfRange {
                what: "max_services * 2 * max_table_size",
                value: table_entries,
                limit: u64::from(u32::MAX),
            })?;
        let mut loader = EbpfLoader::new();
        if let Some(dir) = dir {
            for name in pin::PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .map_max_entries(maps::CONNTRACK, opts.conntrack_size)
            .map_max_entries(maps::NAT_REV, opts.conntrack_size)
            .map_max_entries(maps::SERVICES, opts.max_services)
            .map_max_entries(maps::SERVICE_STATS, opts.max_services)
            .map_max_entries(maps::BACKENDS, opts.max_backends)
            .map_max_entries(maps::BACKEND_STATS, opts.max_backends)
            .map_max_entries(maps::NEXTHOPS, opts.max_backends)
            // Slots are stored in pairs (see lb-ebpf); max_table_size is
            // odd or even, 2 * it is even.
            .map_max_entries(maps::TABLES, table_entries / 2)
            .override_global(aya_log::LEVEL, &opts.log_level, false)
            .load(OBJECT)?;
        // Records only flow when a level is set; the ring buffer must be
        // taken before the programs load (they reference its fd).
        let logger = if opts.log_level > 0 {
            Some(
                aya_log::EbpfLogger::init(&mut ebpf)
                    .map_err(|e| BalancerError::Log(e.to_string()))?,
            )
        } else {
            None
        };
        for name in [programs::BALANCER, programs::PASS] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(BalancerError::MissingMap(name))?
                .try_into()
                .map_err(|source| BalancerError::Program { name, source })?;
            prog.load()
                .map_err(|source| BalancerError::Program { name, source })?;
        }

        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(BalancerError::MissingMap(name));
        let aya::maps::Map::Array(tables_map) = take(maps::TABLES)? else {
            return Err(BalancerError::MissingMap(maps::TABLES));
        };
        let services = HashMap::try_from(take(maps::SERVICES)?).map_err(map_err(maps::SERVICES))?;
        let backends = Array::try_from(take(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?;
        let conntrack =
            HashMap::try_from(take(maps::CONNTRACK)?).map_err(map_err(maps::CONNTRACK))?;
        let nat_rev = HashMap::try_from(take(maps::NAT_REV)?).map_err(map_err(maps::NAT_REV))?;
        let config_map = Array::try_from(take(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        let global = PerCpuArray::try_from(take(maps::GLOBAL_STATS)?)
            .map_err(map_err(maps::GLOBAL_STATS))?;
        let service_stats = PerCpuArray::try_from(take(maps::SERVICE_STATS)?)
            .map_err(map_err(maps::SERVICE_STATS))?;
        let backend_stats = PerCpuArray::try_from(take(maps::BACKEND_STATS)?)
            .map_err(map_err(maps::BACKEND_STATS))?;
        let tx_ports =
            DevMapHash::try_from(take(maps::TX_PORTS)?).map_err(map_err(maps::TX_PORTS))?;
        let nat_ports =
            Array::try_from(take(maps::NAT_PORTS)?).map_err(map_err(maps::NAT_PORTS))?;
        let vip_ports =
            Array::try_from(take(maps::VIP_PORTS)?).map_err(map_err(maps::VIP_PORTS))?;
        let tables = TableMem::map(tables_map.fd(), table_entries)?;

        let mut lb = Self {
            ebpf,
            opts: opts.clone(),
            services,
            backends,
            conntrack,
            nat_rev,
            config_map,
            global,
            service_stats,
            backend_stats,
            tx_ports,
            nat_ports,
            vip_ports,
            tables,
            _tables_map: tables_map,
            config: Config {
                udp_idle_timeout_ns: opts.udp_idle_timeout.as_nanos() as u64,
                // Cached next hops start empty (epoch 0): none is valid.
                epoch: 1,
                ..Config::default()
            },
            published: StdHashMap::new(),
            backends_set: StdHashMap::new(),
            pin_dir: None,
            logger,
        };
        lb.write_config()?;
        Ok(lb)
    }

    /// Forwards the program's pending log records to the `log` facade
    /// (nothing when loaded with `log_level` 0). Poll [`Self::log_fd`].
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    /// The log ring buffer's fd, readable when records are pending.
    pub fn log_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.logger.as_ref().map(|l| l.as_fd())
    }

    /// Attaches the balancer to interface `ifname` (index `ifindex` in the
    /// calling thread's network namespace) and lets it redirect there. When
    /// loaded pinned, the XDP link is pinned too, and a link pinned by an
    /// earlier run has its program replaced atomically instead: the
    /// interface never runs without the balancer. A pinned link of an
    /// interface that was deleted (and maybe recreated under the same name)
    /// is dropped and the new interface attached. Returns whether a pinned
    /// link was reused.
    pub fn attach(
        &mut self,
        ifname: &str,
        ifindex: u32,
        mode: XdpMode,
    ) -> Result<bool, BalancerError> {
        let name = programs::BALANCER;
        let perr = move |source| BalancerError::Program { name, source };
        let pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(pin::link_name(pin::Hook::Xdp, ifname)));
        if let (Some(path), Some(dir)) = (&pin, &self.pin_dir) {
            if path.exists() {
                let linked = pin::link_ifindex(path, pin::Hook::Xdp)?;
                if linked != ifindex {
                    // Updating a defunct link fails, and one of another
                    // interface would leave this one without the balancer.
                    tracing::warn!(
                        interface = ifname,
                        ifindex,
                        pinned_ifindex = linked,
                        "the pinned link belongs to an interface that is gone: attaching anew"
                    );
                    pin::unpin(dir, pin::Hook::Xdp, ifname)?;
                }
            }
        }
        let prog = self.program();
        let reused = pin.as_ref().is_some_and(|p| p.exists());
        match pin {
            Some(path) if path.exists() => {
                let pinned = PinnedLink::from_pin(&path)
                    .map_err(|e| BalancerError::Pin(format!("{}: {e}", path.display())))?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .map_err(|e| BalancerError::Pin(format!("{}: {e}", path.display())))?;
                let id = prog.attach_to_link(link).map_err(perr)?;
                // The pin keeps the link (and the program on it) alive; our
                // fd may close with this value.
                drop(prog.take_link(id).map_err(perr)?);
            }
            Some(path) => {
                let id = prog.attach_to_if_index(ifindex, mode).map_err(perr)?;
                let link = FdLink::try_from(prog.take_link(id).map_err(perr)?)
                    .map_err(|e| BalancerError::Pin(format!("{ifname}: not a bpf_link: {e}")))?;
                link.pin(&path)
                    .map_err(|e| BalancerError::Pin(format!("{}: {e}", path.display())))?;
            }
            None => {
                prog.attach_to_if_index(ifindex, mode).map_err(perr)?;
            }
        }
        self.add_tx_port(ifindex)?;
        self.drop_other_hook(pin::Hook::Tc, ifname)?;
        Ok(reused)
    }

    /// Like [`Self::attach`], but on the interface's TC ingress hook (a
    /// tcx link) with the TC program ([`TC_PROGRAM`], loaded on first use):
    /// for veths and other virtual interfaces, where it works on the skb
    /// and keeps GSO and checksum offload. Same pinning: loaded pinned, the
    /// link is pinned as `tc-<ifname>` in the pin directory; a link pinned
    /// by an earlier run gets the new program atomically; one whose
    /// interface is gone is dropped and the interface attached anew. An XDP
    /// link an earlier run pinned for this interface (its mode changed) is
    /// removed once the TC link runs, so the interface never keeps both.
    /// Returns whether a pinned link was reused.
    pub fn attach_tc(&mut self, ifname: &str, ifindex: u32) -> Result<bool, BalancerError> {
        let name = TC_PROGRAM;
        let perr = move |source| BalancerError::Program { name, source };
        // aya attaches TC by name: make sure the name means the interface
        // the caller resolved, in this thread's namespace.
        let here = pin::ifindex_of(ifname)?;
        if here != ifindex {
            return Err(BalancerError::Pin(format!(
                "interface {ifname} has index {here} here, not {ifindex}"
            )));
        }
        let dir = self.pin_dir.clone();
        let pin = dir
            .as_ref()
            .map(|d| d.join(pin::link_name(pin::Hook::Tc, ifname)));
        if let (Some(path), Some(dir)) = (&pin, &dir) {
            if path.exists() {
                let linked = pin::link_ifindex(path, pin::Hook::Tc)?;
                if linked != ifindex {
                    // As for XDP: a defunct link cannot be updated.
                    tracing::warn!(
                        interface = ifname,
                        ifindex,
                        pinned_ifindex = linked,
                        "the pinned tc link belongs to an interface that is gone: attaching anew"
                    );
                    pin::unpin(dir, pin::Hook::Tc, ifname)?;
                }
            }
        }
        let prog = self.tc_program()?;
        let reused = pin.as_ref().is_some_and(|p| p.exists());
        let tcx = || TcAttachOptions::TcxOrder(LinkOrder::default());
        match pin {
            Some(path) if path.exists() => {
                let pinned = PinnedLink::from_pin(&path)
                    .map_err(|e| BalancerError::Pin(format!("{}: {e}", path.display())))?;
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| BalancerError::Pin(format!("{}: {e}", path.display())))?;
                let id = prog.attach_to_link(link).map_err(perr)?;
                // The pin keeps the link alive; our fd may close.
                drop(prog.take_link(id).map_err(perr)?);
            }
            Some(path) => {
                let id = prog
                    .attach_with_options(ifname, TcAttachType::Ingress, tcx())
                    .map_err(perr)?;
                let link = FdLink::try_from(prog.take_link(id).map_err(perr)?)
                    .map_err(|e| BalancerError::Pin(format!("{ifname}: not a bpf_link: {e}")))?;
                link.pin(&path)
                    .map_err(|e| BalancerError::Pin(format!("{}: {e}", path.display())))?;
            }
            None => {
                prog.attach_with_options(ifname, TcAttachType::Ingress, tcx())
                    .map_err(perr)?;
            }
        }
        // The TC program redirects without the devmap, but XDP interfaces
        // of the same balancer may redirect to this one.
        self.add_tx_port(ifindex)?;
        self.drop_other_hook(pin::Hook::Xdp, ifname)?;
        Ok(reused)
    }

    /// Removes the pinned `hook` link of `ifname` an earlier run left (the
    /// interface's mode changed), now that the other hook runs there.
    fn drop_other_hook(&mut self, hook: pin::Hook, ifname: &str) -> Result<(), BalancerError> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        if !dir.join(pin::link_name(hook, ifname)).exists() {
            return Ok(());
        }
        pin::unpin(dir, hook, ifname)?;
        tracing::info!(
            interface = ifname,
            removed = hook.as_str(),
            "the interface's attach mode changed: removed the earlier run's link"
        );
        Ok(())
    }

    /// Checks that maps an earlier run pinned have the shape this program
    /// expects: a newer build with other sizes must not reuse them blindly.
    fn check_pinned(&self) -> Result<(), BalancerError> {
        let o = &self.opts;
        let checks: [(&str, u32, u32, u32); 5] = [
            (
                maps::SERVICES,
                size_of::<ServiceKey>() as u32,
                size_of::<ServiceValue>() as u32,
                o.max_services,
            ),
            (
                maps::BACKENDS,
                4,
                size_of::<Backend>() as u32,
                o.max_backends,
            ),
            (
                maps::CONNTRACK,
                size_of::<FlowKey>() as u32,
                size_of::<Flow>() as u32,
                o.conntrack_size,
            ),
            (
                maps::NAT_REV,
                size_of::<FlowKey>() as u32,
                size_of::<RevNat>() as u32,
                o.conntrack_size,
            ),
            (maps::CONFIG, 4, size_of::<Config>() as u32, 1),
        ];
        for (name, key, value, entries) in checks {
            let info = aya::maps::MapInfo::from_pin(self.pin_path(name))
                .map_err(|e| BalancerError::Pin(format!("{name}: {e}")))?;
            let got = (info.key_size(), info.value_size(), info.max_entries());
            if got != (key, value, entries) {
                return Err(BalancerError::Pin(format!(
                    "pinned map {name} has key/value/entries {got:?}, this build expects {:?}: \
                     run `headroom lb detach` to start afresh (drops all flows)",
                    (key, value, entries)
                )));
            }
        }
        Ok(())
    }

    fn pin_path(&self, name: &str) -> PathBuf {
        self.pin_dir.as_deref().unwrap_or(Path::new("")).join(name)
    }

    /// Rebuilds what userspace remembers (published services, backends,
    /// configuration epoch) from maps an earlier run left pinned.
    fn recover(&mut self) -> Result<(), BalancerError> {
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(map_err(maps::SERVICES))?;
            self.published.insert(k, v);
        }
        for id in 0..self.opts.max_backends {
            let b = self.backends.get(&id, 0).map_err(map_err(maps::BACKENDS))?;
            if b.flags & BACKEND_ACTIVE != 0 {
                self.backends_set.insert(id, b);
            }
        }
        let old = self.config_map.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        // Keep the epoch moving forward: hops cached by the old program may
        // be stale by now.
        self.config.epoch = old.epoch.wrapping_add(1).max(1);
        self.write_config()?;
        if !self.backends_set.is_empty() {
            self.write_nat_ports()?;
        }
        self.write_vip_ports(None)
    }

    /// The services currently published (recovered after a pinned restart).
    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceValue)> {
        self.published.iter()
    }

    /// The active backends (recovered after a pinned restart).
    pub fn backends(&self) -> impl Iterator<Item = (&u32, &Backend)> {
        self.backends_set.iter()
    }

    /// Where maps and links are pinned (`None` when loaded unpinned).
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The options the program was loaded with.
    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    /// The balancer program (attach it, or test-run it).
    pub fn program(&mut self) -> &mut Xdp {
        self.xdp(programs::BALANCER)
    }

    /// The TC program ([`TC_PROGRAM`]), loaded on first use: objects and
    /// hosts that only run XDP never load it. Fails with
    /// [`BalancerError::MissingProgram`] if the object has none.
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier, BalancerError> {
        let name = TC_PROGRAM;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(BalancerError::MissingProgram(name))?
            .try_into()
            .map_err(|source| BalancerError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| BalancerError::Program { name, source })?;
        }
        Ok(prog)
    }

    /// Runs one frame through the TC program like [`Self::run`] does
    /// through XDP; the action is a TC verdict ([`tc_act`]).
    pub fn run_tc(
        &mut self,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> Result<RunResult, BalancerError> {
        run_tc(self.tc_program()?, frame, ingress_ifindex)
    }

    /// The `XDP_PASS` program (for veth peers, and the benchmark floor).
    pub fn pass_program(&mut self) -> &mut Xdp {
        self.xdp(programs::PASS)
    }

    fn xdp(&mut self, name: &str) -> &mut Xdp {
        // Both programs were found and converted in `load`.
        match self.ebpf.program_mut(name).map(<&mut Xdp>::try_from) {
            Some(Ok(p)) => p,
            _ => unreachable!("program {name} was checked at load"),
        }
    }

    fn write_config(&mut self) -> Result<(), BalancerError> {
        self.config_map
            .set(0, self.config, 0)
            .map_err(map_err(maps::CONFIG))
    }

    /// Changes the UDP idle timeout at runtime.
    pub fn set_udp_idle_timeout(&mut self, t: Duration) -> Result<(), BalancerError> {
        self.config.udp_idle_timeout_ns = t.as_nanos() as u64;
        self.write_config()
    }

    /// Allows XDP_REDIRECT (through the devmap) to this interface.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<(), BalancerError> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| match e {
                aya::maps::xdp::XdpMapError::MapError(source) => BalancerError::Map {
                    name: maps::TX_PORTS,
                    source,
                },
                other => BalancerError::Map {
                    name: maps::TX_PORTS,
                    source: MapError::from(std::io::Error::other(other.to_string())),
                },
            })
    }

    /// Writes backend slot `id`. Cached next hops are dropped (the address
    /// may have changed) and the nat reply ports follow the active backends.
    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), BalancerError> {
        self.check("backend id", id, self.opts.max_backends)?;
        self.backends
            .set(id, backend, 0)
            .map_err(map_err(maps::BACKENDS))?;
        let old = self.backends_set.insert(id, backend);
        if old.and_then(nat_port) != nat_port(backend) {
            self.write_nat_ports()?;
        }
        self.refresh_next_hops()
    }

    /// Drops every cached next hop: the program asks the FIB again. Call it
    /// when routes or neighbours change (the daemon does, periodically).
    pub fn refresh_next_hops(&mut self) -> Result<(), BalancerError> {
        self.config.epoch = self.config.epoch.wrapping_add(1).max(1);
        self.write_config()
    }

    /// Source ports of active nat backends: only packets from them can be
    /// nat replies, so only they are looked up in `NAT_REV`.
    fn write_nat_ports(&mut self) -> Result<(), BalancerError> {
        let mut bits = [0u64; 1024];
        for port in self.backends_set.values().filter_map(|b| nat_port(*b)) {
            let port = usize::from(u16::from_be(port));
            bits[port >> 6] |= 1 << (port & 63);
        }
        self.nat_ports
            .set(0, bits, 0)
            .map_err(map_err(maps::NAT_PORTS))
    }

    /// The ports (host order) set in the kernel's `NAT_PORTS`: sources whose
    /// packets the program checks for a reverse-NAT entry.
    pub fn nat_ports(&self) -> Result<Vec<u16>, BalancerError> {
        let bits = self
            .nat_ports
            .get(&0, 0)
            .map_err(map_err(maps::NAT_PORTS))?;
        Ok(ports_of(&bits))
    }

    /// The ports (host order) set in the kernel's `VIP_PORTS`: destinations
    /// whose packets the program looks up as a service's.
    pub fn vip_ports(&self) -> Result<Vec<u16>, BalancerError> {
        let bits = self
            .vip_ports
            .get(&0, 0)
            .map_err(map_err(maps::VIP_PORTS))?;
        Ok(ports_of(&bits))
    }

    /// Ports of published services (and of `extra`, about to be): the
    /// program looks for a service, or a flow, only on packets to them.
    fn write_vip_ports(&mut self, extra: Option<&ServiceKey>) -> Result<(), BalancerError> {
        let mut bits = [0u64; 1024];
        for k in self.published.keys().chain(extra) {
            let port = usize::from(u16::from_be(k.port));
            bits[port >> 6] |= 1 << (port & 63);
        }
        self.vip_ports
            .set(0, bits, 0)
            .map_err(map_err(maps::VIP_PORTS))
    }

    /// Reads backend slot `id`.
    pub fn backend(&self, id: u32) -> Result<Backend, BalancerError> {
        self.backends.get(&id, 0).map_err(map_err(maps::BACKENDS))
    }

    fn check(&self, what: &'static str, value: u32, limit: u32) -> Result<(), BalancerError> {
        if value >= limit {
            return Err(BalancerError::OutOfRange {
                what,
                value: value.into(),
                limit: limit.into(),
            });
        }
        Ok(())
    }

    /// Publishes a new table for a service: `fill` writes the inactive buffer
    /// in place, then one map update flips the service to it. The program
    /// sees the old table or the new one, never a mix. If `fill` fails,
    /// nothing is flipped: the service keeps the table it has.
    pub fn publish_with<E: std::fmt::Display>(
        &mut self,
        key: ServiceKey,
        id: u32,
        mode: u8,
        table_size: u32,
        fill: impl FnOnce(&mut [u32]) -> Result<(), E>,
    ) -> Result<ServiceValue, BalancerError> {
        self.check("service id", id, self.opts.max_services)?;
        if table_size > self.opts.max_table_size {
            return Err(BalancerError::OutOfRange {
                what: "table size",
                value: table_size.into(),
                limit: self.opts.max_table_size.into(),
            });
        }
        let first = id * 2 * self.opts.max_table_size;
        let second = first + self.opts.max_table_size;
        let base = match self.published.get(&key) {
            Some(v) if v.id == id && v.table_base == first => second,
            _ => first,
        };
        fill(self.tables.region_mut(base, table_size as usize)?)
            .map_err(|e| BalancerError::Fill(e.to_string()))?;
        let value = ServiceValue {
            id,
            table_base: base,
            table_size,
            mode,
            flags: 0,
            _pad: [0; 2],
        };
        if !self.published.contains_key(&key) {
            // The program skips ports without a bit: set it before the
            // service appears (if the insert then fails, the extra bit only
            // costs a lookup).
            self.write_vip_ports(Some(&key))?;
        }
        self.services
            .insert(key, value, 0)
            .map_err(map_err(maps::SERVICES))?;
        self.published.insert(key, value);
        Ok(value)
    }

    /// Publishes a ready-made table (see [`Self::publish_with`]).
    pub fn publish(
        &mut self,
        key: ServiceKey,
        id: u32,
        mode: u8,
        table: &[u32],
    ) -> Result<ServiceValue, BalancerError> {
        let m = u32::try_from(table.len()).unwrap_or(u32::MAX);
        self.publish_with(key, id, mode, m, |buf| {
            buf.copy_from_slice(table);
            Ok::<(), std::convert::Infallible>(())
        })
    }

    /// The active table of a published service.
    pub fn active_table(&self, key: &ServiceKey) -> Option<&[u32]> {
        let v = self.published.get(key)?;
        self.tables.region(v.table_base, v.table_size as usize).ok()
    }

    /// Removes a service: its VIP is no longer balanced.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), BalancerError> {
        self.services.remove(key).map_err(map_err(maps::SERVICES))?;
        self.published.remove(key);
        self.write_vip_ports(None)
    }

    /// The connection table.
    pub fn conntrack(&mut self) -> &mut HashMap<MapData, FlowKey, Flow> {
        &mut self.conntrack
    }

    /// The reverse-NAT table.
    pub fn nat_rev(&mut self) -> &mut HashMap<MapData, FlowKey, RevNat> {
        &mut self.nat_rev
    }

    /// Global counters summed over CPUs, indexed by [`lb_common::counter`].
    pub fn global_counters(&self) -> Result<[u64; counter::COUNT as usize], BalancerError> {
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .global
                .get(&(i as u32), 0)
                .map_err(map_err(maps::GLOBAL_STATS))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// A service's counters summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters, BalancerError> {
        sum(&self.service_stats, id).map_err(map_err(maps::SERVICE_STATS))
    }

    /// A backend's counters summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters, BalancerError> {
        sum(&self.backend_stats, id).map_err(map_err(maps::BACKEND_STATS))
    }

    /// Runs one frame through the balancer (BPF_PROG_TEST_RUN), as if it
    /// arrived on `ingress_ifindex` of the calling thread's network namespace
    /// (0: the namespace's loopback).
    pub fn run(&mut self, frame: &[u8], ingress_ifindex: u32) -> Result<RunResult, BalancerError> {
        run_xdp(self.program(), programs::BALANCER, frame, ingress_ifindex)
    }
}

/// What [`detach`] removed.
#[derive(Debug, Default)]
pub struct Detached {
    /// Interfaces whose pinned XDP or TC link was removed (the balancer came
    /// off them).
    pub links: Vec<String>,
    /// Pinned maps removed.
    pub maps: Vec<String>,
}

/// Removes everything [`Balancer::load_pinned`] and [`Balancer::attach`]
/// pinned in `dir`: links first (XDP comes off the interfaces), then the
/// maps (the kernel frees them once no program holds them), then `dir`.
pub fn detach(dir: &Path) -> Result<Detached, BalancerError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| BalancerError::Pin(format!("reading {}: {e}", dir.display())))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    let link_of = |p: &Path| {
        p.file_name()
            .and_then(|n| pin::parse_link_name(&n.to_string_lossy()))
    };
    // Links (XDP "link-*", TC "tc-*") before maps.
    paths.sort_by_key(|p| link_of(p).is_none());
    let mut out = Detached::default();
    for p in paths {
        let link = link_of(&p);
        if link.is_some() {
            // Best effort: the unpin below frees the link anyway, only later.
            let _ = pin::detach_link(&p);
        }
        std::fs::remove_file(&p)
            .map_err(|e| BalancerError::Pin(format!("removing {}: {e}", p.display())))?;
        match link {
            Some((_, ifname)) => out.links.push(ifname),
            None => out.maps.push(
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        }
    }
    std::fs::remove_dir(dir)
        .map_err(|e| BalancerError::Pin(format!("removing {}: {e}", dir.display())))?;
    Ok(out)
}

/// The interfaces with a link pinned in `dir` (XDP `link-<ifname>` or TC
/// `tc-<ifname>`), each once, sorted.
pub fn pinned_links(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| pin::parse_link_name(&e.file_name().to_string_lossy()))
                .map(|(_, ifname)| ifname)
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// Removes the pinned links of `ifname` in `dir`, XDP and TC: the
/// balancer comes off the interface (unless another process holds a link
/// open). Fails if there was none.
pub fn unpin_link(dir: &Path, ifname: &str) -> Result<(), BalancerError> {
    let mut removed = false;
    for hook in [pin::Hook::Xdp, pin::Hook::Tc] {
        if dir.join(pin::link_name(hook, ifname)).exists() {
            pin::unpin(dir, hook, ifname)?;
            removed = true;
        }
    }
    if !removed {
        return Err(BalancerError::Pin(format!(
            "no link of {ifname} is pinned in {}",
            dir.display()
        )));
    }
    Ok(())
}

/// Whether `dir` (or, if it does not exist yet, its nearest existing
/// parent) is on a bpf filesystem. Errors if that cannot be told.
pub fn on_bpffs(dir: &Path) -> Result<bool, BalancerError> {
    pin::on_bpffs(dir)
}

/// Makes sure `dir` can hold pins: if it is not on a bpf filesystem, mounts
/// one on `mount_point` (as bpftool and systemd do for `/sys/fs/bpf`).
/// Returns whether it mounted. The error says how to mount it by hand.
pub fn ensure_bpffs(dir: &Path, mount_point: &Path) -> Result<bool, BalancerError> {
    if pin::on_bpffs(dir)? {
        return Ok(false);
    }
    if !dir.starts_with(mount_point) {
        return Err(BalancerError::Pin(format!(
            "{} is not on a bpf filesystem: mount one first (mount -t bpf bpf DIR)",
            dir.display()
        )));
    }
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes());
    let (Ok(target), Ok(fstype)) = (c(mount_point), std::ffi::CString::new("bpf")) else {
        return Err(BalancerError::Pin(format!(
            "{}: NUL in path",
            mount_point.display()
        )));
    };
    // SAFETY: all pointers are valid NUL-terminated strings for the call;
    // bpffs takes no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(BalancerError::Pin(format!(
            "{} is not on a bpf filesystem and mounting one on {} failed: {}; \
             mount it first: mount -t bpf bpf {}",
            dir.display(),
            mount_point.display(),
            std::io::Error::last_os_error(),
            mount_point.display()
        )));
    }
    Ok(true)
}

/// Pinning details.
mod pin {
    use std::path::Path;

    use lb_common::maps;

    use super::BalancerError;

    /// The maps that outlive the daemon (not the log ring buffer).
    pub const PINNED_MAPS: [&str; 13] = [
        maps::SERVICES,
        maps::BACKENDS,
        maps::TABLES,
        maps::CONNTRACK,
        maps::NAT_REV,
        maps::CONFIG,
        maps::GLOBAL_STATS,
        maps::SERVICE_STATS,
        maps::BACKEND_STATS,
        maps::TX_PORTS,
        maps::NEXTHOPS,
        maps::NAT_PORTS,
        maps::VIP_PORTS,
    ];

    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    /// `enum bpf_cmd` values (linux/bpf.h).
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_DETACH: libc::c_long = 34;
    /// `enum bpf_link_type`.
    const BPF_LINK_TYPE_XDP: u32 = 6;
    const BPF_LINK_TYPE_TCX: u32 = 11;

    /// The hook a pinned link attaches the balancer to.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Hook {
        /// An XDP link, pinned as `link-<ifname>`.
        Xdp,
        /// A tcx ingress link, pinned as `tc-<ifname>`.
        Tc,
    }

    impl Hook {
        /// The pin's file-name prefix.
        fn prefix(self) -> &'static str {
            match self {
                Hook::Xdp => "link-",
                Hook::Tc => "tc-",
            }
        }

        /// The name in logs.
        pub fn as_str(self) -> &'static str {
            match self {
                Hook::Xdp => "xdp",
                Hook::Tc => "tc",
            }
        }

        /// `enum bpf_link_type` of its links.
        fn link_type(self) -> u32 {
            match self {
                Hook::Xdp => BPF_LINK_TYPE_XDP,
                Hook::Tc => BPF_LINK_TYPE_TCX,
            }
        }
    }

    /// The file name of `ifname`'s `hook` link in a pin directory.
    pub fn link_name(hook: Hook, ifname: &str) -> String {
        format!("{}{ifname}", hook.prefix())
    }

    /// The hook and interface of a pinned link's file name; `None` for a map.
    pub fn parse_link_name(name: &str) -> Option<(Hook, String)> {
        [Hook::Xdp, Hook::Tc].into_iter().find_map(|h| {
            name.strip_prefix(h.prefix())
                .filter(|i| !i.is_empty())
                .map(|i| (h, i.to_string()))
        })
    }

    /// Removes `ifname`'s pinned `hook` link from `dir`, detaching it first.
    pub fn unpin(dir: &Path, hook: Hook, ifname: &str) -> Result<(), BalancerError> {
        let p = dir.join(link_name(hook, ifname));
        // Best effort: removing the pin frees the link anyway, only later.
        let _ = detach_link(&p);
        std::fs::remove_file(&p)
            .map_err(|e| BalancerError::Pin(format!("removing {}: {e}", p.display())))
    }

    /// The index of `ifname` in the calling thread's network namespace.
    pub fn ifindex_of(ifname: &str) -> Result<u32, BalancerError> {
        let c = std::ffi::CString::new(ifname)
            .map_err(|_| BalancerError::Pin(format!("{ifname:?}: NUL in interface name")))?;
        // SAFETY: `c` is a valid NUL-terminated string for the whole call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index == 0 {
            return Err(BalancerError::Pin(format!(
                "interface {ifname}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(index)
    }

    /// Opens the object pinned at `path` (`BPF_OBJ_GET`).
    fn open_pinned(path: &Path) -> Result<std::os::fd::OwnedFd, BalancerError> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| BalancerError::Pin(format!("{}: NUL in path", path.display())))?;
        // union bpf_attr, BPF_OBJ_GET part.
        #[repr(C)]
        struct ObjGet {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let get = ObjGet {
            pathname: c.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        // SAFETY: `get` and the string it points to outlive the call; the
        // kernel reads `size_of::<ObjGet>()` bytes of it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                &get as *const ObjGet,
                std::mem::size_of::<ObjGet>() as u32,
            )
        };
        if fd < 0 {
            return Err(last_err("opening", path));
        }
        // SAFETY: the kernel just returned this fd to us; it is ours to close.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn last_err(what: &str, path: &Path) -> BalancerError {
        BalancerError::Pin(format!(
            "{what} {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ))
    }

    /// Detaches the link pinned at `path` from its hook now
    /// (`BPF_LINK_DETACH`). Removing the pin alone frees the link, and so
    /// takes XDP off the interface, only when the kernel gets to it.
    pub fn detach_link(path: &Path) -> Result<(), BalancerError> {
        use std::os::fd::AsRawFd;
        let fd = open_pinned(path)?;
        let detach: u32 = fd.as_raw_fd() as u32;
        // SAFETY: the attr (link_fd only) outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_LINK_DETACH,
                &detach as *const u32,
                std::mem::size_of::<u32>() as u32,
            )
        };
        if rc < 0 {
            return Err(last_err("detaching", path));
        }
        Ok(())
    }

    /// The interface index of the `hook` link pinned at `path`: 0 once its
    /// interface is gone (the kernel then keeps a defunct link).
    pub fn link_ifindex(path: &Path, hook: Hook) -> Result<u32, BalancerError> {
        use std::os::fd::AsRawFd;
        let fd = open_pinned(path)?;
        // struct bpf_link_info: u32 type, id, prog_id, then a union
        // aligned to 8 whose `xdp.ifindex` and `tcx.ifindex` are both its
        // first u32 (word 4).
        #[repr(C, align(8))]
        struct LinkInfo([u32; 64]);
        let mut info = LinkInfo([0; 64]);
        #[repr(C)]
        struct InfoByFd {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = InfoByFd {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<LinkInfo>() as u32,
            info: &mut info as *mut LinkInfo as u64,
        };
        // SAFETY: `attr` and the buffer it points to outlive the call; the
        // kernel writes at most `info_len` bytes into the buffer and updates
        // `info_len` in `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &mut attr as *mut InfoByFd,
                std::mem::size_of::<InfoByFd>() as u32,
            )
        };
        if rc < 0 {
            return Err(last_err("reading link info of", path));
        }
        let link_type = info.0[0];
        if link_type != hook.link_type() {
            return Err(BalancerError::Pin(format!(
                "{}: not an {} link (type {link_type})",
                path.display(),
                hook.as_str()
            )));
        }
        Ok(info.0[4])
    }

    /// Pins only work on a bpffs: say so plainly instead of failing later.
    pub fn check_bpffs(dir: &Path) -> Result<(), BalancerError> {
        if on_bpffs(dir)? {
            return Ok(());
        }
        Err(BalancerError::Pin(format!(
            "{} is not on a bpf filesystem: mount one first (mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        )))
    }

    /// Whether the nearest existing ancestor of `dir` is on a bpffs.
    pub fn on_bpffs(dir: &Path) -> Result<bool, BalancerError> {
        // The directory may not exist yet: check the nearest existing parent.
        let existing = dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
            .map_err(|_| BalancerError::Pin(format!("{}: NUL in path", dir.display())))?;
        // SAFETY: statfs writes into the zeroed struct we pass.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(BalancerError::Pin(format!(
                "statfs {}: {}",
                existing.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(st.f_type as i64 == BPF_FS_MAGIC)
    }
}

/// Runs `frame` through an XDP program once; see [`Balancer::run`].
pub fn run_xdp(
    prog: &Xdp,
    name: &'static str,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<RunResult, BalancerError> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let md: [u32; 6] = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
    let md_bytes: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    if ingress_ifindex != 0 {
        opts.ctx_in = Some(&md_bytes);
    }
    let r = prog
        .test_run(opts)
        .map_err(|source| BalancerError::Program { name, source })?;
    out.truncate(r.data_size_out as usize);
    Ok(RunResult {
        action: r.return_value,
        frame: out,
        duration: r.duration,
    })
}

/// Runs `frame` through the TC program once (BPF_PROG_TEST_RUN); see
/// [`Balancer::run_tc`]. The action is a TC verdict ([`tc_act`]).
pub fn run_tc(
    prog: &SchedClassifier,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<RunResult, BalancerError> {
    let mut out = vec![0u8; frame.len() + 256];
    let ctx = skb_ctx(ingress_ifindex);
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    if ingress_ifindex != 0 {
        opts.ctx_in = Some(&ctx);
    }
    let r = prog
        .test_run(opts)
        .map_err(|source| BalancerError::Program {
            name: TC_PROGRAM,
            source,
        })?;
    out.truncate(r.data_size_out as usize);
    Ok(RunResult {
        action: r.return_value,
        frame: out,
        duration: r.duration,
    })
}

/// The head of a `struct __sk_buff` for BPF_PROG_TEST_RUN, up to and with
/// `tc_index` (the kernel zero-fills the rest). Only a few fields may be
/// non-zero in a test run's context (`convert___skb_to_skb`); `ifindex`
/// makes the skb's device that interface, so `bpf_fib_lookup` and
/// `ctx.ifindex()` see it, and `ingress_ifindex` is the skb's `skb_iif`, as
/// on a real TC ingress. 0 leaves the namespace's loopback as the device.
fn skb_ctx(ingress_ifindex: u32) -> Vec<u8> {
    // Word offsets in struct __sk_buff (linux/bpf.h).
    const INGRESS_IFINDEX: usize = 9;
    const IFINDEX: usize = 10;
    let mut words = [0u32; 12];
    words[INGRESS_IFINDEX] = ingress_ifindex;
    words[IFINDEX] = ingress_ifindex;
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

fn sum(map: &PerCpuArray<MapData, Counters>, id: u32) -> Result<Counters, MapError> {
    let per_cpu = map.get(&id, 0)?;
    Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
        new_flows: a.new_flows + c.new_flows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip() {
        assert_eq!(pin::link_name(pin::Hook::Xdp, "eth0"), "link-eth0");
        assert_eq!(pin::link_name(pin::Hook::Tc, "veth1"), "tc-veth1");
        for (hook, ifname) in [(pin::Hook::Xdp, "lb-c"), (pin::Hook::Tc, "tc-x")] {
            let parsed = pin::parse_link_name(&pin::link_name(hook, ifname));
            assert_eq!(parsed, Some((hook, ifname.to_string())));
        }
        // Maps, and prefixes with no interface, are not links.
        for name in [maps::SERVICES, maps::CONNTRACK, "link-", "tc-", "tcx-a"] {
            assert_eq!(pin::parse_link_name(name), None, "{name}");
        }
    }

    #[test]
    fn pinned_links_lists_both_hooks_once() {
        let dir = tempfile_dir();
        for f in ["link-a", "tc-b", "link-c", "tc-c", maps::SERVICES] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        assert_eq!(pinned_links(&dir), ["a", "b", "c"]);
        assert_eq!(pin::link_name(pin::Hook::Tc, "b"), "tc-b");
        assert_eq!(pin::link_name(pin::Hook::Xdp, "a"), "link-a");
        // Plain files: nothing to detach, but the pins go (both of c's).
        unpin_link(&dir, "c").unwrap();
        assert_eq!(pinned_links(&dir), ["a", "b"]);
        let e = unpin_link(&dir, "c").unwrap_err().to_string();
        assert!(e.contains("no link of c"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn skb_ctx_sets_only_the_device_fields() {
        let ctx = skb_ctx(7);
        assert_eq!(ctx.len(), 48);
        let words: Vec<u32> = ctx
            .chunks(4)
            .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        // ingress_ifindex (offset 36) and ifindex (offset 40), nothing else.
        let set: Vec<(usize, u32)> = words
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, w)| *w != 0)
            .collect();
        assert_eq!(set, [(9, 7), (10, 7)]);
    }

    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "headroom-loader-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
