//! Frames for packet tests, built with `etherparse` so checksums are
//! computed from scratch, plus an independent checksum checker for what the
//! program emits. Addresses are those of [`crate::fixture_env`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::fixture_env::*;
use etherparse::{
    icmpv4::DestUnreachableHeader, Icmpv4Type, Icmpv6Type, IpHeaders, IpNumber, Ipv4Header,
    Ipv4Options, Ipv6Header, PacketBuilder, TcpHeader,
};

/// XDP actions, as BPF_PROG_TEST_RUN returns them.
pub const XDP_DROP: u32 = 1;
/// Pass to the stack.
pub const XDP_PASS: u32 = 2;
/// Back out of the ingress interface.
pub const XDP_TX: u32 = 3;
/// To another interface.
pub const XDP_REDIRECT: u32 = 4;

/// TCP flag bits.
pub const SYN: u8 = 0x02;
/// TCP ACK flag.
pub const ACK: u8 = 0x10;
/// TCP PSH flag.
pub const PSH: u8 = 0x08;

/// A router on the client's link (source of ICMP errors).
pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
/// IPv6 router on the client's link.
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

#[derive(Clone, Copy, Debug)]
/// Transport header of a [`Desc`].
pub enum L4 {
    /// TCP with flags.
    Tcp { sport: u16, dport: u16, flags: u8 },
    /// UDP.
    Udp { sport: u16, dport: u16 },
}

/// A TCP/UDP frame, described so that a copy with changed fields is the
/// expected output.
#[derive(Clone, Debug)]
pub struct Desc {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// 802.1Q tag.
    pub vlan: Option<u16>,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport header.
    pub l4: L4,
    /// Payload.
    pub payload: Vec<u8>,
    /// IPv4 options bytes.
    pub ip_options: Vec<u8>,
    /// IPv4 MF flag.
    pub more_fragments: bool,
}

impl Desc {
    /// A frame from `src` to `dst` with a fixed payload.
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: FX0_MAC,
            vlan: None,
            src,
            dst,
            l4,
            payload: b"headroom fixture".to_vec(),
            ip_options: Vec::new(),
            more_fragments: false,
        }
    }

    /// Client → `vip:dport` TCP with `flags` from `sport`.
    pub fn tcp(vip: IpAddr, sport: u16, dport: u16, flags: u8) -> Self {
        let client = client_of(vip);
        Self::new(
            client,
            vip,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    /// Client → `vip:dport` UDP from `sport`.
    pub fn udp(vip: IpAddr, sport: u16, dport: u16) -> Self {
        let client = client_of(vip);
        Self::new(client, vip, L4::Udp { sport, dport })
    }

    /// This frame after the balancer sent it to a backend behind fx1.
    pub fn to_backend(&self, i: u8, nat: bool) -> Self {
        let mut d = self.clone();
        d.src_mac = FX1_MAC;
        d.dst_mac = backend_mac(i);
        if nat {
            d.dst = if self.dst.is_ipv4() {
                backend4(i).into()
            } else {
                backend6(i).into()
            };
            d.set_dport(BACKEND_PORT);
        }
        d
    }

    /// Changes the destination port.
    pub fn set_dport(&mut self, port: u16) {
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
        }
    }

    /// The IP packet (no link layer).
    pub fn ip_packet(&self) -> Vec<u8> {
        let ip = ip_headers(self.src, self.dst, &self.ip_options, self.more_fragments, 0);
        let mut out = Vec::new();
        let b = PacketBuilder::ip(ip);
        match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut t = TcpHeader::new(sport, dport, 1000, 64240);
                t.syn = flags & SYN != 0;
                t.ack = flags & ACK != 0;
                t.psh = flags & PSH != 0;
                if t.ack {
                    t.acknowledgment_number = 7777;
                }
                b.tcp_header(t).write(&mut out, &self.payload)
            }
            L4::Udp { sport, dport } => b.udp(sport, dport).write(&mut out, &self.payload),
        }
        .expect("etherparse builds the packet");
        out
    }

    /// The whole frame.
    pub fn frame(&self) -> Vec<u8> {
        frame(
            self.src_mac,
            self.dst_mac,
            self.vlan,
            self.dst.is_ipv4(),
            &self.ip_packet(),
        )
    }
}

/// Port every fixture backend listens on (nat rewrites to it).
pub const BACKEND_PORT: u16 = 8080;

/// The client address of the VIP's family.
pub fn client_of(vip: IpAddr) -> IpAddr {
    if vip.is_ipv4() {
        CLIENT4.into()
    } else {
        CLIENT6.into()
    }
}

/// IP headers (IPv4 with options and fragment fields, or IPv6).
pub fn ip_headers(src: IpAddr, dst: IpAddr, options: &[u8], mf: bool, frag_off: u16) -> IpHeaders {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, s.octets(), d.octets())
                .expect("valid IPv4 header");
            h.options = Ipv4Options::try_from(options).expect("options fit");
            h.more_fragments = mf;
            h.dont_fragment = false;
            h.identification = 0x4242;
            h.fragment_offset = frag_off.try_into().expect("fragment offset fits");
            IpHeaders::Ipv4(h, Default::default())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
            Ipv6Header {
                source: s.octets(),
                destination: d.octets(),
                hop_limit: 64,
                ..Default::default()
            },
            Default::default(),
        ),
        _ => panic!("mixed address families"),
    }
}

/// Ethernet (+ optional 802.1Q tag) in front of an IP packet.
pub fn frame(src: [u8; 6], dst: [u8; 6], vlan: Option<u16>, v4: bool, ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + ip.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(id) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&(if v4 { 0x0800u16 } else { 0x86dd }).to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// ICMP error (v4 frag-needed / v6 packet-too-big) from a router to the VIP,
/// quoting `quoted` (an IP packet), built by etherparse.
pub fn icmp_error(
    quoted_v4: bool,
    outer_dst: IpAddr,
    quote: &[u8],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> Vec<u8> {
    let mut out = Vec::new();
    if quoted_v4 {
        let IpAddr::V4(d) = outer_dst else {
            panic!("v4")
        };
        PacketBuilder::ipv4(ROUTER4.octets(), d.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut out, quote)
            .expect("icmp builds");
    } else {
        let IpAddr::V6(d) = outer_dst else {
            panic!("v6")
        };
        PacketBuilder::ipv6(ROUTER6.octets(), d.octets(), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut out, quote)
            .expect("icmpv6 builds");
    }
    frame(src_mac, dst_mac, None, quoted_v4, &out)
}

/// The reply a backend sends for `d` (as the backend sees it), and the quote
/// an ICMP error carries of the balancer's reply: IP header + 8 bytes.
pub fn quote_of_reply(d: &Desc) -> Vec<u8> {
    let reply = Desc::new(
        d.dst,
        d.src,
        match d.l4 {
            L4::Tcp { sport, dport, .. } => L4::Tcp {
                sport: dport,
                dport: sport,
                flags: ACK,
            },
            L4::Udp { sport, dport } => L4::Udp {
                sport: dport,
                dport: sport,
            },
        },
    );
    let p = reply.ip_packet();
    let hlen = if d.dst.is_ipv4() { 20 } else { 40 };
    p[..hlen + 8].to_vec()
}

/// What a nat balancer makes of a quote: inner source = backend i, port = backend port.
pub fn rewrite_quote(q: &[u8], i: u8) -> Vec<u8> {
    let mut q = q.to_vec();
    if q[0] >> 4 == 4 {
        q[12..16].copy_from_slice(&backend4(i).octets());
        q[20..22].copy_from_slice(&BACKEND_PORT.to_be_bytes());
        q[10..12].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&q[..20], 0));
        q[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        q[8..24].copy_from_slice(&backend6(i).octets());
        q[40..42].copy_from_slice(&BACKEND_PORT.to_be_bytes());
    }
    q
}

/// One's complement sum of big-endian 16-bit words, added to `s`.
pub fn sum(data: &[u8], mut s: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        s += u32::from(*b) << 8;
    }
    s
}

/// Folds a sum to 16 bits.
pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Checks every checksum of a frame the program emitted, from scratch.
pub fn assert_checksums(f: &[u8]) -> Result<(), String> {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([f[12], f[13]]);
    if et == 0x8100 {
        et = u16::from_be_bytes([f[16], f[17]]);
        l3 = 18;
    }
    let ip = &f[l3..];
    let (proto, pseudo, l4) = match et {
        0x0800 => {
            let hlen = usize::from(ip[0] & 0xf) * 4;
            if fold(sum(&ip[..hlen], 0)) != 0xffff {
                return Err("bad IPv4 header checksum".into());
            }
            let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if frag & 0x3fff != 0 {
                return Ok(()); // a fragment's L4 checksum covers bytes we do not have
            }
            let l4 = &ip[hlen..tot];
            let mut p = sum(&ip[12..20], 0);
            p += u32::from(ip[9]) + l4.len() as u32;
            (ip[9], p, l4)
        }
        0x86dd => {
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let l4 = &ip[40..40 + plen];
            let mut p = sum(&ip[8..40], 0);
            p += u32::from(ip[6]) + l4.len() as u32;
            (ip[6], p, l4)
        }
        _ => return Ok(()),
    };
    let ok = match proto {
        6 | 58 => fold(sum(l4, pseudo)) == 0xffff,
        17 => (et == 0x0800 && l4[6..8] == [0, 0]) || fold(sum(l4, pseudo)) == 0xffff,
        1 => fold(sum(l4, 0)) == 0xffff,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bad L4 checksum (protocol {proto})"))
    }
}

/// Recomputes the IPv4 header checksum of the header at `l3` in place.
pub fn refresh_ipv4_csum(f: &mut [u8], l3: usize) {
    let hlen = usize::from(f[l3] & 0xf) * 4;
    f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = !fold(sum(&f[l3..l3 + hlen], 0));
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}
