//! `headroom lb run`, the real binary, started with `ip netns exec` in the
//! balancer namespace of a test topology (client — balancer — two backends,
//! `headroom_tests::topology`), with a static service (no Redis involved):
//!
//! 1. With a default route on `lb-c`, the daemon refuses to attach (exit
//!    non-zero, a message naming the interface and `--force`) and leaves no
//!    XDP program behind.
//! 2. Without it, the daemon attaches to every configured interface, real
//!    TCP connections through the VIP reach both static backends in the
//!    config's proportion; SIGTERM makes it exit 0 and leave XDP attached
//!    (pinned), connections still work with no daemon, and
//!    `headroom lb detach` removes the programs.
//!
//! Every run of the binary enters one private mount namespace the test
//! holds (`MountNs`): the bpffs the daemon mounts never appears on the host,
//! and it outlives the daemon as the host's `/sys/fs/bpf` would.
use std::{
    io::Write,
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use headroom_tests::{
    mountns::MountNs,
    require_root,
    topology::{backend_addr, ClientLimits, Mode, Topology, VIP, VIP_PORT},
    Netns,
};

const HEADROOM: &str = env!("CARGO_BIN_EXE_headroom");
const WAIT: Duration = Duration::from_secs(15);

#[test]
fn root_lb_run_binary_refuses_default_route_then_serves_and_keeps_xdp() {
    if !require_root("root_lb_run_binary_refuses_default_route_then_serves_and_keeps_xdp") {
        return;
    }
    run().expect("lb run");
}

fn run() -> Result<()> {
    let started = Instant::now();
    let mode = Mode::Nat;
    let topo = Topology::new_for_daemon(mode, 2)?;
    let lb_ns = topo.balancer_ns();
    let ifaces = topo.balancer_interfaces();
    let mut config = tempfile::NamedTempFile::new()?;
    let mut text = String::from(
        "name = \"binary-test\"\n[datapath]\nconntrack_size = 65536\nmax_services = 2\nmax_backends = 16\n\
         [[group]]\nname = \"g\"\n",
    );
    for i in &ifaces {
        text.push_str(&format!(
            "[[group.interface]]\nname = \"{i}\"\nmode = \"native\"\n"
        ));
    }
    text.push_str(&format!(
        "[[group.service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = {VIP_PORT}\nmode = \"nat\"\n\
         [[group.service.backend]]\naddress = \"{}:{}\"\nweight = 1\n\
         [[group.service.backend]]\naddress = \"{}:{}\"\nweight = 3\n",
        backend_addr(0),
        mode.server_port(),
        backend_addr(1),
        mode.server_port()
    ));
    config.write_all(text.as_bytes())?;
    let path = config.path().to_str().context("temp path")?.to_string();
    let argv = [HEADROOM, "lb", "run", "--config", &path];
    let mount_ns = MountNs::new()?;

    // 1. A default route on lb-c: refused, nothing attached.
    lb_ns.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "10.90.0.2",
        "dev",
        "lb-c",
    ])?;
    let mut child = mount_ns.spawn_daemon(&lb_ns.path(), &argv)?;
    let status = child
        .wait_timeout(WAIT)?
        .context("the daemon did not refuse")?;
    let stderr = child.exited_stderr();
    eprintln!("refused: {status}; stderr:\n{stderr}");
    ensure!(
        !status.success(),
        "the daemon attached next to a default route"
    );
    ensure!(
        stderr.contains("refusing to attach to lb-c")
            && stderr.contains("--force")
            && !stderr.contains("backtrace"),
        "message does not name the interface and --force: {stderr}"
    );
    for i in &ifaces {
        ensure!(
            !has_xdp(lb_ns, i)?,
            "{i} has an XDP program after the refusal"
        );
    }
    lb_ns.exec(&["ip", "route", "del", "default"])?;

    // 2. Attach, serve, SIGTERM.
    let mut child = mount_ns.spawn_daemon(&lb_ns.path(), &argv)?;
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait()? {
            bail!("the daemon exited: {s}: {}", child.exited_stderr());
        }
        let mut all = true;
        for i in &ifaces {
            all &= has_xdp(lb_ns, i)?;
        }
        if all {
            break;
        }
        ensure!(Instant::now() < deadline, "not attached within {WAIT:?}");
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("attached after {:.2?}", started.elapsed());
    // The static table is published before the loop starts, but after the
    // attach: retry the first connection briefly.
    let deadline = Instant::now() + WAIT;
    let never = AtomicBool::new(false);
    let limits = ClientLimits {
        per_connection: Duration::from_secs(3),
        total: Duration::from_secs(30),
    };
    while topo.run_clients(1, limits, &never).is_err() {
        ensure!(Instant::now() < deadline, "no connection through the VIP");
        thread::sleep(Duration::from_millis(100));
    }
    let tally = topo.run_clients(800, limits, &never)?;
    let share1 = tally.per_backend[1] as f64 / tally.total() as f64;
    eprintln!(
        "800 connections: {:?} ({:.1} % to weight 3 of 4)",
        tally.per_backend,
        share1 * 100.0
    );
    ensure!(
        (share1 - 0.75).abs() <= 0.06,
        "weights 1:3 gave {:?}",
        tally.per_backend
    );

    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    ensure!(rc == 0, "SIGTERM: {}", std::io::Error::last_os_error());
    let status = child
        .wait_timeout(WAIT)?
        .context("the daemon ignored SIGTERM")?;
    let stderr = child.exited_stderr();
    ensure!(status.success(), "exit after SIGTERM: {status}: {stderr}");
    ensure!(
        stderr.contains("the balancer stays attached"),
        "no word that XDP stays: {stderr}"
    );
    for i in &ifaces {
        ensure!(
            has_xdp(lb_ns, i)?,
            "{i} lost its XDP program when the daemon stopped"
        );
    }
    // No daemon: the pinned program and tables keep forwarding.
    let tally = topo.run_clients(100, limits, &never)?;
    ensure!(
        tally.total() == 100 && tally.per_backend.iter().all(|&n| n > 0),
        "with no daemon running: {:?}",
        tally.per_backend
    );
    let out = mount_ns.run(
        &lb_ns.path(),
        &[HEADROOM, "lb", "detach", "--config", &path],
    )?;
    ensure!(out.contains("detached"), "lb detach said: {out}");
    for i in &ifaces {
        ensure!(
            !has_xdp(lb_ns, i)?,
            "{i} still has an XDP program after lb detach"
        );
    }
    eprintln!("total {:.2?}", started.elapsed());
    Ok(())
}

/// Whether `ifname` in `ns` has an XDP program attached.
fn has_xdp(ns: &Netns, ifname: &str) -> Result<bool> {
    let out = ns.exec(&["ip", "-j", "link", "show", "dev", ifname])?;
    Ok(out.contains("\"xdp\""))
}
