//! `headroom lb trace`: which backend a flow gets now, asked of the live
//! program (like Katran's simulator, but with the real object and maps).
//!
//! A tracked flow is answered from the connection table. For an untracked
//! one a TCP SYN (or a UDP datagram) of the 4-tuple is built and run through
//! the loaded program once with BPF_PROG_TEST_RUN, as if it arrived on an
//! attached interface; the backend is read from the connection-table entry
//! the run created. Then the entries the run created are removed (and an
//! older reverse-NAT entry it overwrote is put back), so a trace leaves no
//! flow state. Nothing is transmitted: TEST_RUN returns the frame instead.
//!
//! The run does count: one packet (and one new flow) in the service's and
//! the backend's counters, and one verdict and `miss_syn`/`ct_miss` in the
//! global ones.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use aya::maps::MapError;
use lb_common::{
    flow_hash, Backend, FlowKey, RevNat, ServiceKey, BACKEND_ACTIVE, PROTO_TCP, PROTO_UDP,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    config::{addr_words, family},
    Balancer, BalancerError,
};

/// Transport protocol of a traced flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    /// The protocol of an IP protocol number (anything but UDP is TCP: the
    /// data path balances only those two).
    pub fn of(number: u8) -> Proto {
        if number == lb_common::PROTO_UDP {
            Proto::Udp
        } else {
            Proto::Tcp
        }
    }

    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Proto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!("protocol {s:?}: expected tcp or udp")),
        }
    }
}

/// A trace request: the flow `src → dst` of `proto`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    /// The client's address and port.
    pub src: SocketAddr,
    /// The VIP and port.
    pub dst: SocketAddr,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub proto: Proto,
    /// Interface the packet arrives on (default: the first interface of the
    /// service's group).
    #[serde(default)]
    pub interface: Option<String>,
}

impl TraceRequest {
    /// Checks what can be checked without the maps.
    pub fn validate(&self) -> Result<(), TraceError> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(TraceError::Input(format!(
                "src {} and dst {} are of different address families",
                self.src, self.dst
            )));
        }
        if self.src.port() == 0 || self.dst.port() == 0 {
            return Err(TraceError::Input(format!(
                "port 0 in {} → {}: give real ports",
                self.src, self.dst
            )));
        }
        Ok(())
    }

    /// The connection-table key of the flow.
    pub fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: addr_words(self.src.ip()),
            dst: addr_words(self.dst.ip()),
            sport: self.src.port().to_be(),
            dport: self.dst.port().to_be(),
            proto: self.proto.number(),
            family: family(self.dst.ip()),
            _pad: [0; 2],
        }
    }

    /// The services-map key of the destination.
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            addr: addr_words(self.dst.ip()),
            port: self.dst.port().to_be(),
            proto: self.proto.number(),
            family: family(self.dst.ip()),
        }
    }
}

/// How the answer was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The flow is in the connection table: its packets go to that backend.
    Tracked,
    /// Not tracked: the program selected this backend for a new flow.
    NewFlow,
    /// `dst` is not a service of this balancer.
    NotAService,
}

impl Outcome {
    /// `tracked`, `new flow` or `not a service`.
    pub fn describe(self) -> &'static str {
        match self {
            Outcome::Tracked => "tracked",
            Outcome::NewFlow => "new flow",
            Outcome::NotAService => "not a service",
        }
    }
}

/// The backend a trace found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedBackend {
    /// Backend id.
    pub id: u32,
    /// Address (and port) packets are sent to.
    pub addr: Option<SocketAddr>,
    /// Instance id (scoreboard) or configured address (static).
    pub instance: Option<String>,
    /// Whether the backend is draining.
    pub draining: bool,
}

/// The answer to a [`TraceRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceAnswer {
    /// The request, as understood.
    pub request: TraceRequest,
    /// How the answer was found.
    pub outcome: Outcome,
    /// The service `dst` belongs to.
    pub service: Option<String>,
    /// The backend the flow goes to (`None`: no backend, or not a service).
    pub backend: Option<TracedBackend>,
    /// New flows: the program's action (`tx`, `redirect`, `pass`, `drop`).
    pub action: Option<String>,
    /// The interface the traced packet arrived on.
    pub interface: Option<String>,
    /// What else matters (e.g. the next packet re-selects).
    pub note: Option<String>,
}

/// Why a trace could not be answered.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The request is wrong (HTTP 400).
    #[error("{0}")]
    Input(String),
    /// A map or the program failed.
    #[error(transparent)]
    Balancer(#[from] BalancerError),
    /// A map operation failed.
    #[error("{what}: {source}")]
    Map {
        /// What was being done.
        what: &'static str,
        /// The map error.
        #[source]
        source: MapError,
    },
    /// The daemon did not answer (HTTP 503/504).
    #[error("{0}")]
    Unavailable(String),
}

/// Where and how a trace runs: the service the request's `dst` resolved to.
#[derive(Clone, Debug)]
pub struct TraceTarget {
    /// Service name.
    pub service: String,
    /// Ingress interface name.
    pub ifname: String,
    /// Ingress interface index in the balancer's network namespace.
    pub ifindex: u32,
    /// The data path's UDP idle timeout.
    pub udp_idle: Duration,
}

/// Traces `req` through `lb` (see the module docs). `target` is the
/// service `req.dst` belongs to; the caller fills in instance names.
pub fn trace(
    lb: &mut Balancer,
    target: &TraceTarget,
    req: &TraceRequest,
) -> Result<TraceAnswer, TraceError> {
    req.validate()?;
    let key = req.flow_key();
    let mut answer = TraceAnswer {
        request: req.clone(),
        outcome: Outcome::Tracked,
        service: Some(target.service.clone()),
        backend: None,
        action: None,
        interface: Some(target.ifname.clone()),
        note: None,
    };
    if let Some(flow) = get_opt(lb.conntrack().get(&key, 0), "reading the connection table")? {
        let b = lb.backend(flow.backend)?;
        answer.backend = Some(traced(flow.backend, &b));
        if b.flags & BACKEND_ACTIVE == 0 {
            answer.note = Some(
                "its backend is no longer active: the next packet re-selects (ct_reselect)".into(),
            );
        } else if req.proto == Proto::Udp
            && monotonic_ns().saturating_sub(flow.atime_ns) > target.udp_idle.as_nanos() as u64
        {
            answer.note = Some(format!(
                "idle longer than the UDP timeout ({:?}): the next packet re-selects",
                target.udp_idle
            ));
        } else if req.proto == Proto::Tcp {
            answer.note = Some("a new SYN on this 4-tuple would select again".into());
        }
        return Ok(answer);
    }

    answer.outcome = Outcome::NewFlow;
    // The backend userspace expects, to save the reverse-NAT entry the run
    // may overwrite (a previous connection's, still answering).
    let predicted = lb
        .active_table(&req.service_key())
        .filter(|t| !t.is_empty())
        .map(|t| t[(flow_hash(&key) % t.len() as u32) as usize]);
    let saved_rev = match predicted {
        Some(id) if id != lb_common::NO_BACKEND => {
            let b = lb.backend(id)?;
            let rkey = reverse_key(&key, &b);
            get_opt(lb.nat_rev().get(&rkey, 0), "reading the reverse-NAT table")?.map(|v| (rkey, v))
        }
        _ => None,
    };

    let frame = syn_frame(req);
    let run = lb.run(&frame, target.ifindex)?;
    answer.action = Some(action_name(run.action).to_string());

    let flow = get_opt(lb.conntrack().get(&key, 0), "reading the connection table")?;
    let Some(flow) = flow else {
        answer.note = Some("the program created no flow (no backend in the table?)".into());
        return Ok(answer);
    };
    let b = lb.backend(flow.backend)?;
    answer.backend = Some(traced(flow.backend, &b));
    // Leave no flow state: the run's entries go, an overwritten one returns.
    del_opt(lb.conntrack().remove(&key), "removing the traced flow")?;
    let rkey = reverse_key(&key, &b);
    match saved_rev {
        Some((k, v)) if k == rkey => restore_rev(lb, &k, &v)?,
        _ => del_opt(
            lb.nat_rev().remove(&rkey),
            "removing the traced reverse-NAT entry",
        )?,
    }
    if predicted.is_some_and(|p| p != flow.backend) {
        answer.note = Some(format!(
            "the table changed during the trace (expected backend {predicted:?})"
        ));
    }
    Ok(answer)
}

fn restore_rev(lb: &mut Balancer, k: &FlowKey, v: &RevNat) -> Result<(), TraceError> {
    lb.nat_rev()
        .insert(k, v, 0)
        .map_err(|source| TraceError::Map {
            what: "restoring a reverse-NAT entry",
            source,
        })
}

/// The reverse-NAT key the program writes for a nat flow to `b`.
fn reverse_key(key: &FlowKey, b: &Backend) -> FlowKey {
    FlowKey {
        src: b.addr,
        dst: key.src,
        sport: b.port,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

fn traced(id: u32, b: &Backend) -> TracedBackend {
    TracedBackend {
        id,
        addr: crate::daemon::recover::backend_socket(b),
        instance: None,
        draining: b.flags & lb_common::BACKEND_DRAINING != 0,
    }
}

fn get_opt<V>(r: Result<V, MapError>, what: &'static str) -> Result<Option<V>, TraceError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(TraceError::Map { what, source }),
    }
}

fn del_opt(r: Result<(), MapError>, what: &'static str) -> Result<(), TraceError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(TraceError::Map { what, source }),
    }
}

/// The name of an XDP action.
pub fn action_name(action: u32) -> &'static str {
    match action {
        0 => "aborted",
        1 => "drop",
        2 => "pass",
        3 => "tx",
        4 => "redirect",
        _ => "unknown",
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// An Ethernet frame with the flow's first packet: a TCP SYN (no options)
/// or an empty UDP datagram, checksums filled in.
pub fn syn_frame(req: &TraceRequest) -> Vec<u8> {
    let l4 = match req.proto {
        Proto::Tcp => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&req.src.port().to_be_bytes());
            t[2..4].copy_from_slice(&req.dst.port().to_be_bytes());
            t[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
            t[12] = 5 << 4; // data offset: 5 words
            t[13] = 0x02; // SYN
            t[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
            t
        }
        Proto::Udp => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&req.src.port().to_be_bytes());
            u[2..4].copy_from_slice(&req.dst.port().to_be_bytes());
            u[4..6].copy_from_slice(&8u16.to_be_bytes());
            u
        }
    };
    let proto = req.proto.number();
    let (ethertype, mut ip, pseudo) = match (req.src.ip(), req.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            h[6] = 0x40; // DF
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = fold(sum(&h, 0));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            let mut p = Vec::with_capacity(12);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            (0x0800u16, h, p)
        }
        (s, d) => {
            let (s, d) = (v6(s), v6(d));
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            let mut p = Vec::with_capacity(40);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
            (0x86ddu16, h, p)
        }
    };
    let mut l4 = l4;
    let c = fold(sum(&l4, sum(&pseudo, 0)));
    let at = if req.proto == Proto::Tcp { 16 } else { 6 };
    // UDP: a computed 0 is sent as 0xffff (0 means "no checksum").
    let c = if c == 0 && req.proto == Proto::Udp {
        0xffff
    } else {
        c
    };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(14 + ip.len() + l4.len());
    // Locally administered MACs: the program does not look at them.
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.append(&mut ip);
    f.extend_from_slice(&l4);
    f
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// One's-complement sum of `data` (16-bit big-endian words) onto `s`.
fn sum(data: &[u8], mut s: u32) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    s
}

/// The Internet checksum of a sum.
fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FAMILY_V4, FAMILY_V6};

    fn req(src: &str, dst: &str, proto: Proto) -> TraceRequest {
        TraceRequest {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            interface: None,
        }
    }

    #[test]
    fn frames_have_valid_checksums() {
        for r in [
            req("10.0.0.2:40000", "10.99.0.1:80", Proto::Tcp),
            req("10.0.0.2:40000", "10.99.0.1:53", Proto::Udp),
            req("[fd00::2]:40000", "[fd00::1]:80", Proto::Tcp),
        ] {
            let f = syn_frame(&r);
            let (l3, l4) = if r.dst.is_ipv4() {
                assert_eq!(fold(sum(&f[14..34], 0)), 0, "ipv4 header checksum");
                (14, 34)
            } else {
                (14, 54)
            };
            let len = f.len() - l4;
            let mut pseudo = Vec::new();
            if r.dst.is_ipv4() {
                pseudo.extend_from_slice(&f[l3 + 12..l3 + 20]);
                pseudo.extend_from_slice(&[0, r.proto.number()]);
                pseudo.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                pseudo.extend_from_slice(&f[l3 + 8..l3 + 40]);
                pseudo.extend_from_slice(&(len as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, r.proto.number()]);
            }
            assert_eq!(fold(sum(&f[l4..], sum(&pseudo, 0))), 0, "l4 checksum {r:?}");
            assert_eq!(&f[l4..l4 + 2], &40000u16.to_be_bytes());
        }
    }

    #[test]
    fn requests_validate() {
        assert!(req("10.0.0.2:1", "10.99.0.1:80", Proto::Tcp)
            .validate()
            .is_ok());
        assert!(req("[fd00::2]:1", "10.99.0.1:80", Proto::Tcp)
            .validate()
            .is_err());
        assert!(req("10.0.0.2:0", "10.99.0.1:80", Proto::Tcp)
            .validate()
            .is_err());
        let bad = serde_json::from_str::<TraceRequest>(
            r#"{"src":"10.0.0.2:1","dst":"10.99.0.1:80","color":"red"}"#,
        );
        assert!(bad.unwrap_err().to_string().contains("color"));
        assert_eq!("UDP".parse::<Proto>(), Ok(Proto::Udp));
        assert!("sctp".parse::<Proto>().is_err());
    }

    #[test]
    fn backend_addresses_decode() {
        let b = Backend {
            addr: addr_words("10.91.1.2".parse().unwrap()),
            port: 8080u16.to_be(),
            family: FAMILY_V4,
            flags: BACKEND_ACTIVE,
        };
        assert_eq!(
            crate::daemon::recover::backend_socket(&b),
            Some("10.91.1.2:8080".parse().unwrap())
        );
        let b6 = Backend {
            addr: addr_words("fd00::7".parse().unwrap()),
            port: 80u16.to_be(),
            family: FAMILY_V6,
            flags: 0,
        };
        assert_eq!(
            crate::daemon::recover::backend_socket(&b6),
            Some("[fd00::7]:80".parse().unwrap())
        );
    }
}
