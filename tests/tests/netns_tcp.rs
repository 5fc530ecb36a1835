//! Real TCP through the XDP balancer: a client namespace, the balancer
//! namespace (XDP on both sides, native mode) and two backend namespaces
//! running TCP servers (see `headroom_tests::topology`).
//!
//! For nat and for dsr: 1000 connections to the VIP each send a request and
//! read the backend's answer to the end, without a reset or a timeout; both
//! backends serve a fair share; the balancer's counters agree with what the
//! client and the servers saw, and in nat mode every reply crossed the XDP
//! reverse-NAT path.
//!
//! The same for the TC hook (`mode = "tc"`, tcx ingress links on the
//! balancer's veths, nothing on the peers, offloads at Linux's defaults),
//! plus what only TC makes possible: a 16 MiB stream through the VIP and
//! back with TX checksum offload and TSO on, every byte echoed intact,
//! crossing the balancer as GSO super-packets whose checksums the program
//! rewrote.
use std::{
    sync::{atomic::AtomicBool, Mutex, PoisonError},
    time::{Duration, Instant},
};

use headroom::loader::tc_act;
use headroom_tests::{
    packets::{assert_checksums, Desc, SYN, XDP_REDIRECT},
    require_root,
    topology::{
        backend_addr, backend_name, bulk_backend_id, ClientLimits, Hook, LbCounters, Mode,
        Offloads, TcpStats, Topology, BACKEND_PORT, CLIENT_ADDR, VIP, VIP_PORT,
    },
};
use lb_common::{counter, flow_hash};

/// Connections per mode.
const CONNECTIONS: usize = 1000;
/// Backends, with equal weights.
const BACKENDS: usize = 2;
/// Least share of the connections each backend must serve. With equal
/// weights each expects 50 %, with a standard deviation of 1.6 % over 1000
/// random source ports: 35 % never fails by chance, and catches a skew
/// like the 73/27 split a misread table once produced.
const MIN_SHARE: f64 = 0.35;

/// The tests build separate topologies, but run them one at a time: on two
/// cores, two topologies at once would only make each slower and noisier.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn root_tcp_through_vip_nat() {
    if !require_root("root_tcp_through_vip_nat") {
        return;
    }
    check_mode(Mode::Nat, Hook::Xdp);
}

#[test]
fn root_tcp_through_vip_dsr() {
    if !require_root("root_tcp_through_vip_dsr") {
        return;
    }
    check_mode(Mode::Dsr, Hook::Xdp);
}

#[test]
fn root_tcp_through_vip_nat_tc() {
    if !require_root("root_tcp_through_vip_nat_tc") {
        return;
    }
    check_mode(Mode::Nat, Hook::Tc);
}

#[test]
fn root_tcp_through_vip_dsr_tc() {
    if !require_root("root_tcp_through_vip_dsr_tc") {
        return;
    }
    check_mode(Mode::Dsr, Hook::Tc);
}

/// Bytes of the bulk transfer (each way).
const BULK_BYTES: u64 = 16 << 20;
/// TCP payload of one full-sized segment on a 1500-byte link (IPv4,
/// timestamps on): what a frame carries without GSO.
const MSS: u64 = 1448;

#[test]
fn root_tc_bulk_with_offloads_arrives_intact_as_gso() {
    if !require_root("root_tc_bulk_with_offloads_arrives_intact_as_gso") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut topo =
        Topology::with_hook(Mode::Nat, BACKENDS, Hook::Tc).expect("building the topology");
    topo.publish(&[1; BACKENDS])
        .expect("publishing the service");
    topo.start_bulk().expect("starting the bulk service");
    // The senders of both directions keep Linux's offloads: their TCP hands
    // the veth 64 KiB skbs with partial checksums.
    let mut senders = vec![(
        "client".to_string(),
        topo.client_ns(),
        topo.client_interface(),
    )];
    senders.extend((0..BACKENDS).map(|i| {
        (
            backend_name(i),
            topo.backend_ns(i),
            topo.backend_interface(),
        )
    }));
    for (who, ns, ifname) in &senders {
        let o = Offloads::read(ns, ifname).expect("ethtool -k");
        assert!(
            o.tx_checksum && o.tso,
            "{who}'s {ifname} has offloads {o:?}: the test needs TX checksum offload and TSO on"
        );
    }
    // Make the rewritten checksums count: the balancer's veths finish the
    // partial checksums and segment in software on their way out (from the
    // seed the program rewrote), and the endpoints verify every segment in
    // software on the way in. A wrong pseudo-header update then loses
    // segments (InCsumErrors) and the echo stalls.
    for ifname in topo.balancer_interfaces() {
        topo.balancer_ns()
            .exec(&["ethtool", "-K", ifname.as_str(), "tx", "off"])
            .expect("balancer veth: tx off");
    }
    for (_, ns, ifname) in &senders {
        ns.exec(&["ethtool", "-K", *ifname, "rx", "off"])
            .expect("endpoint veth: rx off");
    }
    let csum_errors = |ns: &headroom_tests::Netns| -> u64 {
        let snmp = ns.exec(&["cat", "/proc/net/snmp"]).expect("snmp");
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = tcp.next().zip(tcp.next()).expect("Tcp: lines");
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InCsumErrors")
            .and_then(|(_, v)| v.parse().ok())
            .expect("InCsumErrors")
    };
    let csum_before: Vec<u64> = senders.iter().map(|(_, ns, _)| csum_errors(ns)).collect();

    let lb_before = topo.counters().expect("balancer counters");
    let tcp_before = topo.tcp_stats().expect("TCP counters");
    let run = match topo.send_bulk(BULK_BYTES, Duration::from_secs(60)) {
        Ok(r) => r,
        Err(e) => {
            let lb = topo.counters().map(|c| c.since(&lb_before).summary());
            panic!("bulk transfer: {e:#}\nbalancer counters: {lb:?}");
        }
    };
    let lb = topo
        .counters()
        .expect("balancer counters")
        .since(&lb_before);
    let tcp_after = topo.tcp_stats().expect("TCP counters");
    for ((who, ns, _), before) in senders.iter().zip(&csum_before) {
        assert_eq!(
            csum_errors(ns) - before,
            0,
            "{who}: TCP segments with a bad checksum arrived"
        );
    }
    let mut bulk = Vec::new();
    for i in 0..BACKENDS {
        bulk.push(
            topo.lb()
                .backend_counters(bulk_backend_id(i))
                .expect("bulk backend counters"),
        );
    }
    eprintln!(
        "tc bulk: {} MiB each way in {:.2?} ({:.0} Mbit/s each way)",
        run.bytes >> 20,
        run.elapsed,
        run.bytes as f64 * 8.0 / run.elapsed.as_secs_f64() / 1e6
    );
    eprintln!("tc bulk: balancer counters: {}", lb.summary());
    eprintln!("tc bulk: bulk backends' counters: {bulk:?}");
    for ((name, after), (_, before)) in tcp_after.iter().zip(&tcp_before) {
        let d = after.since(before);
        eprintln!("tc bulk: {name} TCP: {d:?}");
        assert_eq!(
            (d.out_rsts, d.estab_resets, d.attempt_fails),
            (0, 0, 0),
            "{name}: (OutRsts, EstabResets, AttemptFails) during the bulk transfer"
        );
    }

    // One flow, on one backend, which counted every byte sent to it.
    let served: Vec<_> = bulk.iter().filter(|c| c.new_flows > 0).collect();
    assert_eq!(served.len(), 1, "bulk flows per backend: {bulk:?}");
    let c = served[0];
    assert_eq!(c.new_flows, 1, "{c:?}");
    assert!(
        c.bytes >= BULK_BYTES,
        "the balancer counted {} bytes towards the backend, {BULK_BYTES} were sent",
        c.bytes
    );
    // Full-sized segments alone would be BULK_BYTES / MSS packets; far
    // fewer crossed the program: GSO super-packets, whose checksums it
    // rewrote as partial ones (the echo proves them right).
    let segments = BULK_BYTES / MSS;
    assert!(
        c.packets < segments / 2,
        "{} packets towards the backend for {segments} MSS-sized segments: no GSO super-packets",
        c.packets
    );
    // The echo came back through the reverse NAT, as super-packets too.
    let replies = lb.get(counter::NAT_REPLY);
    assert!(
        replies > 0 && replies < segments / 2,
        "{replies} nat replies for {segments} MSS-sized segments of echo: {}",
        lb.summary()
    );
    for k in [
        counter::DROP_NO_BACKEND,
        counter::DROP_REDIRECT,
        counter::PASS_FIB,
        counter::MISS_NON_SYN,
    ] {
        assert_eq!(
            lb.get(k),
            0,
            "{} in {}",
            counter::NAMES[k as usize],
            lb.summary()
        );
    }
}

/// `Balancer::run_tc` runs a frame through the TC program as if it came in
/// on an interface (BPF_PROG_TEST_RUN with an `__sk_buff` naming it): a SYN
/// to the VIP on the balancer's client link leaves nat-rewritten towards
/// the backend its flow entry names, with valid checksums and the backend's
/// MAC, redirected (`TC_ACT_REDIRECT`); the XDP program turns the same
/// frame into the same bytes.
#[test]
fn root_run_tc_forwards_a_syn_like_xdp() {
    if !require_root("root_run_tc_forwards_a_syn_like_xdp") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut topo =
        Topology::with_hook(Mode::Nat, BACKENDS, Hook::Tc).expect("building the topology");
    topo.publish(&[1; BACKENDS])
        .expect("publishing the service");
    let lb_ifs = topo.balancer_interfaces();
    let lb_ns = topo.balancer_ns();
    let ingress = lb_ns.ifindex(&lb_ifs[0]).expect("ifindex");
    let mut syn = Desc::tcp(VIP.into(), 40_000, VIP_PORT, SYN);
    syn.src = CLIENT_ADDR.into();
    syn.src_mac = topo
        .client_ns()
        .mac(topo.client_interface())
        .expect("client MAC");
    syn.dst_mac = lb_ns.mac(&lb_ifs[0]).expect("balancer MAC");
    let backend_macs: Vec<[u8; 6]> = (0..BACKENDS)
        .map(|i| {
            topo.backend_ns(i)
                .mac(topo.backend_interface())
                .expect("MAC")
        })
        .collect();
    let frame = syn.frame();
    let (tc, xdp) = topo
        .in_balancer_ns(|lb| {
            let tc = lb.run_tc(&frame, ingress).expect("run_tc");
            let xdp = lb.run(&frame, ingress).expect("run");
            (tc, xdp)
        })
        .expect("entering the balancer namespace");
    assert_eq!(tc.action, tc_act::REDIRECT, "TC verdict");
    assert_eq!(xdp.action, XDP_REDIRECT, "XDP verdict");
    let k = (0..BACKENDS)
        .find(|&i| tc.frame[..6] == backend_macs[i])
        .unwrap_or_else(|| panic!("TC sent the SYN to MAC {:02x?}", &tc.frame[..6]));
    let mut expected = syn.clone();
    expected.src_mac = topo.balancer_ns().mac(&lb_ifs[1 + k]).expect("MAC");
    expected.dst_mac = backend_macs[k];
    expected.dst = backend_addr(k).into();
    expected.set_dport(BACKEND_PORT);
    assert_eq!(tc.frame, expected.frame(), "TC output for backend {k}");
    assert_checksums(&tc.frame).expect("TC output checksums");
    assert_eq!(xdp.frame, tc.frame, "XDP and TC outputs differ");
    let flows = topo.flows().expect("connection table");
    assert!(
        flows
            .iter()
            .any(|(key, b)| *b == k as u32 && u16::from_be(key.sport) == 40_000),
        "no flow entry on backend {k}: {flows:?}"
    );
}

/// Builds the topology for `mode` on `hook`, runs the connections and
/// checks them.
fn check_mode(mode: Mode, hook: Hook) {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let mut topo = Topology::with_hook(mode, BACKENDS, hook).expect("building the topology");
    let table = topo
        .publish(&[1; BACKENDS])
        .expect("publishing the service");
    let built = started.elapsed();

    let lb_before = topo.counters().expect("balancer counters");
    let tcp_before = topo.tcp_stats().expect("TCP counters");
    let stop = AtomicBool::new(false);
    let tally = match topo.run_clients(CONNECTIONS, ClientLimits::default(), &stop) {
        Ok(t) => t,
        Err(e) => {
            let lb = topo.counters().map(|c| c.since(&lb_before).summary());
            panic!("{mode}: {e:#}\nbalancer counters: {lb:?}");
        }
    };
    let lb = topo
        .counters()
        .expect("balancer counters")
        .since(&lb_before);
    let tcp_after = topo.tcp_stats().expect("TCP counters");
    let tcp: Vec<(String, TcpStats)> = tcp_after
        .iter()
        .zip(&tcp_before)
        .map(|((name, after), (_, before))| (name.clone(), after.since(before)))
        .collect();

    eprintln!(
        "{mode}: topology {built:.2?}, {CONNECTIONS} connections {:.2?}, per backend {:?}",
        tally.elapsed, tally.per_backend
    );
    eprintln!("{mode}: balancer counters: {}", lb.summary());
    for (name, stats) in &tcp {
        eprintln!("{mode}: {name} TCP: {stats:?}");
    }

    check_distribution(mode, &topo, &tally.per_backend);
    check_balancer_counters(mode, &lb, &tally.per_backend);
    check_no_resets(mode, &tcp);
    check_flows_follow_table(mode, &mut topo, &table);
    drop(topo);
    eprintln!(
        "{mode}: total {:.2?} (teardown included)",
        started.elapsed()
    );
}

/// Every connection answered, both backends served a fair share, and the
/// servers counted what the client saw.
fn check_distribution(mode: Mode, topo: &Topology, per_backend: &[u64]) {
    assert_eq!(
        per_backend.iter().sum::<u64>(),
        CONNECTIONS as u64,
        "{mode}"
    );
    for (i, &n) in per_backend.iter().enumerate() {
        let share = n as f64 / CONNECTIONS as f64;
        assert!(
            share >= MIN_SHARE,
            "{mode}: {} served {n} of {CONNECTIONS} ({:.1} %), below {} %",
            backend_name(i),
            share * 100.0,
            MIN_SHARE * 100.0
        );
        assert_eq!(
            topo.served(i),
            n,
            "{mode}: {}'s server count differs from the client's",
            backend_name(i)
        );
    }
}

/// The balancer saw one new flow per connection at the backend that served
/// it, forwarded everything (no drop, no FIB miss), and in nat mode
/// rewrote the replies itself.
fn check_balancer_counters(mode: Mode, lb: &LbCounters, per_backend: &[u64]) {
    for (i, (c, &n)) in lb.backends.iter().zip(per_backend).enumerate() {
        assert_eq!(
            c.new_flows,
            n,
            "{mode}: balancer's new_flows of {} vs connections it served",
            backend_name(i)
        );
        // At least SYN, request, final ACK per connection.
        assert!(
            c.packets >= 3 * n,
            "{mode}: {} packets for {n} flows",
            c.packets
        );
    }
    for c in [
        counter::DROP_NO_BACKEND,
        counter::DROP_REDIRECT,
        counter::PASS_FIB,
        counter::MISS_NON_SYN,
    ] {
        assert_eq!(
            lb.get(c),
            0,
            "{mode}: {} in {}",
            counter::NAMES[c as usize],
            lb.summary()
        );
    }
    let forwarded = lb.get(counter::REDIRECT) + lb.get(counter::TX);
    assert!(
        forwarded >= 3 * CONNECTIONS as u64,
        "{mode}: only {forwarded} packets forwarded: {}",
        lb.summary()
    );
    // SYN-ACK and the answer are separate segments: at least two replies per
    // connection.
    let replies = 2 * CONNECTIONS as u64;
    match mode {
        Mode::Nat => assert!(
            lb.get(counter::NAT_REPLY) >= replies,
            "{mode}: replies did not all cross the XDP reverse-NAT path: {}",
            lb.summary()
        ),
        Mode::Dsr => {
            assert_eq!(lb.get(counter::NAT_REPLY), 0, "{mode}: {}", lb.summary());
            // The backends' replies reach the balancer's kernel untouched.
            assert!(
                lb.get(counter::PASS_NOT_VIP) >= replies,
                "{mode}: replies did not cross the balancer: {}",
                lb.summary()
            );
        }
    }
}

/// Every tracked flow went to the backend userspace expects:
/// `table[flow_hash(5-tuple) % M]`. This pins down the program's hash, its
/// slot arithmetic and its reading of the table memory userspace wrote,
/// which a share check alone would let through as a mere skew.
fn check_flows_follow_table(mode: Mode, topo: &mut Topology, table: &[u32]) {
    let flows = topo.flows().expect("reading the connection table");
    // A client port reused by a later connection shares its entry.
    assert!(
        !flows.is_empty() && flows.len() <= CONNECTIONS,
        "{mode}: {} tracked flows for {CONNECTIONS} connections",
        flows.len()
    );
    let m = table.len() as u32;
    let strays: Vec<_> = flows
        .iter()
        .filter(|(key, backend)| table[(flow_hash(key) % m) as usize] != *backend)
        .collect();
    assert!(
        strays.is_empty(),
        "{mode}: {} of {} flows are not on the backend their table slot names, e.g. {:?}",
        strays.len(),
        flows.len(),
        strays.first()
    );
}

/// No side sent or received a reset, no connection attempt failed, and the
/// TCP stacks counted exactly our connections.
fn check_no_resets(mode: Mode, tcp: &[(String, TcpStats)]) {
    for (name, s) in tcp {
        assert_eq!(
            (s.out_rsts, s.estab_resets, s.attempt_fails),
            (0, 0, 0),
            "{mode}: {name} (OutRsts, EstabResets, AttemptFails): {s:?}"
        );
    }
    let client = &tcp[0].1;
    assert_eq!(
        client.active_opens, CONNECTIONS as u64,
        "{mode}: client {client:?}"
    );
    let accepted: u64 = tcp[1..].iter().map(|(_, s)| s.passive_opens).sum();
    assert_eq!(
        accepted, CONNECTIONS as u64,
        "{mode}: backends' PassiveOpens"
    );
}
