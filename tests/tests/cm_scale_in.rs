//! Scale-in with the balancer in a network namespace (issue 5): no
//! connection to the instance being removed is reset during its cool-down.
//! And the same loop with placement by a real machine-manager: every
//! instance runs where it placed it, and its place is given back when the
//! instance is stopped
//! ([`root_machine_manager_places_and_releases_instances`]).
//!
//! The scale-in test runs with a static `--agent` list
//! ([`Placement::Static`]): it needs the two instances on different nodes,
//! which the container-manager's spreading guarantees, while the
//! machine-manager's best fit may pack both on one node.
//!
//! Everything is real (`headroom_tests::scale_env`): a private
//! redis-server, `headroom lb run` with XDP on the balancer namespace's
//! veths, two node namespaces each running `headroom agent`, a
//! `headroom container-manager` process, and instances (`scale-instance`)
//! started by the agents from the registered template, each answering
//! every line with its id and reporting the load the test puts in a file.
//!
//! Service `web`: min 1, max 2, warm-up 1 s, cool-down [`COOL_DOWN_SECS`].
//!
//! 1. The manager starts the first instance; the load is raised to 90, it
//!    starts a second one (on the other node); both enter the table.
//! 2. [`CONNS`] long-lived connections through the VIP from the client
//!    namespace; both instances hold some (the answer names the instance).
//! 3. The load drops to 5: the manager drains one instance (drain mark,
//!    address kept). From then on, every ~50 ms, every connection exchanges
//!    a line, and a new connection is opened and must be answered by the
//!    remaining instance; the daemon must list the drained one as draining
//!    while it still reports fresh loads (so only the mark keeps it out).
//!    The drained instance's connections exchange data until [`MARGIN`]
//!    before the earliest moment the manager may stop it, then close
//!    cleanly (a stop while the client keeps sending would reset them: that
//!    is the instance ending, not the balancer).
//! 4. After the cool-down the drained instance is stopped: its process is
//!    gone, its record and its `addr`/`drain`/`load`/`seen` entries are
//!    gone; the remaining connections go on exchanging, then close cleanly.
//!
//! Checked over the whole test: no connection error, no reset in the client
//! namespace (`EstabResets`, `AttemptFails`, `OutRsts` of /proc/net/snmp),
//! no flow re-selected or dropped by the data path (`ct_reselect`,
//! `drop_no_backend`, `miss_non_syn`), and the decisions log reads
//! up to 1 (below min), up to 2, down to 1.
//!
//! If the balancer ignored the drain mark, new connections during the
//! cool-down would reach the drained instance (and the daemon would not list
//! it as draining); if the manager removed the address instead (the old
//! behaviour), the backend would be retired and its established flows
//! re-selected onto the other instance, which resets them. Both were
//! tried by removing the mark (`SREM`) or the address (`HDEL`) right after
//! the drain: the first fails on the daemon's status, the second with
//! "Connection reset by peer" on a drained instance's connection.
//!
//! The `headroom` binary: `HEADROOM_BIN`, else the one in the target
//! directory (`cargo test --workspace --release` or `cargo build --release
//! -p lb-userspace --bin headroom`), newer than the sources.
use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use headroom_tests::{
    bins::headroom_bin,
    require_root,
    scale_env::{node_name, now_ms, LineConn, Options, Placement, ScaleEnv, SERVICE},
};
use lb_common::counter;

/// Cool-down of the service: how long the drained instance keeps its flows.
const COOL_DOWN_SECS: u64 = 8;
/// Long-lived connections opened before the scale-in.
const CONNS: usize = 40;
/// The drained instance's connections stop this long before the earliest
/// moment the manager may stop the instance.
const MARGIN: Duration = Duration::from_millis(1000);
/// Pause between exchange rounds.
const ROUND_PAUSE: Duration = Duration::from_millis(50);
/// Bound on every wait for the manager, the daemon or an instance.
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn root_scale_in_keeps_connections_to_the_draining_instance() {
    if !require_root("root_scale_in_keeps_connections_to_the_draining_instance") {
        return;
    }
    let mut opts = Options::new(
        headroom_bin().expect("the headroom binary"),
        PathBuf::from(env!("CARGO_BIN_EXE_scale-instance")),
    );
    opts.cool_down_secs = COOL_DOWN_SECS;
    opts.stop_grace_secs = 2;
    opts.placement = Placement::Static;
    let mut env = ScaleEnv::start(opts).expect("starting the scale environment");
    if let Err(e) = scale_in(&mut env) {
        panic!("{e:#}\n\n{}", env.logs());
    }
}

#[test]
fn root_machine_manager_places_and_releases_instances() {
    if !require_root("root_machine_manager_places_and_releases_instances") {
        return;
    }
    let mut opts = Options::new(
        headroom_bin().expect("the headroom binary"),
        PathBuf::from(env!("CARGO_BIN_EXE_scale-instance")),
    );
    opts.placement = Placement::MachineManager;
    let mut env = ScaleEnv::start(opts).expect("starting the scale environment");
    if let Err(e) = mm_placement(&mut env) {
        panic!("{e:#}\n\n{}", env.logs());
    }
}

/// Every placement the machine-manager holds, as (node, id), sorted.
fn held(env: &ScaleEnv) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for i in 0..env.options().nodes {
        let node = node_name(i);
        for id in env.mm_placements(&node)?.into_keys() {
            out.push((node.clone(), id));
        }
    }
    out.sort();
    Ok(out)
}

/// The instance records' (node, placement id), sorted; fails on a record
/// without a placement id.
fn recorded(env: &ScaleEnv) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for r in env.cm_instances()? {
        let p = r
            .placement
            .with_context(|| format!("record of {} has no placement id", r.id))?;
        out.push((r.node, p));
    }
    out.sort();
    Ok(out)
}

/// Up to min, up to 2 under load, down to 1: at each step the placements
/// the machine-manager holds are exactly the records' (node, placement),
/// every instance runs on its placed node's agent, and the table follows.
fn mm_placement(env: &mut ScaleEnv) -> Result<()> {
    let t0 = Instant::now();
    for i in 0..env.options().nodes {
        let n = env.mm_node(&node_name(i))?.with_context(|| {
            format!("{} is not in the machine-manager's registry", node_name(i))
        })?;
        ensure!(n.state == "ready", "{}: {n:?}", node_name(i));
    }
    let check = |env: &ScaleEnv, count: usize| -> Result<Vec<String>> {
        let recs = recorded(env)?;
        let held = held(env)?;
        ensure!(recs.len() == count, "records {recs:?}, want {count}");
        ensure!(
            recs == held,
            "records' placements {recs:?} != held by the machine-manager {held:?}"
        );
        let agents = env.agent_instances()?;
        let mut ids = Vec::new();
        for r in env.cm_instances()? {
            let on = agents
                .iter()
                .find(|(_, a)| a.id == r.id && a.state == "running")
                .map(|(n, _)| n.clone());
            ensure!(
                on.as_deref() == Some(r.node.as_str()),
                "{} placed on {} but runs on {on:?}",
                r.id,
                r.node
            );
            ids.push(r.id);
        }
        ids.sort();
        Ok(ids)
    };
    let first = wait_until(env, "the first instance in the table", |env| {
        let table = table_ids(env)?;
        Ok((table.len() == 1).then(|| table[0].clone()))
    })?;
    ensure!(check(env, 1)? == [first.clone()], "first instance {first}");
    eprintln!(
        "{:.1?}: first instance {first}: {:?}",
        t0.elapsed(),
        held(env)?
    );

    env.set_load(90.0)?;
    let mut both = wait_until(env, "two instances in the table", |env| {
        let table = table_ids(env)?;
        Ok((table.len() == 2).then_some(table))
    })?;
    both.sort();
    ensure!(check(env, 2)? == both, "table {both:?}");
    eprintln!("{:.1?}: both placed: {:?}", t0.elapsed(), held(env)?);

    env.set_load(5.0)?;
    let last = wait_until(env, "the scale-in to one instance", |env| {
        let recs = env.cm_instances()?;
        let table = table_ids(env)?;
        Ok(
            (recs.len() == 1 && table.len() == 1 && recs[0].id == table[0])
                .then(|| table[0].clone()),
        )
    })?;
    // The release follows the stop in the same round: allow it a moment.
    wait_until(env, "the stopped instance's placement released", |env| {
        Ok((held(env)?.len() == 1).then_some(()))
    })?;
    ensure!(check(env, 1)? == [last.clone()], "remaining {last}");
    eprintln!("{:.1?}: back to {last}: {:?}", t0.elapsed(), held(env)?);

    let actions: Vec<(String, u64)> = env
        .decisions()?
        .into_iter()
        .filter(|d| d.action != "hold")
        .map(|d| (d.action, d.to))
        .collect();
    ensure!(
        actions
            == [
                ("up".to_string(), 1),
                ("up".to_string(), 2),
                ("down".to_string(), 1)
            ],
        "decisions: {actions:?}"
    );
    Ok(())
}

fn scale_in(env: &mut ScaleEnv) -> Result<()> {
    let t0 = Instant::now();
    // 1. Up to min, then up to 2 under load.
    let first = wait_until(env, "the first instance in the table", |env| {
        let table = table_ids(env)?;
        Ok((table.len() == 1).then(|| table[0].clone()))
    })?;
    eprintln!("{:.1?}: first instance {first}", t0.elapsed());
    env.set_load(90.0)?;
    let both = wait_until(env, "two instances in the table", |env| {
        let table = table_ids(env)?;
        Ok((table.len() == 2).then_some(table))
    })?;
    eprintln!("{:.1?}: both in the table: {both:?}", t0.elapsed());
    let nodes: Vec<String> = env.cm_instances()?.iter().map(|r| r.node.clone()).collect();
    ensure!(
        nodes.len() == 2 && nodes[0] != nodes[1],
        "the instances share a node: {nodes:?}"
    );

    // 2. Long-lived connections on both.
    let mut conns = Vec::new();
    for k in 0..CONNS {
        conns.push(env.connect_vip(&format!("c{k}"))?);
    }
    let on = |id: &str, conns: &[LineConn]| conns.iter().filter(|c| c.instance == id).count();
    let (a, b) = (on(&both[0], &conns), on(&both[1], &conns));
    eprintln!("connections: {a} on {}, {b} on {}", both[0], both[1]);
    ensure!(
        a >= 3 && b >= 3,
        "{CONNS} connections did not reach both instances: {a} / {b}"
    );
    let mut seq = 0u64;
    let warm = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warm {
        round(&mut conns, &mut seq, "before the scale-in")?;
        thread::sleep(ROUND_PAUSE);
    }

    // 3. Scale-in: find the drained instance while exchanging.
    env.set_load(5.0)?;
    let deadline = Instant::now() + WAIT;
    let drained = loop {
        round(&mut conns, &mut seq, "waiting for the drain")?;
        let set = env.drain_set()?;
        if let Some(d) = set.first() {
            ensure!(set.len() == 1, "more than one instance drained: {set:?}");
            break d.clone();
        }
        env.check_alive()?;
        ensure!(Instant::now() < deadline, "no drain within {WAIT:?}");
        thread::sleep(ROUND_PAUSE);
    };
    let remaining = both
        .iter()
        .find(|id| **id != drained)
        .cloned()
        .context("the drained instance is not one of the two")?;
    let rec = env
        .cm_instances()?
        .into_iter()
        .find(|r| r.id == drained)
        .context("no record of the drained instance")?;
    ensure!(rec.phase == "draining", "{rec:?}");
    let drain_since = rec.drain_since_ms.context("no drain_since_ms")?;
    let stop_earliest = drain_since + (COOL_DOWN_SECS * 1000) as i64;
    let (node, pid) = agent_pid(env, &drained)?;
    eprintln!(
        "{:.1?}: {drained} (node {node}, pid {pid}) draining since {drain_since}; {remaining} remains",
        t0.elapsed()
    );
    ensure!(
        env.sb_entries(&drained)?.addr.is_some(),
        "the drained instance lost its address at once"
    );

    // The daemon follows the mark (no new flows), keeping the backend,
    // early enough to leave most of the cool-down to check that.
    let drain_by = stop_earliest - MARGIN.as_millis() as i64 - 2000;
    loop {
        round(&mut conns, &mut seq, "waiting for the daemon to drain")?;
        let st = env.status()?;
        let svc = st
            .service(SERVICE)
            .context("no web service in the status")?;
        if svc.is_draining(&drained) {
            let table: Vec<&str> = svc.table.iter().map(|b| b.instance.as_str()).collect();
            ensure!(
                table == [remaining.as_str()],
                "table while {drained} drains: {table:?}"
            );
            break;
        }
        ensure!(
            now_ms() < drain_by,
            "the daemon did not list {drained} as draining within {} ms of its drain mark \
             (is the mark ignored?): {svc:?}",
            drain_by - drain_since
        );
        thread::sleep(ROUND_PAUSE);
    }
    let drain_seen = now_ms();

    // The cool-down: every connection exchanges, new ones go to the rest.
    let (mut d_conns, mut r_conns): (Vec<LineConn>, Vec<LineConn>) =
        conns.into_iter().partition(|c| c.instance == drained);
    let mut probes = 0u32;
    let mut d_rounds = 0u32;
    let mut last_d_exchange = drain_seen;
    while now_ms() < stop_earliest - MARGIN.as_millis() as i64 {
        round(&mut d_conns, &mut seq, "drained instance, cool-down")?;
        last_d_exchange = now_ms();
        d_rounds += 1;
        round(&mut r_conns, &mut seq, "remaining instance, cool-down")?;
        let probe = env.connect_vip(&format!("probe{probes}"))?;
        ensure!(
            probe.instance == remaining,
            "new connection {probes} during the cool-down went to {} (drained: {drained}, \
             remaining: {remaining}), {} ms after the drain",
            probe.instance,
            now_ms() - drain_since
        );
        probe.close().context("closing a probe")?;
        probes += 1;
        ensure!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the drained instance's process {pid} ended {} ms into the cool-down",
            now_ms() - drain_since
        );
        env.check_alive()?;
        thread::sleep(ROUND_PAUSE);
    }
    // It kept reporting fresh loads: only the mark kept it out of the table.
    let e = env.sb_entries(&drained)?;
    let fresh = e.seen.is_some_and(|s| (now_ms() as f64 - s) < 2000.0);
    ensure!(
        fresh && e.drain && e.addr.is_some(),
        "{drained} at the end of its cool-down: {e:?}"
    );
    eprintln!(
        "{:.1?}: cool-down: {d_rounds} rounds on {} drained connections until {} ms after the \
         drain (stop allowed at {} ms), {probes} new connections all to {remaining}",
        t0.elapsed(),
        d_conns.len(),
        last_d_exchange - drain_since,
        stop_earliest - drain_since
    );
    ensure!(
        probes >= 20,
        "only {probes} new connections in the cool-down"
    );
    for (k, c) in d_conns.into_iter().enumerate() {
        let what = format!("drained connection {k} from {}", c.local);
        c.close().context(what)?;
    }

    // 4. The stop.
    let deadline = Instant::now() + WAIT;
    loop {
        round(
            &mut r_conns,
            &mut seq,
            "remaining instance, waiting for the stop",
        )?;
        let gone_rec = !env.cm_instances()?.iter().any(|r| r.id == drained);
        let sb = env.sb_entries(&drained)?;
        let agent = env
            .agent_instances()?
            .into_iter()
            .find(|(_, r)| r.id == drained)
            .map(|(_, r)| r);
        let stopped = agent.as_ref().is_some_and(|r| r.state == "stopped");
        let proc_gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        if gone_rec && sb.is_empty() && stopped && proc_gone {
            let ended = agent.and_then(|r| r.ended_ms).context("no ended_ms")?;
            ensure!(
                ended >= stop_earliest,
                "stopped {} ms after the drain, before the {COOL_DOWN_SECS} s cool-down",
                ended - drain_since
            );
            eprintln!(
                "{:.1?}: {drained} stopped {} ms after the drain",
                t0.elapsed(),
                ended - drain_since
            );
            break;
        }
        env.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "{drained} not stopped and forgotten within {WAIT:?}: record gone {gone_rec}, \
             scoreboard {sb:?}, agent {agent:?}, process gone {proc_gone}"
        );
        thread::sleep(ROUND_PAUSE);
    }
    let after = Instant::now() + Duration::from_secs(1);
    while Instant::now() < after {
        round(&mut r_conns, &mut seq, "remaining instance, after the stop")?;
        thread::sleep(ROUND_PAUSE);
    }
    let r_count = r_conns.len();
    for (k, c) in r_conns.into_iter().enumerate() {
        let what = format!("remaining connection {k} from {}", c.local);
        c.close().context(what)?;
    }
    ensure!(
        table_ids(env)? == [remaining.clone()],
        "table after the stop"
    );

    // Over the whole test: no reset, no re-selection, no drop.
    let tcp = env.client_tcp_since_start()?;
    eprintln!("client TCP counters over the test: {tcp:?}");
    ensure!(
        tcp.estab_resets == 0 && tcp.attempt_fails == 0 && tcp.out_rsts == 0,
        "resets or failed connections in the client namespace: {tcp:?}"
    );
    let st = env.status()?;
    for c in [
        counter::CT_RESELECT,
        counter::DROP_NO_BACKEND,
        counter::MISS_NON_SYN,
    ] {
        ensure!(
            st.counter(c) == 0,
            "data path counter {} = {}",
            counter::NAMES[c as usize],
            st.counter(c)
        );
    }
    let actions: Vec<(String, u64)> = env
        .decisions()?
        .into_iter()
        .filter(|d| d.action != "hold")
        .map(|d| (d.action, d.to))
        .collect();
    ensure!(
        actions
            == [
                ("up".to_string(), 1),
                ("up".to_string(), 2),
                ("down".to_string(), 1)
            ],
        "decisions: {actions:?}"
    );
    eprintln!(
        "{:.1?}: done; {seq} lines exchanged in all, {r_count} connections stayed on {remaining}",
        t0.elapsed()
    );
    Ok(())
}

/// One exchange on every connection; any failure names the connection.
fn round(conns: &mut [LineConn], seq: &mut u64, phase: &str) -> Result<()> {
    for c in conns.iter_mut() {
        *seq += 1;
        let line = format!("line {seq}");
        c.exchange(&line).with_context(|| {
            format!(
                "{phase}: connection from {} to {} failed after {} lines",
                c.local, c.instance, c.exchanged
            )
        })?;
    }
    Ok(())
}

/// The instances in the daemon's published table.
fn table_ids(env: &ScaleEnv) -> Result<Vec<String>> {
    let st = env.status()?;
    Ok(st
        .service(SERVICE)
        .map(|s| s.table.iter().map(|b| b.instance.clone()).collect())
        .unwrap_or_default())
}

/// The node and pid of a running instance, from its agent's mirror.
fn agent_pid(env: &ScaleEnv, id: &str) -> Result<(String, u32)> {
    let (node, r) = env
        .agent_instances()?
        .into_iter()
        .find(|(_, r)| r.id == id)
        .with_context(|| format!("no agent runs {id}"))?;
    ensure!(r.state == "running", "{id}: {r:?}");
    Ok((node, r.pid))
}

/// Polls `f` every 100 ms until it returns a value, within [`WAIT`];
/// fails early if a process of the environment died.
fn wait_until<T>(
    env: &mut ScaleEnv,
    what: &str,
    mut f: impl FnMut(&ScaleEnv) -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f(env)? {
            return Ok(v);
        }
        env.check_alive()?;
        if Instant::now() > deadline {
            bail!("waiting {WAIT:?} for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}
