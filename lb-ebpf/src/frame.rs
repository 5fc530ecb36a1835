//! What the balancer needs from its hook: XDP (raw frames, the fast path on
//! NICs) or TC ingress (skbs: on veths it keeps GSO and checksum offload, and
//! a redirect hands the skb to the egress device as it is).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::{bpf_l4_csum_replace, bpf_redirect, bpf_skb_pull_data},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::counter;

use crate::{Delta, TX_PORTS};

/// Longest header run the parser reads (VLAN, IPv4 with options, ICMP, the
/// quoted IPv4 header with options and its ports): what TC pulls into the
/// linear area when a packet's headers are not all there.
pub const PULL_LEN: u32 = 14 + 4 + 60 + 8 + 60 + 8;

/// A packet as the balancer sees it.
pub trait Frame: EbpfContext {
    /// Whether sending a frame back out of its own interface is a redirect
    /// (TC) rather than a verdict of its own (XDP_TX).
    const TX_IS_REDIRECT: bool;
    /// Start of the directly accessible bytes.
    fn data(&self) -> usize;
    /// End of the directly accessible bytes.
    fn data_end(&self) -> usize;
    /// Length of the whole packet from the Ethernet header (an skb may hold
    /// more than its linear part).
    fn len(&self) -> usize;
    /// The interface the packet came in on.
    fn ifindex(&self) -> u32;
    /// The largest IP packet this one is on the wire: for a GSO skb one
    /// segment (IP and TCP/UDP headers, at `l3` and `l4`, plus the segment
    /// size), else `ip_len`. The FIB's MTU check and the next-hop cache use it.
    fn wire_len(&self, ip_len: u16, l3: usize, l4: usize, tcp: bool) -> u16;
    /// Sends the frame out of `ifindex`; returns the verdict counter.
    fn redirect(&self, ifindex: u32) -> u32;
    /// Applies an address change (`pseudo`, part of the pseudo-header) and a
    /// port change (`plain`) to the TCP/UDP checksum `old` at `off`. UDP: a
    /// zero IPv4 checksum means none and stays zero; a result of zero is sent
    /// as 0xffff.
    fn l4_csum(
        &self,
        off: usize,
        old: u16,
        pseudo: Delta,
        plain: Delta,
        udp: bool,
        v4: bool,
    ) -> bool;
}

impl Frame for XdpContext {
    const TX_IS_REDIRECT: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn wire_len(&self, ip_len: u16, _l3: usize, _l4: usize, _tcp: bool) -> u16 {
        ip_len
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> u32 {
        if TX_PORTS.redirect(ifindex, 0).is_ok() {
            return counter::REDIRECT;
        }
        // Not in the devmap: the slower generic redirect still delivers it.
        if unsafe { bpf_redirect(ifindex, 0) }
            == aya_ebpf::bindings::xdp_action::XDP_REDIRECT as i64
        {
            counter::REDIRECT
        } else {
            counter::DROP_REDIRECT
        }
    }

    #[inline(always)]
    fn l4_csum(
        &self,
        off: usize,
        old: u16,
        pseudo: Delta,
        plain: Delta,
        udp: bool,
        v4: bool,
    ) -> bool {
        let Some(c) = crate::at::<u16, _>(self, off) else {
            return false;
        };
        if udp && v4 && old == 0 {
            return true;
        }
        let mut d = pseudo;
        d.0 += plain.0;
        let mut new = d.apply(old);
        if udp && new == 0 {
            new = 0xffff;
        }
        unsafe { *c = new };
        true
    }
}

impl Frame for TcContext {
    const TX_IS_REDIRECT: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn wire_len(&self, ip_len: u16, l3: usize, l4: usize, tcp: bool) -> u16 {
        let gso = unsafe { (*self.skb.skb).gso_size };
        if gso == 0 {
            return ip_len;
        }
        let l4_hlen = if tcp {
            // The TCP data offset, in 32-bit words.
            crate::at::<u8, _>(self, l4 + 12).map_or(20, |d| (unsafe { *d } >> 4) as u32 * 4)
        } else {
            8
        };
        let seg = (l4 - l3) as u32 + l4_hlen + gso;
        if seg >= ip_len as u32 {
            ip_len
        } else {
            seg as u16
        }
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> u32 {
        // TC_ACT_REDIRECT: the skb goes to the egress of `ifindex` as it is.
        if unsafe { bpf_redirect(ifindex, 0) } == aya_ebpf::bindings::TC_ACT_REDIRECT as i64 {
            counter::REDIRECT
        } else {
            counter::DROP_REDIRECT
        }
    }

    #[inline(always)]
    fn l4_csum(
        &self,
        off: usize,
        _old: u16,
        pseudo: Delta,
        plain: Delta,
        udp: bool,
        _v4: bool,
    ) -> bool {
        // The kernel's helper knows how the skb carries its checksum: for a
        // CHECKSUM_PARTIAL (offloaded, GSO) skb only the pseudo-header part
        // goes into the field; for CHECKSUM_COMPLETE skb->csum follows.
        let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let skb = self.skb.skb.cast();
        let a = unsafe {
            bpf_l4_csum_replace(
                skb,
                off as u32,
                0,
                pseudo.fold() as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled,
            )
        };
        let b = unsafe { bpf_l4_csum_replace(skb, off as u32, 0, plain.fold() as u64, mangled) };
        a == 0 && b == 0
    }
}

/// Pulls up to [`PULL_LEN`] bytes into the skb's linear area, when it holds
/// more than is there. Returns whether anything was pulled.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) -> bool {
    let len = TcContext::len(ctx);
    let linear = (TcContext::data_end(ctx) - TcContext::data(ctx)) as u32;
    let want = if len < PULL_LEN { len } else { PULL_LEN };
    if linear >= want {
        return false;
    }
    unsafe { bpf_skb_pull_data(ctx.skb.skb.cast(), want) == 0 }
}
