//! `headroom lb run`, the real binary, with interfaces in `mode = "tc"`,
//! started with `nsenter` in the balancer namespace of a test topology
//! (client — balancer — two backends, `headroom_tests::topology`) inside
//! one private mount namespace (`MountNs`), so its bpffs and pins outlive
//! each run as the host's `/sys/fs/bpf` would.
//!
//! 1. `root_lb_run_tc_...`: on a topology built for TC (nothing on the
//!    peers, offloads on), the daemon attaches one tcx ingress program per
//!    interface and pins the links as `tc-<ifname>`; connections through
//!    the VIP reach both backends; SIGTERM leaves the links attached and
//!    forwarding; a restart puts its new program on the pinned links (the
//!    program id on every interface changes, still one program each) and
//!    connections keep working; `headroom lb detach` removes the programs,
//!    the pins and the pin directory.
//! 2. `root_lb_run_mode_switch_...`: on a topology built for XDP, a run in
//!    `native`, then one in `tc`, then one in `native` again: each run
//!    leaves exactly its own hook on every interface (never both) and
//!    serves connections.
//!
//! Attached programs are read from the kernel (`BPF_PROG_QUERY` on the
//! tcx ingress hook, `ip -j link` for XDP), not from the daemon's word.
use std::{
    collections::BTreeMap,
    io::Write,
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use headroom_tests::{
    mountns::MountNs,
    require_root,
    topology::{backend_addr, ClientLimits, Hook, Mode, Topology, VIP, VIP_PORT},
    ChildGuard, Netns,
};

const HEADROOM: &str = env!("CARGO_BIN_EXE_headroom");
const WAIT: Duration = Duration::from_secs(15);
const LIMITS: ClientLimits = ClientLimits {
    per_connection: Duration::from_secs(3),
    total: Duration::from_secs(60),
};

#[test]
fn root_lb_run_tc_serves_keeps_links_restarts_and_detaches() {
    if !require_root("root_lb_run_tc_serves_keeps_links_restarts_and_detaches") {
        return;
    }
    tc_lifecycle().expect("lb run in tc mode");
}

#[test]
fn root_lb_run_mode_switch_between_xdp_and_tc_leaves_one_hook() {
    if !require_root("root_lb_run_mode_switch_between_xdp_and_tc_leaves_one_hook") {
        return;
    }
    mode_switch().expect("switching attach modes");
}

fn tc_lifecycle() -> Result<()> {
    let started = Instant::now();
    let name = "tc-test";
    let topo = Topology::for_daemon_with_hook(Mode::Nat, 2, Hook::Tc)?;
    let lb_ns = topo.balancer_ns();
    let ifaces = topo.balancer_interfaces();
    let config = write_config(name, &ifaces, "tc")?;
    let path = config.path().to_str().context("temp path")?.to_string();
    let argv = [HEADROOM, "lb", "run", "--config", &path];
    let mount_ns = MountNs::new()?;
    let pin_dir = format!("/sys/fs/bpf/headroom/{name}");

    // 1. Attach and serve.
    let mut child = mount_ns.spawn_daemon(&lb_ns.path(), &argv)?;
    let first = wait_for(&mut child, "one tcx program per interface", || {
        let ids = tcx_programs(lb_ns, &ifaces)?;
        Ok(ids.values().all(|p| p.len() == 1).then_some(ids))
    })?;
    eprintln!("attached after {:.2?}: {first:?}", started.elapsed());
    for i in &ifaces {
        ensure!(!has_xdp(lb_ns, i)?, "{i} runs XDP in tc mode");
    }
    let pins = mount_ns.run(&lb_ns.path(), &["ls", &pin_dir])?;
    for i in &ifaces {
        ensure!(
            pins.lines().any(|l| l == format!("tc-{i}")),
            "no pinned tc link of {i} in {pin_dir}: {pins}"
        );
    }
    ensure!(
        !pins.lines().any(|l| l.starts_with("link-")),
        "XDP links pinned in tc mode: {pins}"
    );
    first_connection(&topo)?;
    serve(&topo, 300, "daemon running")?;

    // 2. SIGTERM: the links stay, with the same programs, and forward.
    let stderr = stop(&mut child)?;
    ensure!(
        stderr.contains("stays attached"),
        "no word that the balancer stays attached: {stderr}"
    );
    ensure!(
        tcx_programs(lb_ns, &ifaces)? == first,
        "the tcx programs changed when the daemon stopped"
    );
    serve(&topo, 100, "no daemon")?;

    // 3. Restart: the new program goes onto the pinned links.
    let mut child = mount_ns.spawn_daemon(&lb_ns.path(), &argv)?;
    let second = wait_for(&mut child, "new programs on the pinned links", || {
        let ids = tcx_programs(lb_ns, &ifaces)?;
        let replaced = ids
            .iter()
            .all(|(i, p)| p.len() == 1 && Some(p) != first.get(i));
        Ok(replaced.then_some(ids))
    })?;
    eprintln!("restarted: {second:?}");
    serve(&topo, 200, "after the restart")?;
    // The daemon says so too: each pinned link was reused, none re-created.
    let stderr = stop(&mut child)?;
    ensure!(
        stderr.matches("replaced atomically").count() == ifaces.len(),
        "not every pinned link was reused: {stderr}"
    );

    // 4. Detach: nothing left.
    let out = mount_ns.run(
        &lb_ns.path(),
        &[HEADROOM, "lb", "detach", "--config", &path],
    )?;
    ensure!(out.contains("detached"), "lb detach said: {out}");
    for (i, p) in tcx_programs(lb_ns, &ifaces)? {
        ensure!(
            p.is_empty(),
            "{i} still runs tcx programs {p:?} after lb detach"
        );
        ensure!(!has_xdp(lb_ns, &i)?, "{i} runs XDP after lb detach");
    }
    ensure!(
        mount_ns.run(&lb_ns.path(), &["ls", &pin_dir]).is_err(),
        "{pin_dir} survived lb detach"
    );
    eprintln!("total {:.2?}", started.elapsed());
    Ok(())
}

fn mode_switch() -> Result<()> {
    let started = Instant::now();
    let name = "switch-test";
    // Built for XDP (pass programs on the peers, TX checksums computed by
    // the senders), which TC runs on as well.
    let topo = Topology::new_for_daemon(Mode::Nat, 2)?;
    let lb_ns = topo.balancer_ns();
    let ifaces = topo.balancer_interfaces();
    let mount_ns = MountNs::new()?;
    let mut first = true;
    let mut configs = Vec::new();
    for mode in ["native", "tc", "native"] {
        let config = write_config(name, &ifaces, mode)?;
        let path = config.path().to_str().context("temp path")?.to_string();
        configs.push(config);
        let mut child =
            mount_ns.spawn_daemon(&lb_ns.path(), &[HEADROOM, "lb", "run", "--config", &path])?;
        let tc = mode == "tc";
        wait_for(
            &mut child,
            &format!("{mode} alone on every interface"),
            || {
                let programs = tcx_programs(lb_ns, &ifaces)?;
                for i in &ifaces {
                    let has_tc = !programs[i].is_empty();
                    if has_tc != tc || has_xdp(lb_ns, i)? == tc {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )?;
        if first {
            first_connection(&topo)?;
            first = false;
        }
        serve(&topo, 100, mode)?;
        let stderr = stop(&mut child)?;
        if mode == "tc" {
            ensure!(
                stderr.contains("attach mode changed"),
                "no word of the removed XDP links: {stderr}"
            );
        }
        // Stopped: still exactly one hook per interface.
        for i in &ifaces {
            let has_tc = !tcx_programs(lb_ns, std::slice::from_ref(i))?[i].is_empty();
            ensure!(
                has_tc == tc && has_xdp(lb_ns, i)? != tc,
                "{i} after the {mode} run stopped: tc {has_tc}, xdp {}",
                has_xdp(lb_ns, i)?
            );
        }
        eprintln!("{mode}: ok after {:.2?}", started.elapsed());
    }
    let path = configs[0].path().to_str().context("temp path")?.to_string();
    let out = mount_ns.run(
        &lb_ns.path(),
        &[HEADROOM, "lb", "detach", "--config", &path],
    )?;
    ensure!(out.contains("detached"), "lb detach said: {out}");
    for (i, p) in tcx_programs(lb_ns, &ifaces)? {
        ensure!(
            p.is_empty() && !has_xdp(lb_ns, &i)?,
            "{i} still runs a program"
        );
    }
    Ok(())
}

/// A static nat service on `VIP:VIP_PORT` over both backends (weights 1:1)
/// on `ifaces` in `attach_mode`.
fn write_config(
    name: &str,
    ifaces: &[String],
    attach_mode: &str,
) -> Result<tempfile::NamedTempFile> {
    let mut text = format!(
        "name = \"{name}\"\n[datapath]\nconntrack_size = 65536\nmax_services = 2\nmax_backends = 16\n\
         [[group]]\nname = \"g\"\n"
    );
    for i in ifaces {
        text.push_str(&format!(
            "[[group.interface]]\nname = \"{i}\"\nmode = \"{attach_mode}\"\n"
        ));
    }
    let port = Mode::Nat.server_port();
    text.push_str(&format!(
        "[[group.service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = {VIP_PORT}\nmode = \"nat\"\n\
         [[group.service.backend]]\naddress = \"{}:{port}\"\nweight = 1\n\
         [[group.service.backend]]\naddress = \"{}:{port}\"\nweight = 1\n",
        backend_addr(0),
        backend_addr(1),
    ));
    let mut file = tempfile::NamedTempFile::new()?;
    file.write_all(text.as_bytes())?;
    Ok(file)
}

/// The static table is published after the attach: retry the first
/// connection briefly.
fn first_connection(topo: &Topology) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    let never = AtomicBool::new(false);
    while topo.run_clients(1, LIMITS, &never).is_err() {
        ensure!(Instant::now() < deadline, "no connection through the VIP");
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `count` connections through the VIP, all answered, by both backends.
fn serve(topo: &Topology, count: usize, when: &str) -> Result<()> {
    let never = AtomicBool::new(false);
    let tally = topo
        .run_clients(count, LIMITS, &never)
        .with_context(|| format!("connections ({when})"))?;
    eprintln!("{when}: {count} connections: {:?}", tally.per_backend);
    ensure!(
        tally.total() == count as u64 && tally.per_backend.iter().all(|&n| n > 0),
        "{when}: {:?}",
        tally.per_backend
    );
    Ok(())
}

/// The ids of the programs on each interface's tcx ingress hook, asked of
/// the kernel from inside `ns`.
fn tcx_programs(ns: &Netns, ifaces: &[String]) -> Result<BTreeMap<String, Vec<u32>>> {
    let _inside = ns.enter_thread()?;
    ifaces
        .iter()
        .map(|i| {
            let (_, progs) = SchedClassifier::query_tcx(i, TcAttachType::Ingress)
                .with_context(|| format!("querying the tcx ingress of {i}"))?;
            Ok((i.clone(), progs.iter().map(|p| p.id()).collect()))
        })
        .collect()
}

/// Whether `ifname` in `ns` has an XDP program attached.
fn has_xdp(ns: &Netns, ifname: &str) -> Result<bool> {
    let out = ns.exec(&["ip", "-j", "link", "show", "dev", ifname])?;
    Ok(out.contains("\"xdp\""))
}

/// Polls `check` until it gives a value; fails if the daemon exits or
/// `WAIT` passes.
fn wait_for<T>(
    child: &mut ChildGuard,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait()? {
            bail!(
                "the daemon exited ({s}) before {what}: {}",
                child.exited_stderr()
            );
        }
        if let Some(v) = check()? {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, a clean exit; returns the daemon's stderr.
fn stop(child: &mut ChildGuard) -> Result<String> {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    ensure!(rc == 0, "SIGTERM: {}", std::io::Error::last_os_error());
    let status = child
        .wait_timeout(WAIT)?
        .context("the daemon ignored SIGTERM")?;
    let stderr = child.exited_stderr();
    ensure!(status.success(), "exit after SIGTERM: {status}: {stderr}");
    Ok(stderr)
}
