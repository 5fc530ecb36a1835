//! Headroom's XDP balancer: a thin data path whose intelligence lives in
//! userspace, expressed as map contents (see docs/ARCHITECTURE.md).
//!
//! Per packet: parse → is the destination a VIP? → conntrack hit, or pick a
//! slot `flow_hash % M` in the service's table → rewrite (nat) or not (dsr)
//! → next hop from the kernel FIB → XDP_TX / XDP_REDIRECT. Every packet bumps
//! exactly one verdict counter; anything not ours leaves untouched.
#![no_std]
#![no_main]

use core::mem::size_of;

use frame::Frame;

mod frame;

use aya_ebpf::{
    bindings::{__sk_buff, xdp_action, BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU},
    helpers::{bpf_ktime_get_ns, generated::bpf_fib_lookup},
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use lb_common::{
    counter, flow_hash, Backend, Config, Counters, Flow, FlowKey, NextHop, RevNat, ServiceKey,
    ServiceValue, BACKEND_ACTIVE, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_SERVICES, DEFAULT_TABLE_SIZE, FAMILY_V4, FAMILY_V6, FLOW_SERVICE, MODE_NAT,
    NO_BACKEND, PROTO_TCP, PROTO_UDP,
};

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "BACKENDS")]
static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

// Two buffers per service so a table is replaced by flipping `table_base`.
// Mmapable so userspace writes a 65537-slot table with stores, not syscalls.
// Array elements are padded to 8 bytes, so slots are stored in pairs: the
// mapping is then a dense u32 array (slot i = element i/2, half i%2).
#[map(name = "TABLES")]
static TABLES: Array<[u32; 2]> =
    Array::with_max_entries(DEFAULT_MAX_SERVICES * DEFAULT_TABLE_SIZE, BPF_F_MMAPABLE);

// Per-CPU LRU lists, one shared table: no cross-CPU contention on eviction.
#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, BPF_F_NO_COMMON_LRU);

#[map(name = "NAT_REV")]
static NAT_REV: LruHashMap<FlowKey, RevNat> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, BPF_F_NO_COMMON_LRU);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "GLOBAL_STATS")]
static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map(name = "SERVICE_STATS")]
static SERVICE_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "BACKEND_STATS")]
static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "TX_PORTS")]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

// Per CPU: filled by whichever CPU missed, never torn by another.
#[map(name = "NEXTHOPS")]
static NEXTHOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

// One bit per source port: a reverse-NAT lookup only for packets from a
// backend port, so host traffic does not pay for it.
#[map(name = "NAT_PORTS")]
static NAT_PORTS: Array<[u64; 1024]> = Array::with_max_entries(1, 0);

// Room for bpf_fib_lookup's 64-byte parameters off the stack, which the TC
// program (a subprogram under a small caller) cannot spare.
#[map(name = "FIB_SCRATCH")]
static FIB_SCRATCH: PerCpuArray<Fib> = PerCpuArray::with_max_entries(1, 0);

// One bit per service port: packets to other ports are not for a VIP and
// skip the service lookup; those to a VIP port look up their flow first.
// Userspace sets a port's bit before the service exists, clears it after.
#[map(name = "VIP_PORTS")]
static VIP_PORTS: Array<[u64; 1024]> = Array::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_FRAGMENT: u8 = 44;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

/// `struct bpf_fib_lookup` without its unions (same 64-byte layout).
#[repr(C)]
struct Fib {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    tot_len: u16,
    ifindex: u32,
    flowinfo: u32,
    src: [u32; 4],
    dst: [u32; 4],
    vlan: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// A parsed TCP/UDP packet.
struct Pkt {
    l3: usize,
    l4: usize,
    key: FlowKey,
    tcp_flags: u8,
    /// IPv4 total length or IPv6 payload length + 40.
    ip_len: u16,
}

impl Pkt {
    /// The longest IP packet this one is on the wire (for a GSO skb one
    /// segment): what the FIB's MTU check and the next-hop cache see.
    #[inline(always)]
    fn mtu_len<C: Frame>(&self, ctx: &C) -> u16 {
        ctx.wire_len(self.ip_len, self.l3, self.l4, self.key.proto == PROTO_TCP)
    }
}

#[xdp]
pub fn headroom(ctx: XdpContext) -> u32 {
    let verdict = balance(&ctx);
    bump(verdict);
    match verdict {
        counter::TX => xdp_action::XDP_TX,
        counter::REDIRECT => xdp_action::XDP_REDIRECT,
        counter::DROP_NO_BACKEND | counter::DROP_REDIRECT => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// The same balancer at TC ingress, for veths and other virtual interfaces:
/// it handles the skb itself, so GSO and checksum offload survive, and a
/// redirect hands the skb to the egress device without a copy.
#[classifier]
pub fn headroom_tc(ctx: TcContext) -> i32 {
    let mut verdict = balance_skb(ctx.skb.skb);
    // Headers beyond the linear part (rare: paged skbs) are pulled in and the
    // packet parsed again; nothing was counted or changed before a parse fails.
    if needs_headers(verdict) && frame::pull_headers(&ctx) {
        verdict = balance_skb(ctx.skb.skb);
    }
    bump(verdict);
    match verdict {
        counter::TX | counter::REDIRECT => TC_ACT_REDIRECT,
        counter::DROP_NO_BACKEND | counter::DROP_REDIRECT => TC_ACT_SHOT,
        // Not ours: the next tcx program, tc filter or the stack decides.
        _ => TC_ACT_UNSPEC,
    }
}

/// [`balance`] as a BPF subprogram: called twice, inlined it would need
/// twice the stack.
#[inline(never)]
fn balance_skb(skb: *mut __sk_buff) -> u32 {
    balance(&TcContext::new(skb))
}

/// Verdicts that a packet whose headers are not all in the linear part gets.
#[inline(always)]
fn needs_headers(verdict: u32) -> bool {
    matches!(
        verdict,
        counter::PASS_TRUNC_ETH
            | counter::PASS_TRUNC_VLAN
            | counter::PASS_TRUNC_IPV4
            | counter::PASS_TRUNC_IPV6
            | counter::PASS_TRUNC_L4
            | counter::PASS_ICMP
    )
}

/// The floor of the benchmark, and the program on veth peers that lets them
/// take redirected frames.
#[xdp]
pub fn headroom_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn bump(c: u32) {
    if let Some(v) = GLOBAL_STATS.get_ptr_mut(c) {
        unsafe { *v += 1 };
    }
}

/// A pointer to a `T` at `off` bytes into the packet, if the packet holds it.
#[inline(always)]
fn at<T, C: Frame>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn rd<T: Copy>(p: *mut T) -> T {
    unsafe { *p }
}

#[inline(always)]
fn wr<T>(p: *mut T, v: T) {
    unsafe { *p = v }
}

/// Returns the verdict counter; the action follows from it.
#[inline(always)]
fn balance<C: Frame>(ctx: &C) -> u32 {
    let Some(eth_type) = at::<u16, C>(ctx, 12) else {
        return counter::PASS_TRUNC_ETH;
    };
    let mut proto = u16::from_be(rd(eth_type));
    let mut l3 = ETH_HLEN;
    if proto == ETH_P_8021Q {
        let Some(inner) = at::<u16, C>(ctx, 16) else {
            return counter::PASS_TRUNC_VLAN;
        };
        proto = u16::from_be(rd(inner));
        l3 = ETH_HLEN + 4;
    }
    match proto {
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => counter::PASS_NOT_IP,
    }
}

#[inline(always)]
fn ipv4<C: Frame>(ctx: &C, l3: usize) -> u32 {
    let Some(hdr) = at::<[u32; 5], C>(ctx, l3) else {
        return counter::PASS_TRUNC_IPV4;
    };
    let w0 = rd(hdr)[0].to_ne_bytes();
    let ihl = (w0[0] & 0x0f) as usize;
    if w0[0] >> 4 != 4 || ihl < 5 {
        return counter::PASS_TRUNC_IPV4;
    }
    let tot_len = u16::from_be_bytes([w0[2], w0[3]]);
    let hlen = ihl * 4;
    if (tot_len as usize) < hlen || l3 + tot_len as usize > ctx.len() {
        return counter::PASS_TRUNC_IPV4;
    }
    let w = rd(hdr);
    let w1 = w[1].to_ne_bytes();
    if u16::from_be_bytes([w1[2], w1[3]]) & 0x1fff != 0 {
        return counter::PASS_FRAGMENT;
    }
    let ip_proto = w[2].to_ne_bytes()[1];
    let l4 = l3 + hlen;
    let (src, dst) = ([w[3], 0, 0, 0], [w[4], 0, 0, 0]);
    match ip_proto {
        PROTO_TCP | PROTO_UDP => {
            let Some((sport, dport)) = ports_at(ctx, l4) else {
                return counter::PASS_TRUNC_L4;
            };
            let key = FlowKey {
                src,
                dst,
                sport,
                dport,
                proto: ip_proto,
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            l4_ports(ctx, l3, l4, key, tot_len)
        }
        IPPROTO_ICMP => icmp4(ctx, l3, l4, &src, w[4], tot_len),
        _ => counter::PASS_L4_OTHER,
    }
}

#[inline(always)]
fn ipv6<C: Frame>(ctx: &C, l3: usize) -> u32 {
    let Some(hdr) = at::<[u32; 10], C>(ctx, l3) else {
        return counter::PASS_TRUNC_IPV6;
    };
    let h = rd(hdr);
    let w0 = h[0].to_ne_bytes();
    let w1 = h[1].to_ne_bytes();
    let plen = u16::from_be_bytes([w1[0], w1[1]]) as usize;
    if w0[0] >> 4 != 6 || l3 + 40 + plen > ctx.len() {
        return counter::PASS_TRUNC_IPV6;
    }
    let nh = w1[2];
    let (src, dst) = ([h[2], h[3], h[4], h[5]], [h[6], h[7], h[8], h[9]]);
    let ip_len = (plen + 40) as u16;
    match nh {
        PROTO_TCP | PROTO_UDP => {
            let Some((sport, dport)) = ports_at(ctx, l3 + 40) else {
                return counter::PASS_TRUNC_L4;
            };
            let key = FlowKey {
                src,
                dst,
                sport,
                dport,
                proto: nh,
                family: FAMILY_V6,
                _pad: [0; 2],
            };
            l4_ports(ctx, l3, l3 + 40, key, ip_len)
        }
        IPPROTO_ICMPV6 => icmp6(ctx, l3, l3 + 40, &src, &dst, ip_len),
        IPPROTO_FRAGMENT => counter::PASS_FRAGMENT,
        _ => counter::PASS_L4_OTHER,
    }
}

/// The source and destination ports (network order) at `l4`.
#[inline(always)]
fn ports_at<C: Frame>(ctx: &C, l4: usize) -> Option<(u16, u16)> {
    let p = rd(at::<[u16; 2], C>(ctx, l4)?);
    Some((p[0], p[1]))
}

/// `key` is complete (ports included) before it is built: a key built with
/// zeroed ports and filled in later lets LLVM merge the zero stores into a
/// `memset`, which bpf-linker leaves as a call to a byte-at-a-time loop.
#[inline(always)]
fn l4_ports<C: Frame>(ctx: &C, l3: usize, l4: usize, key: FlowKey, ip_len: u16) -> u32 {
    let mut tcp_flags = 0;
    if key.proto == PROTO_TCP {
        let Some(th) = at::<[u8; 20], C>(ctx, l4) else {
            return counter::PASS_TRUNC_L4;
        };
        tcp_flags = rd(th)[13];
    } else if at::<[u8; 8], C>(ctx, l4).is_none() {
        return counter::PASS_TRUNC_L4;
    }
    let pkt = Pkt {
        l3,
        l4,
        key,
        tcp_flags,
        ip_len,
    };
    let chosen = 'pick: {
        // A port no service listens on is not a VIP's: no lookup at all.
        if port_in(&VIP_PORTS, key.dport) {
            // An established flow needs only its conntrack entry. A SYN
            // always selects: a reused 4-tuple is a new connection.
            let syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            let ct = if syn {
                None
            } else {
                CONNTRACK.get_ptr_mut(&key)
            };
            if let Some(f) = ct {
                if let Some(c) = established(&pkt, f) {
                    break 'pick c;
                }
            }
            let skey = ServiceKey {
                addr: key.dst,
                port: key.dport,
                proto: key.proto,
                family: key.family,
            };
            if let Some(svc) = unsafe { SERVICES.get(&skey) } {
                match to_backend(ctx, &pkt, svc, syn, ct) {
                    Ok(c) => break 'pick c,
                    Err(verdict) => return verdict,
                }
            }
        }
        // Not for a VIP: at most a nat reply (one call site keeps the
        // inlined code, and its stack, single).
        return nat_reply(ctx, &pkt);
    };
    deliver(ctx, &pkt, &chosen)
}

/// Where a packet of a VIP goes.
struct Chosen {
    /// Service id.
    sid: u32,
    nat: bool,
    /// Backend id and entry.
    id: u32,
    b: &'static Backend,
    /// The packet starts a flow (counted as such; nat: reverse entry made).
    new_flow: bool,
}

/// Whether `port` (network order) is set in a port bitmap.
#[inline(always)]
fn port_in(map: &Array<[u64; 1024]>, port: u16) -> bool {
    let port = u16::from_be(port) as usize;
    map.get(0)
        .is_some_and(|bits| bits[port >> 6] & (1u64 << (port & 63)) != 0)
}

/// The backend of a tracked flow from its entry alone. `None` when the full
/// path must decide (backend gone, UDP flow idle too long, or an entry of an
/// older program without its service): nothing was counted yet.
#[inline(always)]
fn established(pkt: &Pkt, f: *mut Flow) -> Option<Chosen> {
    let flow = rd(f);
    if flow.flags & FLOW_SERVICE == 0 {
        return None;
    }
    let b = active_backend(flow.backend)?;
    if pkt.key.proto == PROTO_UDP {
        let now = unsafe { bpf_ktime_get_ns() };
        let idle = CONFIG.get(0).map_or(0, |c| c.udp_idle_timeout_ns);
        if now.wrapping_sub(flow.atime_ns) > idle {
            return None;
        }
        unsafe { (*f).atime_ns = now };
    }
    bump(counter::CT_HIT);
    Some(Chosen {
        sid: flow.service as u32,
        nat: flow.mode == MODE_NAT,
        id: flow.backend,
        b,
        new_flow: false,
    })
}

/// Picks (or recalls) the flow's backend. `ct`: the flow's entry as the
/// short path found it (looked up once; `None` for a SYN or a miss).
#[inline(always)]
fn to_backend<C: Frame>(
    ctx: &C,
    pkt: &Pkt,
    svc: &ServiceValue,
    syn: bool,
    ct: Option<*mut Flow>,
) -> Result<Chosen, u32> {
    let key = &pkt.key;
    let udp = key.proto == PROTO_UDP;
    let mut now = 0;
    let mut chosen = None;
    if !syn {
        if let Some(f) = ct {
            let id = rd(f).backend;
            match active_backend(id) {
                None => bump(counter::CT_RESELECT),
                Some(b) if udp => {
                    now = unsafe { bpf_ktime_get_ns() };
                    let idle = CONFIG.get(0).map_or(0, |c| c.udp_idle_timeout_ns);
                    if now.wrapping_sub(rd(f).atime_ns) > idle {
                        bump(counter::CT_UDP_EXPIRED);
                    } else {
                        unsafe { (*f).atime_ns = now };
                        chosen = Some((id, b));
                    }
                }
                Some(b) => chosen = Some((id, b)),
            }
            if chosen.is_some() && unsafe { (*f).flags } & FLOW_SERVICE == 0 {
                // An entry of an older program: record its service, so its
                // next packets take the short path.
                unsafe {
                    (*f).service = svc.id as u16;
                    (*f).mode = svc.mode;
                    (*f).flags = FLOW_SERVICE;
                }
            }
        } else if key.proto == PROTO_TCP {
            bump(counter::MISS_NON_SYN);
        }
    } else {
        bump(counter::MISS_SYN);
    }

    let new_flow = chosen.is_none();
    let (id, b) = match chosen {
        Some(hit) => {
            bump(counter::CT_HIT);
            hit
        }
        None => {
            bump(counter::CT_MISS);
            let Some((id, b)) = select(svc, key) else {
                return Err(counter::DROP_NO_BACKEND);
            };
            if udp && now == 0 {
                now = unsafe { bpf_ktime_get_ns() };
            }
            let flow = Flow {
                backend: id,
                service: svc.id as u16,
                mode: svc.mode,
                flags: FLOW_SERVICE,
                atime_ns: now,
            };
            // Failure (map full of locked entries) only costs affinity.
            let _ = CONNTRACK.insert(key, &flow, 0);
            debug!(ctx, "new flow: service {} -> backend {}", svc.id, id);
            (id, b)
        }
    };
    Ok(Chosen {
        sid: svc.id,
        nat: svc.mode == MODE_NAT,
        id,
        b,
        new_flow,
    })
}

/// Sends a packet of service `sid` to backend `id`: next hop, nat rewrite
/// (a new nat flow also gets its reverse entry), counters, out.
#[inline(always)]
fn deliver<C: Frame>(ctx: &C, pkt: &Pkt, c: &Chosen) -> u32 {
    let (sid, nat, id, b, new_flow) = (c.sid, c.nat, c.id, c.b, c.new_flow);
    let key = &pkt.key;
    let mtu_len = pkt.mtu_len(ctx);
    let hop = resolve(ctx, NEXTHOPS.get_ptr_mut(id), mtu_len, |fib| {
        fib_init(ctx, fib, key.family, key.proto, mtu_len);
        fib.sport = key.sport;
        fib.dport = if nat { b.port } else { key.dport };
        fib.src = key.src;
        fib.dst = b.addr;
    });
    let Some(hop) = hop else {
        return counter::PASS_FIB;
    };

    if nat {
        if new_flow {
            let rkey = FlowKey {
                src: words(&b.addr),
                dst: key.src,
                sport: b.port,
                dport: key.sport,
                proto: key.proto,
                family: key.family,
                _pad: [0; 2],
            };
            let mut rev = core::mem::MaybeUninit::<RevNat>::uninit();
            let _ = NAT_REV.insert(&rkey, rev_nat(&mut rev, &key.dst, key.dport, sid), 0);
        }
        if !rewrite(ctx, pkt, false, &b.addr, b.port) {
            return counter::PASS_TRUNC_L4;
        }
    }
    let len = ctx.len() as u64;
    account(&SERVICE_STATS, sid, len, new_flow);
    account(&BACKEND_STATS, id, len, new_flow);
    forward(ctx, &hop)
}

/// The backend of a new flow: `table[flow_hash % M]` of the active buffer.
#[inline(always)]
fn select(svc: &ServiceValue, key: &FlowKey) -> Option<(u32, &'static Backend)> {
    if svc.table_size == 0 {
        return None;
    }
    let index = svc.table_base.wrapping_add(flow_hash(key) % svc.table_size);
    let id = TABLES.get(index >> 1)?[(index & 1) as usize];
    if id == NO_BACKEND {
        return None;
    }
    Some((id, active_backend(id)?))
}

/// Backend `id`, if it is in use (removed ones are not).
#[inline(always)]
fn active_backend(id: u32) -> Option<&'static Backend> {
    // A reference into the map, not a copy: the stack is tight.
    let b = BACKENDS.get(id)?;
    (b.flags & BACKEND_ACTIVE != 0).then_some(b)
}

/// A reply from a nat backend: source back to the VIP, then to the client.
#[inline(always)]
fn nat_reply<C: Frame>(ctx: &C, pkt: &Pkt) -> u32 {
    let key = &pkt.key;
    if !port_in(&NAT_PORTS, key.sport) {
        return counter::PASS_NOT_VIP;
    }
    let Some(rev) = NAT_REV.get_ptr_mut(key) else {
        return counter::PASS_NOT_VIP;
    };
    let (vip, vport) = (rd(rev).vip, rd(rev).vport);
    let cache = unsafe { core::ptr::addr_of_mut!((*rev).hop) };
    let mtu_len = pkt.mtu_len(ctx);
    let hop = resolve(ctx, Some(cache), mtu_len, |fib| {
        fib_init(ctx, fib, key.family, key.proto, mtu_len);
        fib.sport = vport;
        fib.dport = key.dport;
        fib.src = vip;
        fib.dst = key.dst;
    });
    let Some(hop) = hop else {
        return counter::PASS_FIB;
    };
    if !rewrite(ctx, pkt, true, &vip, vport) {
        return counter::PASS_TRUNC_L4;
    }
    bump(counter::NAT_REPLY);
    forward(ctx, &hop)
}

/// A copy of four words as four loads. A plain array copy between two
/// pointers that LLVM cannot prove apart becomes a `memmove`, which
/// bpf-linker leaves as a call to a byte-at-a-time loop.
#[inline(always)]
fn words(a: &[u32; 4]) -> [u32; 4] {
    unsafe {
        [
            core::ptr::read_volatile(&a[0]),
            core::ptr::read_volatile(&a[1]),
            core::ptr::read_volatile(&a[2]),
            core::ptr::read_volatile(&a[3]),
        ]
    }
}

// `rev_nat` writes every byte of a `RevNat` field by field: that holds while
// it has no implicit padding and its hop is whole words.
const _: () = assert!(
    size_of::<RevNat>() == 16 + 2 + 2 + 4 + size_of::<NextHop>()
        && size_of::<NextHop>() == 24
        && core::mem::align_of::<NextHop>() == 4
);

/// The reverse-NAT entry of a new flow, written in place, its next hop
/// empty (epoch 0). The hop is zeroed word by word: a zeroed struct literal
/// becomes a `memset` call (see [`l4_ports`]), and so does a copy of it.
#[inline(always)]
fn rev_nat<'a>(
    rev: &'a mut core::mem::MaybeUninit<RevNat>,
    vip: &[u32; 4],
    vport: u16,
    service: u32,
) -> &'a RevNat {
    let p = rev.as_mut_ptr();
    unsafe {
        core::ptr::addr_of_mut!((*p).vip).write(*vip);
        core::ptr::addr_of_mut!((*p).vport).write(vport);
        core::ptr::addr_of_mut!((*p)._pad).write([0; 2]);
        core::ptr::addr_of_mut!((*p).service).write(service);
        let hop = core::ptr::addr_of_mut!((*p).hop) as *mut u32;
        let mut i = 0;
        while i < size_of::<NextHop>() / 4 {
            hop.add(i).write_volatile(0);
            i += 1;
        }
        rev.assume_init_ref()
    }
}

/// Where a frame goes next: egress interface and MACs.
#[derive(Clone, Copy)]
struct Hop {
    ifindex: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
}

/// The next hop: from `cache` while it is of the current epoch and has
/// carried packets this long, else from the FIB (whose answer refills it).
#[inline(always)]
fn resolve<C: Frame>(
    ctx: &C,
    cache: Option<*mut NextHop>,
    len: u16,
    params: impl FnOnce(&mut Fib),
) -> Option<Hop> {
    let epoch = CONFIG.get(0).map_or(0, |c| c.epoch);
    if let Some(c) = cache {
        let c = rd(c);
        if c.epoch == epoch && len <= c.max_len {
            return Some(Hop {
                ifindex: c.ifindex,
                dmac: c.dmac,
                smac: c.smac,
            });
        }
    }
    let fib = lookup_with(ctx, params)?;
    if let Some(c) = cache {
        let old = rd(c);
        // The FIB checked the MTU for this length: shorter packets are safe.
        let max_len = if old.epoch == epoch && old.ifindex == fib.ifindex && old.max_len > len {
            old.max_len
        } else {
            len
        };
        wr(
            c,
            NextHop {
                ifindex: fib.ifindex,
                epoch,
                max_len,
                dmac: fib.dmac,
                smac: fib.smac,
                _pad: [0; 2],
            },
        );
    }
    Some(fib)
}

/// Rewrites the destination (or, for replies, the source) address and port,
/// fixing the IPv4 header and TCP/UDP checksums incrementally.
#[inline(always)]
fn rewrite<C: Frame>(ctx: &C, pkt: &Pkt, source: bool, addr: &[u32; 4], port: u16) -> bool {
    // Addresses are in the TCP/UDP pseudo-header, ports in the segment: TC
    // must tell its checksum helper which is which.
    let mut da = Delta(0);
    let mut dp = Delta(0);
    let v4 = pkt.key.family == FAMILY_V4;
    let (addr_off, port_off) = match (v4, source) {
        (true, true) => (12, 0),
        (true, false) => (16, 2),
        (false, true) => (8, 0),
        (false, false) => (24, 2),
    };
    if v4 {
        let Some(a) = at::<u32, C>(ctx, pkt.l3 + addr_off) else {
            return false;
        };
        let Some(c) = at::<u16, C>(ctx, pkt.l3 + 10) else {
            return false;
        };
        let old = rd(a);
        da.w32(old, addr[0]);
        wr(a, addr[0]);
        wr(c, da.apply(rd(c)));
    } else {
        let Some(a) = at::<[u32; 4], C>(ctx, pkt.l3 + addr_off) else {
            return false;
        };
        let old = rd(a);
        let mut i = 0;
        while i < 4 {
            da.w32(old[i], addr[i]);
            i += 1;
        }
        wr(a, words(addr));
    }
    let Some(p) = at::<u16, C>(ctx, pkt.l4 + port_off) else {
        return false;
    };
    dp.w16(rd(p), port);
    wr(p, port);
    let udp = pkt.key.proto == PROTO_UDP;
    let csum_off = pkt.l4 + if udp { 6 } else { 16 };
    let Some(c) = at::<u16, C>(ctx, csum_off) else {
        // A first fragment too short to carry the TCP checksum: leave it.
        return !udp;
    };
    ctx.l4_csum(csum_off, rd(c), da, dp, udp, v4)
}

/// ICMPv4 fragmentation-needed quoting a balanced flow: to that flow's backend.
#[inline(always)]
fn icmp4<C: Frame>(
    ctx: &C,
    l3: usize,
    l4: usize,
    outer_src: &[u32; 4],
    outer_dst: u32,
    ip_len: u16,
) -> u32 {
    let Some(ih) = at::<[u8; 8], C>(ctx, l4) else {
        return counter::PASS_TRUNC_L4;
    };
    let ih = rd(ih);
    if ih[0] != ICMP_DEST_UNREACH || ih[1] != ICMP_FRAG_NEEDED {
        return counter::PASS_ICMP;
    }
    let il3 = l4 + 8;
    let Some(inner) = at::<[u32; 5], C>(ctx, il3) else {
        return counter::PASS_ICMP;
    };
    let w = rd(inner);
    let b0 = w[0].to_ne_bytes()[0];
    let ihl = (b0 & 0x0f) as usize;
    let iproto = w[2].to_ne_bytes()[1];
    if b0 >> 4 != 4 || ihl < 5 || (iproto != PROTO_TCP && iproto != PROTO_UDP) {
        return counter::PASS_ICMP;
    }
    let il4 = il3 + ihl * 4;
    let Some(ports) = at::<[u16; 2], C>(ctx, il4) else {
        return counter::PASS_ICMP;
    };
    let p = rd(ports);
    // The quoted packet went VIP -> client; the flow is client -> VIP.
    let mut key = FlowKey {
        sport: p[1],
        dport: p[0],
        proto: iproto,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    key.src[0] = w[4];
    key.dst[0] = w[3];
    if outer_dst != w[3] {
        return counter::PASS_ICMP;
    }
    let Some((nat, b)) = tracked(&key) else {
        return counter::PASS_ICMP;
    };
    let Some(hop) = lookup_with(ctx, |fib| {
        fib_init(ctx, fib, FAMILY_V4, IPPROTO_ICMP, ip_len);
        fib.src = *outer_src;
        fib.dst = b.addr;
    }) else {
        return counter::PASS_FIB;
    };
    if nat {
        // Outer destination, inner source address and port, inner IP checksum;
        // the ICMP checksum covers the inner bytes, so it follows them.
        let (Some(odst), Some(ocsum), Some(isrc), Some(icsum), Some(isport), Some(ccsum)) = (
            at::<u32, C>(ctx, l3 + 16),
            at::<u16, C>(ctx, l3 + 10),
            at::<u32, C>(ctx, il3 + 12),
            at::<u16, C>(ctx, il3 + 10),
            at::<u16, C>(ctx, il4),
            at::<u16, C>(ctx, l4 + 2),
        ) else {
            return counter::PASS_ICMP;
        };
        let mut od = Delta(0);
        od.w32(rd(odst), b.addr[0]);
        wr(odst, b.addr[0]);
        wr(ocsum, od.apply(rd(ocsum)));

        let mut id = Delta(0);
        id.w32(rd(isrc), b.addr[0]);
        let old_icsum = rd(icsum);
        let new_icsum = id.apply(old_icsum);
        let mut cd = id;
        cd.w16(old_icsum, new_icsum);
        cd.w16(rd(isport), b.port);
        wr(isrc, b.addr[0]);
        wr(icsum, new_icsum);
        wr(isport, b.port);
        wr(ccsum, cd.apply(rd(ccsum)));
    }
    bump(counter::ICMP_TO_BACKEND);
    forward(ctx, &hop)
}

/// ICMPv6 packet-too-big quoting a balanced flow: to that flow's backend.
#[inline(always)]
fn icmp6<C: Frame>(
    ctx: &C,
    l3: usize,
    l4: usize,
    outer_src: &[u32; 4],
    outer_dst: &[u32; 4],
    ip_len: u16,
) -> u32 {
    let Some(ih) = at::<[u8; 8], C>(ctx, l4) else {
        return counter::PASS_TRUNC_L4;
    };
    if rd(ih)[0] != ICMPV6_PKT_TOOBIG {
        return counter::PASS_ICMP;
    }
    let il3 = l4 + 8;
    let Some(inner) = at::<[u32; 10], C>(ctx, il3) else {
        return counter::PASS_ICMP;
    };
    let h = rd(inner);
    let w1 = h[1].to_ne_bytes();
    let iproto = w1[2];
    if h[0].to_ne_bytes()[0] >> 4 != 6 || (iproto != PROTO_TCP && iproto != PROTO_UDP) {
        return counter::PASS_ICMP;
    }
    let il4 = il3 + 40;
    let Some(ports) = at::<[u16; 2], C>(ctx, il4) else {
        return counter::PASS_ICMP;
    };
    let p = rd(ports);
    let key = FlowKey {
        src: [h[6], h[7], h[8], h[9]],
        dst: [h[2], h[3], h[4], h[5]],
        sport: p[1],
        dport: p[0],
        proto: iproto,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    if *outer_dst != key.dst {
        return counter::PASS_ICMP;
    }
    let Some((nat, b)) = tracked(&key) else {
        return counter::PASS_ICMP;
    };
    let Some(hop) = lookup_with(ctx, |fib| {
        fib_init(ctx, fib, FAMILY_V6, IPPROTO_ICMPV6, ip_len);
        fib.src = *outer_src;
        fib.dst = b.addr;
    }) else {
        return counter::PASS_FIB;
    };
    if nat {
        // The ICMPv6 checksum covers the pseudo-header (outer destination)
        // and the quoted bytes (inner source address and port).
        let (Some(odst), Some(isrc), Some(isport), Some(ccsum)) = (
            at::<[u32; 4], C>(ctx, l3 + 24),
            at::<[u32; 4], C>(ctx, il3 + 8),
            at::<u16, C>(ctx, il4),
            at::<u16, C>(ctx, l4 + 2),
        ) else {
            return counter::PASS_ICMP;
        };
        let mut d = Delta(0);
        let o = rd(odst);
        let s = rd(isrc);
        let mut i = 0;
        while i < 4 {
            d.w32(o[i], b.addr[i]);
            d.w32(s[i], b.addr[i]);
            i += 1;
        }
        d.w16(rd(isport), b.port);
        wr(odst, words(&b.addr));
        wr(isrc, words(&b.addr));
        wr(isport, b.port);
        wr(ccsum, d.apply(rd(ccsum)));
    }
    bump(counter::ICMP_TO_BACKEND);
    forward(ctx, &hop)
}

/// Whether a tracked flow of a current service is nat, and its live
/// backend, for ICMP errors (no selection: an error about an unknown flow is
/// not ours to route).
#[inline(always)]
fn tracked(key: &FlowKey) -> Option<(bool, &'static Backend)> {
    let skey = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    // Only for a VIP that is still a service (errors are rare: the lookup
    // costs nothing that matters).
    let svc = unsafe { SERVICES.get(&skey) }?;
    let f = unsafe { CONNTRACK.get(key) }?;
    // The flow's own mode; an entry of an older program has only its service's.
    let mode = if f.flags & FLOW_SERVICE != 0 {
        f.mode
    } else {
        svc.mode
    };
    Some((mode == MODE_NAT, active_backend(f.backend)?))
}

/// The inputs of a lookup without flags; the caller sets `src` and `dst`.
/// The outputs (`vlan`, MACs) are left as they are: zeroing them would cost
/// a `memset` call (see [`l4_ports`]) for bytes the kernel overwrites.
#[inline(always)]
fn fib_init<C: Frame>(ctx: &C, fib: &mut Fib, family: u8, proto: u8, ip_len: u16) {
    fib.family = if family == FAMILY_V6 {
        AF_INET6
    } else {
        AF_INET
    };
    fib.l4_protocol = proto;
    fib.sport = 0;
    fib.dport = 0;
    fib.tot_len = ip_len;
    fib.ifindex = ctx.ifindex();
    fib.flowinfo = 0;
}

impl Fib {
    #[inline(always)]
    fn hop(&self) -> Hop {
        Hop {
            ifindex: self.ifindex,
            dmac: self.dmac,
            smac: self.smac,
        }
    }
}

/// Fills the per-CPU FIB parameters with `fill` and asks the FIB.
#[inline(always)]
fn lookup_with<C: Frame>(ctx: &C, fill: impl FnOnce(&mut Fib)) -> Option<Hop> {
    let fib = unsafe { &mut *FIB_SCRATCH.get_ptr_mut(0)? };
    fill(fib);
    if !lookup(ctx, fib) {
        return None;
    }
    Some(fib.hop())
}

/// Asks the kernel's FIB (routes + neighbours) for the next hop.
#[inline(always)]
fn lookup<C: Frame>(ctx: &C, fib: &mut Fib) -> bool {
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr() as *mut _,
            fib as *mut Fib as *mut _,
            size_of::<Fib>() as i32,
            0,
        )
    };
    rc == 0
}

/// Sets the next hop's MACs and sends the frame on its way.
#[inline(always)]
fn forward<C: Frame>(ctx: &C, hop: &Hop) -> u32 {
    let Some(eth) = at::<[u8; 12], C>(ctx, 0) else {
        return counter::PASS_TRUNC_ETH;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&hop.dmac);
    macs[6..].copy_from_slice(&hop.smac);
    wr(eth, macs);
    if hop.ifindex == ctx.ifindex() {
        if C::TX_IS_REDIRECT {
            // TC has no "back out where it came from" verdict: redirect there.
            return match ctx.redirect(hop.ifindex) {
                counter::REDIRECT => counter::TX,
                v => v,
            };
        }
        return counter::TX;
    }
    ctx.redirect(hop.ifindex)
}

#[inline(always)]
fn account(map: &PerCpuArray<Counters>, id: u32, len: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(id) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
            (*c).new_flows += new_flow as u64;
        }
    }
}

/// RFC 1624 incremental checksum update: the sum of `~old + new` over the
/// 16-bit words that changed. Words are read in memory order; one's
/// complement sums do not care about byte order as long as all agree.
#[derive(Clone, Copy)]
pub struct Delta(pub u32);

impl Delta {
    #[inline(always)]
    fn w16(&mut self, old: u16, new: u16) {
        self.0 += (!old) as u32 + new as u32;
    }

    #[inline(always)]
    fn w32(&mut self, old: u32, new: u32) {
        self.w16(old as u16, new as u16);
        self.w16((old >> 16) as u16, (new >> 16) as u16);
    }

    /// The change as a 16-bit one's complement sum (a checksum diff).
    #[inline(always)]
    pub fn fold(&self) -> u16 {
        fold(self.0)
    }

    #[inline(always)]
    pub fn apply(&self, csum: u16) -> u16 {
        !fold((!csum) as u32 + fold(self.0) as u32)
    }
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
