//! Packet fixtures, Katran style: frame in → verdict + exact frame out +
//! counter deltas, through BPF_PROG_TEST_RUN in a namespace whose FIB gives
//! known next hops (see `headroom_tests::fixture_env`).
//!
//! Input and expected frames are both built with `etherparse`, so expected
//! checksums are computed from scratch, never patched; every frame the
//! program emits is also checked by an independent checksum routine here.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use etherparse::{IpNumber, PacketBuilder};
use headroom::{loader::tc_act, LoadOptions};
use headroom_tests::{current_cpu, fixture_env::*, packets::*, pin_thread_to_cpu, require_root};
use lb_common::{
    counter, Backend, Counters, Flow, ServiceKey, BACKEND_ACTIVE, BACKEND_DRAINING, FLOW_SERVICE,
    MODE_DSR, MODE_NAT, NO_BACKEND, PROTO_TCP, PROTO_UDP,
};

/// Table size of the fixtures (prime; small keeps setup fast).
const M: u32 = 31;
const MAX_SERVICES: u32 = 16;
const MAX_BACKENDS: u32 = 32;

const UNROUTED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

// ------------------------------------------------------------- the runner

/// The expected outcome of one frame.
enum Expect {
    /// This action, frame untouched.
    Same(u32),
    /// This action and exactly these bytes.
    Out(u32, Vec<u8>),
    /// The kernel refuses the frame (BPF_PROG_TEST_RUN: EINVAL).
    Refused,
}

/// Traffic counters one step must add (packets 1, bytes = frame length).
#[derive(Clone, Copy)]
struct Traffic {
    service: u32,
    backend: u32,
    new_flow: bool,
}

struct Snapshot {
    global: Vec<u64>,
    services: Vec<Counters>,
    backends: Vec<Counters>,
}

struct Ctx {
    lb: headroom::Balancer,
    fx0: u32,
    fx1: u32,
    /// Run the TC program instead of the XDP one (same maps, same cases).
    tc: bool,
}

/// Whether `frame` declares IPv4/IPv6 but stops inside that fixed header
/// (BPF_PROG_TEST_RUN refuses such a frame for skb programs).
fn short_ip_header(frame: &[u8]) -> bool {
    let (mut ty, mut l3) = (frame.get(12..14), 14);
    if ty == Some(&[0x81, 0x00][..]) {
        (ty, l3) = (frame.get(16..18), 18);
    }
    match ty {
        Some([0x08, 0x00]) => frame.len() < l3 + 20,
        Some([0x86, 0xdd]) => frame.len() < l3 + 40,
        _ => false,
    }
}

/// The TC verdict for an XDP action: both hooks must do the same thing.
fn tc_action(xdp: u32) -> u32 {
    match xdp {
        XDP_PASS => tc_act::NEXT,
        XDP_DROP => tc_act::SHOT,
        XDP_TX | XDP_REDIRECT => tc_act::REDIRECT,
        other => other,
    }
}

// Services of the fixtures: (id, vip, port, proto, mode, backend id filling the table).
const SVC_TCP4_NAT: u32 = 0;
const SVC_UDP4_NAT: u32 = 1;
const SVC_TCP4_DSR: u32 = 2;
const SVC_UDP4_DSR: u32 = 3;
const SVC_TCP6_NAT: u32 = 4;
const SVC_UDP6_NAT: u32 = 5;
const SVC_TCP6_DSR: u32 = 6;
const SVC_UDP6_DSR: u32 = 7;
const SVC_LOCAL4: u32 = 8;
const SVC_LOCAL6: u32 = 9;
const SVC_EMPTY: u32 = 10;
const SVC_HASHED: u32 = 11;
const SVC_UNROUTED: u32 = 12;

/// Backend ids: 0..3 = backend4(i), 10..13 = backend6(i), 3 / 13 local, 20 unrouted.
const B_LOCAL4: u32 = 3;
const B_LOCAL6: u32 = 13;
const B_UNROUTED: u32 = 20;

fn v4(a: Ipv4Addr) -> IpAddr {
    a.into()
}

fn v6(a: Ipv6Addr) -> IpAddr {
    a.into()
}

impl Ctx {
    fn services() -> Vec<(u32, IpAddr, u16, u8, u8, u32)> {
        vec![
            (SVC_TCP4_NAT, v4(VIP4), 80, PROTO_TCP, MODE_NAT, 0),
            (SVC_UDP4_NAT, v4(VIP4), 53, PROTO_UDP, MODE_NAT, 0),
            (SVC_TCP4_DSR, v4(VIP4), 443, PROTO_TCP, MODE_DSR, 1),
            (SVC_UDP4_DSR, v4(VIP4), 5353, PROTO_UDP, MODE_DSR, 1),
            (SVC_TCP6_NAT, v6(VIP6), 80, PROTO_TCP, MODE_NAT, 10),
            (SVC_UDP6_NAT, v6(VIP6), 53, PROTO_UDP, MODE_NAT, 10),
            (SVC_TCP6_DSR, v6(VIP6), 443, PROTO_TCP, MODE_DSR, 11),
            (SVC_UDP6_DSR, v6(VIP6), 5353, PROTO_UDP, MODE_DSR, 11),
            (SVC_LOCAL4, v4(VIP4), 8000, PROTO_TCP, MODE_NAT, B_LOCAL4),
            (SVC_LOCAL6, v6(VIP6), 8000, PROTO_TCP, MODE_NAT, B_LOCAL6),
            (SVC_EMPTY, v4(VIP4), 9000, PROTO_TCP, MODE_NAT, NO_BACKEND),
            (
                SVC_HASHED,
                v4(VIP4),
                7000,
                PROTO_TCP,
                MODE_NAT,
                u32::MAX - 1,
            ),
            (
                SVC_UNROUTED,
                v4(VIP4),
                9100,
                PROTO_TCP,
                MODE_NAT,
                B_UNROUTED,
            ),
        ]
    }

    fn hashed_table() -> Vec<u32> {
        (0..M).map(|i| i % 3).collect()
    }

    fn key(&self, id: u32) -> ServiceKey {
        let s = Self::services()
            .into_iter()
            .find(|s| s.0 == id)
            .expect("known service");
        service_key(s.1, s.2, s.3)
    }

    /// Back to the baseline: all backends active, every table as declared,
    /// empty connection tables, default UDP timeout.
    fn reset(&mut self) {
        let lb = &mut self.lb;
        for i in 0..NUM_BACKENDS {
            lb.set_backend(u32::from(i), backend(backend4(i).into(), BACKEND_PORT))
                .expect("backend");
            lb.set_backend(10 + u32::from(i), backend(backend6(i).into(), BACKEND_PORT))
                .expect("backend");
        }
        lb.set_backend(B_LOCAL4, backend(LOCAL_BACKEND4.into(), BACKEND_PORT))
            .expect("backend");
        lb.set_backend(B_LOCAL6, backend(LOCAL_BACKEND6.into(), BACKEND_PORT))
            .expect("backend");
        lb.set_backend(B_UNROUTED, backend(UNROUTED4.into(), BACKEND_PORT))
            .expect("backend");
        for (id, vip, port, proto, mode, fill) in Self::services() {
            let table = if fill == u32::MAX - 1 {
                Self::hashed_table()
            } else {
                vec![fill; M as usize]
            };
            lb.publish(service_key(vip, port, proto), id, mode, &table)
                .expect("publish");
        }
        let keys: Vec<_> = lb.conntrack().keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = lb.conntrack().remove(&k);
        }
        let keys: Vec<_> = lb.nat_rev().keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = lb.nat_rev().remove(&k);
        }
        lb.set_udp_idle_timeout(Duration::from_secs(30))
            .expect("timeout");
    }

    fn fill(&mut self, service: u32, backend_id: u32) {
        let key = self.key(service);
        let s = Self::services()
            .into_iter()
            .find(|s| s.0 == service)
            .expect("service");
        self.lb
            .publish(key, service, s.4, &vec![backend_id; M as usize])
            .expect("publish");
    }

    /// A TCP SYN that opens a flow to backend `bi` behind fx1: redirected,
    /// a new flow of `service` on backend id `bid`.
    fn new_flow(
        &mut self,
        what: &str,
        syn: &Desc,
        bi: u8,
        nat: bool,
        service: u32,
        bid: u32,
    ) -> Result<(), String> {
        let want = syn.to_backend(bi, nat).frame();
        self.step(
            what,
            &syn.frame(),
            self.fx0,
            Expect::Out(XDP_REDIRECT, want),
            &[REDIRECT, CT_MISS, MISS_SYN],
            fwd(service, bid),
        )
    }

    fn set_backend_flags(&mut self, id: u32, flags: u8) {
        let mut b: Backend = self.lb.backend(id).expect("backend");
        b.flags = flags;
        self.lb.set_backend(id, b).expect("set backend");
    }

    fn snapshot(&self) -> Snapshot {
        let lb = &self.lb;
        Snapshot {
            global: lb.global_counters().expect("counters").to_vec(),
            services: (0..MAX_SERVICES)
                .map(|i| lb.service_counters(i).expect("svc"))
                .collect(),
            backends: (0..MAX_BACKENDS)
                .map(|i| lb.backend_counters(i).expect("be"))
                .collect(),
        }
    }

    /// Runs one frame and checks verdict, bytes and every counter.
    fn step(
        &mut self,
        what: &str,
        input: &[u8],
        ingress: u32,
        expect: Expect,
        global: &[u32],
        traffic: Option<Traffic>,
    ) -> Result<(), String> {
        let before = self.snapshot();
        let r = if self.tc {
            self.lb.run_tc(input, ingress)
        } else {
            self.lb.run(input, ingress)
        };
        let after = self.snapshot();
        let fail = |m: String| Err(format!("{what}: {m}"));
        let (action, out) = match (&r, &expect) {
            (Err(_), Expect::Refused) => return check_unchanged(what, &before, &after),
            // The kernel builds no skb whose IP header is cut short.
            (Err(_), _) if self.tc && short_ip_header(input) => {
                return check_unchanged(what, &before, &after)
            }
            (Err(e), _) => return fail(format!("test run failed: {e}")),
            (Ok(r), Expect::Refused) => {
                return fail(format!("expected EINVAL, got action {}", r.action))
            }
            (Ok(r), _) => (r.action, &r.frame),
        };
        let (want_action, want_frame) = match &expect {
            Expect::Same(a) => (*a, input.to_vec()),
            Expect::Out(a, f) => (*a, f.clone()),
            Expect::Refused => unreachable!(),
        };
        let want_action = if self.tc {
            tc_action(want_action)
        } else {
            want_action
        };
        if action != want_action {
            return fail(format!("action {action}, expected {want_action}"));
        }
        if *out != want_frame {
            return fail(format!(
                "output differs\n   got: {}\n  want: {}",
                hex(out),
                hex(&want_frame)
            ));
        }
        if matches!(expect, Expect::Out(..)) {
            assert_checksums(out).or_else(&fail)?;
        }
        // Global counters: exactly the listed ones moved, by one each.
        let mut want = vec![0u64; before.global.len()];
        for c in global {
            want[*c as usize] += 1;
        }
        for (i, name) in counter::NAMES.iter().enumerate() {
            let got = after.global[i] - before.global[i];
            if got != want[i] {
                return fail(format!("counter {name}: +{got}, expected +{}", want[i]));
            }
        }
        let len = input.len() as u64;
        for (kind, ids, b, a, who) in [
            (
                "service",
                MAX_SERVICES,
                &before.services,
                &after.services,
                traffic.map(|t| t.service),
            ),
            (
                "backend",
                MAX_BACKENDS,
                &before.backends,
                &after.backends,
                traffic.map(|t| t.backend),
            ),
        ] {
            for i in 0..ids {
                let (b, a) = (b[i as usize], a[i as usize]);
                let got = (
                    a.packets - b.packets,
                    a.bytes - b.bytes,
                    a.new_flows - b.new_flows,
                );
                let want = if who == Some(i) {
                    (1, len, u64::from(traffic.is_some_and(|t| t.new_flow)))
                } else {
                    (0, 0, 0)
                };
                if got != want {
                    return fail(format!(
                        "{kind} {i} counters (pkts, bytes, new) +{got:?}, expected +{want:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_unchanged(what: &str, b: &Snapshot, a: &Snapshot) -> Result<(), String> {
    if b.global != a.global || b.services != a.services || b.backends != a.backends {
        return Err(format!("{what}: counters moved on a refused frame"));
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs a command in the namespace the calling thread is in.
fn sh(cmd: &str) -> Result<(), String> {
    let argv: Vec<&str> = cmd.split_whitespace().collect();
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn fwd(service: u32, backend: u32) -> Option<Traffic> {
    Some(Traffic {
        service,
        backend,
        new_flow: true,
    })
}

fn hit(service: u32, backend: u32) -> Option<Traffic> {
    Some(Traffic {
        service,
        backend,
        new_flow: false,
    })
}

use counter::*;

/// One fixture: a name and its steps.
type Case = (&'static str, Box<dyn Fn(&mut Ctx) -> Result<(), String>>);

fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();

    // --- v4/v6 × TCP/UDP × nat/dsr: a new flow, exact frame out.
    for (name, vip, port, tcp, nat, svc, bi) in [
        (
            "v4 tcp nat: SYN rewritten to backend",
            v4(VIP4),
            80,
            true,
            true,
            SVC_TCP4_NAT,
            0u8,
        ),
        (
            "v4 udp nat: datagram rewritten to backend",
            v4(VIP4),
            53,
            false,
            true,
            SVC_UDP4_NAT,
            0,
        ),
        (
            "v4 tcp dsr: SYN gets the backend's MAC only",
            v4(VIP4),
            443,
            true,
            false,
            SVC_TCP4_DSR,
            1,
        ),
        (
            "v4 udp dsr: datagram gets the backend's MAC only",
            v4(VIP4),
            5353,
            false,
            false,
            SVC_UDP4_DSR,
            1,
        ),
        (
            "v6 tcp nat: SYN rewritten to backend",
            v6(VIP6),
            80,
            true,
            true,
            SVC_TCP6_NAT,
            0,
        ),
        (
            "v6 udp nat: datagram rewritten to backend",
            v6(VIP6),
            53,
            false,
            true,
            SVC_UDP6_NAT,
            0,
        ),
        (
            "v6 tcp dsr: SYN gets the backend's MAC only",
            v6(VIP6),
            443,
            true,
            false,
            SVC_TCP6_DSR,
            1,
        ),
        (
            "v6 udp dsr: datagram gets the backend's MAC only",
            v6(VIP6),
            5353,
            false,
            false,
            SVC_UDP6_DSR,
            1,
        ),
    ] {
        v.push((
            name,
            Box::new(move |c: &mut Ctx| {
                let d = if tcp {
                    Desc::tcp(vip, 40000, port, SYN)
                } else {
                    Desc::udp(vip, 40000, port)
                };
                let bid = if vip.is_ipv4() {
                    u32::from(bi)
                } else {
                    10 + u32::from(bi)
                };
                let want = d.to_backend(bi, nat).frame();
                let ctr: &[u32] = if tcp {
                    &[REDIRECT, CT_MISS, MISS_SYN]
                } else {
                    &[REDIRECT, CT_MISS]
                };
                c.step(
                    "first packet",
                    &d.frame(),
                    c.fx0,
                    Expect::Out(XDP_REDIRECT, want),
                    ctr,
                    fwd(svc, bid),
                )
            }),
        ));
    }

    // --- conntrack hits.
    for (name, vip, port, nat, svc, bi, bid) in [
        (
            "v4 tcp nat: ACK after SYN is a conntrack hit",
            v4(VIP4),
            80,
            true,
            SVC_TCP4_NAT,
            0u8,
            0u32,
        ),
        (
            "v6 tcp dsr: ACK after SYN is a conntrack hit",
            v6(VIP6),
            443,
            false,
            SVC_TCP6_DSR,
            1,
            11,
        ),
    ] {
        v.push((
            name,
            Box::new(move |c: &mut Ctx| {
                let syn = Desc::tcp(vip, 40001, port, SYN);
                c.new_flow("SYN", &syn, bi, nat, svc, bid)?;
                let ack = Desc::tcp(vip, 40001, port, ACK | PSH);
                c.step(
                    "ACK",
                    &ack.frame(),
                    c.fx0,
                    Expect::Out(XDP_REDIRECT, ack.to_backend(bi, nat).frame()),
                    &[REDIRECT, CT_HIT],
                    hit(svc, bid),
                )
            }),
        ));
    }
    v.push((
        "v4 udp nat: second datagram is a conntrack hit",
        Box::new(|c: &mut Ctx| {
            let d = Desc::udp(v4(VIP4), 40002, 53);
            c.step(
                "first",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(0, true).frame()),
                &[REDIRECT, CT_MISS],
                fwd(SVC_UDP4_NAT, 0),
            )?;
            c.step(
                "second",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(0, true).frame()),
                &[REDIRECT, CT_HIT],
                hit(SVC_UDP4_NAT, 0),
            )
        }),
    ));
    v.push((
        "v4 tcp: ACK without state selects (non-SYN miss)",
        Box::new(|c: &mut Ctx| {
            let d = Desc::tcp(v4(VIP4), 40003, 80, ACK);
            c.step(
                "ACK",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(0, true).frame()),
                &[REDIRECT, CT_MISS, MISS_NON_SYN],
                fwd(SVC_TCP4_NAT, 0),
            )
        }),
    ));
    v.push((
        "v4 tcp: SYN-ACK towards a VIP is not a SYN",
        Box::new(|c: &mut Ctx| {
            let d = Desc::tcp(v4(VIP4), 40004, 80, SYN | ACK);
            c.step(
                "SYN-ACK",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(0, true).frame()),
                &[REDIRECT, CT_MISS, MISS_NON_SYN],
                fwd(SVC_TCP4_NAT, 0),
            )
        }),
    ));

    // --- the nat reply path.
    for (name, vip, tcp, svc, bi, bid) in [
        (
            "v4 tcp nat reply: source back to the VIP",
            v4(VIP4),
            true,
            SVC_TCP4_NAT,
            0u8,
            0u32,
        ),
        (
            "v6 udp nat reply: source back to the VIP",
            v6(VIP6),
            false,
            SVC_UDP6_NAT,
            0,
            10,
        ),
        (
            "v6 tcp nat reply: source back to the VIP",
            v6(VIP6),
            true,
            SVC_TCP6_NAT,
            0,
            10,
        ),
        (
            "v4 udp nat reply: source back to the VIP",
            v4(VIP4),
            false,
            SVC_UDP4_NAT,
            0,
            0,
        ),
    ] {
        v.push((
            name,
            Box::new(move |c: &mut Ctx| {
                let port = if tcp { 80 } else { 53 };
                let d = if tcp {
                    Desc::tcp(vip, 40010, port, SYN)
                } else {
                    Desc::udp(vip, 40010, port)
                };
                let first: &[u32] = if tcp {
                    &[REDIRECT, CT_MISS, MISS_SYN]
                } else {
                    &[REDIRECT, CT_MISS]
                };
                c.step(
                    "request",
                    &d.frame(),
                    c.fx0,
                    Expect::Out(XDP_REDIRECT, d.to_backend(bi, true).frame()),
                    first,
                    fwd(svc, bid),
                )?;
                let be: IpAddr = if vip.is_ipv4() {
                    backend4(bi).into()
                } else {
                    backend6(bi).into()
                };
                let l4 = |sport, dport| {
                    if tcp {
                        L4::Tcp {
                            sport,
                            dport,
                            flags: SYN | ACK,
                        }
                    } else {
                        L4::Udp { sport, dport }
                    }
                };
                let mut reply = Desc::new(be, d.src, l4(BACKEND_PORT, 40010));
                reply.src_mac = backend_mac(bi);
                reply.dst_mac = FX1_MAC;
                let mut want = Desc::new(vip, d.src, l4(port, 40010));
                want.src_mac = FX0_MAC;
                want.dst_mac = CLIENT_MAC;
                c.step(
                    "reply",
                    &reply.frame(),
                    c.fx1,
                    Expect::Out(XDP_REDIRECT, want.frame()),
                    &[REDIRECT, NAT_REPLY],
                    None,
                )
            }),
        ));
    }
    v.push((
        "reply from a backend without nat state passes untouched",
        Box::new(|c: &mut Ctx| {
            let mut d = Desc::new(
                backend4(0).into(),
                CLIENT4.into(),
                L4::Tcp {
                    sport: BACKEND_PORT,
                    dport: 40011,
                    flags: ACK,
                },
            );
            d.src_mac = backend_mac(0);
            d.dst_mac = FX1_MAC;
            c.step(
                "reply",
                &d.frame(),
                c.fx1,
                Expect::Same(XDP_PASS),
                &[PASS_NOT_VIP],
                None,
            )
        }),
    ));

    // --- XDP_TX: the backend is on the link the packet came in on.
    for (name, vip, svc, bid, be) in [
        (
            "v4: backend on the ingress link → XDP_TX",
            v4(VIP4),
            SVC_LOCAL4,
            B_LOCAL4,
            v4(LOCAL_BACKEND4),
        ),
        (
            "v6: backend on the ingress link → XDP_TX",
            v6(VIP6),
            SVC_LOCAL6,
            B_LOCAL6,
            v6(LOCAL_BACKEND6),
        ),
    ] {
        v.push((
            name,
            Box::new(move |c: &mut Ctx| {
                let d = Desc::tcp(vip, 40020, 8000, SYN);
                let mut want = d.clone();
                want.src_mac = FX0_MAC;
                want.dst_mac = LOCAL_BACKEND_MAC;
                want.dst = be;
                want.set_dport(BACKEND_PORT);
                c.step(
                    "SYN",
                    &d.frame(),
                    c.fx0,
                    Expect::Out(XDP_TX, want.frame()),
                    &[TX, CT_MISS, MISS_SYN],
                    fwd(svc, bid),
                )
            }),
        ));
    }

    // --- not ours: untouched.
    v.push((
        "v4 tcp to a VIP's unbalanced port passes untouched",
        Box::new(|c: &mut Ctx| {
            let d = Desc::tcp(v4(VIP4), 40030, 81, SYN);
            c.step(
                "SYN",
                &d.frame(),
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_NOT_VIP],
                None,
            )
        }),
    ));
    v.push((
        "v6 udp to a non-VIP address passes untouched",
        Box::new(|c: &mut Ctx| {
            let d = Desc::new(
                CLIENT6.into(),
                backend6(2).into(),
                L4::Udp {
                    sport: 40031,
                    dport: 53,
                },
            );
            c.step(
                "datagram",
                &d.frame(),
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_NOT_VIP],
                None,
            )
        }),
    ));
    v.push((
        "udp to a tcp-only VIP port passes untouched",
        Box::new(|c: &mut Ctx| {
            let d = Desc::udp(v4(VIP4), 40032, 80);
            c.step(
                "datagram",
                &d.frame(),
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_NOT_VIP],
                None,
            )
        }),
    ));
    v.push((
        "ARP passes untouched",
        Box::new(|c: &mut Ctx| {
            let mut f = Vec::new();
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&CLIENT4.octets());
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&VIP4.octets());
            c.step(
                "ARP",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_NOT_IP],
                None,
            )
        }),
    ));
    v.push((
        "v4 GRE (another transport) passes untouched",
        Box::new(|c: &mut Ctx| {
            let mut f = Desc::tcp(v4(VIP4), 40033, 80, SYN).frame();
            f[14 + 9] = 47;
            refresh_ipv4_csum(&mut f, 14);
            c.step(
                "GRE",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_L4_OTHER],
                None,
            )
        }),
    ));

    // --- truncated and malformed headers.
    v.push((
        "frame shorter than Ethernet is refused by the kernel",
        Box::new(|c: &mut Ctx| {
            let f = Desc::tcp(v4(VIP4), 40040, 80, SYN).frame()[..10].to_vec();
            c.step("runt", &f, c.fx0, Expect::Refused, &[], None)
        }),
    ));
    v.push((
        "truncated 802.1Q tag",
        Box::new(|c: &mut Ctx| {
            let mut f = vec![0u8; 12];
            f[..6].copy_from_slice(&FX0_MAC);
            f[6..].copy_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&[0x81, 0x00, 0x00]);
            c.step(
                "tag",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_VLAN],
                None,
            )
        }),
    ));
    v.push((
        "truncated IPv4 header",
        Box::new(|c: &mut Ctx| {
            let f = Desc::tcp(v4(VIP4), 40041, 80, SYN).frame()[..14 + 12].to_vec();
            c.step(
                "ipv4",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_IPV4],
                None,
            )
        }),
    ));
    v.push((
        "IPv4 IHL below 5",
        Box::new(|c: &mut Ctx| {
            let mut f = Desc::tcp(v4(VIP4), 40042, 80, SYN).frame();
            f[14] = 0x44;
            c.step(
                "ihl",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_IPV4],
                None,
            )
        }),
    ));
    v.push((
        "IPv4 total length beyond the frame",
        Box::new(|c: &mut Ctx| {
            let f = Desc::tcp(v4(VIP4), 40043, 80, SYN).frame();
            let f = f[..f.len() - 4].to_vec();
            c.step(
                "tot_len",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_IPV4],
                None,
            )
        }),
    ));
    v.push((
        "IPv4 options beyond the frame",
        Box::new(|c: &mut Ctx| {
            let mut f = Desc::tcp(v4(VIP4), 40044, 80, SYN).frame()[..14 + 20].to_vec();
            f[14] = 0x4f; // IHL 15: 60 bytes of header in a 20-byte packet
            f[16..18].copy_from_slice(&20u16.to_be_bytes());
            c.step(
                "options",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_IPV4],
                None,
            )
        }),
    ));
    v.push((
        "truncated IPv6 header",
        Box::new(|c: &mut Ctx| {
            let f = Desc::tcp(v6(VIP6), 40045, 80, SYN).frame()[..14 + 30].to_vec();
            c.step(
                "ipv6",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_IPV6],
                None,
            )
        }),
    ));
    v.push((
        "IPv6 payload length beyond the frame",
        Box::new(|c: &mut Ctx| {
            let f = Desc::tcp(v6(VIP6), 40046, 80, SYN).frame();
            let f = f[..f.len() - 1].to_vec();
            c.step(
                "plen",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_IPV6],
                None,
            )
        }),
    ));
    v.push((
        "truncated TCP header",
        Box::new(|c: &mut Ctx| {
            let mut d = Desc::tcp(v4(VIP4), 40047, 80, SYN);
            d.payload.clear();
            let mut f = d.frame();
            f.truncate(14 + 20 + 12);
            f[16..18].copy_from_slice(&32u16.to_be_bytes());
            refresh_ipv4_csum(&mut f, 14);
            c.step(
                "tcp",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_L4],
                None,
            )
        }),
    ));
    v.push((
        "truncated UDP header (IPv6)",
        Box::new(|c: &mut Ctx| {
            let mut d = Desc::udp(v6(VIP6), 40048, 53);
            d.payload.clear();
            let mut f = d.frame();
            f.truncate(14 + 40 + 4);
            f[18..20].copy_from_slice(&4u16.to_be_bytes());
            c.step(
                "udp",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_TRUNC_L4],
                None,
            )
        }),
    ));

    // --- IPv4 options, fragments, VLAN.
    v.push((
        "v4 with IP options: L4 found past them, rewritten",
        Box::new(|c: &mut Ctx| {
            let mut d = Desc::tcp(v4(VIP4), 40050, 80, SYN);
            d.ip_options = vec![0x94, 0x04, 0x00, 0x00]; // router alert
            c.new_flow("SYN", &d, 0, true, SVC_TCP4_NAT, 0)
        }),
    ));
    v.push((
        "v4 first fragment is balanced by its ports",
        Box::new(|c: &mut Ctx| {
            let mut d = Desc::udp(v4(VIP4), 40051, 53);
            d.more_fragments = true;
            d.payload = vec![0xab; 64];
            c.step(
                "first fragment",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(0, true).frame()),
                &[REDIRECT, CT_MISS],
                fwd(SVC_UDP4_NAT, 0),
            )
        }),
    ));
    v.push((
        "v4 later fragment passes to the stack",
        Box::new(|c: &mut Ctx| {
            let ip = ip_headers(CLIENT4.into(), VIP4.into(), &[], false, 9);
            let mut out = Vec::new();
            PacketBuilder::ip(ip)
                .write(&mut out, IpNumber::UDP, &[0xcd; 40])
                .expect("build");
            let f = frame(CLIENT_MAC, FX0_MAC, None, true, &out);
            c.step(
                "fragment",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_FRAGMENT],
                None,
            )
        }),
    ));
    v.push((
        "v6 fragment header passes to the stack",
        Box::new(|c: &mut Ctx| {
            let mut f = Desc::udp(v6(VIP6), 40052, 53).frame();
            f[14 + 6] = 44;
            c.step(
                "fragment",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_FRAGMENT],
                None,
            )
        }),
    ));
    v.push((
        "v4 tcp nat with an 802.1Q tag: tag kept",
        Box::new(|c: &mut Ctx| {
            let mut d = Desc::tcp(v4(VIP4), 40053, 80, SYN);
            d.vlan = Some(100);
            c.new_flow("SYN", &d, 0, true, SVC_TCP4_NAT, 0)
        }),
    ));
    v.push((
        "v6 udp dsr with an 802.1Q tag: tag kept",
        Box::new(|c: &mut Ctx| {
            let mut d = Desc::udp(v6(VIP6), 40054, 5353);
            d.vlan = Some(4000);
            c.step(
                "datagram",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(1, false).frame()),
                &[REDIRECT, CT_MISS],
                fwd(SVC_UDP6_DSR, 11),
            )
        }),
    ));
    v.push((
        "v4 udp without checksum keeps it zero",
        Box::new(|c: &mut Ctx| {
            let d = Desc::udp(v4(VIP4), 40055, 53);
            let mut f = d.frame();
            f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
            let mut want = d.to_backend(0, true).frame();
            want[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
            c.step(
                "datagram",
                &f,
                c.fx0,
                Expect::Out(XDP_REDIRECT, want),
                &[REDIRECT, CT_MISS],
                fwd(SVC_UDP4_NAT, 0),
            )
        }),
    ));

    // --- ICMP errors quoting a tracked flow.
    // `flip`: the service changes mode after the flow began; the error still
    // follows the flow's own mode (recorded in its entry).
    for (name, vip, port, nat, bi, flip) in [
        (
            "ICMP frag-needed for a nat flow: to its backend, quote rewritten",
            v4(VIP4),
            80u16,
            true,
            0u8,
            false,
        ),
        (
            "ICMP frag-needed for a dsr flow: to its backend, MACs only",
            v4(VIP4),
            443,
            false,
            1,
            false,
        ),
        (
            "ICMPv6 packet-too-big for a nat flow: to its backend, quote rewritten",
            v6(VIP6),
            80,
            true,
            0,
            false,
        ),
        (
            "ICMPv6 packet-too-big for a dsr flow: to its backend, MACs only",
            v6(VIP6),
            443,
            false,
            1,
            false,
        ),
        (
            "ICMP frag-needed for a nat flow whose service turned dsr: quote rewritten",
            v4(VIP4),
            80,
            true,
            0,
            true,
        ),
        (
            "ICMPv6 packet-too-big for a dsr flow whose service turned nat: MACs only",
            v6(VIP6),
            443,
            false,
            1,
            true,
        ),
    ] {
        v.push((
            name,
            Box::new(move |c: &mut Ctx| {
                let is4 = vip.is_ipv4();
                let svc = match (is4, nat) {
                    (true, true) => SVC_TCP4_NAT,
                    (true, false) => SVC_TCP4_DSR,
                    (false, true) => SVC_TCP6_NAT,
                    (false, false) => SVC_TCP6_DSR,
                };
                let bid = if is4 {
                    u32::from(bi)
                } else {
                    10 + u32::from(bi)
                };
                let syn = Desc::tcp(vip, 40060, port, SYN);
                c.new_flow("SYN", &syn, bi, nat, svc, bid)?;
                if flip {
                    let (key, mode) = (c.key(svc), if nat { MODE_DSR } else { MODE_NAT });
                    c.lb.publish(key, svc, mode, &vec![bid; M as usize])
                        .map_err(|e| e.to_string())?;
                }
                let quote = quote_of_reply(&syn);
                let input = icmp_error(is4, vip, &quote, CLIENT_MAC, FX0_MAC);
                let be: IpAddr = if is4 {
                    backend4(bi).into()
                } else {
                    backend6(bi).into()
                };
                let want = if nat {
                    icmp_error(
                        is4,
                        be,
                        &rewrite_quote(&quote, bi),
                        FX1_MAC,
                        backend_mac(bi),
                    )
                } else {
                    icmp_error(is4, vip, &quote, FX1_MAC, backend_mac(bi))
                };
                c.step(
                    "ICMP error",
                    &input,
                    c.fx0,
                    Expect::Out(XDP_REDIRECT, want),
                    &[REDIRECT, ICMP_TO_BACKEND],
                    None,
                )
            }),
        ));
    }
    v.push((
        "ICMP frag-needed for an unknown flow passes untouched",
        Box::new(|c: &mut Ctx| {
            let d = Desc::tcp(v4(VIP4), 40061, 80, SYN);
            let f = icmp_error(true, v4(VIP4), &quote_of_reply(&d), CLIENT_MAC, FX0_MAC);
            c.step(
                "ICMP",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_ICMP],
                None,
            )
        }),
    ));
    v.push((
        "ICMP echo request to a VIP passes untouched",
        Box::new(|c: &mut Ctx| {
            let mut out = Vec::new();
            PacketBuilder::ipv4(CLIENT4.octets(), VIP4.octets(), 64)
                .icmpv4_echo_request(1, 1)
                .write(&mut out, b"ping")
                .expect("build");
            let f = frame(CLIENT_MAC, FX0_MAC, None, true, &out);
            c.step(
                "echo",
                &f,
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_ICMP],
                None,
            )
        }),
    ));
    v.push((
        "ICMPv6 neighbour solicitation passes untouched",
        Box::new(|c: &mut Ctx| {
            let mut out = Vec::new();
            PacketBuilder::ipv6(CLIENT6.octets(), VIP6.octets(), 255)
                .icmpv6_raw(135, 0, [0; 4])
                .write(&mut out, &VIP6.octets())
                .expect("build");
            let f = frame(CLIENT_MAC, FX0_MAC, None, false, &out);
            c.step("NS", &f, c.fx0, Expect::Same(XDP_PASS), &[PASS_ICMP], None)
        }),
    ));

    // --- tables change under live flows.
    v.push((
        "affinity: a flow keeps its backend across a table swap",
        Box::new(|c: &mut Ctx| {
            let syn = Desc::tcp(v4(VIP4), 40070, 80, SYN);
            c.new_flow("SYN", &syn, 0, true, SVC_TCP4_NAT, 0)?;
            c.fill(SVC_TCP4_NAT, 1);
            let ack = Desc::tcp(v4(VIP4), 40070, 80, ACK);
            c.step(
                "ACK after swap",
                &ack.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, ack.to_backend(0, true).frame()),
                &[REDIRECT, CT_HIT],
                hit(SVC_TCP4_NAT, 0),
            )?;
            let other = Desc::tcp(v4(VIP4), 40071, 80, SYN);
            c.new_flow("new flow after swap", &other, 1, true, SVC_TCP4_NAT, 1)
        }),
    ));
    v.push((
        "removed backend: its flows are re-selected",
        Box::new(|c: &mut Ctx| {
            let syn = Desc::tcp(v6(VIP6), 40072, 80, SYN);
            c.new_flow("SYN", &syn, 0, true, SVC_TCP6_NAT, 10)?;
            c.fill(SVC_TCP6_NAT, 12);
            c.set_backend_flags(10, 0);
            let ack = Desc::tcp(v6(VIP6), 40072, 80, ACK);
            c.step(
                "ACK after removal",
                &ack.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, ack.to_backend(2, true).frame()),
                &[REDIRECT, CT_RESELECT, CT_MISS],
                fwd(SVC_TCP6_NAT, 12),
            )
        }),
    ));
    v.push((
        "draining backend keeps its flows, gets no new ones",
        Box::new(|c: &mut Ctx| {
            let syn = Desc::tcp(v4(VIP4), 40073, 443, SYN);
            c.new_flow("SYN", &syn, 1, false, SVC_TCP4_DSR, 1)?;
            c.set_backend_flags(1, BACKEND_ACTIVE | BACKEND_DRAINING);
            c.fill(SVC_TCP4_DSR, 2);
            let ack = Desc::tcp(v4(VIP4), 40073, 443, ACK);
            c.step(
                "ACK while draining",
                &ack.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, ack.to_backend(1, false).frame()),
                &[REDIRECT, CT_HIT],
                hit(SVC_TCP4_DSR, 1),
            )?;
            let other = Desc::tcp(v4(VIP4), 40074, 443, SYN);
            c.new_flow("new flow", &other, 2, false, SVC_TCP4_DSR, 2)
        }),
    ));
    v.push((
        "an entry of an older program (no service in it) is served and upgraded",
        Box::new(|c: &mut Ctx| {
            let syn = Desc::tcp(v6(VIP6), 40090, 80, SYN);
            c.new_flow("SYN", &syn, 0, true, SVC_TCP6_NAT, 10)?;
            let entries: Vec<_> = c.lb.conntrack().iter().filter_map(Result::ok).collect();
            let [(k, f)] = entries[..] else {
                return Err(format!("{} conntrack entries, expected 1", entries.len()));
            };
            let recorded = |f: &Flow| {
                f.flags == FLOW_SERVICE
                    && u32::from(f.service) == SVC_TCP6_NAT
                    && f.mode == MODE_NAT
                    && f.backend == 10
            };
            if !recorded(&f) {
                return Err(format!("new entry lacks its service: {f:?}"));
            }
            // What the program before service-carrying entries wrote.
            let old = Flow {
                backend: f.backend,
                ..Flow::default()
            };
            c.lb.conntrack()
                .insert(k, old, 0)
                .map_err(|e| e.to_string())?;
            let ack = Desc::tcp(v6(VIP6), 40090, 80, ACK);
            for what in ["ACK on the old entry", "ACK on the upgraded entry"] {
                c.step(
                    what,
                    &ack.frame(),
                    c.fx0,
                    Expect::Out(XDP_REDIRECT, ack.to_backend(0, true).frame()),
                    &[REDIRECT, CT_HIT],
                    hit(SVC_TCP6_NAT, 10),
                )?;
                let f = c.lb.conntrack().get(&k, 0).map_err(|e| e.to_string())?;
                if !recorded(&f) {
                    return Err(format!("{what}: entry not upgraded: {f:?}"));
                }
            }
            Ok(())
        }),
    ));
    v.push((
        "udp flow within its idle timeout stays across a swap",
        Box::new(|c: &mut Ctx| {
            let d = Desc::udp(v4(VIP4), 40075, 5353);
            c.step(
                "first",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(1, false).frame()),
                &[REDIRECT, CT_MISS],
                fwd(SVC_UDP4_DSR, 1),
            )?;
            c.fill(SVC_UDP4_DSR, 0);
            c.step(
                "second",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(1, false).frame()),
                &[REDIRECT, CT_HIT],
                hit(SVC_UDP4_DSR, 1),
            )
        }),
    ));
    v.push((
        "udp flow idle past its timeout is re-selected",
        Box::new(|c: &mut Ctx| {
            c.lb.set_udp_idle_timeout(Duration::from_millis(50))
                .map_err(|e| e.to_string())?;
            let d = Desc::udp(v6(VIP6), 40076, 53);
            c.step(
                "first",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(0, true).frame()),
                &[REDIRECT, CT_MISS],
                fwd(SVC_UDP6_NAT, 10),
            )?;
            c.fill(SVC_UDP6_NAT, 11);
            std::thread::sleep(Duration::from_millis(120));
            c.step(
                "after idle",
                &d.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, d.to_backend(1, true).frame()),
                &[REDIRECT, CT_UDP_EXPIRED, CT_MISS],
                fwd(SVC_UDP6_NAT, 11),
            )
        }),
    ));

    // --- selection and failure.
    v.push((
        "slot = flow_hash % M picks the backend",
        Box::new(|c: &mut Ctx| {
            let table = Ctx::hashed_table();
            for sport in [41000u16, 41001, 41002, 41003, 41004, 41005] {
                let d = Desc::tcp(v4(VIP4), sport, 7000, SYN);
                let key = flow_key(d.src, sport, d.dst, 7000, PROTO_TCP);
                let bi = table[(lb_common::flow_hash(&key) % M) as usize];
                c.new_flow(
                    &format!("SYN from {sport}"),
                    &d,
                    bi as u8,
                    true,
                    SVC_HASHED,
                    bi,
                )?;
            }
            Ok(())
        }),
    ));
    v.push((
        "VIP without backends drops, counted",
        Box::new(|c: &mut Ctx| {
            let d = Desc::tcp(v4(VIP4), 40080, 9000, SYN);
            c.step(
                "SYN",
                &d.frame(),
                c.fx0,
                Expect::Same(XDP_DROP),
                &[DROP_NO_BACKEND, CT_MISS, MISS_SYN],
                None,
            )
        }),
    ));
    v.push((
        "no route to the backend: pass untouched, counted",
        Box::new(|c: &mut Ctx| {
            let d = Desc::tcp(v4(VIP4), 40081, 9100, SYN);
            c.step(
                "SYN",
                &d.frame(),
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_FIB, CT_MISS, MISS_SYN],
                None,
            )
        }),
    ));
    v.push((
        "next-hop cache: a neighbour change is used after refresh_next_hops",
        Box::new(|c: &mut Ctx| {
            let syn = Desc::tcp(v4(VIP4), 40090, 80, SYN);
            c.new_flow("SYN", &syn, 0, true, SVC_TCP4_NAT, 0)?;
            let new_mac = [0x02, 0, 0, 0, 0xbe, 0x99];
            sh(&format!(
                "ip neigh replace {} lladdr 02:00:00:00:be:99 dev fx1 nud permanent",
                backend4(0)
            ))?;
            let ack = Desc::tcp(v4(VIP4), 40090, 80, ACK);
            // Until userspace bumps the epoch, the cached hop stands.
            let r = c.step(
                "ACK, cache not refreshed",
                &ack.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, ack.to_backend(0, true).frame()),
                &[REDIRECT, CT_HIT],
                hit(SVC_TCP4_NAT, 0),
            );
            c.lb.refresh_next_hops().map_err(|e| e.to_string())?;
            let mut want = ack.to_backend(0, true);
            want.dst_mac = new_mac;
            let r2 = c.step(
                "ACK after refresh",
                &ack.frame(),
                c.fx0,
                Expect::Out(XDP_REDIRECT, want.frame()),
                &[REDIRECT, CT_HIT],
                hit(SVC_TCP4_NAT, 0),
            );
            sh(&format!(
                "ip neigh replace {} lladdr 02:00:00:00:be:00 dev fx1 nud permanent",
                backend4(0)
            ))?;
            c.lb.refresh_next_hops().map_err(|e| e.to_string())?;
            r.and(r2)
        }),
    ));
    v.push((
        "next-hop cache: a longer packet than it has carried asks the FIB (MTU)",
        Box::new(|c: &mut Ctx| {
            sh("ip link set dev fx1 mtu 1000")?;
            let syn = Desc::tcp(v4(VIP4), 40091, 80, SYN);
            let r = c.new_flow("SYN", &syn, 0, true, SVC_TCP4_NAT, 0);
            let mut big = Desc::tcp(v4(VIP4), 40091, 80, ACK);
            big.payload = vec![0x5a; 1100];
            let r2 = c.step(
                "1160-byte packet over a 1000-byte MTU",
                &big.frame(),
                c.fx0,
                Expect::Same(XDP_PASS),
                &[PASS_FIB, CT_HIT],
                None,
            );
            sh("ip link set dev fx1 mtu 1500")?;
            r.and(r2)
        }),
    ));
    v.push((
        "a SYN re-selects even when the tuple is tracked",
        Box::new(|c: &mut Ctx| {
            let syn = Desc::tcp(v4(VIP4), 40082, 80, SYN);
            c.new_flow("SYN", &syn, 0, true, SVC_TCP4_NAT, 0)?;
            c.fill(SVC_TCP4_NAT, 2);
            c.new_flow("SYN again (reused tuple)", &syn, 2, true, SVC_TCP4_NAT, 2)
        }),
    ));
    v
}

#[test]
fn root_packet_fixtures() {
    if !require_root("root_packet_fixtures") {
        return;
    }
    run_fixtures(false);
}

/// The same cases through the TC program: same verdicts (as TC actions),
/// same output frames, same counters.
#[test]
fn root_packet_fixtures_tc() {
    if !require_root("root_packet_fixtures_tc") {
        return;
    }
    run_fixtures(true);
}

fn run_fixtures(tc: bool) {
    let opts = LoadOptions {
        conntrack_size: 4096,
        max_services: MAX_SERVICES,
        max_backends: MAX_BACKENDS,
        max_table_size: M,
        ..LoadOptions::default()
    };
    let FixtureEnv { ns, lb, fx0, fx1 } =
        FixtureEnv::new(&opts).expect("fixture namespace and balancer");
    let mut ctx = Ctx { lb, fx0, fx1, tc };
    let _inside = ns.enter_thread().expect("enter the fixture namespace");
    // The next-hop cache is per CPU: every case must run on the CPU that
    // filled it, or a "cached" step would ask the FIB afresh.
    let cpu = current_cpu().expect("sched_getcpu");
    pin_thread_to_cpu(cpu).expect("pin the fixture thread");
    let cases = cases();
    assert!(cases.len() >= 40, "only {} fixture cases", cases.len());
    let mut failures = Vec::new();
    for (name, case) in &cases {
        ctx.reset();
        match case(&mut ctx) {
            Ok(()) => eprintln!("ok    {name}"),
            Err(e) => {
                eprintln!("FAIL  {name}: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
