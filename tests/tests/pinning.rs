//! Restart without state loss: maps and XDP links pinned on a bpffs outlive
//! the balancer value; a new load reuses them (services, tables, backends,
//! connection table) and replaces the program on the link atomically;
//! `detach` removes everything.

use std::path::Path;

use aya::programs::XdpMode;
use headroom::{loader, Balancer, LoadOptions};
use headroom_tests::{fixture_env::*, packets::*, require_root, run_cmd, PrivateBpffs};
use lb_common::{counter, MODE_NAT, PROTO_TCP};

/// The XDP program id attached to `ifname`, if any (from `ip -d link`).
fn xdp_prog_id(ifname: &str) -> Option<u32> {
    let out = run_cmd(&["ip", "-d", "link", "show", "dev", ifname]).ok()?;
    let rest = out.split("prog/xdp id ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn opts() -> LoadOptions {
    LoadOptions {
        conntrack_size: 4096,
        max_services: 4,
        max_backends: 8,
        max_table_size: 31,
        ..LoadOptions::default()
    }
}

fn ack_backend(lb: &mut Balancer, ingress: u32, sport: u16) -> (u32, Vec<u8>) {
    let ack = Desc::tcp(VIP4.into(), sport, 80, ACK);
    let r = lb.run(&ack.frame(), ingress).expect("run");
    (r.action, r.frame)
}

#[test]
fn root_pinned_state_survives_a_restart() {
    if !require_root("root_pinned_state_survives_a_restart") {
        return;
    }
    let fs = PrivateBpffs::mount("pinning").expect("private bpffs");
    let dir: &Path = &fs.root().join("headroom").join("test");
    let FixtureEnv { ns, lb, fx0, .. } = FixtureEnv::new_pinned(&opts(), dir).expect("fixture env");
    let _inside = ns.enter_thread().expect("enter namespace");
    let mut lb = lb;
    let vip = service_key(VIP4.into(), 80, PROTO_TCP);
    lb.set_backend(0, backend(backend4(0).into(), BACKEND_PORT))
        .expect("backend 0");
    lb.set_backend(1, backend(backend4(1).into(), BACKEND_PORT))
        .expect("backend 1");
    lb.publish(vip, 0, MODE_NAT, &[0; 31]).expect("publish");
    lb.attach("fx0", fx0, XdpMode::Driver).expect("attach");
    let first_prog = xdp_prog_id("fx0").expect("XDP on fx0");

    let syn = Desc::tcp(VIP4.into(), 40000, 80, SYN);
    let r = lb.run(&syn.frame(), fx0).expect("SYN");
    assert_eq!(r.frame, syn.to_backend(0, true).frame(), "SYN to backend 0");
    let hits_before = lb.global_counters().expect("counters")[counter::MISS_SYN as usize];

    // The daemon exits: nothing is detached, nothing is lost.
    drop(lb);
    assert_eq!(
        xdp_prog_id("fx0"),
        Some(first_prog),
        "XDP stays on fx0 while pinned"
    );

    // A mismatched build must not reuse the maps blindly.
    let other = LoadOptions {
        conntrack_size: 8192,
        ..opts()
    };
    let err = Balancer::load_pinned(&other, dir)
        .err()
        .expect("size mismatch refused");
    assert!(err.to_string().contains("headroom lb detach"), "{err}");

    let mut lb = Balancer::load_pinned(&opts(), dir).expect("reload pinned");
    let recovered: Vec<_> = lb.services().map(|(k, v)| (*k, v.id)).collect();
    assert_eq!(recovered, vec![(vip, 0)], "service recovered");
    let mut ids: Vec<u32> = lb.backends().map(|(id, _)| *id).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1], "backends recovered");
    assert_eq!(
        lb.active_table(&vip).expect("table"),
        &[0; 31],
        "table recovered"
    );
    assert!(
        lb.global_counters().expect("counters")[counter::MISS_SYN as usize] >= hits_before,
        "counters continue"
    );

    // New table (the other buffer), new program on the same link.
    lb.publish(vip, 0, MODE_NAT, &[1; 31])
        .expect("publish after restart");
    lb.attach("fx0", fx0, XdpMode::Driver).expect("re-attach");
    let second_prog = xdp_prog_id("fx0").expect("XDP on fx0");
    assert_ne!(
        second_prog, first_prog,
        "the new program replaced the old one on the link"
    );

    // The flow opened before the restart keeps its backend.
    let (action, frame) = ack_backend(&mut lb, fx0, 40000);
    assert_eq!(action, 4, "ACK redirected");
    assert_eq!(
        frame,
        Desc::tcp(VIP4.into(), 40000, 80, ACK)
            .to_backend(0, true)
            .frame()
    );
    // A new flow takes the new table.
    let syn = Desc::tcp(VIP4.into(), 40001, 80, SYN);
    assert_eq!(
        lb.run(&syn.frame(), fx0).expect("SYN").frame,
        syn.to_backend(1, true).frame()
    );

    drop(lb);
    loader::detach(dir).expect("detach");
    assert_eq!(xdp_prog_id("fx0"), None, "detach removes XDP from fx0");
    assert!(!dir.exists(), "detach removes the pin directory");
}

#[test]
fn root_pinning_needs_a_bpffs() {
    if !require_root("root_pinning_needs_a_bpffs") {
        return;
    }
    let dir = std::env::temp_dir().join("hr-not-bpffs");
    let err = Balancer::load_pinned(&opts(), &dir).err().expect("refused");
    assert!(err.to_string().contains("not on a bpf filesystem"), "{err}");
}

#[test]
fn root_a_pinned_link_of_a_deleted_interface_is_replaced_on_the_new_one() {
    if !require_root("root_a_pinned_link_of_a_deleted_interface_is_replaced_on_the_new_one") {
        return;
    }
    let fs = PrivateBpffs::mount("relink").expect("private bpffs");
    let dir: &Path = &fs.root().join("headroom").join("test");
    let FixtureEnv { ns, lb, fx0, .. } = FixtureEnv::new_pinned(&opts(), dir).expect("fixture env");
    let _inside = ns.enter_thread().expect("enter namespace");
    let mut lb = lb;
    assert!(
        !lb.attach("fx0", fx0, XdpMode::Driver).expect("attach"),
        "first attach pins a new link"
    );
    assert!(xdp_prog_id("fx0").is_some());
    drop(lb);

    // The interface goes away while the daemon is down and comes back under
    // the same name (a new ifindex): the pinned link is now defunct.
    run_cmd(&["ip", "link", "del", "fx0"]).expect("delete fx0");
    run_cmd(&[
        "ip", "link", "add", "fx0", "type", "veth", "peer", "name", "fx0p",
    ])
    .expect("recreate fx0");
    run_cmd(&["ip", "link", "set", "fx0", "up"]).expect("fx0 up");
    run_cmd(&["ip", "link", "set", "fx0p", "up"]).expect("fx0p up");
    let new_index = ns.ifindex("fx0").expect("new ifindex");
    assert_ne!(new_index, fx0, "the kernel gave the new fx0 a new index");
    assert_eq!(xdp_prog_id("fx0"), None, "nothing on the new fx0 yet");

    let mut lb = Balancer::load_pinned(&opts(), dir).expect("reload pinned");
    let reused = lb
        .attach("fx0", new_index, XdpMode::Driver)
        .expect("attach to the recreated interface");
    assert!(!reused, "the defunct link is not reused");
    assert!(
        xdp_prog_id("fx0").is_some(),
        "the balancer runs on the new fx0"
    );
    // And a later restart reuses the new link.
    drop(lb);
    let mut lb = Balancer::load_pinned(&opts(), dir).expect("reload pinned again");
    assert!(
        lb.attach("fx0", new_index, XdpMode::Driver)
            .expect("re-attach"),
        "the new pinned link is reused"
    );
    drop(lb);
    loader::detach(dir).expect("detach");
    assert_eq!(xdp_prog_id("fx0"), None);
}
