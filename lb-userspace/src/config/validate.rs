//! Checks on a parsed [`Config`]: every value on its own, against the others,
//! and against the data plane's limits. All problems are collected, so one
//! run of `headroom lb check-config` shows every one of them.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use headroom_control::scoreboard::valid_service;

use super::{
    format_duration, Config, Datapath, FieldError, Mode, Protocol, Scoreboard, Service,
    MAX_TABLE_SIZE_LIMIT, MIN_CONNTRACK_SIZE,
};
use crate::maglev::is_prime;

/// The collected problems.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            reason: reason.into(),
            location: None,
        });
    }

    /// Records `check`'s error, if any, against `path`.
    fn check(&mut self, path: impl Into<String>, check: Result<(), String>) {
        if let Err(reason) = check {
            self.push(path, reason);
        }
    }
}

/// Every problem with `c`, in file order as far as possible; empty if valid.
pub(super) fn validate(c: &Config) -> Vec<FieldError> {
    let mut e = Errors::default();
    e.check("name", pin_name(&c.name));
    if c.metrics_listen.port() == 0 {
        e.push("metrics_listen", "port 0: give the port to listen on");
    }
    scoreboard(&c.scoreboard, &mut e);
    weights(c, &mut e);
    datapath(&c.datapath, &mut e);
    groups(c, &mut e);
    e.0
}

/// The pin directory's last component: a safe, portable file name.
fn pin_name(s: &str) -> Result<(), String> {
    if s == "." || s == ".." || !valid_service(s) {
        return Err(format!(
            "{s:?} is not a valid balancer name: 1 to 64 of A-Z a-z 0-9 . _ - (it names the pin directory {}/<name>/)",
            super::PIN_ROOT
        ));
    }
    Ok(())
}

fn scoreboard(s: &Scoreboard, e: &mut Errors) {
    e.check("scoreboard.redis_url", redis_url(s.redis_url.as_str()));
    // Sub-millisecond refreshes would only spin: the scoreboard changes at
    // report pace (about 1 s), and each rebuild takes ~1.4 ms.
    if s.refresh_interval < Duration::from_millis(1) {
        e.push(
            "scoreboard.refresh_interval",
            format!(
                "{} is too short: must be at least 1ms",
                format_duration(s.refresh_interval)
            ),
        );
    }
    // A zero ttl is the weight policy's to report (weights()).
    if !s.ttl.is_zero() && s.ttl <= s.refresh_interval {
        e.push(
            "scoreboard.ttl",
            format!(
                "{} must be longer than scoreboard.refresh_interval ({}), or every instance is stale between two reads",
                format_duration(s.ttl),
                format_duration(s.refresh_interval)
            ),
        );
    }
}

/// Scheme first (the clearest message), then the redis crate's own parser:
/// the daemon connects with it, so what passes here is what it accepts
/// (e.g. `rediss://` only when the build has TLS).
fn redis_url(url: &str) -> Result<(), String> {
    const SCHEMES: &str = "redis://, rediss://, unix:// or redis+unix://";
    match url.split_once("://") {
        Some(("redis" | "rediss" | "unix" | "redis+unix", _)) => {}
        Some((scheme, _)) => {
            return Err(format!(
                "unsupported scheme `{scheme}://`: expected {SCHEMES}"
            ))
        }
        None => return Err(format!("not a URL: expected {SCHEMES}")),
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|err| {
            // "Missing hostname - InvalidClientConfig": keep the words.
            let msg = err.to_string();
            let msg = msg.split(" - ").next().unwrap_or(&msg).to_string();
            // Never echo the URL: it may hold a password.
            format!("not a usable Redis URL: {msg}")
        })
}

/// The knobs of the weight policy are checked by the policy itself, so the
/// config accepts exactly what the daemon runs with.
fn weights(c: &Config, e: &mut Errors) {
    if let Err(err) = c.policy().validate() {
        let path = match err.field {
            "alpha" => "weights.ewma_alpha".to_string(),
            "ttl" => "scoreboard.ttl".to_string(),
            other => format!("weights.{other}"),
        };
        e.push(path, err.reason);
    }
}

fn datapath(d: &Datapath, e: &mut Errors) {
    if d.conntrack_size < MIN_CONNTRACK_SIZE {
        e.push(
            "datapath.conntrack_size",
            format!(
                "{} is too small: must be at least {MIN_CONNTRACK_SIZE} flows",
                d.conntrack_size
            ),
        );
    }
    if d.udp_idle_timeout.is_zero() {
        e.push("datapath.udp_idle_timeout", "must be longer than 0s");
    } else if u64::try_from(d.udp_idle_timeout.as_nanos()).is_err() {
        e.push(
            "datapath.udp_idle_timeout",
            "is too large: must fit in 64-bit nanoseconds (584 years)",
        );
    }
    if d.max_services == 0 {
        e.push("datapath.max_services", "must be at least 1");
    } else if d.max_services > 65536 {
        // Flow entries record the service id in 16 bits.
        e.push("datapath.max_services", "must be at most 65536");
    }
    if d.max_backends == 0 {
        e.push("datapath.max_backends", "must be at least 1");
    }
    if !(2..=MAX_TABLE_SIZE_LIMIT).contains(&d.max_table_size) {
        e.push(
            "datapath.max_table_size",
            format!(
                "{} is out of range: must be in [2, {MAX_TABLE_SIZE_LIMIT}]",
                d.max_table_size
            ),
        );
    } else {
        // The loader sizes TABLES as max_services × 2 × max_table_size u32 slots.
        let slots = u64::from(d.max_services) * 2 * u64::from(d.max_table_size);
        if slots > u64::from(u32::MAX) {
            e.push(
                "datapath.max_table_size",
                format!(
                    "max_services × 2 × max_table_size = {slots} slots, more than the table map can index ({})",
                    u32::MAX
                ),
            );
        }
    }
}

/// Linux's `dev_valid_name`: 1–15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn interface_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty interface name".into());
    }
    if s.len() > 15 {
        return Err(format!(
            "{s:?} is {} bytes long: interface names have at most 15",
            s.len()
        ));
    }
    if s == "." || s == ".." {
        return Err(format!("{s:?} is not a valid interface name"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{s:?} is not a valid interface name: it contains {c:?}"
        ));
    }
    Ok(())
}

/// A VIP or backend address must be one host.
fn unicast(ip: IpAddr) -> Result<(), String> {
    if ip.is_unspecified() {
        return Err(format!("{ip} is the unspecified address"));
    }
    if ip.is_multicast() {
        return Err(format!("{ip} is a multicast address"));
    }
    if let IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return Err(format!("{ip} is the broadcast address"));
        }
    }
    Ok(())
}

fn family_name(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Cross-group state: names and VIPs must be unique over the whole daemon,
/// since all groups share one program and one set of maps.
#[derive(Default)]
struct Seen {
    groups: HashMap<String, String>,
    interfaces: HashMap<String, String>,
    services: HashMap<String, String>,
    vips: HashMap<(IpAddr, u16, Protocol), String>,
    services_total: u64,
    backends_total: u64,
}

fn groups(c: &Config, e: &mut Errors) {
    if c.groups.is_empty() {
        e.push(
            "group",
            "no [[group]]: at least one group with interfaces and services is required",
        );
    }
    let mut seen = Seen::default();
    for (gi, g) in c.groups.iter().enumerate() {
        let gp = format!("group[{gi}]");
        if !valid_service(&g.name) {
            e.push(
                format!("{gp}.name"),
                format!(
                    "{:?} is not a valid group name: 1 to 64 of A-Z a-z 0-9 . _ -",
                    g.name
                ),
            );
        } else if let Some(first) = seen.groups.insert(g.name.clone(), gp.clone()) {
            e.push(
                format!("{gp}.name"),
                format!("duplicate group name {:?} (also {first})", g.name),
            );
        }
        if g.interfaces.is_empty() {
            e.push(
                format!("{gp}.interface"),
                "no [[group.interface]]: a group needs at least one interface",
            );
        }
        for (ii, i) in g.interfaces.iter().enumerate() {
            let ip = format!("{gp}.interface[{ii}].name");
            match interface_name(&i.name) {
                Err(reason) => e.push(ip, reason),
                Ok(()) => {
                    // One interface carries one balancer program: listing it twice,
                    // even in two groups, is a mistake.
                    if let Some(first) = seen.interfaces.insert(i.name.clone(), ip.clone()) {
                        e.push(
                            ip,
                            format!("interface {:?} is listed twice (also {first})", i.name),
                        );
                    }
                }
            }
        }
        if g.services.is_empty() {
            e.push(
                format!("{gp}.service"),
                "no [[group.service]]: a group needs at least one service",
            );
        }
        for (si, s) in g.services.iter().enumerate() {
            service(c, s, &format!("{gp}.service[{si}]"), &mut seen, e);
        }
    }
    let d = &c.datapath;
    if seen.services_total > u64::from(d.max_services) {
        e.push(
            "datapath.max_services",
            format!(
                "{} services are configured over all groups, more than max_services ({})",
                seen.services_total, d.max_services
            ),
        );
    }
    if seen.backends_total > u64::from(d.max_backends) {
        e.push(
            "datapath.max_backends",
            format!(
                "{} static backends are configured, more than max_backends ({})",
                seen.backends_total, d.max_backends
            ),
        );
    }
}

fn service(c: &Config, s: &Service, sp: &str, seen: &mut Seen, e: &mut Errors) {
    seen.services_total += 1;
    if !valid_service(&s.name) {
        e.push(
            format!("{sp}.name"),
            format!(
                "{:?} is not a valid service name: 1 to 64 of A-Z a-z 0-9 . _ - (the scoreboard's rule)",
                s.name
            ),
        );
    } else if let Some(first) = seen.services.insert(s.name.clone(), format!("{sp}.name")) {
        e.push(
            format!("{sp}.name"),
            format!("duplicate service name {:?} (also {first})", s.name),
        );
    }
    if let Some(sb) = &s.scoreboard_name {
        if !valid_service(sb) {
            e.push(
                format!("{sp}.scoreboard_name"),
                format!(
                    "{sb:?} is not a valid scoreboard service name: 1 to 64 of A-Z a-z 0-9 . _ -"
                ),
            );
        } else if s.is_static() {
            e.push(
                format!("{sp}.scoreboard_name"),
                "has no effect: a service with static backends does not read the scoreboard",
            );
        }
    }
    e.check(format!("{sp}.vip"), unicast(s.vip));
    if s.port == 0 {
        e.push(
            format!("{sp}.port"),
            "0 is not a valid port: must be 1-65535",
        );
    }
    if let Some(first) = seen
        .vips
        .insert((s.vip, s.port, s.protocol), sp.to_string())
    {
        e.push(
            format!("{sp}.vip"),
            format!(
                "{}:{}/{} is already a VIP ({first})",
                s.vip, s.port, s.protocol
            ),
        );
    }
    table_size(c, s, sp, e);
    backends(s, sp, seen, e);
}

fn table_size(c: &Config, s: &Service, sp: &str, e: &mut Errors) {
    let m = s.table_size;
    let path = format!("{sp}.table_size");
    if !(2..=MAX_TABLE_SIZE_LIMIT).contains(&m) {
        e.push(
            path,
            format!("{m} is out of range: must be a prime in [2, {MAX_TABLE_SIZE_LIMIT}]"),
        );
    } else if !is_prime(m) {
        // Maglev's permutations cover every slot only when M is prime.
        e.push(path, format!("{m} is not prime"));
    } else if m > c.datapath.max_table_size {
        e.push(
            path,
            format!(
                "{m} exceeds datapath.max_table_size ({}): raise that too",
                c.datapath.max_table_size
            ),
        );
    } else if s.backends.len() > m as usize {
        e.push(
            path,
            format!("{m} slots cannot hold {} static backends", s.backends.len()),
        );
    }
}

fn backends(s: &Service, sp: &str, seen: &mut Seen, e: &mut Errors) {
    let mut addrs = HashSet::new();
    for (bi, b) in s.backends.iter().enumerate() {
        seen.backends_total += 1;
        let bp = format!("{sp}.backend[{bi}]");
        let ap = format!("{bp}.address");
        let a = b.address;
        if a.ip.is_ipv4() != s.vip.is_ipv4() {
            e.push(
                &ap,
                format!(
                    "{} backend {} for an {} VIP ({}): families must match",
                    family_name(a.ip),
                    a.ip,
                    family_name(s.vip),
                    s.vip
                ),
            );
        } else if let Err(reason) = unicast(a.ip) {
            e.push(&ap, reason);
        } else if a.ip == s.vip {
            e.push(&ap, format!("{} is the VIP itself", a.ip));
        }
        match (s.mode, a.port) {
            (Mode::Nat, None) => e.push(
                &ap,
                format!(
                    "nat backends need a port: write {}",
                    super::BackendAddr {
                        port: Some(s.port),
                        ..a
                    }
                ),
            ),
            (_, Some(0)) => e.push(&ap, "port 0 is not a valid backend port"),
            (Mode::Dsr, Some(p)) if p != s.port => e.push(
                &ap,
                format!(
                    "dsr backends receive the VIP's port {}: port {p} cannot be used (omit it)",
                    s.port
                ),
            ),
            _ => {}
        }
        // Compare what the data plane would store (dsr: the VIP's port).
        let key = (a.ip, a.port.unwrap_or(s.port));
        if !addrs.insert(key) {
            e.push(&ap, format!("duplicate backend {a} in this service"));
        }
        if b.weight == 0 {
            e.push(
                format!("{bp}.weight"),
                "0 is not allowed: static weights must be > 0 (remove the backend to take it out)",
            );
        }
    }
}
