//! Real TCP through the XDP balancer: a client namespace, the balancer
//! namespace (XDP on both sides, native mode) and two backend namespaces
//! running TCP servers (see `headroom_tests::topology`).
//!
//! For nat and for dsr: 1000 connections to the VIP each send a request and
//! read the backend's answer to the end, without a reset or a timeout; both
//! backends serve a fair share; the balancer's counters agree with what the
//! client and the servers saw, and in nat mode every reply crossed the XDP
//! reverse-NAT path.
use std::{
    sync::{atomic::AtomicBool, Mutex, PoisonError},
    time::Instant,
};

use headroom_tests::{
    require_root,
    topology::{backend_name, ClientLimits, LbCounters, Mode, TcpStats, Topology},
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
    check_mode(Mode::Nat);
}

#[test]
fn root_tcp_through_vip_dsr() {
    if !require_root("root_tcp_through_vip_dsr") {
        return;
    }
    check_mode(Mode::Dsr);
}

/// Builds the topology for `mode`, runs the connections and checks them.
fn check_mode(mode: Mode) {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    let mut topo = Topology::new(mode, BACKENDS).expect("building the topology");
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
