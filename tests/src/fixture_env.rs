//! The ground for packet fixtures and the XDP benchmark: a namespace whose
//! FIB gives known next hops (static addresses, permanent neighbours), and a
//! loaded balancer.
//!
//! ```text
//!   client 10.0.0.2 / fd00::2 ── fx0 [balancer ns] fx1 ── backends 10.1.0.10.. / fd01::10..
//!   (and 10.0.0.50 / fd00::50: a backend on the client's link, reached by XDP_TX)
//! ```
//! Frames are run with BPF_PROG_TEST_RUN as if received on `fx0` (or `fx1`
//! for replies); the thread running them must have entered the namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use headroom::{Balancer, LoadOptions};
use lb_common::{Backend, FlowKey, ServiceKey, BACKEND_ACTIVE};

use crate::Netns;

/// MAC of the client's side of the world (the neighbour behind `fx0`).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];
/// MAC of the balancer's client-facing interface `fx0`.
pub const FX0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xf0, 0x00];
/// MAC of the balancer's backend-facing interface `fx1`.
pub const FX1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xf1, 0x00];

/// The client, IPv4.
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The client, IPv6.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The VIP, IPv4 (owned by nobody in this namespace).
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// The VIP, IPv6.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd64, 0, 0, 0, 0, 0, 0, 1);

/// Backends behind `fx1`: index i is 10.1.0.(10+i) / fd01::(10+i).
pub const NUM_BACKENDS: u8 = 3;

/// Address of backend `i` behind `fx1`.
pub fn backend4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 10 + i)
}

/// IPv6 address of backend `i` behind `fx1`.
pub fn backend6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0x10 + u16::from(i))
}

/// MAC of backend `i` behind `fx1`.
pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0xbe, i]
}

/// A backend on the client's link (egress = ingress: XDP_TX).
pub const LOCAL_BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
/// IPv6 backend on the client's link.
pub const LOCAL_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x50);
/// MAC of the local backend.
pub const LOCAL_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x50];

/// Address words as the maps keep them, and the family tag (the daemon's own).
pub use headroom::config::{addr_words as words, family};

/// Services-map key of `vip:port/proto`.
pub fn service_key(vip: IpAddr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: words(vip),
        port: port.to_be(),
        proto,
        family: family(vip),
    }
}

/// An active backend entry.
pub fn backend(addr: IpAddr, port: u16) -> Backend {
    Backend {
        addr: words(addr),
        port: port.to_be(),
        family: family(addr),
        flags: BACKEND_ACTIVE,
    }
}

/// Conntrack key of a flow `src:sport -> dst:dport/proto`.
pub fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: words(src),
        dst: words(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: family(src),
        _pad: [0; 2],
    }
}

/// The namespace and the balancer loaded for it.
pub struct FixtureEnv {
    /// The balancer's namespace (enter it before running frames).
    pub ns: Netns,
    /// The loaded (not attached) balancer.
    pub lb: Balancer,
    /// ifindex of `fx0` (client side).
    pub fx0: u32,
    /// ifindex of `fx1` (backend side).
    pub fx1: u32,
}

impl FixtureEnv {
    /// Builds the namespace and loads the balancer with `opts`.
    pub fn new(opts: &LoadOptions) -> Result<Self> {
        Self::build(|| Balancer::load(opts).context("loading the balancer"))
    }

    /// Like [`Self::new`], with the balancer's maps pinned in `dir`.
    pub fn new_pinned(opts: &LoadOptions, dir: &std::path::Path) -> Result<Self> {
        Self::build(|| Balancer::load_pinned(opts, dir).context("loading the pinned balancer"))
    }

    fn build(load: impl FnOnce() -> Result<Balancer>) -> Result<Self> {
        let ns = Netns::with_tag("fx")?;
        let sh = |args: &str| -> Result<()> {
            let argv: Vec<&str> = args.split_whitespace().collect();
            ns.exec(&argv).map(drop)
        };
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        sh("sysctl -qw net.ipv4.ip_forward=1")?;
        sh("sysctl -qw net.ipv6.conf.all.forwarding=1")?;
        for (dev, peer, m) in [("fx0", "fx0p", FX0_MAC), ("fx1", "fx1p", FX1_MAC)] {
            sh(&format!(
                "ip link add {dev} address {} type veth peer name {peer}",
                mac(m)
            ))?;
            sh(&format!("ip link set {dev} up"))?;
            sh(&format!("ip link set {peer} up"))?;
        }
        sh("ip addr add 10.0.0.1/24 dev fx0")?;
        sh("ip addr add 10.1.0.1/24 dev fx1")?;
        sh("ip -6 addr add fd00::1/64 dev fx0 nodad")?;
        sh("ip -6 addr add fd01::1/64 dev fx1 nodad")?;
        let neigh = |ip: IpAddr, m: [u8; 6], dev: &str| {
            sh(&format!(
                "ip neigh replace {ip} lladdr {} dev {dev} nud permanent",
                mac(m)
            ))
        };
        neigh(CLIENT4.into(), CLIENT_MAC, "fx0")?;
        neigh(CLIENT6.into(), CLIENT_MAC, "fx0")?;
        neigh(LOCAL_BACKEND4.into(), LOCAL_BACKEND_MAC, "fx0")?;
        neigh(LOCAL_BACKEND6.into(), LOCAL_BACKEND_MAC, "fx0")?;
        for i in 0..NUM_BACKENDS {
            neigh(backend4(i).into(), backend_mac(i), "fx1")?;
            neigh(backend6(i).into(), backend_mac(i), "fx1")?;
        }
        let fx0 = ns.ifindex("fx0")?;
        let fx1 = ns.ifindex("fx1")?;
        let mut lb = load()?;
        {
            // A devmap resolves ifindexes in the caller's namespace.
            let _inside = ns.enter_thread()?;
            lb.add_tx_port(fx0)?;
            lb.add_tx_port(fx1)?;
        }
        Ok(Self { ns, lb, fx0, fx1 })
    }
}
