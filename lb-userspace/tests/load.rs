//! The embedded object passes the verifier, and publishing is all or nothing.
use headroom::{Balancer, BalancerError, LoadOptions};
use lb_common::{Backend, ServiceKey, BACKEND_ACTIVE, BACKEND_DSR, MODE_NAT, PROTO_TCP, PROTO_UDP};

fn root() -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "root-only test must run in CI"
    );
    eprintln!("skipping: needs root");
    false
}

fn opts() -> LoadOptions {
    LoadOptions {
        conntrack_size: 1024,
        max_services: 4,
        max_table_size: 7,
        ..Default::default()
    }
}

#[test]
fn root_program_loads() {
    if !root() {
        return;
    }
    if let Err(e) = Balancer::load(&opts()) {
        panic!("{e}\n{e:?}");
    }
}

#[test]
fn root_failed_fill_keeps_the_table() {
    if !root() {
        return;
    }
    let mut lb = Balancer::load(&opts()).expect("load");
    let key = ServiceKey {
        addr: [1, 0, 0, 0],
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        family: 4,
    };
    let before = lb.publish(key, 0, MODE_NAT, &[1; 7]).expect("publish");
    let err = lb
        .publish_with(key, 0, MODE_NAT, 7, |buf| {
            buf.fill(9); // scribbles on the inactive buffer, then fails
            Err("no backend fits")
        })
        .expect_err("a failed fill is an error");
    assert!(
        matches!(err, BalancerError::Fill(ref m) if m.contains("no backend fits")),
        "{err}"
    );
    assert_eq!(
        lb.active_table(&key),
        Some(&[1u32; 7][..]),
        "the old table stays active"
    );
    let now: Vec<_> = lb.services().map(|(_, v)| *v).collect();
    assert_eq!(now, vec![before], "the service entry did not flip");
    // The next good publish still lands.
    lb.publish(key, 0, MODE_NAT, &[2; 7]).expect("publish");
    assert_eq!(lb.active_table(&key), Some(&[2u32; 7][..]));
}

/// Only active nat backends' ports are reverse-NAT candidates: dsr replies
/// and host traffic from other ports skip the `NAT_REV` lookup.
#[test]
fn root_nat_ports_hold_active_nat_backends_only() {
    if !root() {
        return;
    }
    let mut lb = Balancer::load(&opts()).expect("load");
    let backend = |port: u16, flags| Backend {
        addr: [0x0a00_0002u32.to_be(), 0, 0, 0],
        port: port.to_be(),
        family: 4,
        flags,
    };
    assert_eq!(lb.nat_ports().unwrap(), Vec::<u16>::new());
    lb.set_backend(0, backend(8080, BACKEND_ACTIVE)).unwrap();
    lb.set_backend(1, backend(80, BACKEND_ACTIVE | BACKEND_DSR))
        .unwrap();
    assert_eq!(lb.nat_ports().unwrap(), [8080]);
    // The same slot turned nat: its port becomes a candidate.
    lb.set_backend(1, backend(80, BACKEND_ACTIVE)).unwrap();
    assert_eq!(lb.nat_ports().unwrap(), [80, 8080]);
    // And dsr again, then the nat one removed.
    lb.set_backend(1, backend(80, BACKEND_ACTIVE | BACKEND_DSR))
        .unwrap();
    lb.set_backend(0, backend(8080, 0)).unwrap();
    assert_eq!(lb.nat_ports().unwrap(), Vec::<u16>::new());
}

/// A port's bit is set while any published service uses it: the program
/// looks for a service only on packets to those ports.
#[test]
fn root_vip_ports_follow_the_published_services() {
    if !root() {
        return;
    }
    let mut lb = Balancer::load(&opts()).expect("load");
    let key = |port: u16, proto| ServiceKey {
        addr: [0x0a00_0001u32.to_be(), 0, 0, 0],
        port: port.to_be(),
        proto,
        family: 4,
    };
    assert_eq!(lb.vip_ports().unwrap(), Vec::<u16>::new());
    lb.publish(key(53, PROTO_TCP), 0, MODE_NAT, &[0; 7])
        .unwrap();
    lb.publish(key(53, PROTO_UDP), 1, MODE_NAT, &[0; 7])
        .unwrap();
    lb.publish(key(80, PROTO_TCP), 2, MODE_NAT, &[0; 7])
        .unwrap();
    assert_eq!(lb.vip_ports().unwrap(), [53, 80]);
    // Shared by two services: kept until the last one goes.
    lb.remove_service(&key(53, PROTO_TCP)).unwrap();
    assert_eq!(lb.vip_ports().unwrap(), [53, 80]);
    lb.remove_service(&key(53, PROTO_UDP)).unwrap();
    assert_eq!(lb.vip_ports().unwrap(), [80]);
}
