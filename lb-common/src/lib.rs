//! Map keys and values shared by the Headroom XDP program and userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding fields: hash-map keys are
//! compared byte for byte, so padding must be named and zeroed. Addresses are
//! kept as the wire bytes, reinterpreted as four native-endian `u32` words
//! (`u32::from_ne_bytes(octets)`); IPv4 uses word 0 and leaves the rest zero.
//! Ports are stored in network byte order, as they appear in the packet.
#![no_std]

/// Address family tag for IPv4 keys and values.
pub const FAMILY_V4: u8 = 4;
/// Address family tag for IPv6 keys and values.
pub const FAMILY_V6: u8 = 6;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Forwarding mode `nat`: destination rewritten to the backend, replies rewritten back.
pub const MODE_NAT: u8 = 0;
/// Forwarding mode `dsr`: only the Ethernet header changes; backends own the VIP.
pub const MODE_DSR: u8 = 1;

/// Backend flag: the slot is in use. A conntrack entry pointing at a backend
/// without it is re-selected.
pub const BACKEND_ACTIVE: u8 = 1;
/// Backend flag: no new flows (absent from tables), existing flows continue.
pub const BACKEND_DRAINING: u8 = 2;
/// Backend flag: a dsr service's backend. Its replies go straight to the
/// client, so userspace leaves its port out of `NAT_PORTS` (the program
/// skips the reverse-NAT lookup for them, unless a nat backend uses the
/// same port).
pub const BACKEND_DSR: u8 = 4;

/// Table entry meaning "no backend": a service whose table holds it drops new flows.
pub const NO_BACKEND: u32 = u32::MAX;

/// Default lookup-table size (prime).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
/// Default number of services the table map has room for (two buffers each).
pub const DEFAULT_MAX_SERVICES: u32 = 64;
/// Default number of backend slots.
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Default connection-table size (flows).
pub const DEFAULT_CONNTRACK_SIZE: u32 = 1 << 20;
/// Default idle timeout of a UDP flow.
pub const DEFAULT_UDP_IDLE_TIMEOUT_NS: u64 = 30_000_000_000;

/// Names of the maps in the object, shared so userspace never spells them twice.
pub mod maps {
    /// `HashMap<ServiceKey, ServiceValue>`.
    pub const SERVICES: &str = "SERVICES";
    /// `Array<Backend>` indexed by backend id.
    pub const BACKENDS: &str = "BACKENDS";
    /// `Array<[u32; 2]>` of backend ids, slot i at element i/2: all services'
    /// double-buffered lookup tables, mmapable (a dense `u32` array to userspace).
    pub const TABLES: &str = "TABLES";
    /// `LruHashMap<FlowKey, Flow>`: the connection table.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// `LruHashMap<FlowKey, RevNat>`: reply 5-tuple (backend → client) to VIP.
    pub const NAT_REV: &str = "NAT_REV";
    /// `Array<Config>` with one entry.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<u64>` indexed by [`crate::counter`].
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    /// `PerCpuArray<Counters>` indexed by service id.
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// `PerCpuArray<Counters>` indexed by backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// `DevMapHash` keyed by ifindex: interfaces XDP_REDIRECT may send to.
    pub const TX_PORTS: &str = "TX_PORTS";
    /// `PerCpuArray<NextHop>` indexed by backend id: the FIB's answer, cached.
    pub const NEXTHOPS: &str = "NEXTHOPS";
    /// `Array<[u64; 1024]>` with one entry: a bitmap of backend source ports;
    /// only packets from those ports are looked up as nat replies.
    pub const NAT_PORTS: &str = "NAT_PORTS";
    /// `Array<[u64; 1024]>` with one entry: a bitmap of the services' ports;
    /// only packets to those ports look up their flow before the service.
    pub const VIP_PORTS: &str = "VIP_PORTS";
}

/// Names of the programs in the object.
pub mod programs {
    /// The balancer.
    pub const BALANCER: &str = "headroom";
    /// `XDP_PASS` and nothing else: attached to veth peers so redirected
    /// frames are accepted, and the floor of the benchmark.
    pub const PASS: &str = "headroom_pass";
    /// The balancer at TC ingress (a `sched_cls` program, for veths).
    pub const TC: &str = "headroom_tc";
}

/// Global counters: indexes into `GLOBAL_STATS`.
///
/// Every packet increments exactly one *verdict* counter (`0..VERDICTS`), so
/// the verdict counters add up to the packets seen. The *event* counters
/// after them count things that happened on the way.
pub mod counter {
    /// Not IPv4 or IPv6 (ARP, LLDP, …).
    pub const PASS_NOT_IP: u32 = 0;
    /// Ethernet header truncated.
    pub const PASS_TRUNC_ETH: u32 = 1;
    /// 802.1Q tag truncated.
    pub const PASS_TRUNC_VLAN: u32 = 2;
    /// IPv4 header truncated, or its IHL/total length is impossible.
    pub const PASS_TRUNC_IPV4: u32 = 3;
    /// IPv6 fixed header truncated, or its payload length is impossible.
    pub const PASS_TRUNC_IPV6: u32 = 4;
    /// TCP, UDP or ICMP header truncated.
    pub const PASS_TRUNC_L4: u32 = 5;
    /// Another transport, IPv6 extension headers, or a non-first IPv4 fragment.
    pub const PASS_L4_OTHER: u32 = 6;
    /// IPv4 fragment other than the first: carries no ports.
    pub const PASS_FRAGMENT: u32 = 7;
    /// TCP/UDP not addressed to a VIP and not a reply of a nat flow.
    pub const PASS_NOT_VIP: u32 = 8;
    /// ICMP that is not an error quoting a tracked flow.
    pub const PASS_ICMP: u32 = 9;
    /// The kernel's FIB had no route or neighbour for the next hop.
    pub const PASS_FIB: u32 = 10;
    /// A VIP whose table has no backend.
    pub const DROP_NO_BACKEND: u32 = 11;
    /// Redirect to the egress device failed.
    pub const DROP_REDIRECT: u32 = 12;
    /// Sent back out of the interface it came in on.
    pub const TX: u32 = 13;
    /// Redirected to another interface.
    pub const REDIRECT: u32 = 14;
    /// Number of verdict counters.
    pub const VERDICTS: u32 = 15;

    /// Connection-table hit that was used.
    pub const CT_HIT: u32 = 15;
    /// Connection-table miss (new flow or lost state).
    pub const CT_MISS: u32 = 16;
    /// Miss on a TCP SYN (or UDP): an expected new flow.
    pub const MISS_SYN: u32 = 17;
    /// Miss on a TCP packet without SYN: state lost (LRU eviction, restart).
    pub const MISS_NON_SYN: u32 = 18;
    /// Hit whose backend was removed: re-selected.
    pub const CT_RESELECT: u32 = 19;
    /// UDP hit older than the idle timeout: re-selected.
    pub const CT_UDP_EXPIRED: u32 = 20;
    /// Reply from a nat backend rewritten back to the VIP.
    pub const NAT_REPLY: u32 = 21;
    /// ICMP error quoting a tracked flow, sent to its backend.
    pub const ICMP_TO_BACKEND: u32 = 22;
    /// Number of counters.
    pub const COUNT: u32 = 23;

    /// Snake-case names, indexed like the counters (metrics labels, tests).
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_trunc_eth",
        "pass_trunc_vlan",
        "pass_trunc_ipv4",
        "pass_trunc_ipv6",
        "pass_trunc_l4",
        "pass_l4_other",
        "pass_fragment",
        "pass_not_vip",
        "pass_icmp",
        "pass_fib",
        "drop_no_backend",
        "drop_redirect",
        "tx",
        "redirect",
        "ct_hit",
        "ct_miss",
        "miss_syn",
        "miss_non_syn",
        "ct_reselect",
        "ct_udp_expired",
        "nat_reply",
        "icmp_to_backend",
    ];
}

/// A flow's 5-tuple as seen on the wire (conntrack and reverse-NAT key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address words.
    pub src: [u32; 4],
    /// Destination address words.
    pub dst: [u32; 4],
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 2],
}

/// Connection-table value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Backend id the flow is pinned to.
    pub backend: u32,
    /// The flow's service id (valid with `FLOW_SERVICE`).
    pub service: u16,
    /// The service's mode when the flow began (valid with `FLOW_SERVICE`).
    pub mode: u8,
    /// `FLOW_SERVICE`, or 0 in entries of older programs.
    pub flags: u8,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet; kept for UDP only.
    pub atime_ns: u64,
}

/// `Flow::flags`: service and mode are recorded, so an established flow is
/// forwarded without looking up its service.
pub const FLOW_SERVICE: u8 = 1;

/// Services map key: a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// VIP address words.
    pub addr: [u32; 4],
    /// VIP port, network order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// Services map value. Userspace replaces the whole value to swap tables:
/// a hash-map update is an atomic replace, so the program sees the old
/// `table_base` or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Service id: index into `SERVICE_STATS`.
    pub id: u32,
    /// Index in `TABLES` of slot 0 of the active table.
    pub table_base: u32,
    /// M: number of slots (prime); 0 means no backend.
    pub table_size: u32,
    /// `MODE_NAT` or `MODE_DSR`.
    pub mode: u8,
    /// Reserved, zero.
    pub flags: u8,
    /// Zero.
    pub _pad: [u8; 2],
}

/// A backend (real server).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Address words.
    pub addr: [u32; 4],
    /// Port, network order (nat mode; dsr keeps the VIP's port).
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `BACKEND_ACTIVE` | `BACKEND_DRAINING` | `BACKEND_DSR`.
    pub flags: u8,
}

/// A next hop as `bpf_fib_lookup` gave it, cached so that most packets skip
/// the lookup. Valid while `epoch` equals `Config::epoch` (userspace bumps it
/// when routes, neighbours or backends change) and for packets no longer
/// than `max_len`, the longest one the FIB has accepted for it (so the FIB's
/// MTU check still sees every longer packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    /// `Config::epoch` this was looked up in; 0 = never.
    pub epoch: u32,
    /// Longest IP packet (bytes) the FIB accepted for this hop.
    pub max_len: u16,
    /// Next hop's MAC.
    pub dmac: [u8; 6],
    /// Egress interface's MAC.
    pub smac: [u8; 6],
    /// Zero.
    pub _pad: [u8; 2],
}

/// Reverse-NAT value: what a reply from a backend is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    /// VIP address words.
    pub vip: [u32; 4],
    /// VIP port, network order.
    pub vport: u16,
    /// Zero.
    pub _pad: [u8; 2],
    /// Service id.
    pub service: u32,
    /// Next hop towards the client, cached by the program.
    pub hop: NextHop,
}

/// Runtime configuration (one-entry array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// UDP flows idle longer than this are re-selected.
    pub udp_idle_timeout_ns: u64,
    /// Reserved, zero.
    pub flags: u32,
    /// Next-hop cache generation: cached hops of another epoch are stale.
    pub epoch: u32,
}

/// Per-service and per-backend traffic counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (frame length as received).
    pub bytes: u64,
    /// Flows assigned (conntrack misses that selected a backend).
    pub new_flows: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, with explicit padding fields.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::NextHop {}
}

#[inline(always)]
fn mix(mut h: u32, k: u32) -> u32 {
    // murmur3 block step: cheap, and good enough spread for slot choice.
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    h ^= k;
    h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// The flow hash that picks a table slot: `slot = flow_hash(key) % M`.
///
/// Defined here so the program, `headroom lb trace` and the tests agree, and
/// so every balancer running the same table sends a flow to the same backend.
/// Hashes only the words the family uses.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = 0x9747_b28c_u32;
    h = mix(h, key.src[0]);
    h = mix(h, key.dst[0]);
    if key.family == FAMILY_V6 {
        h = mix(h, key.src[1]);
        h = mix(h, key.src[2]);
        h = mix(h, key.src[3]);
        h = mix(h, key.dst[1]);
        h = mix(h, key.dst[2]);
        h = mix(h, key.dst[3]);
    }
    h = mix(h, ((key.sport as u32) << 16) | key.dport as u32);
    h = mix(h, key.proto as u32);
    // murmur3 finaliser
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
