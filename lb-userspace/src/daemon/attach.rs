//! Attaching the balancer to the configured interfaces, and the safety check
//! that keeps it off the interface that carries the host's default route.
//!
//! [`attach_or_reuse`] is the one place that decides how the program gets
//! onto the interfaces: the balancer is loaded pinned, so an interface with
//! a link pinned by an earlier run gets the new program on that link
//! atomically (it never runs without the balancer), any other is attached
//! and its link pinned. Interfaces with `mode = "tc"` get the TC program on
//! their tcx ingress hook, the others XDP; an interface whose mode changed
//! loses the other hook's link. Links outlive the daemon; [`detach_pinned`]
//! (`headroom lb detach`) removes them.

use std::{collections::BTreeSet, ffi::CString, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use tracing::{info, warn};

use crate::{
    config::{AttachMode, Config},
    loader, Balancer,
};

/// One attached interface.
#[derive(Debug)]
pub struct Attached {
    /// Interface name (from the config).
    pub ifname: String,
    /// Its index in the daemon's network namespace.
    pub ifindex: u32,
    /// The group it belongs to.
    pub group: String,
    /// Whether a link pinned by an earlier run got the new program.
    pub reused: bool,
}

/// The interfaces the balancer runs on.
#[derive(Debug, Default)]
pub struct Attachment {
    /// Every configured interface, in file order.
    pub interfaces: Vec<Attached>,
}

/// The aya XDP mode for a configured mode (`auto` lets the kernel choose:
/// native where the driver supports it, else generic); `None` for `tc`,
/// which is not XDP.
pub fn xdp_mode(mode: AttachMode) -> Option<XdpMode> {
    match mode {
        AttachMode::Native => Some(XdpMode::Driver),
        AttachMode::Generic => Some(XdpMode::Skb),
        AttachMode::Auto => Some(XdpMode::Default),
        AttachMode::Tc => None,
    }
}

/// Interface index of `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the whole call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("interface {name} not found in this network namespace"));
    }
    Ok(index)
}

/// Attaches the balancer program to every interface of `config` (all checks
/// first: nothing is attached if one interface is missing or refused) and
/// allows XDP_REDIRECT to each. Refuses an interface that carries a default
/// route of the calling thread's network namespace unless `force`.
pub fn attach_or_reuse(lb: &mut Balancer, config: &Config, force: bool) -> Result<Attachment> {
    let defaults = match default_route_devices() {
        Ok(d) => d,
        Err(e) if force => {
            warn!("cannot tell which interfaces carry the default route ({e:#}); --force given, attaching anyway");
            BTreeSet::new()
        }
        Err(e) => {
            return Err(e.context(
                "cannot tell which interfaces carry the default route; refusing to attach (pass --force to attach anyway)",
            ))
        }
    };
    let mut plan = Vec::new();
    for (group, iface) in config.interfaces() {
        let index = ifindex(&iface.name).with_context(|| format!("group {}", group.name))?;
        if defaults.contains(&iface.name) {
            if force {
                warn!(interface = %iface.name, "interface carries the default route; attaching because of --force");
            } else {
                bail!(
                    "refusing to attach to {}: it carries this host's default route \
                     (the balancer there can take the host off the network); pass --force to attach anyway",
                    iface.name
                );
            }
        }
        plan.push((group.name.clone(), iface.name.clone(), index, iface.mode));
    }
    let dir = lb.pin_dir().map(Path::to_path_buf);
    let pinned_before: BTreeSet<String> = dir
        .as_deref()
        .map(loader::pinned_links)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut out = Attachment::default();
    for (group, ifname, ifindex, mode) in plan {
        let attached = match xdp_mode(mode) {
            Some(xdp) => lb.attach(&ifname, ifindex, xdp),
            None => lb.attach_tc(&ifname, ifindex),
        };
        let reused = attached
            .with_context(|| format!("attaching the balancer to {ifname} ({})", mode.as_str()))?;
        if reused {
            info!(interface = %ifname, ifindex, "attached: the pinned link now runs this program (replaced atomically)");
        } else {
            info!(interface = %ifname, ifindex, mode = mode.as_str(), "attached");
        }
        out.interfaces.push(Attached {
            ifname,
            ifindex,
            group,
            reused,
        });
    }
    // Interfaces an earlier run attached to that the config no longer
    // names: their links would keep the old program running there.
    if let Some(dir) = &dir {
        for ifname in pinned_before {
            if out.interfaces.iter().any(|a| a.ifname == ifname) {
                continue;
            }
            match loader::unpin_link(dir, &ifname) {
                Ok(()) => info!(interface = %ifname, "no longer configured: detached"),
                Err(e) => warn!(interface = %ifname, "no longer configured, detaching failed: {e}"),
            }
        }
    }
    Ok(out)
}

/// `headroom lb detach`: removes the links pinned in `dir` (XDP and TC come
/// off the interfaces), every pinned map and `dir` itself, then `dir`'s parent
/// if that is left empty. `Ok(None)` when nothing was pinned there.
pub fn detach_pinned(dir: &Path) -> Result<Option<loader::Detached>> {
    if !dir.exists() {
        return Ok(None);
    }
    let d = loader::detach(dir).with_context(|| format!("detaching {}", dir.display()))?;
    // The per-host root (`/sys/fs/bpf/headroom`) goes with its last
    // balancer; failing because another one is left is expected.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(Some(d))
}

/// Interfaces that carry a default route (IPv4 or IPv6, any table) in the
/// calling thread's network namespace: from `ip -j route show table all
/// default`, else from `/proc/thread-self/net/{route,ipv6_route}`.
pub fn default_route_devices() -> Result<BTreeSet<String>> {
    match default_route_devices_ip() {
        Ok(d) => Ok(d),
        Err(ip_err) => {
            default_route_devices_proc().with_context(|| format!("after `ip` failed: {ip_err:#}"))
        }
    }
}

fn default_route_devices_ip() -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for family in ["-4", "-6"] {
        // A child process starts in the calling thread's network namespace.
        let o = Command::new("ip")
            .args(["-j", family, "route", "show", "table", "all", "default"])
            .output()
            .context("running `ip route`")?;
        if !o.status.success() {
            bail!(
                "`ip {family} route show table all default`: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        out.extend(parse_ip_json(&o.stdout)?);
    }
    Ok(out)
}

/// Devices of the routes in `ip -j route` output (multipath: every hop).
pub fn parse_ip_json(json: &[u8]) -> Result<BTreeSet<String>> {
    let text = String::from_utf8_lossy(json);
    if text.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(&text).context("parsing `ip -j route` output")?;
    let mut out = BTreeSet::new();
    for r in &routes {
        if let Some(dev) = r.get("dev").and_then(|d| d.as_str()) {
            out.insert(dev.to_string());
        }
        for hop in r
            .get("nexthops")
            .and_then(|n| n.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(dev) = hop.get("dev").and_then(|d| d.as_str()) {
                out.insert(dev.to_string());
            }
        }
    }
    Ok(out)
}

fn default_route_devices_proc() -> Result<BTreeSet<String>> {
    let v4 = std::fs::read_to_string("/proc/thread-self/net/route")
        .context("reading /proc/thread-self/net/route")?;
    let mut out = parse_proc_route(&v4);
    // Absent when IPv6 is disabled.
    if let Ok(v6) = std::fs::read_to_string("/proc/thread-self/net/ipv6_route") {
        out.extend(parse_proc_ipv6_route(&v6));
    }
    Ok(out)
}

/// Devices of `/proc/net/route` lines with destination and mask 0.
pub fn parse_proc_route(text: &str) -> BTreeSet<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .collect()
}

/// Devices of `/proc/net/ipv6_route` lines for `::/0` (not `lo`, which
/// carries the kernel's unreachable placeholders).
pub fn parse_proc_ipv6_route(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo")
                .then(|| f[9].to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_is_not_an_xdp_mode() {
        assert_eq!(xdp_mode(AttachMode::Tc), None);
        assert_eq!(xdp_mode(AttachMode::Native), Some(XdpMode::Driver));
        assert_eq!(xdp_mode(AttachMode::Generic), Some(XdpMode::Skb));
        assert_eq!(xdp_mode(AttachMode::Auto), Some(XdpMode::Default));
    }

    #[test]
    fn ip_json() {
        let j = br#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]},
            {"dst":"default","flags":[],"nexthops":[{"gateway":"10.0.0.1","dev":"eth1"},{"gateway":"10.0.1.1","dev":"eth2"}]}]"#;
        let d = parse_ip_json(j).expect("parse");
        assert_eq!(d.into_iter().collect::<Vec<_>>(), ["eth0", "eth1", "eth2"]);
        assert!(parse_ip_json(b"").expect("empty").is_empty());
        assert!(parse_ip_json(b"[]").expect("empty").is_empty());
    }

    #[test]
    fn proc_route() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            parse_proc_route(t).into_iter().collect::<Vec<_>>(),
            ["eth0"]
        );
        let t6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
            fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        assert_eq!(
            parse_proc_ipv6_route(t6).into_iter().collect::<Vec<_>>(),
            ["eth0"]
        );
    }
}
