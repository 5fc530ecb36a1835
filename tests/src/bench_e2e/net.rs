//! The benchmark's network: the same shape as [`crate::topology`] (client
//! namespace, balancer namespace, three backend namespaces, one veth pair
//! per link, same addresses), but with nothing balancing yet: each variant
//! ([`super::variants`]) installs its balancer and removes it again.
//!
//! Fixed for every variant: forwarding on and reverse-path filtering off in
//! the balancer namespace, permanent neighbours there (the XDP program's
//! FIB lookups need them), the VIP on every backend's `lo` with ARP for it
//! suppressed (ecmp, direct and dsr need it; nat, nftables and HAProxy
//! rewrite the destination, so it does not matter to them), a wide
//! ephemeral port range on the client.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::programs::{xdp::XdpLinkId, XdpMode};
use headroom::{Balancer, LoadOptions};

use crate::{
    topology::{backend_addr, CLIENT_ADDR, VIP},
    veth_pair, Netns,
};

/// The client's interface.
pub const CLIENT_IF: &str = "c-lb";
/// The balancer's interface towards the client.
pub const LB_CLIENT_IF: &str = "lb-c";
/// Each backend's interface.
pub const BACKEND_IF: &str = "b-lb";
/// The balancer's address on the client link.
pub const LB_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);

/// The balancer's interface towards backend `i`.
pub fn lb_backend_if(i: usize) -> String {
    format!("lb-b{i}")
}

/// The balancer's address on backend `i`'s link.
pub fn lb_backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, i as u8, 1)
}

/// What the veths' receiving sides run: redirected frames (XDP_REDIRECT
/// into a veth) are only taken by a peer in NAPI mode, which an XDP program
/// or GRO turns on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receive {
    /// Defaults: no XDP, GRO off (veth's default without XDP).
    Plain,
    /// The `headroom_pass` XDP program on the client's and backends' veths.
    Pass,
    /// GRO on on the client's and backends' veths, no program.
    Gro,
    /// Both.
    PassGro,
}

/// Offload state of the client's and backends' veths for one measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    /// TX checksum offload (and with it TSO) on the senders. Headroom needs
    /// it off: XDP_REDIRECT drops the "checksum left to hardware" mark, so
    /// a partial checksum would arrive as a bad one.
    pub sender_tx_csum: bool,
    /// The receiving side (see [`Receive`]).
    pub receive: Receive,
}

impl Offloads {
    /// Linux defaults: what a balancer that does not need XDP runs with.
    pub const DEFAULT: Offloads = Offloads {
        sender_tx_csum: true,
        receive: Receive::Plain,
    };
    /// What Headroom's topology uses (see `topology.rs`).
    pub const HEADROOM: Offloads = Offloads {
        sender_tx_csum: false,
        receive: Receive::Pass,
    };

    /// Short label for tables.
    pub fn label(&self) -> String {
        let rx = match self.receive {
            Receive::Plain => "plain rx",
            Receive::Pass => "XDP pass on rx",
            Receive::Gro => "GRO on rx",
            Receive::PassGro => "XDP pass + GRO on rx",
        };
        let tx = if self.sender_tx_csum {
            "tx csum/TSO on"
        } else {
            "tx csum/TSO off"
        };
        format!("{tx}, {rx}")
    }
}

/// Client, balancer, backends. Field order is drop order: the pass-program
/// holder detaches first, then the namespaces go.
pub struct BenchNet {
    pass: Balancer,
    pass_links: Vec<(usize, XdpLinkId)>,
    offloads: Offloads,
    /// The client's namespace.
    pub client: Netns,
    /// The balancer's namespace.
    pub lb: Netns,
    /// The backends' namespaces.
    pub backends: Vec<Netns>,
}

impl BenchNet {
    /// Builds the namespaces and links for `n` backends.
    pub fn new(n: usize) -> Result<BenchNet> {
        let client = Netns::with_tag("bclient")?;
        let lb = Netns::with_tag("blb")?;
        let mut backends = Vec::with_capacity(n);
        for i in 0..n {
            backends.push(Netns::with_tag(&format!("bbe{i}"))?);
        }
        wire(&client, &lb, &backends).context("wiring the bench network")?;
        // Only for the pass program: small maps.
        let pass = Balancer::load(&LoadOptions {
            conntrack_size: 1024,
            max_services: 1,
            max_backends: 4,
            max_table_size: 7,
            ..LoadOptions::default()
        })
        .context("loading the XDP object (for its pass program)")?;
        Ok(BenchNet {
            pass,
            pass_links: Vec::new(),
            offloads: Offloads::DEFAULT,
            client,
            lb,
            backends,
        })
    }

    /// The balancer namespace's interfaces: towards the client, then each backend.
    pub fn lb_interfaces(&self) -> Vec<String> {
        let mut v = vec![LB_CLIENT_IF.to_string()];
        v.extend((0..self.backends.len()).map(lb_backend_if));
        v
    }

    /// The client's and backends' (namespace, interface) pairs: the senders
    /// and receivers of the traffic.
    fn endpoints(&self) -> Vec<(&Netns, &'static str)> {
        let mut v = vec![(&self.client, CLIENT_IF)];
        v.extend(self.backends.iter().map(|ns| (ns, BACKEND_IF)));
        v
    }

    /// Sets the endpoints' offloads (only what differs from now).
    pub fn set_offloads(&mut self, want: Offloads) -> Result<()> {
        if want.sender_tx_csum != self.offloads.sender_tx_csum {
            let v = if want.sender_tx_csum { "on" } else { "off" };
            for (ns, ifname) in self.endpoints() {
                ns.exec(&["ethtool", "-K", ifname, "tx", v])
                    .with_context(|| format!("ethtool tx {v} on {ifname} in {}", ns.name()))?;
            }
        }
        let has_pass = |r: Receive| matches!(r, Receive::Pass | Receive::PassGro);
        let has_gro = |r: Receive| matches!(r, Receive::Gro | Receive::PassGro);
        if has_gro(want.receive) != has_gro(self.offloads.receive) {
            let v = if has_gro(want.receive) { "on" } else { "off" };
            for (ns, ifname) in self.endpoints() {
                ns.exec(&["ethtool", "-K", ifname, "gro", v])
                    .with_context(|| format!("ethtool gro {v} on {ifname} in {}", ns.name()))?;
            }
        }
        if has_pass(want.receive) && self.pass_links.is_empty() {
            self.attach_pass()?;
        } else if !has_pass(want.receive) && !self.pass_links.is_empty() {
            self.detach_pass()?;
        }
        self.offloads = want;
        Ok(())
    }

    fn attach_pass(&mut self) -> Result<()> {
        let n = self.backends.len();
        for k in 0..=n {
            let (ns, ifname) = if k == 0 {
                (&self.client, CLIENT_IF)
            } else {
                (&self.backends[k - 1], BACKEND_IF)
            };
            let ifindex = ns.ifindex(ifname)?;
            let _inside = ns.enter_thread()?;
            let id = self
                .pass
                .pass_program()
                .attach_to_if_index(ifindex, XdpMode::Driver)
                .with_context(|| {
                    format!("attaching the pass program to {ifname} in {}", ns.name())
                })?;
            self.pass_links.push((k, id));
        }
        Ok(())
    }

    fn detach_pass(&mut self) -> Result<()> {
        for (k, id) in std::mem::take(&mut self.pass_links) {
            let ns = if k == 0 {
                &self.client
            } else {
                &self.backends[k - 1]
            };
            let _inside = ns.enter_thread()?;
            self.pass
                .pass_program()
                .detach(id)
                .with_context(|| format!("detaching the pass program in {}", ns.name()))?;
        }
        Ok(())
    }
}

/// Creates links, addresses, routes and the fixed settings of the module docs.
fn wire(client: &Netns, lb: &Netns, backends: &[Netns]) -> Result<()> {
    veth_pair(lb, LB_CLIENT_IF, client, CLIENT_IF)?;
    lb.add_addr(LB_CLIENT_IF, &format!("{LB_CLIENT_ADDR}/24"))?;
    client.add_addr(CLIENT_IF, &format!("{CLIENT_ADDR}/24"))?;
    client.add_route(&format!("{VIP}/32"), &LB_CLIENT_ADDR.to_string())?;
    // wrk opens tens of thousands of connections per run.
    client.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])?;
    for (i, ns) in backends.iter().enumerate() {
        let lb_if = lb_backend_if(i);
        veth_pair(lb, &lb_if, ns, BACKEND_IF)?;
        lb.add_addr(&lb_if, &format!("{}/24", lb_backend_addr(i)))?;
        ns.add_addr(BACKEND_IF, &format!("{}/24", backend_addr(i)))?;
        ns.add_route("default", &lb_backend_addr(i).to_string())?;
        for s in [
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
            // Connection: close leaves TIME_WAIT on the server side.
            "net.ipv4.tcp_max_tw_buckets=262144",
        ] {
            ns.exec(&["sysctl", "-qw", s])?;
        }
        ns.add_addr("lo", &format!("{VIP}/32"))?;
    }
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    let mut devs = vec![
        "all".to_string(),
        "default".to_string(),
        LB_CLIENT_IF.into(),
    ];
    devs.extend((0..backends.len()).map(lb_backend_if));
    for dev in devs {
        lb.exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{dev}.rp_filter=0")])?;
    }
    let pin = |addr: Ipv4Addr, mac: [u8; 6], dev: &str| -> Result<()> {
        let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        lb.exec(&[
            "ip",
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &mac.join(":"),
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .map(drop)
    };
    pin(CLIENT_ADDR, client.mac(CLIENT_IF)?, LB_CLIENT_IF)?;
    for (i, ns) in backends.iter().enumerate() {
        pin(backend_addr(i), ns.mac(BACKEND_IF)?, &lb_backend_if(i))?;
    }
    Ok(())
}
