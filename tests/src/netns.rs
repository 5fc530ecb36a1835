//! Network namespaces and veth pairs for tests (needs root).
//!
//! A [`Netns`] is deleted on drop, after every process still inside it is
//! killed, so neither interfaces nor servers outlive the test, also when the
//! test panics. Interfaces created inside namespaces die with them.
use std::{
    fs::{self, File},
    marker::PhantomData,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    cmd::{output, run_cmd},
    process::ChildGuard,
};

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace this harness creates.
const PREFIX: &str = "hr-";
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A network namespace named `hr-<pid>-<n>[-tag]`, with loopback up.
/// Deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name.
    pub fn new() -> Result<Netns> {
        Self::create(None)
    }

    /// Like [`Netns::new`], with `tag` appended to the name to make
    /// `ip netns list` readable (e.g. `client`, `lb`).
    pub fn with_tag(tag: &str) -> Result<Netns> {
        Self::create(Some(tag))
    }

    fn create(tag: Option<&str>) -> Result<Netns> {
        // Namespaces of test runs that were SIGKILLed (timeouts) never got
        // their Drop; clear them once per process.
        SWEEP.call_once(sweep_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut name = format!("{PREFIX}{}-{n}", std::process::id());
        if let Some(tag) = tag {
            name.push('-');
            name.push_str(tag);
        }
        run_cmd(&["ip", "netns", "add", &name])
            .with_context(|| format!("creating network namespace {name} (needs root)"))?;
        // From here on, Drop deletes it even if a later step fails.
        let ns = Netns { name };
        ns.set_up("lo")?;
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`: open it for `setns` or pass it to tools.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip netns exec NAME argv...` as a [`Command`], to adjust before running.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `argv` inside the namespace; returns stdout. The error carries
    /// the command and its stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        output(&mut self.command(argv))
    }

    /// Starts `argv` inside the namespace (stdin closed, output inherited).
    /// The process is killed when the namespace is dropped; wrap it in a
    /// [`ChildGuard`] (or use [`Netns::spawn_guarded`]) to kill it sooner.
    pub fn spawn(&self, argv: &[&str]) -> Result<Child> {
        let mut cmd = self.command(argv);
        cmd.stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {argv:?} in {}", self.name))
    }

    /// [`Netns::spawn`], killed when the returned guard drops.
    pub fn spawn_guarded(&self, argv: &[&str]) -> Result<ChildGuard> {
        self.spawn(argv).map(ChildGuard::new)
    }

    /// Moves the calling thread (only it) into the namespace until the
    /// returned guard drops. Sockets and netlink requests made by this thread
    /// meanwhile (e.g. loading XDP with aya) happen inside the namespace.
    /// Processes started meanwhile start inside it too.
    pub fn enter_thread(&self) -> Result<EnteredNetns<'_>> {
        let original = File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?;
        let target = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        setns(&target).with_context(|| format!("entering network namespace {}", self.name))?;
        Ok(EnteredNetns {
            original,
            _ns: PhantomData,
        })
    }

    /// Sets interface `ifname` up.
    pub fn set_up(&self, ifname: &str) -> Result<()> {
        self.exec(&["ip", "link", "set", "dev", ifname, "up"])
            .map(drop)
    }

    /// Adds address `cidr` (e.g. `10.0.0.1/24`, `fd00::1/64`) to `ifname`.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        let mut argv = vec!["ip"];
        if cidr.contains(':') {
            // IPv6: skip duplicate address detection, which keeps the
            // address unusable ("tentative") for about a second.
            argv.extend(["addr", "add", cidr, "dev", ifname, "nodad"]);
        } else {
            argv.extend(["addr", "add", cidr, "dev", ifname]);
        }
        self.exec(&argv).map(drop)
    }

    /// Adds a route to `dest` (`default`, `10.1.0.0/16`, ...) via gateway `via`.
    pub fn add_route(&self, dest: &str, via: &str) -> Result<()> {
        let family = if via.contains(':') { "-6" } else { "-4" };
        self.exec(&["ip", family, "route", "add", dest, "via", via])
            .map(drop)
    }

    /// Adds a route to `dest` straight out of `ifname` (no gateway).
    pub fn add_dev_route(&self, dest: &str, ifname: &str) -> Result<()> {
        self.exec(&["ip", "route", "add", dest, "dev", ifname])
            .map(drop)
    }

    /// Interface index of `ifname` inside the namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let path = format!("/sys/class/net/{ifname}/ifindex");
        // /sys must be read from inside: `ip netns exec` remounts it there.
        let out = self.exec(&["cat", &path])?;
        out.trim()
            .parse()
            .with_context(|| format!("parsing ifindex of {ifname} in {}: {out:?}", self.name))
    }

    /// MAC address of `ifname` inside the namespace.
    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let path = format!("/sys/class/net/{ifname}/address");
        let out = self.exec(&["cat", &path])?;
        parse_mac(out.trim())
            .with_context(|| format!("parsing MAC of {ifname} in {}: {out:?}", self.name))
    }

    /// Pids of the processes whose network namespace this is.
    pub fn pids(&self) -> Result<Vec<i32>> {
        pids_in(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Guard of [`Netns::enter_thread`]: moves the thread back to the namespace
/// it was in when dropped. Tied to the thread (not `Send`) and to the
/// namespace (which cannot be dropped first).
#[derive(Debug)]
pub struct EnteredNetns<'a> {
    original: File,
    _ns: PhantomData<(&'a Netns, *const ())>,
}

impl Drop for EnteredNetns<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            // Cannot fail for a namespace we were in a moment ago; if it
            // does, the thread would keep working in the wrong namespace.
            eprintln!("EnteredNetns: returning to the original namespace failed: {e:#}");
        }
    }
}

fn setns(ns: &File) -> Result<()> {
    // SAFETY: setns only reads the fd; CLONE_NEWNET affects this thread only.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// Creates a veth pair: `a_if` in namespace `a`, `b_if` in `b`, both up.
/// Names must be at most 15 bytes; they only need to be unique within
/// their namespace, since the pair never exists outside them.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    // Created inside `a` with the peer sent straight to `b`, so it never
    // appears in the host's namespace where names could clash.
    a.exec(&[
        "ip",
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
    .with_context(|| format!("creating veth {a_if}@{} <-> {b_if}@{}", a.name(), b.name()))?;
    a.set_up(a_if)?;
    b.set_up(b_if)
}

/// Fails unless `name` is a valid interface name (1..=15 bytes, no `/`,
/// no whitespace).
pub fn check_ifname(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty() && name.len() <= IFNAME_MAX,
        "interface name {name:?} must be 1..={IFNAME_MAX} bytes"
    );
    ensure!(
        !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()),
        "interface name {name:?} contains '/', ':' or whitespace"
    );
    Ok(())
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().context("too few bytes")?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("bad byte {part:?}"))?;
    }
    if parts.next().is_some() {
        bail!("too many bytes");
    }
    Ok(mac)
}

fn pids_in(name: &str) -> Result<Vec<i32>> {
    let out = run_cmd(&["ip", "netns", "pids", name])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Kills the processes left in namespace `name`, then deletes it. Errors
/// are printed, not returned: this runs in Drop.
fn delete(name: &str) {
    let me = std::process::id() as i32;
    match pids_in(name) {
        Ok(pids) => {
            for pid in pids.into_iter().filter(|&p| p != me) {
                // SAFETY: plain syscall; the pid was just listed as inside
                // our namespace, so it is one of ours (or its descendants).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        Err(e) => eprintln!("netns {name}: listing its processes failed: {e:#}"),
    }
    if let Err(e) = run_cmd(&["ip", "netns", "del", name]) {
        eprintln!("netns {name}: delete failed: {e:#}");
    }
}

/// The pid in a harness namespace name `hr-<pid>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Deletes `hr-<pid>-*` namespaces whose creating process no longer exists.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("deleting stale network namespace {name} (its test process {pid} is gone)");
            delete(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::require_root;
    use std::{
        panic,
        time::{Duration, Instant},
    };

    fn listed(name: &str) -> bool {
        run_cmd(&["ip", "netns", "list"])
            .map(|out| {
                out.lines()
                    .any(|l| l.split_whitespace().next() == Some(name))
            })
            .unwrap_or(false)
    }

    #[test]
    fn names_and_macs_parse() {
        assert_eq!(owner_pid("hr-1234-7"), Some(1234));
        assert_eq!(owner_pid("hr-1234-7-client"), Some(1234));
        assert_eq!(owner_pid("hr-demo-lb"), None);
        assert_eq!(owner_pid("other-1234"), None);
        assert_eq!(
            parse_mac("02:00:0a:ff:10:01").ok(),
            Some([2, 0, 0x0a, 0xff, 0x10, 1])
        );
        assert!(parse_mac("02:00:0a:ff:10").is_err());
        assert!(parse_mac("02:00:0a:ff:10:01:02").is_err());
        assert!(check_ifname("veth-lb-client0").is_ok());
        assert!(check_ifname("veth-lb-client01").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
    }

    #[test]
    fn root_netns_is_deleted_on_drop_and_on_panic() {
        if !require_root("root_netns_is_deleted_on_drop_and_on_panic") {
            return;
        }
        let ns = Netns::with_tag("drop").expect("create netns");
        let name = ns.name().to_string();
        assert!(name.starts_with("hr-") && name.ends_with("-drop"), "{name}");
        assert!(ns.path().exists() && listed(&name));
        drop(ns);
        assert!(
            !Path::new(NETNS_DIR).join(&name).exists(),
            "{name} left after drop"
        );
        assert!(!listed(&name));

        let result = panic::catch_unwind(|| {
            let ns = Netns::new().expect("create netns");
            let name = ns.name().to_string();
            panic!("{name}");
        });
        let payload = result.expect_err("the closure panics");
        let name = payload
            .downcast_ref::<String>()
            .expect("panic payload is the namespace name");
        assert!(name.starts_with("hr-"), "{name}");
        assert!(
            !Path::new(NETNS_DIR).join(name).exists(),
            "{name} left after panic"
        );
        assert!(!listed(name));
    }

    #[test]
    fn root_netns_loopback_is_up() {
        if !require_root("root_netns_loopback_is_up") {
            return;
        }
        let ns = Netns::new().expect("create netns");
        let link = ns
            .exec(&["ip", "-o", "link", "show", "dev", "lo"])
            .expect("ip link");
        assert!(link.contains("<LOOPBACK,UP,LOWER_UP>"), "{link}");
        ns.exec(&["ping", "-c", "1", "-W", "2", "127.0.0.1"])
            .expect("ping loopback inside the namespace");
    }

    #[test]
    fn root_netns_drop_kills_its_processes() {
        if !require_root("root_netns_drop_kills_its_processes") {
            return;
        }
        let ns = Netns::new().expect("create netns");
        let mut child = ns.spawn(&["sleep", "600"]).expect("spawn sleep");
        let deadline = Instant::now() + Duration::from_secs(5);
        // `ip netns exec` execs the command, so the child's pid is sleep's
        // once it has entered the namespace.
        while !ns.pids().expect("list pids").contains(&(child.id() as i32)) {
            assert!(
                Instant::now() < deadline,
                "sleep never showed up in the namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(ns);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                assert!(
                    !status.success(),
                    "sleep was killed, not finished: {status}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "sleep outlived its namespace");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn root_veth_pair_passes_ping() {
        if !require_root("root_veth_pair_passes_ping") {
            return;
        }
        let a = Netns::with_tag("a").expect("netns a");
        let b = Netns::with_tag("b").expect("netns b");
        veth_pair(&a, "veth-a", &b, "veth-b").expect("veth pair");
        a.add_addr("veth-a", "10.200.0.1/24").expect("addr a");
        b.add_addr("veth-b", "10.200.0.2/24").expect("addr b");
        a.add_addr("veth-a", "fd00:200::1/64").expect("addr6 a");
        b.add_addr("veth-b", "fd00:200::2/64").expect("addr6 b");

        let out = a
            .exec(&["ping", "-c", "2", "-W", "2", "10.200.0.2"])
            .expect("ping b from a");
        assert!(out.contains("2 received"), "{out}");
        a.exec(&["ping", "-6", "-c", "1", "-W", "2", "fd00:200::2"])
            .expect("ping6 b from a");
        // Not reachable from the host: the pair lives only in the namespaces.
        assert!(run_cmd(&["ip", "link", "show", "dev", "veth-a"]).is_err());

        let mac_b = b.mac("veth-b").expect("mac");
        assert_ne!(mac_b, [0; 6]);
        let neigh = a
            .exec(&["ip", "neigh", "show", "10.200.0.2"])
            .expect("neigh");
        let mac_text: Vec<String> = mac_b.iter().map(|x| format!("{x:02x}")).collect();
        assert!(
            neigh.contains(&mac_text.join(":")),
            "{neigh} lacks {mac_text:?}"
        );
        assert!(b.ifindex("veth-b").expect("ifindex") > 1);
    }

    #[test]
    fn root_enter_thread_switches_and_restores() {
        if !require_root("root_enter_thread_switches_and_restores") {
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| fs::metadata(p).expect("stat netns").ino();
        let here = || ino(Path::new("/proc/thread-self/ns/net"));
        let ns = Netns::new().expect("create netns");
        let before = here();
        assert_ne!(before, ino(&ns.path()));
        {
            let _inside = ns.enter_thread().expect("enter");
            assert_eq!(here(), ino(&ns.path()));
            // A socket made now belongs to the namespace: only its loopback.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = listener.local_addr().expect("addr").port().to_string();
            let ss = ns
                .exec(&["ss", "-Hltn", "sport", "=", &format!(":{port}")])
                .expect("ss");
            assert!(
                ss.contains(&port),
                "listener not visible in the namespace: {ss:?}"
            );
        }
        assert_eq!(here(), before);
    }
}
