//! Property test: random and mutated frames produce only documented
//! verdicts, a frame that is not ours leaves exactly as it came, and the
//! verdict counters add up to the frames seen.

use std::{cell::RefCell, net::IpAddr};

use headroom::LoadOptions;
use headroom_tests::{fixture_env::*, packets::*, require_root};
use lb_common::{counter, MODE_DSR, MODE_NAT, PROTO_TCP, PROTO_UDP};
use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{Config, TestCaseError, TestRunner},
};

const M: u32 = 31;
/// Cases generated; some are runts the kernel refuses, and at least 10 000 must run.
const CASES: u32 = 12_000;

/// Ports that are VIP services, and two that are not.
const PORTS: [u16; 6] = [80, 53, 443, 5353, 81, 9999];

#[derive(Debug, Clone)]
struct Input {
    kind: u8,
    v6: bool,
    vlan: bool,
    sport: u16,
    port: Index,
    flags: u8,
    flips: Vec<(Index, u8)>,
    cut: Option<Index>,
    noise: Vec<u8>,
}

fn input() -> impl Strategy<Value = Input> {
    (
        (
            0u8..8,
            any::<bool>(),
            any::<bool>(),
            1024u16..1100,
            any::<Index>(),
            any::<u8>(),
        ),
        prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
        prop::option::weighted(0.3, any::<Index>()),
        prop::collection::vec(any::<u8>(), 0..120),
    )
        .prop_map(
            |((kind, v6, vlan, sport, port, flags), flips, cut, noise)| Input {
                kind,
                v6,
                vlan,
                sport,
                port,
                flags,
                flips,
                cut,
                noise,
            },
        )
}

fn addr(v6: bool, a4: std::net::Ipv4Addr, a6: std::net::Ipv6Addr) -> IpAddr {
    if v6 {
        a6.into()
    } else {
        a4.into()
    }
}

/// The frame before mutation. A small sport range makes flows repeat, so
/// conntrack hits and nat replies with state happen too.
fn base_frame(i: &Input) -> Vec<u8> {
    let vip = addr(i.v6, VIP4, VIP6);
    let port = PORTS[i.port.index(PORTS.len())];
    let mut d = match i.kind {
        0 => Desc::tcp(vip, i.sport, port, i.flags),
        1 => Desc::udp(vip, i.sport, port),
        2 => Desc::new(
            client_of(vip),
            addr(i.v6, backend4(2), backend6(2)),
            L4::Tcp {
                sport: i.sport,
                dport: port,
                flags: i.flags,
            },
        ),
        3 => {
            // A backend answering a client: a nat reply if the flow exists.
            let mut d = Desc::new(
                addr(i.v6, backend4(0), backend6(0)),
                client_of(vip),
                L4::Udp {
                    sport: BACKEND_PORT,
                    dport: i.sport,
                },
            );
            d.src_mac = backend_mac(0);
            d.dst_mac = FX1_MAC;
            d
        }
        4 => {
            let quoted = Desc::tcp(vip, i.sport, port, SYN);
            return icmp_error(!i.v6, vip, &quote_of_reply(&quoted), CLIENT_MAC, FX0_MAC);
        }
        5 => {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&i.noise);
            return f;
        }
        6 => {
            let mut f = FX0_MAC.to_vec();
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(if i.v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
            f.extend_from_slice(&i.noise);
            return f;
        }
        _ => Desc::udp(vip, i.sport, 53),
    };
    if i.vlan {
        d.vlan = Some(7);
    }
    d.frame()
}

fn mutate(mut f: Vec<u8>, i: &Input) -> Vec<u8> {
    for (at, byte) in &i.flips {
        let n = f.len();
        f[at.index(n)] = *byte;
    }
    if let Some(cut) = &i.cut {
        let n = f.len();
        f.truncate(cut.index(n + 1));
    }
    f
}

/// True if the frame could be ours: its IP destination is a VIP (TCP/UDP
/// or an ICMP error) or its source a backend (a nat reply). The program does
/// not validate what lies past the headers it needs (a bad UDP length is the
/// backend's to drop), so this reads only the addresses, by hand.
fn could_be_ours(f: &[u8]) -> bool {
    let mut l3 = 14;
    let Some(mut et) = f.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return false;
    };
    if et == 0x8100 {
        let Some(b) = f.get(16..18) else { return false };
        et = u16::from_be_bytes([b[0], b[1]]);
        l3 = 18;
    }
    let (src, dst): (IpAddr, IpAddr) = match et {
        0x0800 => match f.get(l3 + 12..l3 + 20) {
            Some(a) => (
                <[u8; 4]>::try_from(&a[..4]).expect("4 bytes").into(),
                <[u8; 4]>::try_from(&a[4..]).expect("4 bytes").into(),
            ),
            None => return false,
        },
        0x86dd => match f.get(l3 + 8..l3 + 40) {
            Some(a) => (
                <[u8; 16]>::try_from(&a[..16]).expect("16 bytes").into(),
                <[u8; 16]>::try_from(&a[16..]).expect("16 bytes").into(),
            ),
            None => return false,
        },
        _ => return false,
    };
    let vip = dst == IpAddr::from(VIP4) || dst == IpAddr::from(VIP6);
    let backend = (0..NUM_BACKENDS)
        .any(|b| src == IpAddr::from(backend4(b)) || src == IpAddr::from(backend6(b)));
    vip || backend
}

#[test]
fn root_random_and_mutated_frames() {
    if !require_root("root_random_and_mutated_frames") {
        return;
    }
    let opts = LoadOptions {
        conntrack_size: 4096,
        max_services: 8,
        max_backends: 32,
        max_table_size: M,
        ..LoadOptions::default()
    };
    let FixtureEnv {
        ns,
        mut lb,
        fx0,
        fx1,
    } = FixtureEnv::new(&opts).expect("fixture env");
    let _inside = ns.enter_thread().expect("enter namespace");
    for b in 0..NUM_BACKENDS {
        lb.set_backend(u32::from(b), backend(backend4(b).into(), BACKEND_PORT))
            .expect("backend");
        lb.set_backend(10 + u32::from(b), backend(backend6(b).into(), BACKEND_PORT))
            .expect("backend");
    }
    let table = |base: u32| -> Vec<u32> { (0..M).map(|s| base + s % 3).collect() };
    let services = [
        (VIP4.into(), 80, PROTO_TCP, MODE_NAT, 0),
        (VIP4.into(), 53, PROTO_UDP, MODE_NAT, 0),
        (VIP4.into(), 443, PROTO_TCP, MODE_DSR, 0),
        (VIP4.into(), 5353, PROTO_UDP, MODE_DSR, 0),
        (IpAddr::from(VIP6), 80, PROTO_TCP, MODE_NAT, 10),
        (VIP6.into(), 53, PROTO_UDP, MODE_NAT, 10),
        (VIP6.into(), 443, PROTO_TCP, MODE_DSR, 10),
        (VIP6.into(), 5353, PROTO_UDP, MODE_DSR, 10),
    ];
    for (id, (vip, port, proto, mode, base)) in services.into_iter().enumerate() {
        lb.publish(service_key(vip, port, proto), id as u32, mode, &table(base))
            .expect("publish");
    }

    let before = lb.global_counters().expect("counters");
    // TestRunner takes an `Fn`: state that the cases update lives in cells.
    let lb = RefCell::new(lb);
    let actions = RefCell::new([0u64; 5]);
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&input(), |i| {
        let frame = mutate(base_frame(&i), &i);
        let ingress = if i.kind == 3 { fx1 } else { fx0 };
        let r = match lb.borrow_mut().run(&frame, ingress) {
            Ok(r) => r,
            // The kernel refuses frames shorter than an Ethernet header.
            Err(_) if frame.len() < 14 => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("test run failed: {e}"))),
        };
        prop_assert!(
            matches!(r.action, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT),
            "undocumented action {}",
            r.action
        );
        actions.borrow_mut()[r.action as usize] += 1;
        if matches!(r.action, XDP_DROP | XDP_PASS) {
            prop_assert_eq!(&r.frame, &frame, "a passed or dropped frame was modified");
        }
        if !could_be_ours(&frame) {
            prop_assert_eq!(r.action, XDP_PASS, "a frame not ours was not passed");
            prop_assert_eq!(&r.frame, &frame, "a frame not ours was modified");
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }

    let after = lb.borrow().global_counters().expect("counters");
    let actions = actions.into_inner();
    let delta = |c: u32| after[c as usize] - before[c as usize];
    let verdicts: u64 = (0..counter::VERDICTS).map(delta).sum();
    let ran: u64 = actions.iter().sum();
    assert!(ran >= 10_000, "only {ran} frames ran");
    assert_eq!(
        verdicts, ran,
        "verdict counters must add up to the frames run"
    );
    let passes: u64 = (0..counter::VERDICTS)
        .filter(|c| counter::NAMES[*c as usize].starts_with("pass_"))
        .map(delta)
        .sum();
    assert_eq!(
        passes, actions[XDP_PASS as usize],
        "pass counters vs XDP_PASS"
    );
    assert_eq!(
        delta(counter::DROP_NO_BACKEND) + delta(counter::DROP_REDIRECT),
        actions[XDP_DROP as usize],
        "drop counters vs XDP_DROP"
    );
    assert_eq!(delta(counter::TX), actions[XDP_TX as usize], "tx counter");
    assert_eq!(
        delta(counter::REDIRECT),
        actions[XDP_REDIRECT as usize],
        "redirect counter"
    );
    // The mix really exercised the balancer, not only the pass paths.
    assert!(
        actions[XDP_REDIRECT as usize] > 1000,
        "too few balanced frames: {actions:?}"
    );
    assert!(delta(counter::CT_HIT) > 100, "too few conntrack hits");
    assert!(delta(counter::NAT_REPLY) > 10, "too few nat replies");
    eprintln!(
        "{ran} frames: {actions:?} (aborted, drop, pass, tx, redirect); counters: {}",
        (0..counter::COUNT)
            .filter(|c| delta(*c) > 0)
            .map(|c| format!("{}={}", counter::NAMES[c as usize], delta(c)))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
