//! `cargo xtask bench xdp`: nanoseconds per packet of the XDP program, as the
//! kernel measures them (BPF_PROG_TEST_RUN), per path:
//!
//! - floor: the bare `XDP_PASS` program, i.e. what the test-run machinery
//!   itself costs (two clock reads, bottom halves off and on, the dispatch);
//! - conntrack hit: a TCP ACK of an established flow;
//! - new flow: a TCP SYN of a tuple absent from the connection table;
//! - non-VIP pass: TCP to the host itself, which the program leaves alone;
//!
//! for IPv4 and IPv6, nat and dsr, each over 1 flow and over `--flows`
//! distinct flows.
//!
//! Method. Every call runs the program once (repeat = 1) on a fresh copy of
//! a pre-built frame: an in-kernel repeat would run it again on the frame it
//! has just rewritten. The kernel times each call (`RunResult.duration`);
//! userspace work between calls is not in the figures. A *run* makes
//! `--calls` calls per cell and records their mean; cells are interleaved
//! (run 1: every cell, in a shuffled order; run 2: every cell; …) so drift
//! on a noisy machine hits all cells alike. The table gives the median, min
//! and max of the per-run means over `--runs` runs, and the same of
//! (cell − floor) computed per run.
//!
//! Every cell proves it took the path it is named after: each call's action
//! and output frame are checked, and so are the deltas of all global
//! counters over the cell (e.g. a hit cell must grow `ct_hit` and `redirect`
//! by exactly its calls and nothing else). Any mismatch aborts the benchmark.
//!
//! nat and dsr use two balancers (same maps, same tables): with a nat
//! service loaded, every non-VIP packet also costs a reverse-NAT lookup, and
//! a dsr-only balancer skips it. A new-flow cell deletes its tuples from the
//! connection table (and their reverse-NAT entries) before each pass over
//! them, untimed, so every SYN inserts a key that is not there; the SYNs
//! re-create exactly the entries the hit cells use.
//!
//! A second, diagnostic table runs the paths whose output frame takes the
//! same path again (floor, non-VIP, dsr hit, dsr SYN) with a large in-kernel
//! repeat (`--hot-repeat`): warm caches, no syscall between packets. The
//! difference to the first table is what each packet pays for arriving cold.
//!
//! Needs root. Run from the workspace root: `cargo xtask bench xdp --
//! [--calls N] [--runs N] [--flows N] [--cpu N] [--hot-repeat N] [--only TEXT]`.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use clap::Parser;
use headroom::{loader::run_xdp, Balancer, LoadOptions, RunResult};
use headroom_tests::{
    fixture_env::{
        backend, backend4, backend6, backend_mac, service_key, words, FixtureEnv, CLIENT4, CLIENT6,
        CLIENT_MAC, FX0_MAC, FX1_MAC, NUM_BACKENDS, VIP4, VIP6,
    },
    is_root,
    packets::{BACKEND_PORT, XDP_PASS, XDP_REDIRECT},
};
use lb_common::{
    counter, flow_hash, programs, FlowKey, DEFAULT_CONNTRACK_SIZE, DEFAULT_TABLE_SIZE, FAMILY_V4,
    FAMILY_V6, MODE_DSR, MODE_NAT, PROTO_TCP,
};

/// The services' port.
const VIP_PORT: u16 = 80;
/// Non-VIP traffic: to the balancer host's own address, this port.
const HOST_PORT: u16 = 22;
/// Flow `i` comes from port `FIRST_PORT + i % PORTS_PER_ADDR` of client
/// address `CLIENT + i / PORTS_PER_ADDR`.
const FIRST_PORT: u32 = 10_000;
const PORTS_PER_ADDR: u32 = 50_000;
/// The balancer's own address on `fx0` (see fixture_env).
const HOST4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// Calls slower than this are counted (and kept in the means).
const SLOW_NS: u128 = 10_000;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Per-packet cost of the XDP program, measured with BPF_PROG_TEST_RUN.
#[derive(Parser, Debug)]
#[command(name = "bench-xdp")]
struct Args {
    /// Program runs per cell per run.
    #[arg(long, default_value_t = 100_000)]
    calls: u32,
    /// Runs (each runs every cell once); the table reports over their means.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Distinct flows of the many-flow cells.
    #[arg(long, default_value_t = 100_000)]
    flows: u32,
    /// CPU the measuring thread is pinned to (default: the last online one).
    #[arg(long)]
    cpu: Option<usize>,
    /// Diagnostic table: the paths that survive a rerun on their own output
    /// (floor, non-VIP, dsr hit, dsr SYN), 1 flow, with this in-kernel
    /// repeat, i.e. with warm caches. 0 or 1: no diagnostic table. Keep it
    /// large: every test run with repeat > 1 swaps the program into the
    /// kernel's XDP dispatcher and out again, waiting for RCU both times
    /// (milliseconds per call on a busy machine; not in the timings).
    #[arg(long, default_value_t = 10_000)]
    hot_repeat: u32,
    /// Only the cells whose name contains this (the floors always run),
    /// e.g. `--only "hit v4 dsr"` while profiling.
    #[arg(long)]
    only: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Floor,
    Hit,
    New,
    NotVip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fam {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Nat,
    Dsr,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Cell {
    kind: Kind,
    fam: Fam,
    mode: Mode,
    flows: u32,
    /// In-kernel repeat: 1, except in the diagnostic table.
    repeat: u32,
}

impl Cell {
    fn label(&self) -> String {
        let r = if self.repeat > 1 {
            format!(", repeat {}", self.repeat)
        } else {
            String::new()
        };
        if self.kind == Kind::Floor {
            return format!("floor (bare XDP_PASS){r}");
        }
        let kind = match self.kind {
            Kind::Hit => "conntrack hit",
            Kind::New => "new flow",
            _ => "non-VIP pass",
        };
        let fam = match self.fam {
            Fam::V4 => "v4",
            Fam::V6 => "v6",
        };
        let mode = match self.mode {
            Mode::Nat => "nat",
            Mode::Dsr => "dsr",
        };
        format!("{kind} {fam} {mode}, {}{r}", flows_label(self.flows))
    }

    /// Target above the floor, from the issue: (1 flow, many flows).
    fn target(&self) -> Option<u32> {
        if self.repeat > 1 {
            return None;
        }
        let (one, many) = match self.kind {
            Kind::Hit => (100, 150),
            Kind::New => (180, 300),
            _ => return None,
        };
        Some(if self.flows == 1 { one } else { many })
    }
}

fn flows_label(n: u32) -> String {
    match n {
        1 => "1 flow".into(),
        n if n % 1000 == 0 => format!("{}k flows", n / 1000),
        n => format!("{n} flows"),
    }
}

/// Frames of equal length, back to back.
struct Frames {
    buf: Vec<u8>,
    len: usize,
}

impl Frames {
    fn new(len: usize, n: u32) -> Self {
        Frames {
            buf: Vec::with_capacity(len * n as usize),
            len,
        }
    }

    fn push(&mut self, frame: &[u8]) {
        assert_eq!(frame.len(), self.len);
        self.buf.extend_from_slice(frame);
    }

    fn get(&self, i: u32) -> &[u8] {
        let at = i as usize * self.len;
        &self.buf[at..at + self.len]
    }
}

/// A family's pre-built frames and the keys of its flows.
struct FamData {
    fam: Fam,
    vip: IpAddr,
    /// Flow `i`: SYN to the VIP.
    syn: Frames,
    /// Flow `i`: ACK to the VIP.
    ack: Frames,
    /// Flow `i`'s client and port, ACK to the host's own address.
    host: Frames,
    /// Connection-table key of flow `i`.
    keys: Vec<FlowKey>,
    /// Reverse-NAT key of flow `i` in the nat balancer.
    rkeys: Vec<FlowKey>,
}

fn client(fam: Fam, i: u32) -> (IpAddr, u16) {
    let port = (FIRST_PORT + i % PORTS_PER_ADDR) as u16;
    let off = i / PORTS_PER_ADDR;
    let addr = match fam {
        Fam::V4 => IpAddr::V4(Ipv4Addr::from(u32::from(CLIENT4) + off)),
        Fam::V6 => IpAddr::V6(Ipv6Addr::from(u128::from(CLIENT6) + u128::from(off))),
    };
    (addr, port)
}

/// Backend index (0..NUM_BACKENDS) a flow lands on: the tables hold
/// `slot % NUM_BACKENDS` (offset per family).
fn backend_index(key: &FlowKey) -> u8 {
    let slot = flow_hash(key) % DEFAULT_TABLE_SIZE;
    (slot % u32::from(NUM_BACKENDS)) as u8
}

fn backend_addr(fam: Fam, i: u8) -> IpAddr {
    match fam {
        Fam::V4 => backend4(i).into(),
        Fam::V6 => backend6(i).into(),
    }
}

fn build_family(fam: Fam, n: u32) -> FamData {
    let (vip, host, len) = match fam {
        Fam::V4 => (IpAddr::V4(VIP4), IpAddr::V4(HOST4), 54),
        Fam::V6 => (IpAddr::V6(VIP6), IpAddr::V6(HOST6), 74),
    };
    let mut d = FamData {
        fam,
        vip,
        syn: Frames::new(len, n),
        ack: Frames::new(len, n),
        host: Frames::new(len, n),
        keys: Vec::with_capacity(n as usize),
        rkeys: Vec::with_capacity(n as usize),
    };
    for i in 0..n {
        let (src, sport) = client(fam, i);
        d.syn.push(&tcp_frame(src, sport, vip, VIP_PORT, TCP_SYN));
        d.ack.push(&tcp_frame(src, sport, vip, VIP_PORT, TCP_ACK));
        d.host
            .push(&tcp_frame(src, sport, host, HOST_PORT, TCP_ACK));
        let key = flow_key(src, sport, vip, VIP_PORT);
        let b = backend_addr(fam, backend_index(&key));
        d.rkeys.push(flow_key(b, BACKEND_PORT, src, sport));
        d.keys.push(key);
    }
    d
}

fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    headroom_tests::fixture_env::flow_key(src, sport, dst, dport, PROTO_TCP)
}

/// Ethernet + IPv4/IPv6 + TCP (no payload), valid checksums, as the client
/// sends it to `fx0`.
fn tcp_frame(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(74);
    f.extend_from_slice(&FX0_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes()); // seq
    if flags & TCP_ACK != 0 {
        tcp[8..12].copy_from_slice(&2000u32.to_be_bytes());
    }
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = PROTO_TCP;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, PROTO_TCP, 0, 20]);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = PROTO_TCP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            f.extend_from_slice(&ip);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, PROTO_TCP]);
        }
        _ => unreachable!("mixed families"),
    }
    let c = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

/// Internet checksum over the concatenation of even-length parts.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut s: u32 = 0;
    for p in parts {
        for w in p.chunks(2) {
            s += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Backends 0..3 (v4) and 3..6 (v6), one service per family on port 80,
/// tables of the default size holding `slot % 3`.
fn configure(lb: &mut Balancer, mode: u8) -> Result<()> {
    let n = u32::from(NUM_BACKENDS);
    for i in 0..NUM_BACKENDS {
        lb.set_backend(u32::from(i), backend(backend4(i).into(), BACKEND_PORT))?;
        lb.set_backend(n + u32::from(i), backend(backend6(i).into(), BACKEND_PORT))?;
    }
    for (id, vip, base) in [(0, IpAddr::V4(VIP4), 0), (1, IpAddr::V6(VIP6), n)] {
        lb.publish_with(
            service_key(vip, VIP_PORT, PROTO_TCP),
            id,
            mode,
            DEFAULT_TABLE_SIZE,
            |t| {
                for (s, slot) in t.iter_mut().enumerate() {
                    *slot = base + s as u32 % n;
                }
                Ok::<(), std::convert::Infallible>(())
            },
        )?;
    }
    Ok(())
}

/// Checks what the program did to one frame.
fn check_frame(cell: &Cell, d: &FamData, i: u32, input: &[u8], out: &[u8]) -> Result<()> {
    match cell.kind {
        Kind::Floor | Kind::NotVip => {
            ensure!(out == input, "the frame was modified");
        }
        Kind::Hit | Kind::New => {
            let (dst, l4) = match d.fam {
                Fam::V4 => (30..34, 34),
                Fam::V6 => (38..54, 54),
            };
            ensure!(out.len() == input.len(), "frame length changed");
            ensure!(out[6..12] == FX1_MAC, "source MAC is not fx1's");
            let b = out[5];
            ensure!(
                b < NUM_BACKENDS && out[0..6] == backend_mac(b),
                "destination MAC {:02x?} is no backend's",
                &out[0..6]
            );
            let key = &d.keys[i as usize];
            ensure!(
                b == backend_index(key),
                "flow {i} went to backend {b}, its table slot says {}",
                backend_index(key)
            );
            let (want_addr, want_port) = match cell.mode {
                Mode::Nat => (backend_addr(d.fam, b), BACKEND_PORT),
                Mode::Dsr => (d.vip, VIP_PORT),
            };
            let want: Vec<u8> = match want_addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            ensure!(
                out[dst] == want[..],
                "destination address is not {want_addr}"
            );
            ensure!(
                out[l4 + 2..l4 + 4] == want_port.to_be_bytes(),
                "destination port is not {want_port}"
            );
        }
    }
    Ok(())
}

/// The exact change of every global counter a cell of `calls` calls must make.
fn expected_deltas(kind: Kind, calls: u64) -> [u64; counter::COUNT as usize] {
    let mut e = [0u64; counter::COUNT as usize];
    let set: &[u32] = match kind {
        Kind::Floor => &[],
        Kind::Hit => &[counter::CT_HIT, counter::REDIRECT],
        Kind::New => &[counter::MISS_SYN, counter::CT_MISS, counter::REDIRECT],
        Kind::NotVip => &[counter::PASS_NOT_VIP],
    };
    for &c in set {
        e[c as usize] = calls;
    }
    e
}

/// One cell's result in one run.
struct Sample {
    mean_ns: f64,
    slow: u64,
    max_ns: u128,
}

struct Bench {
    lbs: [Balancer; 2],
    fams: [FamData; 2],
    ifindex: u32,
}

impl Bench {
    fn lb(&mut self, mode: Mode) -> &mut Balancer {
        &mut self.lbs[mode as usize]
    }

    /// Removes a cell's first `flows` flows from the connection table (and the reverse-NAT
    /// table), so its SYNs are new flows. Each entry must be there: one
    /// missing means it was evicted, and the hit cells would be wrong too.
    fn forget(&mut self, cell: &Cell, flows: u32) -> Result<()> {
        let d = &self.fams[cell.fam as usize];
        let lb = &mut self.lbs[cell.mode as usize];
        for i in 0..flows as usize {
            lb.conntrack().remove(&d.keys[i]).with_context(|| {
                format!(
                    "{}: conntrack entry of flow {i} is missing (evicted?)",
                    cell.label()
                )
            })?;
            if cell.mode == Mode::Nat {
                lb.nat_rev().remove(&d.rkeys[i]).with_context(|| {
                    format!("{}: reverse-NAT entry of flow {i} is missing", cell.label())
                })?;
            }
        }
        Ok(())
    }

    /// Runs `calls` calls of `cell`. `established`: the cell's flows are in
    /// the connection table (false only for the SYNs that first create them).
    fn run_cell(&mut self, cell: &Cell, calls: u32, established: bool) -> Result<Sample> {
        // Program runs: `calls`, in `syscalls` test runs of `repeat` each.
        let syscalls = (calls / cell.repeat).max(1);
        let runs = u64::from(syscalls) * u64::from(cell.repeat);
        let before = self.lb(cell.mode).global_counters()?;
        let mut total: u128 = 0;
        let mut slow = 0;
        let mut max_ns = 0;
        let want_action = match cell.kind {
            Kind::Hit | Kind::New => XDP_REDIRECT,
            _ => XDP_PASS,
        };
        let ifindex = self.ifindex;
        for c in 0..syscalls {
            let i = c % cell.flows;
            if cell.kind == Kind::New && i == 0 && established && cell.repeat == 1 {
                // Only the flows this pass will re-create.
                self.forget(cell, cell.flows.min(syscalls - c))?;
            }
            let d = &self.fams[cell.fam as usize];
            let frame = match cell.kind {
                Kind::Floor | Kind::Hit => d.ack.get(i),
                Kind::New => d.syn.get(i),
                Kind::NotVip => d.host.get(i),
            };
            let lb = &mut self.lbs[cell.mode as usize];
            let r = match (cell.kind, cell.repeat) {
                (Kind::Floor, 1) => run_xdp(lb.pass_program(), programs::PASS, frame, ifindex)?,
                (_, 1) => lb.run(frame, ifindex)?,
                (Kind::Floor, n) => run_repeat(lb.pass_program(), frame, ifindex, n)?,
                (_, n) => run_repeat(lb.program(), frame, ifindex, n)?,
            };
            ensure!(
                r.action == want_action,
                "{}: call {c} (flow {i}) returned action {}, expected {want_action}",
                cell.label(),
                r.action
            );
            check_frame(cell, d, i, frame, &r.frame)
                .with_context(|| format!("{}: call {c} (flow {i})", cell.label()))?;
            let ns = r.duration.as_nanos();
            total += ns;
            max_ns = max_ns.max(ns);
            if ns > SLOW_NS {
                slow += 1;
            }
        }
        let after = self.lb(cell.mode).global_counters()?;
        let want = expected_deltas(cell.kind, runs);
        let mut wrong = Vec::new();
        for (c, name) in counter::NAMES.iter().enumerate() {
            let got = after[c].wrapping_sub(before[c]);
            if got != want[c] {
                wrong.push(format!("{name}: +{got}, expected +{}", want[c]));
            }
        }
        if !wrong.is_empty() {
            bail!(
                "{} did not take the path it measures ({runs} program runs): {}",
                cell.label(),
                wrong.join(", ")
            );
        }
        Ok(Sample {
            // The kernel reports the mean of each test run's repeats.
            mean_ns: total as f64 / f64::from(syscalls),
            slow,
            max_ns,
        })
    }
}

/// Like [`run_xdp`], with an in-kernel repeat: the program runs `repeat`
/// times on the same buffer, each time on what the previous run left.
fn run_repeat(prog: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Result<RunResult> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let md_bytes: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&md_bytes);
    opts.repeat = repeat;
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok(RunResult {
        action: r.return_value,
        frame: out,
        duration: r.duration,
    })
}

/// xorshift64*: a fixed-seed shuffle of the cell order per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// (median, min, max).
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s[0], s[n - 1])
}

/// Number of CPUs in a sysfs list like `0-1,4`.
fn count_cpus(list: &str) -> usize {
    list.trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => 1,
        })
        .sum()
}

fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn loadavg() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.calls > 0 && args.runs > 0 && args.flows > 1,
        "--calls, --runs must be > 0 and --flows > 1"
    );
    if !is_root() {
        bail!("bench-xdp needs root (BPF_PROG_TEST_RUN, network namespaces)");
    }
    if args.calls < args.flows {
        eprintln!(
            "warning: --calls {} < --flows {}: the many-flow cells see only their first {} flows",
            args.calls, args.flows, args.calls
        );
    }
    if args.calls < 100_000 || args.runs < 5 {
        eprintln!("warning: below 100000 calls x 5 runs; fine for a try, not for the record");
    }
    let started = Instant::now();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let possible = count_cpus(&read_trim("/sys/devices/system/cpu/possible")).max(1);
    let cpu = args.cpu.unwrap_or(nproc.saturating_sub(1));
    let load_before = loadavg();
    let date = now_utc();

    // Per-CPU LRU lists (BPF_F_NO_COMMON_LRU): one CPU can only use
    // size / possible CPUs entries, and the pinned thread inserts them all:
    // two families' flows per balancer, plus room.
    let need = (u64::from(args.flows) * 2 * possible as u64 * 3 / 2).next_power_of_two();
    let conntrack_size = u32::try_from(need.max(u64::from(DEFAULT_CONNTRACK_SIZE)))
        .context("--flows too large for the connection table")?;
    let opts = LoadOptions {
        conntrack_size,
        ..LoadOptions::default()
    };

    eprintln!("setting up: namespace, two balancers (nat, dsr), conntrack size {conntrack_size}");
    let FixtureEnv {
        ns,
        lb: nat_lb,
        fx0,
        ..
    } = FixtureEnv::new(&opts)?;
    let _inside = ns.enter_thread()?;
    let mut dsr_lb = Balancer::load(&opts).context("loading the dsr balancer")?;
    for ifindex in [fx0, ns.ifindex("fx1")?] {
        dsr_lb.add_tx_port(ifindex)?;
    }
    let mut lbs = [nat_lb, dsr_lb];
    configure(&mut lbs[Mode::Nat as usize], MODE_NAT)?;
    configure(&mut lbs[Mode::Dsr as usize], MODE_DSR)?;

    eprintln!("building {} flows x 3 frames per family", args.flows);
    let fams = [
        build_family(Fam::V4, args.flows),
        build_family(Fam::V6, args.flows),
    ];
    debug_assert_eq!(fams[0].keys[0].family, FAMILY_V4);
    debug_assert_eq!(fams[1].keys[0].family, FAMILY_V6);
    debug_assert_eq!(fams[0].keys[0].dst, words(VIP4.into()));

    headroom_tests::pin_thread_to_cpu(cpu)?;
    let mut bench = Bench {
        lbs,
        fams,
        ifindex: fx0,
    };

    // Establish every flow once (one SYN each): the hit cells' state.
    eprintln!("establishing {} flows per family and mode", args.flows);
    for mode in [Mode::Nat, Mode::Dsr] {
        for fam in [Fam::V4, Fam::V6] {
            let cell = Cell {
                kind: Kind::New,
                fam,
                mode,
                flows: args.flows,
                repeat: 1,
            };
            bench.run_cell(&cell, args.flows, false)?;
        }
    }

    // The table's cells, then the diagnostic ones (paths whose output frame
    // takes the same path again, so an in-kernel repeat measures them warm).
    let floor = Cell {
        kind: Kind::Floor,
        fam: Fam::V4,
        mode: Mode::Nat,
        flows: 1,
        repeat: 1,
    };
    let mut cells = vec![floor];
    for kind in [Kind::Hit, Kind::New, Kind::NotVip] {
        for fam in [Fam::V4, Fam::V6] {
            for mode in [Mode::Nat, Mode::Dsr] {
                for flows in [1, args.flows] {
                    cells.push(Cell {
                        kind,
                        fam,
                        mode,
                        flows,
                        repeat: 1,
                    });
                }
            }
        }
    }
    let hot_floor = Cell {
        repeat: args.hot_repeat,
        ..floor
    };
    let mut hot = Vec::new();
    if args.hot_repeat > 1 {
        hot.push(hot_floor);
        for (kind, mode) in [
            (Kind::Hit, Mode::Dsr),
            (Kind::New, Mode::Dsr),
            (Kind::NotVip, Mode::Nat),
            (Kind::NotVip, Mode::Dsr),
        ] {
            for fam in [Fam::V4, Fam::V6] {
                hot.push(Cell {
                    kind,
                    fam,
                    mode,
                    flows: 1,
                    repeat: args.hot_repeat,
                });
            }
        }
    }
    if let Some(only) = &args.only {
        let keep = |c: &Cell| c.kind == Kind::Floor || c.label().contains(only.as_str());
        cells.retain(keep);
        hot.retain(keep);
    }
    let all: Vec<Cell> = cells.iter().chain(&hot).copied().collect();

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let warm = (args.calls / 10).max(1);
    eprintln!("warm-up: {} cells x {warm} calls (not recorded)", all.len());
    let mut order = all.clone();
    rng.shuffle(&mut order);
    for cell in &order {
        bench.run_cell(cell, warm, true)?;
    }

    let mut samples: BTreeMap<Cell, Vec<Sample>> = BTreeMap::new();
    let timed = Instant::now();
    for run in 1..=args.runs {
        let t = Instant::now();
        rng.shuffle(&mut order);
        for cell in &order {
            let s = bench.run_cell(cell, args.calls, true)?;
            samples.entry(*cell).or_default().push(s);
        }
        let f = samples[&floor][run as usize - 1].mean_ns;
        eprintln!(
            "run {run}/{}: {} cells x {} calls in {} (floor {f:.1} ns)",
            args.runs,
            all.len(),
            args.calls,
            secs(t.elapsed())
        );
    }
    let timed = timed.elapsed();

    // Report.
    println!("## XDP per-packet cost (`cargo xtask bench xdp`)\n");
    println!("- date: {date}");
    println!(
        "- machine: {} ({nproc} CPUs online, {possible} possible), kernel {}, clocksource {}",
        cpu_model(),
        read_trim("/proc/sys/kernel/osrelease"),
        read_trim("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    );
    let mut command = format!(
        "cargo xtask bench xdp -- --calls {} --runs {} --flows {}",
        args.calls, args.runs, args.flows
    );
    if args.hot_repeat != 10_000 {
        command += &format!(" --hot-repeat {}", args.hot_repeat);
    }
    if let Some(only) = &args.only {
        command += &format!(" --only '{only}'");
    }
    println!("- command: `{command}` (measuring thread pinned to CPU {cpu})");
    println!(
        "- load average before / after: {load_before} / {}",
        loadavg()
    );
    println!(
        "- run time: {} in all, {} of it the {} timed runs",
        secs(started.elapsed()),
        secs(timed),
        args.runs
    );
    println!(
        "- ns per packet: mean over {} program runs per run (kernel-timed, repeat = 1: one \
         BPF_PROG_TEST_RUN per packet); median, min, max over {} runs; above floor: \
         cell − floor per run, same statistics\n",
        args.calls, args.runs
    );
    print_table(&cells, &floor, &samples);
    if !hot.is_empty() {
        println!(
            "\nDiagnostic, not the benchmark: the paths whose output takes the same path again, \
             1 flow, with an in-kernel repeat of {} on the same buffer (warm caches, no syscall \
             between runs, and the program called directly by the XDP dispatcher instead of \
             through an indirect call); above floor = above the floor with the same repeat.\n",
            args.hot_repeat
        );
        print_table(&hot, &hot_floor, &samples);
    }
    let (mut slow, mut max_ns, mut runs) = (0, 0, 0);
    for (cell, ss) in &samples {
        slow += ss.iter().map(|s| s.slow).sum::<u64>();
        max_ns = max_ns.max(ss.iter().map(|s| s.max_ns).max().unwrap_or(0));
        if cell.repeat == 1 {
            runs += ss.len() as u64 * u64::from(args.calls);
        }
    }
    println!(
        "\n{slow} of {runs} timed calls took over {} µs (slowest {:.1} µs): interrupts and \
         softirqs inside the timed window; they are included in the means.",
        SLOW_NS / 1000,
        max_ns as f64 / 1000.0
    );
    Ok(())
}

fn print_table(cells: &[Cell], floor: &Cell, samples: &BTreeMap<Cell, Vec<Sample>>) {
    let floor: Vec<f64> = samples[floor].iter().map(|s| s.mean_ns).collect();
    println!(
        "| cell | median ns | min | max | above floor: median | min | max | target above floor |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for cell in cells {
        let means: Vec<f64> = samples[cell].iter().map(|s| s.mean_ns).collect();
        let (med, lo, hi) = stats(&means);
        if cell.kind == Kind::Floor {
            println!(
                "| {} | {med:.1} | {lo:.1} | {hi:.1} | – | – | – | – |",
                cell.label()
            );
            continue;
        }
        let above: Vec<f64> = means.iter().zip(&floor).map(|(m, f)| m - f).collect();
        let (amed, alo, ahi) = stats(&above);
        let target = match cell.target() {
            Some(t) if amed <= f64::from(t) => format!("≤ {t}: met"),
            Some(t) => format!("≤ {t}: **not met**"),
            None => "–".into(),
        };
        println!(
            "| {} | {med:.1} | {lo:.1} | {hi:.1} | {amed:.1} | {alo:.1} | {ahi:.1} | {target} |",
            cell.label()
        );
    }
}
