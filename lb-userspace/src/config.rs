//! The `headroom lb` configuration file (TOML): which interfaces the daemon
//! attaches to, which VIP groups and services it balances, where the
//! scoreboard is and how loads become weights. Every field is documented in
//! docs/CONFIG.md; `docs/headroom.example.toml` is a complete example.
//!
//! Loading has two steps. Serde reads the file into the typed structs below:
//! syntax, types, unknown and missing fields fail there, with the field's
//! path and the line/column. Then `validate` checks every value on its own
//! and against the others and the data plane's limits, and reports every
//! problem it finds, each with its field path. So a [`Config`] that exists is
//! one the daemon can run: nothing is rejected later for a reason visible now.

mod duration;
mod validate;

use std::{
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use lb_common::{
    ServiceKey, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
    DEFAULT_TABLE_SIZE, DEFAULT_UDP_IDLE_TIMEOUT_NS, FAMILY_V4, FAMILY_V6, MODE_DSR, MODE_NAT,
    PROTO_TCP, PROTO_UDP,
};
use serde::{de, Deserialize, Deserializer};
use thiserror::Error;

use crate::{loader::LoadOptions, weights::Policy};

pub use duration::{format_duration, parse_duration};

/// Root of the BPF filesystem directories the daemon pins into.
pub const PIN_ROOT: &str = "/sys/fs/bpf/headroom";
/// Where the daemon mounts a bpf filesystem when [`PIN_ROOT`] is not on one.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Largest table size M a service may ask for (2^24 slots, 64 MiB per buffer).
pub const MAX_TABLE_SIZE_LIMIT: u32 = 1 << 24;
/// Smallest connection table accepted: below this, flows of a busy balancer
/// would be evicted (and re-balanced) within moments.
pub const MIN_CONNTRACK_SIZE: u32 = 1024;

/// The whole configuration of one `headroom lb` daemon.
///
/// One daemon loads one XDP program with one set of maps, attached to the
/// interfaces of all its groups; see docs/CONFIG.md for what groups share.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of this balancer: maps and links are pinned under
    /// `/sys/fs/bpf/headroom/<name>/`. `[A-Za-z0-9._-]{1,64}`.
    pub name: String,
    /// Log level of the daemon itself.
    pub log_level: LogLevel,
    /// Where the Prometheus text endpoint listens.
    pub metrics_listen: SocketAddr,
    /// The Redis scoreboard and how often it is read.
    pub scoreboard: Scoreboard,
    /// How loads become weights.
    pub weights: WeightPolicy,
    /// Sizes and knobs of the XDP program, fixed when it is loaded.
    pub datapath: Datapath,
    /// VIP groups (`[[group]]`), at least one.
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "default".into(),
            log_level: LogLevel::Info,
            metrics_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9470),
            scoreboard: Scoreboard::default(),
            weights: WeightPolicy::default(),
            datapath: Datapath::default(),
            groups: Vec::new(),
        }
    }
}

/// `[scoreboard]`: where loads are read and how fresh they must be.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scoreboard {
    /// `redis://`, `rediss://`, `unix://` or `redis+unix://` URL.
    pub redis_url: RedisUrl,
    /// Time between two reads of the scoreboard (default 100 ms).
    #[serde(deserialize_with = "duration::deserialize")]
    pub refresh_interval: Duration,
    /// An instance whose last report is older than this is drained (default 5 s).
    #[serde(deserialize_with = "duration::deserialize")]
    pub ttl: Duration,
}

impl Default for Scoreboard {
    fn default() -> Self {
        Self {
            redis_url: RedisUrl("redis://127.0.0.1:6379".into()),
            refresh_interval: Duration::from_millis(100),
            ttl: Policy::default().ttl,
        }
    }
}

/// `[weights]`: the knobs of the load → weight formula of
/// [`crate::weights`] (whose defaults these are; docs/CONFIG.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WeightPolicy {
    /// Smallest headroom of a live instance, in load points, (0, 100]:
    /// `headroom = max(100 − load, floor)`, so a fully loaded instance keeps
    /// a trickle of new flows (default 5).
    pub floor: f64,
    /// EWMA factor applied per new report, (0, 1]: `s ← s + α·(h − s)`;
    /// 1 means no smoothing (default 0.5).
    pub ewma_alpha: f64,
    /// Relative share change below which a table is not rebuilt, [0, 1)
    /// (default 0.05).
    pub dead_band: f64,
    /// A new instance's weight ramps linearly to its full value over this
    /// long; 0 disables the ramp (default 10 s, at most 1 day).
    #[serde(deserialize_with = "duration::deserialize")]
    pub ramp_up: Duration,
    /// Fraction of its weight a ramping instance starts with, (0, 1]
    /// (default 0.1).
    pub ramp_from: f64,
}

impl Default for WeightPolicy {
    fn default() -> Self {
        // One source for the defaults: the policy the daemon runs.
        let p = Policy::default();
        Self {
            floor: p.floor,
            ewma_alpha: p.alpha,
            dead_band: p.dead_band,
            ramp_up: p.ramp_up,
            ramp_from: p.ramp_from,
        }
    }
}

/// `[datapath]`: sizes and knobs of the XDP program (see [`LoadOptions`]).
/// Changing a size means new maps: flows pinned in the old ones are lost.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Datapath {
    /// Connection-table (and reverse-NAT table) size, in flows.
    pub conntrack_size: u32,
    /// A UDP flow idle longer than this is re-balanced.
    #[serde(deserialize_with = "duration::deserialize")]
    pub udp_idle_timeout: Duration,
    /// Services the maps have room for, over all groups.
    pub max_services: u32,
    /// Backend slots, over all services (static and scoreboard instances).
    pub max_backends: u32,
    /// Largest `table_size` of any service; every service reserves two
    /// buffers of this many slots.
    pub max_table_size: u32,
    /// Log level of the XDP program (aya-log); `debug` logs every new flow.
    pub log_level: LogLevel,
}

impl Default for Datapath {
    fn default() -> Self {
        Self {
            conntrack_size: DEFAULT_CONNTRACK_SIZE,
            udp_idle_timeout: Duration::from_nanos(DEFAULT_UDP_IDLE_TIMEOUT_NS),
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_table_size: DEFAULT_TABLE_SIZE,
            log_level: LogLevel::Off,
        }
    }
}

/// `[[group]]`: a set of VIPs with the interfaces they arrive on, e.g. the
/// user-facing balancer and the inter-service one (paper §3.2).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Group name, unique: `[A-Za-z0-9._-]{1,64}`.
    pub name: String,
    /// `[[group.interface]]`: interfaces XDP is attached to, at least one.
    #[serde(rename = "interface", default)]
    pub interfaces: Vec<Interface>,
    /// `[[group.service]]`: the group's services, at least one.
    #[serde(rename = "service", default)]
    pub services: Vec<Service>,
}

/// `[[group.interface]]`: one interface the balancer is attached to.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Kernel interface name (1–15 bytes, no `/`, `:` or whitespace).
    pub name: String,
    /// How the balancer is attached (default `auto`).
    #[serde(default)]
    pub mode: AttachMode,
}

/// How the balancer is attached to an interface: one of the XDP modes
/// (physical NICs) or the TC ingress hook (veths and other virtual
/// interfaces).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// XDP in the driver (fast); fails if the driver has no XDP support.
    Native,
    /// XDP in the generic network stack (slow, works everywhere).
    Generic,
    /// XDP native if the driver supports it, else generic.
    #[default]
    Auto,
    /// TC ingress (tcx link) — for veth and other virtual interfaces: keeps
    /// GSO and checksum offload; XDP modes for physical NICs.
    Tc,
}

/// `[[group.service]]`: one VIP balanced over backends.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Service name, unique over all groups; also the scoreboard's service
    /// name unless `scoreboard_name` is given. `[A-Za-z0-9._-]{1,64}`.
    pub name: String,
    /// Virtual IP (IPv4 or IPv6).
    pub vip: IpAddr,
    /// Virtual port (1–65535).
    pub port: u16,
    /// Transport protocol (default `tcp`).
    #[serde(default)]
    pub protocol: Protocol,
    /// Forwarding mode.
    pub mode: Mode,
    /// Lookup-table size M: prime, at most `datapath.max_table_size`.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// Scoreboard service name to read, when it differs from `name` (e.g. one
    /// set of instances behind a TCP and a UDP VIP).
    #[serde(default)]
    pub scoreboard_name: Option<String>,
    /// `[[group.service.backend]]`: static backends. A service with static
    /// backends uses them with their fixed weights and does not read the
    /// scoreboard.
    #[serde(rename = "backend", default)]
    pub backends: Vec<StaticBackend>,
}

fn default_table_size() -> u32 {
    DEFAULT_TABLE_SIZE
}

impl Service {
    /// The scoreboard service name whose instances this service balances.
    pub fn scoreboard_name(&self) -> &str {
        self.scoreboard_name.as_deref().unwrap_or(&self.name)
    }

    /// Whether the backends are static (listed in the config) rather than
    /// read from the scoreboard.
    pub fn is_static(&self) -> bool {
        !self.backends.is_empty()
    }

    /// The `SERVICES` map key of this VIP.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: addr_words(self.vip),
            port: self.port.to_be(),
            proto: self.protocol.number(),
            family: family(self.vip),
        }
    }
}

/// `[[group.service.backend]]`: a static backend.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticBackend {
    /// `IP:PORT` (`[IPv6]:PORT`), or `IP` alone for dsr.
    pub address: BackendAddr,
    /// Relative weight, > 0 (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// A backend address: an IP and, for nat, a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    /// The backend's address.
    pub ip: IpAddr,
    /// Its port; `None` in dsr mode means the VIP's port.
    pub port: Option<u16>,
}

impl FromStr for BackendAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Self {
                ip: sa.ip(),
                port: Some(sa.port()),
            });
        }
        let bare = s
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(s);
        bare.parse()
            .map(|ip| Self { ip, port: None })
            .map_err(|_| format!("{s:?} is not IP:PORT, [IPv6]:PORT or an IP (dsr without a port)"))
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.port {
            Some(p) => SocketAddr::new(self.ip, p).fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

impl<'de> Deserialize<'de> for BackendAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl AttachMode {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Auto => "auto",
            Self::Tc => "tc",
        }
    }

    /// Whether this mode attaches the TC program rather than XDP.
    pub fn is_tc(self) -> bool {
        self == Self::Tc
    }
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number (`PROTO_TCP` / `PROTO_UDP`).
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// Forwarding mode of a service (docs/ARCHITECTURE.md, "Forwarding modes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Destination rewritten to the backend; replies come back through the balancer.
    Nat,
    /// Only the MACs change; backends own the VIP and answer directly.
    Dsr,
}

impl Mode {
    /// The map encoding (`MODE_NAT` / `MODE_DSR`).
    pub fn code(self) -> u8 {
        match self {
            Self::Nat => MODE_NAT,
            Self::Dsr => MODE_DSR,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::Nat => "nat",
            Self::Dsr => "dsr",
        })
    }
}

/// A log level, for the daemon and for the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Informational messages and above.
    Info,
    /// Debugging detail (in the XDP program: one record per new flow).
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// aya-log's numbering (0 off … 5 trace), as `LoadOptions::log_level`.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The name as written in the config (and as `tracing`'s filters spell it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// A Redis URL. Its `Debug` and `Display` hide the password, so configs can be
/// logged and summarised; [`RedisUrl::as_str`] is the real URL.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL as written, password included: for connecting only.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Hides `user:PASSWORD@` in the authority and `password=`/`pass=` query values.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let auth_end = before_query.find('/').unwrap_or(before_query.len());
    let (authority, path) = before_query.split_at(auth_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            // `redis://secret@host`: the redis crate takes a lone userinfo
            // as the username, but people write passwords there too.
            None => format!("***@{host}"),
        },
        None => authority.to_string(),
    };
    let mut out = if url.contains("://") {
        format!("{scheme}://{authority}{path}")
    } else {
        format!("{authority}{path}")
    };
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// Address words as the maps keep them (IPv4 in word 0, wire byte order).
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// `FAMILY_V4` or `FAMILY_V6`.
pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `group[0].service[2].table_size`.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
    /// Line and column (1-based) in the file, when known.
    pub location: Option<(usize, usize)>,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)?;
        } else {
            write!(f, "{}: {}", self.path, self.reason)?;
        }
        if let Some((line, col)) = self.location {
            write!(f, " (line {line}, column {col})")?;
        }
        Ok(())
    }
}

/// Why a configuration was rejected.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column (characters).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// Fields with invalid values (never empty). Serde stops at the first
    /// (type, unknown or missing field); validation reports all it finds.
    #[error("{}", fmt_fields(.0))]
    Invalid(Vec<FieldError>),
}

fn fmt_fields(errors: &[FieldError]) -> String {
    match errors {
        [one] => one.to_string(),
        many => {
            let mut s = format!("{} invalid fields:", many.len());
            for e in many {
                let _ = write!(s, "\n  {e}");
            }
            s
        }
    }
}

impl ConfigError {
    /// The field errors (empty for read and syntax errors).
    pub fn fields(&self) -> &[FieldError] {
        match self {
            Self::Invalid(v) => v,
            _ => &[],
        }
    }
}

impl FromStr for Config {
    type Err = ConfigError;

    /// Parses and validates a configuration.
    fn from_str(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
            ConfigError::Syntax {
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let location = inner.span().map(|s| line_col(text, s.start));
            ConfigError::Invalid(vec![serde_field_error(path, inner.message(), location)])
        })?;
        let errors = validate::validate(&config);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// Names the missing field in the path too: serde reports it on the table
/// that lacks it (`group[0].service[1]: missing field `vip``).
fn serde_field_error(path: String, message: &str, location: Option<(usize, usize)>) -> FieldError {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'));
    let path = match (missing, path.as_str()) {
        (Some(field), "" | ".") => field.to_string(),
        (Some(field), p) => format!("{p}.{field}"),
        // serde_path_to_error prints an empty path as "."
        (None, ".") => String::new(),
        (None, _) => path,
    };
    FieldError {
        path,
        reason: message.to_string(),
        location,
    }
}

/// 1-based line and character column of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        text.parse()
    }

    /// Every service with its group, in file order (the order ids follow).
    pub fn services(&self) -> impl Iterator<Item = (&Group, &Service)> {
        self.groups
            .iter()
            .flat_map(|g| g.services.iter().map(move |s| (g, s)))
    }

    /// Every interface with its group, in file order.
    pub fn interfaces(&self) -> impl Iterator<Item = (&Group, &Interface)> {
        self.groups
            .iter()
            .flat_map(|g| g.interfaces.iter().map(move |i| (g, i)))
    }

    /// The directory the daemon pins its maps and links in.
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir_in(Path::new(PIN_ROOT))
    }

    /// The pin directory under another root than [`PIN_ROOT`] (tests point
    /// it at a private bpffs mount).
    pub fn pin_dir_in(&self, root: &Path) -> PathBuf {
        root.join(&self.name)
    }

    /// The weight policy (`[weights]` and `scoreboard.ttl`).
    pub fn policy(&self) -> Policy {
        let w = &self.weights;
        Policy {
            floor: w.floor,
            alpha: w.ewma_alpha,
            dead_band: w.dead_band,
            ttl: self.scoreboard.ttl,
            ramp_up: w.ramp_up,
            ramp_from: w.ramp_from,
        }
    }

    /// The loader options this configuration asks for.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            conntrack_size: self.datapath.conntrack_size,
            max_services: self.datapath.max_services,
            max_backends: self.datapath.max_backends,
            max_table_size: self.datapath.max_table_size,
            udp_idle_timeout: self.datapath.udp_idle_timeout,
            log_level: self.datapath.log_level.as_u8(),
        }
    }

    /// A human summary, as `headroom lb check-config` prints it (the Redis
    /// password redacted).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let d = &self.datapath;
        let w = &self.weights;
        let sb = &self.scoreboard;
        let _ = writeln!(
            s,
            "balancer {:?}: pins in {}/, metrics on {}, log level {}",
            self.name,
            self.pin_dir().display(),
            self.metrics_listen,
            self.log_level.as_str()
        );
        let _ = writeln!(
            s,
            "scoreboard {}: refresh every {}, ttl {}",
            sb.redis_url,
            format_duration(sb.refresh_interval),
            format_duration(sb.ttl)
        );
        let _ = writeln!(
            s,
            "weights: floor {}, ewma_alpha {}, dead_band {}, ramp_up {} from {}",
            w.floor,
            w.ewma_alpha,
            w.dead_band,
            format_duration(w.ramp_up),
            w.ramp_from
        );
        let _ = writeln!(
            s,
            "datapath: conntrack {} flows, udp idle {}, max {} services / {} backends / table {}, log {}",
            d.conntrack_size,
            format_duration(d.udp_idle_timeout),
            d.max_services,
            d.max_backends,
            d.max_table_size,
            d.log_level.as_str()
        );
        for g in &self.groups {
            let ifaces: Vec<String> = g
                .interfaces
                .iter()
                .map(|i| format!("{} ({})", i.name, i.mode.as_str()))
                .collect();
            let _ = writeln!(
                s,
                "group {:?}: interfaces {}; {} service(s)",
                g.name,
                ifaces.join(", "),
                g.services.len()
            );
            for svc in &g.services {
                let backends = if svc.is_static() {
                    let list: Vec<String> = svc
                        .backends
                        .iter()
                        .map(|b| format!("{}×{}", b.address, b.weight))
                        .collect();
                    format!("static backends {}", list.join(", "))
                } else {
                    format!("scoreboard {:?}", svc.scoreboard_name())
                };
                let _ = writeln!(
                    s,
                    "  service {:?}: {} {}/{} table {} - {}",
                    svc.name,
                    svc.mode,
                    SocketAddr::new(svc.vip, svc.port),
                    svc.protocol,
                    svc.table_size,
                    backends
                );
            }
        }
        let _ = writeln!(
            s,
            "ok: {} group(s), {} service(s)",
            self.groups.len(),
            self.services().count()
        );
        s
    }
}

#[cfg(test)]
mod tests;
