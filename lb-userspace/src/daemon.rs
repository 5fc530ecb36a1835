//! `headroom lb run`: the control daemon. It loads the XDP program, attaches
//! it to the configured interfaces, publishes the static services' tables
//! once, and then, every `scoreboard.refresh_interval`, reads the scoreboard
//! of every scoreboard-driven service in one pipelined round trip, turns it
//! into weights ([`crate::weights`]) and publishes a new weighted Maglev
//! table for a service when (and only when) its weights really changed.
//!
//! # The refresh loop
//!
//! - Weights are updated only from successful reads ([`ServiceWeights::update`]
//!   is never called during an outage: the weights module turns the gap into
//!   a grace when reads resume).
//! - A held decision (no fresh instance) publishes nothing and retires
//!   nothing: the table stays exactly as it is, the backends too.
//! - On every other decision the backends are reconciled, in this order:
//!   1. table members get an id (see [`ids`]) and are written `ACTIVE`
//!      (before any table points at them);
//!   2. the table is published if the decision says `rebuild` (or a previous
//!      publication failed): built in place into the inactive buffer, one
//!      atomic flip;
//!   3. draining instances that have an id are written `ACTIVE | DRAINING`
//!      (absent from the new table, their flows continue);
//!   4. ids of the service whose address is neither in the table nor
//!      draining, and not in the table the kernel holds, are retired: flags
//!      0 (their flows re-select), id quarantined before reuse.
//!
//!   Backend entries are written only when they change.
//! - Redis unreachable, slow or refusing: the tables and backends stay as
//!   they are, a warning is logged when the state changes (not every tick),
//!   the reader reconnects with backoff, and the next successful read
//!   resumes everything.
//! - Every second the cached next hops are invalidated
//!   ([`Balancer::refresh_next_hops`]), so route and neighbour changes reach
//!   the data path within a second.
//!
//! # Lifetime and restarts
//!
//! Maps and XDP links are pinned in `<pin root>/<name>/` (default
//! `/sys/fs/bpf/headroom/<name>/`; a bpffs is mounted on `/sys/fs/bpf` if
//! none is). A start on existing pins takes their state over ([`recover`]):
//! connection tables, tables, backend ids and service ids keep their
//! meaning, and the new program replaces the old one on each pinned link
//! atomically ([`attach::attach_or_reuse`]), so established flows survive a
//! restart or an upgrade. [`run`] runs until SIGINT or SIGTERM and then
//! exits leaving XDP attached and everything pinned: forwarding continues
//! with the last tables while no daemon runs. `headroom lb detach`
//! ([`attach::detach_pinned`]) removes it all. [`Daemon::start`] runs the
//! same daemon on a thread of its own (for tests and embedding) and returns
//! a [`DaemonHandle`] with its [`Status`].

pub mod attach;
pub mod ids;
pub mod recover;
pub mod status;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, ensure, Context, Result};
use lb_common::{Backend, ServiceKey, BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_DSR};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    config::{self, addr_words, family, Config},
    loader,
    maglev::{self, MaglevBackend},
    scoreboard::{ReaderOptions, ScoreboardError, ScoreboardReader, ServiceSnapshot},
    weights::ServiceWeights,
    Balancer,
};
use attach::Attachment;
use ids::BackendIds;
pub use status::{BackendStatus, RedisState, ServiceStatus, Status, StatusHandle};

/// How often cached next hops are invalidated.
pub const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);

/// Command-line options of `headroom lb run` (not in the config file).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Attach even to an interface that carries the default route.
    pub force: bool,
    /// Root of the pin directories (`None`: [`config::PIN_ROOT`]). Only under
    /// the default root is a bpffs mounted when missing; another root must
    /// already be on one (tests use a private mount).
    pub pin_root: Option<PathBuf>,
}

impl RunOptions {
    /// The directory `config`'s balancer pins in with these options.
    pub fn pin_dir(&self, config: &Config) -> PathBuf {
        match &self.pin_root {
            Some(root) => config.pin_dir_in(root),
            None => config.pin_dir(),
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM, then stops, leaving XDP
/// attached and the maps pinned.
pub async fn run(config: Config, opts: RunOptions) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed first: a signal during the setup must not kill us half-way.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let daemon = Daemon::new(config, &opts)?;
    daemon
        .run_until(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: stopping"),
                _ = int.recv() => info!("SIGINT: stopping"),
            }
        })
        .await
}

/// One table member as published.
#[derive(Clone, Debug)]
struct Member {
    /// Maglev key: the instance id (scoreboard) or the address (static).
    key: String,
    addr: SocketAddr,
    id: u32,
    weight: u32,
    target: u32,
}

enum Source {
    Static,
    Scoreboard {
        name: String,
        weights: ServiceWeights,
    },
}

/// A service at run time.
struct Svc {
    name: String,
    group: String,
    id: u32,
    key: ServiceKey,
    mode: config::Mode,
    vip: IpAddr,
    port: u16,
    table_size: u32,
    source: Source,
    /// Backend id per backend address.
    ids: BTreeMap<SocketAddr, u32>,
    /// Addresses in `ids` adopted from pinned maps, as the kernel holds
    /// them (dsr: with the VIP's port, the instance's port is not stored).
    recovered: BTreeSet<SocketAddr>,
    /// The table the kernel holds.
    published: Vec<Member>,
    generation: u64,
    last_publish: Option<Duration>,
    held: bool,
    malformed: Option<String>,
    pending: bool,
    skipped: usize,
    draining: Vec<BackendStatus>,
    /// Instances already warned about (address of the wrong family).
    warned_family: BTreeSet<String>,
    /// Its backends have been reconciled once since the start (static:
    /// published; scoreboard: a read that was not held), so it has claimed
    /// every orphan that is its own.
    reconciled: bool,
}

impl Svc {
    fn backend(&self, addr: SocketAddr, flags: u8) -> Backend {
        // dsr: backends receive the VIP's port.
        let (port, flags) = match self.mode {
            config::Mode::Nat => (addr.port(), flags),
            config::Mode::Dsr => (self.port, flags | BACKEND_DSR),
        };
        Backend {
            addr: addr_words(addr.ip()),
            port: port.to_be(),
            family: family(addr.ip()),
            flags,
        }
    }

    fn status(&self) -> ServiceStatus {
        ServiceStatus {
            name: self.name.clone(),
            group: self.group.clone(),
            id: self.id,
            scoreboard: match &self.source {
                Source::Static => None,
                Source::Scoreboard { name, .. } => Some(name.clone()),
            },
            generation: self.generation,
            held: self.held,
            malformed: self.malformed.clone(),
            publish_pending: self.pending,
            skipped_entries: self.skipped,
            table: self
                .published
                .iter()
                .map(|m| BackendStatus {
                    instance: m.key.clone(),
                    addr: m.addr,
                    id: Some(m.id),
                    weight: m.weight,
                    target: m.target,
                })
                .collect(),
            draining: self.draining.clone(),
            last_publish: self.last_publish,
        }
    }
}

/// The loaded, attached daemon, before or while it runs.
pub struct Daemon {
    config: Config,
    lb: Balancer,
    attachment: Option<Attachment>,
    /// Where maps and links are pinned.
    pin_dir: PathBuf,
    svcs: Vec<Svc>,
    ids: BackendIds,
    /// What each backend id holds, as written (to write only changes).
    written: HashMap<u32, Backend>,
    /// Pinned active backends in no table at restart, by id, until the
    /// service whose backend they are claims them ([`recover`]).
    orphans: BTreeMap<u32, Backend>,
    reader: Option<ScoreboardReader>,
    /// Scoreboard names read every refresh (unique, sorted).
    sb_names: Vec<String>,
    redis: RedisState,
    /// Kind of the last read error (to warn once per change).
    last_error_class: Option<std::mem::Discriminant<ScoreboardError>>,
    reads_ok: u64,
    reads_failed: u64,
    refreshes: u64,
    last_refresh: Option<Duration>,
    status: StatusHandle,
    /// The admin endpoint's socket, bound at start, served by `run_until`.
    admin_listener: Option<std::net::TcpListener>,
}

impl Daemon {
    /// Loads the program with the config's sizes on the maps pinned in
    /// [`RunOptions::pin_dir`] (mounting a bpffs on `/sys/fs/bpf` if the
    /// default root is not on one), attaches it (see
    /// [`attach::attach_or_reuse`]; in the calling thread's network
    /// namespace), takes over what an earlier run pinned ([`recover`]) and
    /// publishes the static services. Nothing is read from Redis yet.
    pub fn new(config: Config, opts: &RunOptions) -> Result<Self> {
        let span = info_span!("lb", name = %config.name);
        let _e = span.enter();
        let policy = config.policy();
        policy
            .validate()
            .map_err(|e| anyhow!("weights.{e}"))
            .context("invalid weight policy")?;
        // Before the kernel is touched: a taken port must not leave XDP behind.
        let admin_listener = crate::admin::bind(config.metrics_listen)?;
        let pin_dir = opts.pin_dir(&config);
        if loader::ensure_bpffs(&pin_dir, Path::new(config::BPFFS_MOUNT))? {
            info!(
                mount = config::BPFFS_MOUNT,
                "no bpf filesystem was mounted: mounted one (as bpftool and systemd do) for the pins"
            );
        }
        let restart = pin_dir.join(lb_common::maps::SERVICES).exists();
        let mut lb = Balancer::load_pinned(&config.load_options(), &pin_dir)
            .context("loading the XDP program (is the object built? `cargo xtask build-ebpf`)")?;
        let pinned: HashMap<ServiceKey, lb_common::ServiceValue> =
            lb.services().map(|(k, v)| (*k, *v)).collect();
        if restart {
            info!(dir = %pin_dir.display(), services = pinned.len(), backends = lb.backends().count(), "pinned state found: taking it over");
        } else {
            info!(dir = %pin_dir.display(), "pinning maps and links");
        }
        let attachment = attach::attach_or_reuse(&mut lb, &config, opts.force)?;
        let keys: Vec<ServiceKey> = config.services().map(|(_, s)| s.key()).collect();
        let service_ids = recover::service_ids(&keys, &pinned, config.datapath.max_services);
        let mut svcs = Vec::new();
        for ((group, s), id) in config.services().zip(service_ids) {
            let id = id.with_context(|| {
                format!(
                    "service {}: no free service id (datapath.max_services = {})",
                    s.name, config.datapath.max_services
                )
            })?;
            let source = if s.is_static() {
                Source::Static
            } else {
                Source::Scoreboard {
                    name: s.scoreboard_name().to_string(),
                    weights: ServiceWeights::new(policy),
                }
            };
            svcs.push(Svc {
                name: s.name.clone(),
                group: group.name.clone(),
                id,
                key: s.key(),
                mode: s.mode,
                vip: s.vip,
                port: s.port,
                table_size: s.table_size,
                source,
                ids: BTreeMap::new(),
                recovered: BTreeSet::new(),
                published: Vec::new(),
                generation: 0,
                last_publish: None,
                held: false,
                malformed: None,
                pending: false,
                skipped: 0,
                draining: Vec::new(),
                warned_family: BTreeSet::new(),
                reconciled: false,
            });
        }
        let sb_names: Vec<String> = svcs
            .iter()
            .filter_map(|s| match &s.source {
                Source::Scoreboard { name, .. } => Some(name.clone()),
                Source::Static => None,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let reader = if sb_names.is_empty() {
            None
        } else {
            Some(
                ScoreboardReader::new(
                    config.scoreboard.redis_url.as_str(),
                    ReaderOptions::default(),
                )
                .context("scoreboard.redis_url")?,
            )
        };
        let ids = BackendIds::new(
            config.datapath.max_backends,
            ids::quarantine_for(config.scoreboard.ttl),
        );
        let mut d = Daemon {
            admin_listener: Some(admin_listener),
            config,
            lb,
            attachment: Some(attachment),
            pin_dir,
            svcs,
            ids,
            written: HashMap::new(),
            orphans: BTreeMap::new(),
            reader,
            sb_names,
            redis: RedisState::Unknown,
            last_error_class: None,
            reads_ok: 0,
            reads_failed: 0,
            refreshes: 0,
            last_refresh: None,
            status: StatusHandle::default(),
        };
        let r = d
            .recover(&pinned, Instant::now())
            .context("taking over the pinned state")?;
        if restart {
            info!(
                services = r.services,
                removed = r.removed,
                backends = r.backends,
                orphans = r.orphans,
                quarantined = r.quarantined,
                "pinned state taken over: established flows keep their backends"
            );
        }
        d.publish_static()?;
        d.retire_orphans(Instant::now());
        d.update_status();
        Ok(d)
    }

    /// A shared view of the status, updated after every refresh.
    pub fn status_handle(&self) -> StatusHandle {
        self.status.clone()
    }

    /// The balancer (maps, counters).
    pub fn balancer(&mut self) -> &mut Balancer {
        &mut self.lb
    }

    /// Runs the refresh loop until `shutdown` completes, then detaches.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let span = info_span!("lb", name = %self.config.name);
        async move {
            let mut refresh = tokio::time::interval(self.config.scoreboard.refresh_interval);
            refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut hops = tokio::time::interval(NEXT_HOP_REFRESH);
            hops.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut hops_failing = false;
            tokio::pin!(shutdown);
            // The admin endpoint (/metrics, /status, /trace); traces come
            // back here, where the balancer is.
            let (trace_tx, mut traces) = tokio::sync::mpsc::channel(crate::admin::TRACE_QUEUE);
            let listener = self
                .admin_listener
                .take()
                .context("run_until called twice")?;
            let admin = match crate::admin::spawn(listener, self.status.clone(), trace_tx) {
                Ok(a) => a,
                Err(e) => {
                    self.stop();
                    return Err(anyhow!(
                        "metrics_listen {}: {e}",
                        self.config.metrics_listen
                    ));
                }
            };
            info!(
                services = self.svcs.len(),
                scoreboard_services = self.sb_names.len(),
                refresh = ?self.config.scoreboard.refresh_interval,
                "running"
            );
            loop {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    _ = refresh.tick() => {
                        self.refresh().await;
                        // The XDP program's records (only with a datapath
                        // log_level): to the daemon's log, once per tick.
                        self.lb.flush_logs();
                    }
                    _ = hops.tick() => match self.refresh_hops() {
                        Ok(()) if hops_failing => {
                            hops_failing = false;
                            info!("refreshing next hops works again");
                        }
                        Ok(()) => {}
                        Err(e) if !hops_failing => {
                            hops_failing = true;
                            warn!("refreshing next hops: {e}");
                        }
                        Err(_) => {}
                    },
                    Some(job) = traces.recv() => self.answer_trace(job),
                }
            }
            drop(admin);
            self.stop();
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Invalidates the cached next hops; updates the status (counters) too,
    /// for daemons without scoreboard services.
    fn refresh_hops(&mut self) -> Result<(), crate::BalancerError> {
        if self.reader.is_none() {
            self.update_status();
        }
        self.lb.refresh_next_hops()
    }

    /// Stops without detaching: the links and maps stay pinned, so the
    /// interfaces keep forwarding with the last tables until a daemon takes
    /// over again or `headroom lb detach` removes them.
    fn stop(&mut self) {
        if let Some(a) = self.attachment.take() {
            let ifaces: Vec<&str> = a.interfaces.iter().map(|i| i.ifname.as_str()).collect();
            info!(
                interfaces = %ifaces.join(","),
                pins = %self.pin_dir.display(),
                "stopped; the balancer stays attached and the maps stay pinned: forwarding continues \
                 with the last tables (`headroom lb detach` removes them)"
            );
        }
    }

    fn publish_static(&mut self) -> Result<()> {
        let now = Instant::now();
        let Daemon {
            config,
            lb,
            svcs,
            ids,
            written,
            orphans,
            ..
        } = self;
        for (svc, (_, s)) in svcs.iter_mut().zip(config.services()) {
            if !matches!(svc.source, Source::Static) {
                continue;
            }
            let mut members = Vec::new();
            for b in &s.backends {
                let addr = SocketAddr::new(b.address.ip, b.address.port.unwrap_or(s.port));
                let id = backend_id(svc, ids, orphans, addr, now)
                    .with_context(|| format!("service {}: no free backend id", svc.name))?;
                write_backend(lb, written, id, svc.backend(addr, BACKEND_ACTIVE))?;
                members.push(Member {
                    key: b.address.to_string(),
                    addr,
                    id,
                    weight: b.weight,
                    target: b.weight,
                });
            }
            let took = publish(lb, svc, members)
                .with_context(|| format!("publishing static service {}", svc.name))?;
            svc.reconciled = true;
            info!(service = %svc.name, backends = s.backends.len(), ?took, "published static table");
            // Backends an earlier run had (adopted from the pins) that the
            // config no longer lists: retired like any gone backend.
            let keep: BTreeSet<u32> = svc.published.iter().map(|m| m.id).collect();
            let gone: Vec<(SocketAddr, u32)> = svc
                .ids
                .iter()
                .filter(|(_, id)| !keep.contains(id))
                .map(|(a, id)| (*a, *id))
                .collect();
            for (addr, id) in gone {
                write_backend(lb, written, id, svc.backend(addr, 0))
                    .with_context(|| format!("retiring backend {id} of {}", svc.name))?;
                svc.ids.remove(&addr);
                svc.recovered.remove(&addr);
                ids.retire(id, now);
                info!(service = %svc.name, %addr, id, "static backend no longer configured: retired");
            }
        }
        Ok(())
    }

    /// One refresh: read, update weights, publish what changed.
    async fn refresh(&mut self) {
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        let started = Instant::now();
        let read = reader.read(&self.sb_names).await;
        match read {
            Err(e) => {
                self.reads_failed += 1;
                self.read_failed(&e);
            }
            Ok(snap) => {
                self.reads_ok += 1;
                if let RedisState::Down { since, .. } = &self.redis {
                    let down = SystemTime::now().duration_since(*since).unwrap_or_default();
                    info!(
                        outage = ?down,
                        "scoreboard readable again: following it again"
                    );
                }
                self.redis = RedisState::Up;
                self.last_error_class = None;
                let now_ms = now_ms();
                let now = Instant::now();
                for i in 0..self.svcs.len() {
                    let Source::Scoreboard { name, .. } = &self.svcs[i].source else {
                        continue;
                    };
                    match snap.services.get(name.as_str()) {
                        Some(Ok(s)) => {
                            if let Some(m) = self.svcs[i].malformed.take() {
                                info!(service = %self.svcs[i].name, "scoreboard data usable again (was: {m})");
                            }
                            self.apply(i, s, now_ms, now);
                        }
                        Some(Err(m)) => {
                            let msg = format!("{}: {}", m.key, m.detail);
                            let svc = &mut self.svcs[i];
                            if svc.malformed.as_ref() != Some(&msg) {
                                warn!(service = %svc.name, "scoreboard data unusable, keeping the last table: {msg}");
                            }
                            svc.malformed = Some(msg);
                        }
                        None => {
                            // The reader answers every name asked for.
                            warn!(service = %self.svcs[i].name, "service missing from the scoreboard read");
                        }
                    }
                }
                self.retire_orphans(now);
            }
        }
        self.refreshes += 1;
        self.last_refresh = Some(started.elapsed());
        self.update_status();
    }

    /// Retires the orphans no service claimed although every service that
    /// could own them (same family; dsr: the VIP's port) has been
    /// reconciled: flags 0 (their flows re-select), ids quarantined. An
    /// orphan a held service could own waits, as that service's draining
    /// backends do.
    fn retire_orphans(&mut self, now: Instant) {
        let svcs = &self.svcs;
        let settled = |b: &Backend| {
            svcs.iter()
                .filter(|s| {
                    family(s.vip) == b.family
                        && (s.mode == config::Mode::Nat || s.port.to_be() == b.port)
                })
                .all(|s| s.reconciled)
        };
        let (done, waiting): (BTreeMap<u32, Backend>, BTreeMap<u32, Backend>) =
            std::mem::take(&mut self.orphans)
                .into_iter()
                .partition(|(_, b)| settled(b));
        self.orphans = waiting;
        for (id, b) in done {
            let gone = Backend { flags: 0, ..b };
            match write_backend(&mut self.lb, &mut self.written, id, gone) {
                Ok(()) => {
                    self.ids.retire(id, now);
                    info!(id, addr = ?recover::backend_socket(&b), "pinned backend no service claimed: retired");
                }
                Err(e) => {
                    warn!(id, "retiring unclaimed backend {id}: {e:#}");
                    self.orphans.insert(id, b);
                }
            }
        }
    }

    fn read_failed(&mut self, e: &ScoreboardError) {
        let class = std::mem::discriminant(e);
        match &mut self.redis {
            RedisState::Down { error, .. } => {
                // Warn again only when the kind of failure changes.
                if self.last_error_class != Some(class) {
                    warn!("scoreboard still unreadable, now: {e}; forwarding with the last tables");
                }
                *error = e.to_string();
            }
            _ => {
                warn!("scoreboard unreadable: {e}; forwarding with the last tables, retrying with backoff");
                self.redis = RedisState::Down {
                    since: SystemTime::now(),
                    error: e.to_string(),
                };
            }
        }
        self.last_error_class = Some(class);
    }
}

impl Daemon {
    /// Folds one successful read of service `i` into its weights and
    /// reconciles its backends and table (see the module docs for the order).
    fn apply(&mut self, i: usize, snap: &ServiceSnapshot, now_ms: i64, now: Instant) {
        let Daemon {
            lb,
            svcs,
            ids,
            written,
            orphans,
            ..
        } = self;
        let svc = &mut svcs[i];
        let snap = same_family(svc, snap);
        svc.skipped = snap.skipped_count();
        let Source::Scoreboard { weights, .. } = &mut svc.source else {
            return;
        };
        let d = weights.update(&snap, now_ms);
        if d.held {
            if !svc.held {
                warn!(
                    service = %svc.name,
                    "no instance has reported within the TTL: holding the table as published"
                );
            }
            svc.held = true;
            return;
        }
        if svc.held {
            info!(service = %svc.name, "fresh reports again: the table follows the scoreboard again");
            svc.held = false;
        }

        // 1. Ids for the table, written active before any table points at them.
        let mut members = Vec::with_capacity(d.weights.len());
        let mut missing_id = None;
        for w in &d.weights {
            match backend_id(svc, ids, orphans, w.addr.socket, now) {
                Some(id) => {
                    if let Err(e) =
                        write_backend(lb, written, id, svc.backend(w.addr.socket, BACKEND_ACTIVE))
                    {
                        warn!(service = %svc.name, instance = %w.instance, "writing backend {id}: {e:#}");
                    }
                    members.push(Member {
                        key: w.instance.clone(),
                        addr: w.addr.socket,
                        id,
                        weight: w.weight,
                        target: w.target,
                    });
                }
                None => missing_id = Some(w.instance.clone()),
            }
        }

        // 2. The table.
        if d.rebuild || svc.pending {
            let result = match &missing_id {
                Some(inst) => Err(anyhow!(
                    "no free backend id for instance {inst} (all {} in use or quarantined)",
                    self.config.datapath.max_backends
                )),
                None => publish(lb, svc, members),
            };
            match result {
                Ok(took) => {
                    if svc.pending {
                        info!(service = %svc.name, "publishing works again");
                    }
                    svc.pending = false;
                    info!(
                        service = %svc.name,
                        generation = svc.generation,
                        reason = ?d.reason,
                        ?took,
                        weights = %weights_summary(&svc.published),
                        draining = d.draining.len(),
                        "published table"
                    );
                }
                Err(e) => {
                    if !svc.pending {
                        warn!(service = %svc.name, "publishing the table failed, keeping the last one (retrying every refresh): {e:#}");
                    }
                    svc.pending = true;
                }
            }
        } else if !svc.published.is_empty() {
            // Targets move within the dead-band without a rebuild.
            for m in &mut svc.published {
                if let Some(w) = d.weights.iter().find(|w| w.instance == m.key) {
                    m.target = w.target;
                }
            }
        }

        // 3. Draining instances keep their entries, flagged.
        let in_kernel: BTreeSet<u32> = svc.published.iter().map(|m| m.id).collect();
        let mut live: BTreeSet<SocketAddr> = d.weights.iter().map(|w| w.addr.socket).collect();
        svc.draining.clear();
        for dr in &d.draining {
            let id = existing_id(svc, orphans, dr.addr.socket);
            if let Some(id) = id {
                if !live.contains(&dr.addr.socket) && !in_kernel.contains(&id) {
                    let b = svc.backend(dr.addr.socket, BACKEND_ACTIVE | BACKEND_DRAINING);
                    if let Err(e) = write_backend(lb, written, id, b) {
                        warn!(service = %svc.name, instance = %dr.instance, "writing backend {id}: {e:#}");
                    }
                }
            }
            svc.draining.push(BackendStatus {
                instance: dr.instance.clone(),
                addr: dr.addr.socket,
                id,
                weight: 0,
                target: 0,
            });
        }
        live.extend(d.draining.iter().map(|dr| dr.addr.socket));
        svc.reconciled = true;

        // 4. Retire what is gone (never what the kernel's table still holds).
        let gone: Vec<(SocketAddr, u32)> = svc
            .ids
            .iter()
            .filter(|(a, id)| !live.contains(a) && !in_kernel.contains(id))
            .map(|(a, id)| (*a, *id))
            .collect();
        for (addr, id) in gone {
            match write_backend(lb, written, id, svc.backend(addr, 0)) {
                Ok(()) => {
                    svc.ids.remove(&addr);
                    svc.recovered.remove(&addr);
                    ids.retire(id, now);
                    info!(service = %svc.name, %addr, id, "backend retired");
                }
                Err(e) => warn!(service = %svc.name, %addr, "retiring backend {id}: {e:#}"),
            }
        }
    }

    fn update_status(&self) {
        self.status.set_observing(Status {
            redis: self.redis.clone(),
            reads_ok: self.reads_ok,
            reads_failed: self.reads_failed,
            refreshes: self.refreshes,
            last_refresh: self.last_refresh,
            ids_quarantined: self.ids.quarantined(),
            ids_free: self.ids.never_used(),
            global: self
                .lb
                .global_counters()
                .map(|c| c.to_vec())
                .unwrap_or_default(),
            services: self.svcs.iter().map(Svc::status).collect(),
            details: self.svcs.iter().map(|s| self.detail(s)).collect(),
            refresh_latency: status::Histogram::default(),
            taken_ms: now_ms(),
        });
    }
}

/// `snap` without addresses of the other family than the VIP's (such an
/// instance is treated as unregistered, and warned about once).
fn same_family<'a>(
    svc: &mut Svc,
    snap: &'a ServiceSnapshot,
) -> std::borrow::Cow<'a, ServiceSnapshot> {
    let v4 = svc.vip.is_ipv4();
    let wrong = |a: &Option<crate::scoreboard::Address>| {
        a.as_ref().is_some_and(|a| a.socket.is_ipv4() != v4)
    };
    if !snap.instances.values().any(|e| wrong(&e.addr)) {
        return std::borrow::Cow::Borrowed(snap);
    }
    let mut s = snap.clone();
    for (id, e) in s.instances.iter_mut() {
        if wrong(&e.addr) {
            if svc.warned_family.insert(id.clone()) {
                warn!(service = %svc.name, instance = %id, vip = %svc.vip, "instance address is of another family than the VIP: ignored");
            }
            e.addr = None;
        }
    }
    std::borrow::Cow::Owned(s)
}

/// The orphan holding exactly the entry `svc` would write for `addr`,
/// which becomes `svc`'s backend for `addr`.
fn claim_orphan(
    svc: &mut Svc,
    orphans: &mut BTreeMap<u32, Backend>,
    addr: SocketAddr,
) -> Option<u32> {
    let want = svc.backend(addr, 0);
    let id = orphans
        .iter()
        .find(|(_, b)| b.addr == want.addr && b.port == want.port && b.family == want.family)
        .map(|(&id, _)| id)?;
    orphans.remove(&id);
    svc.ids.insert(addr, id);
    info!(service = %svc.name, %addr, id, "pinned backend claimed");
    Some(id)
}

/// The id `svc` already has for `addr`: its own, one adopted from the
/// pinned table (dsr: stored under the VIP's port, not the instance's), or
/// a claimed orphan.
fn existing_id(
    svc: &mut Svc,
    orphans: &mut BTreeMap<u32, Backend>,
    addr: SocketAddr,
) -> Option<u32> {
    if let Some(&id) = svc.ids.get(&addr) {
        return Some(id);
    }
    let as_pinned = SocketAddr::new(addr.ip(), svc.port);
    if svc.mode == config::Mode::Dsr && svc.recovered.remove(&as_pinned) {
        if let Some(id) = svc.ids.remove(&as_pinned) {
            svc.ids.insert(addr, id);
            return Some(id);
        }
    }
    claim_orphan(svc, orphans, addr)
}

/// The id of `addr` in `svc`: an existing one ([`existing_id`]), else a new one.
fn backend_id(
    svc: &mut Svc,
    ids: &mut BackendIds,
    orphans: &mut BTreeMap<u32, Backend>,
    addr: SocketAddr,
    now: Instant,
) -> Option<u32> {
    if let Some(id) = existing_id(svc, orphans, addr) {
        return Some(id);
    }
    let id = ids.allocate(now)?;
    svc.ids.insert(addr, id);
    debug!(service = %svc.name, %addr, id, "backend id allocated");
    Some(id)
}

/// Writes backend `id` unless it already holds `b`.
fn write_backend(
    lb: &mut Balancer,
    written: &mut HashMap<u32, Backend>,
    id: u32,
    b: Backend,
) -> Result<()> {
    if written.get(&id) == Some(&b) {
        return Ok(());
    }
    lb.set_backend(id, b)?;
    written.insert(id, b);
    Ok(())
}

/// Builds `members`' table into the service's inactive buffer and flips to
/// it. Returns the build + swap time.
fn publish(lb: &mut Balancer, svc: &mut Svc, members: Vec<Member>) -> Result<Duration> {
    let started = std::time::Instant::now();
    ensure!(!members.is_empty(), "refusing to publish an empty table");
    let n = members.iter().filter(|m| m.weight > 0).count();
    ensure!(
        n <= svc.table_size as usize,
        "{n} backends do not fit in a table of {} slots (raise table_size)",
        svc.table_size
    );
    let new: Vec<MaglevBackend> = members
        .iter()
        .map(|m| MaglevBackend::new(m.key.as_str(), m.id, m.weight))
        .collect();
    // A failed build flips nothing: the service keeps its table.
    lb.publish_with(svc.key, svc.id, svc.mode.code(), svc.table_size, |buf| {
        maglev::build_into(&new, buf)
    })
    .context("publishing the table")?;
    svc.published = members;
    svc.generation += 1;
    let took = started.elapsed();
    svc.last_publish = Some(took);
    Ok(took)
}

fn weights_summary(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("{}={}", m.key, m.weight))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Milliseconds since the Unix epoch, the clock the scoreboard uses.
/// Wall-clock time in ms since the Unix epoch (the scoreboard's clock).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A daemon running on a thread of its own (see [`Daemon::start`]). Dropping
/// the handle stops the daemon and waits for it (it does not detach: see
/// [`attach::detach_pinned`]).
pub struct DaemonHandle {
    status: StatusHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Daemon {
    /// Starts the daemon on a new thread with its own single-threaded tokio
    /// runtime, and returns once it is loaded, attached and its static tables
    /// are published (or with the error that stopped it). The thread starts
    /// in the calling thread's network namespace, so a caller that entered a
    /// namespace gets a daemon that lives there: attached to its interfaces,
    /// talking to Redis through its loopback.
    pub fn start(config: Config, opts: RunOptions) -> Result<DaemonHandle> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<StatusHandle>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("headroom-lb".into())
            .spawn(move || -> Result<()> {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("building the runtime: {e}")));
                        return Ok(());
                    }
                };
                // Inside the runtime: the reader and intervals need it.
                let daemon = match rt.block_on(async { Daemon::new(config, &opts) }) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(daemon.status_handle()));
                rt.block_on(daemon.run_until(async move {
                    // A dropped sender stops the daemon too.
                    let _ = stop_rx.await;
                }))
            })
            .context("spawning the daemon thread")?;
        match ready_rx.recv() {
            Ok(Ok(status)) => Ok(DaemonHandle {
                status,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => match thread.join() {
                Ok(r) => r.and(Err(anyhow!("the daemon thread ended during setup"))),
                Err(_) => Err(anyhow!("the daemon thread panicked during setup")),
            },
        }
    }
}

impl DaemonHandle {
    /// The daemon's current status.
    pub fn status(&self) -> Status {
        self.status.get()
    }

    /// A shared view of the status.
    pub fn status_handle(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Stops the daemon (the balancer stays attached, the maps pinned) and waits for
    /// its thread.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the daemon thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            eprintln!("stopping the daemon: {e:#}");
        }
    }
}

// ---------------------------------------------------------------- observability

impl Daemon {
    /// Counters, loads and slot counts of `svc` for the status snapshot.
    fn detail(&self, svc: &Svc) -> status::ServiceDetail {
        let mut slots: HashMap<u32, u64> = HashMap::new();
        let table = self.lb.active_table(&svc.key);
        for &id in table.unwrap_or_default() {
            *slots.entry(id).or_default() += 1;
        }
        let weights = match &svc.source {
            Source::Scoreboard { weights, .. } => Some(weights),
            Source::Static => None,
        };
        let backend = |instance: &str, id: Option<u32>, draining: bool| {
            let st = weights.and_then(|w| w.state(instance));
            status::BackendDetail {
                instance: instance.to_string(),
                id,
                draining,
                load: st.map(|s| s.load),
                smoothed_load: st.map(|s| s.smoothed),
                last_report_ms: st.map(|s| s.last_seen_ms),
                traffic: id
                    .and_then(|id| self.lb.backend_counters(id).ok())
                    .map(status::Traffic::from)
                    .unwrap_or_default(),
                slots: id.and_then(|id| slots.get(&id).copied()).unwrap_or(0),
            }
        };
        let mut backends: Vec<status::BackendDetail> = svc
            .published
            .iter()
            .map(|m| backend(&m.key, Some(m.id), false))
            .collect();
        backends.extend(
            svc.draining
                .iter()
                .map(|b| backend(&b.instance, b.id, true)),
        );
        status::ServiceDetail {
            name: svc.name.clone(),
            vip: Some(SocketAddr::new(svc.vip, svc.port)),
            proto: crate::trace::Proto::of(svc.key.proto).as_str().to_string(),
            mode: svc.mode.to_string(),
            traffic: self
                .lb
                .service_counters(svc.id)
                .map(status::Traffic::from)
                .unwrap_or_default(),
            table_size: table.map_or(0, |t| t.len() as u64),
            backends,
        }
    }

    /// Answers one `POST /trace` (the admin endpoint waits for it).
    fn answer_trace(&mut self, job: crate::admin::TraceJob) {
        let answer = self.trace(&job.request);
        if let Err(e) = &answer {
            debug!(request = ?job.request, "trace failed: {e}");
        }
        // The asker may have timed out and gone: nothing to do then.
        let _ = job.reply.send(answer);
    }

    /// Traces `req` through the live program (see [`crate::trace`]).
    fn trace(
        &mut self,
        req: &crate::trace::TraceRequest,
    ) -> Result<crate::trace::TraceAnswer, crate::trace::TraceError> {
        use crate::trace::{Outcome, TraceAnswer, TraceError, TraceTarget};
        req.validate()?;
        let key = req.service_key();
        let Some(svc) = self.svcs.iter().find(|s| s.key == key) else {
            let known: Vec<String> = self
                .svcs
                .iter()
                .map(|s| {
                    format!(
                        "{}/{}",
                        SocketAddr::new(s.vip, s.port),
                        crate::trace::Proto::of(s.key.proto).as_str()
                    )
                })
                .collect();
            return Ok(TraceAnswer {
                request: req.clone(),
                outcome: Outcome::NotAService,
                service: None,
                backend: None,
                action: None,
                interface: None,
                note: Some(format!(
                    "{}/{} is not a service of this balancer (services: {})",
                    req.dst,
                    req.proto.as_str(),
                    known.join(", ")
                )),
            });
        };
        let attachment = self
            .attachment
            .as_ref()
            .ok_or_else(|| TraceError::Unavailable("the balancer is not attached".into()))?;
        let iface = match &req.interface {
            Some(name) => attachment
                .interfaces
                .iter()
                .find(|a| &a.ifname == name)
                .ok_or_else(|| {
                    TraceError::Input(format!("interface {name} is not one the balancer runs on"))
                })?,
            None => attachment
                .interfaces
                .iter()
                .find(|a| a.group == svc.group)
                .or(attachment.interfaces.first())
                .ok_or_else(|| TraceError::Unavailable("no attached interface".into()))?,
        };
        let target = TraceTarget {
            service: svc.name.clone(),
            ifname: iface.ifname.clone(),
            ifindex: iface.ifindex,
            udp_idle: self.config.datapath.udp_idle_timeout,
        };
        let svc_index = self.svcs.iter().position(|s| s.key == key);
        let mut answer = crate::trace::trace(&mut self.lb, &target, req)?;
        if let (Some(b), Some(i)) = (answer.backend.as_mut(), svc_index) {
            let svc = &self.svcs[i];
            b.instance = svc
                .published
                .iter()
                .find(|m| m.id == b.id)
                .map(|m| m.key.clone())
                .or_else(|| {
                    svc.draining
                        .iter()
                        .find(|d| d.id == Some(b.id))
                        .map(|d| d.instance.clone())
                });
        }
        Ok(answer)
    }
}
