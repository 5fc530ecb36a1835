//! Taking over the state an earlier run left pinned, so that a restart (or
//! a newer program) keeps every established flow on its backend.
//!
//! - **Service ids** ([`service_ids`]): a service still in the config keeps
//!   the id (and so the table buffers) it had; a new one gets an id no kept
//!   service uses. Ids index the table memory: reusing another service's id
//!   would overwrite the table the kernel is reading.
//! - **Removed services** (in the pinned map, not in the config): their
//!   service entry is removed (the VIP is no longer balanced) and their
//!   backends retired.
//! - **Backends** ([`Daemon::recover`]): every id the kernel holds keeps its
//!   meaning. Ids in a kept service's active table become that service's,
//!   under their address, and its `published` table is the kernel's (so no
//!   id of it is retired before a new table replaced it). Other active ids
//!   (draining in the earlier run) are *orphans*: kept as they are until a
//!   service claims one, which happens when the address it holds (dsr: with
//!   the VIP's port) is that service's backend in the config or the
//!   scoreboard. The kernel does not record which service a backend belongs
//!   to, and guessing would let another service retire it (and reset its
//!   flows). Orphans nobody claims are retired once every service that
//!   could own them (same family; dsr: the VIP's port) has been reconciled
//!   (static: published; scoreboard: a read that was not held); one a held
//!   service could own waits, as that service's draining backends do. Ids found retired are
//!   quarantined from now; empty slots are free. Everything is marked as
//!   written, so nothing is rewritten needlessly.
//! - **Tables** are not touched: a scoreboard service forwards with the
//!   pinned table until the first successful read computes a new one (also
//!   through a Redis outage at restart); static services are republished at
//!   start with the same ids, hence the same table.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::{Context, Result};
use lb_common::{Backend, ServiceKey, ServiceValue, BACKEND_ACTIVE, FAMILY_V4, FAMILY_V6};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{ids, ids::BackendIds, Daemon, Member};
use crate::Balancer;

/// Service ids for `keys` (config order): kept from `pinned` where
/// possible, else the lowest id no kept service uses. `None` for a service
/// that does not fit in `max_services`.
pub fn service_ids(
    keys: &[ServiceKey],
    pinned: &HashMap<ServiceKey, ServiceValue>,
    max_services: u32,
) -> Vec<Option<u32>> {
    let mut used = BTreeSet::new();
    let mut out: Vec<Option<u32>> = keys
        .iter()
        .map(|k| {
            let id = pinned.get(k).map(|v| v.id).filter(|&id| id < max_services);
            // A key listed twice is refused by the config; be safe anyway.
            id.filter(|&id| used.insert(id))
        })
        .collect();
    let mut next = 0u32;
    for slot in out.iter_mut().filter(|s| s.is_none()) {
        while used.contains(&next) {
            next += 1;
        }
        if next < max_services {
            used.insert(next);
            *slot = Some(next);
        }
    }
    out
}

/// The socket address a backend entry holds (`None` for an empty slot).
pub fn backend_socket(b: &Backend) -> Option<SocketAddr> {
    let ip = match b.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(b.addr[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in b.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::from_be(b.port)))
}

/// What a recovery found, for the log.
#[derive(Debug, Default)]
pub struct Summary {
    /// Services whose pinned table is kept.
    pub services: usize,
    /// Services removed (no longer configured).
    pub removed: usize,
    /// Backend ids adopted (in a kept service's table).
    pub backends: usize,
    /// Active backend ids in no table, kept until a service claims them.
    pub orphans: usize,
    /// Backend ids retired (or found retired): quarantined.
    pub quarantined: usize,
}

impl Daemon {
    /// Adopts the pinned services and backends (see the module docs).
    /// `pinned` is the services map as loaded, before anything was written.
    pub(super) fn recover(
        &mut self,
        pinned: &HashMap<ServiceKey, ServiceValue>,
        now: Instant,
    ) -> Result<Summary> {
        let mut summary = Summary::default();
        let Daemon {
            config,
            lb,
            svcs,
            ids: backend_ids,
            written,
            orphans,
            ..
        } = self;
        let max = config.datapath.max_backends;

        // Services no longer configured.
        let mut removed_ids = BTreeSet::new();
        for key in pinned.keys() {
            if svcs.iter().any(|s| s.key == *key) {
                continue;
            }
            removed_ids.extend(table_ids(lb, key));
            lb.remove_service(key)
                .context("removing a service no longer configured")?;
            summary.removed += 1;
            info!(vip = ?key, "pinned service no longer configured: removed");
        }

        let mut slots = BTreeMap::new();
        for id in 0..max {
            let b = lb
                .backend(id)
                .with_context(|| format!("reading backend {id}"))?;
            if b.family != 0 {
                slots.insert(id, b);
            }
        }

        // Ids in a kept service's table.
        let mut owned = BTreeSet::new();
        for svc in svcs.iter_mut() {
            if !pinned.contains_key(&svc.key) {
                continue;
            }
            let table = lb.active_table(&svc.key).unwrap_or(&[]);
            let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
            for &id in table {
                *counts.entry(id).or_default() += 1;
            }
            for (id, n) in counts {
                let Some(addr) = slots
                    .get(&id)
                    .filter(|b| b.flags & BACKEND_ACTIVE != 0)
                    .and_then(backend_socket)
                else {
                    continue;
                };
                svc.ids.insert(addr, id);
                svc.recovered.insert(addr);
                svc.published.push(Member {
                    key: addr.to_string(),
                    addr,
                    id,
                    weight: n,
                    target: n,
                });
                owned.insert(id);
                summary.backends += 1;
            }
            summary.services += 1;
            info!(service = %svc.name, id = svc.id, backends = svc.published.len(), "pinned table kept until the first refresh");
        }

        // Other active ids: draining in the earlier run, or of a removed service.
        let mut retired = BTreeSet::new();
        for (&id, b) in slots.iter_mut() {
            if b.flags & BACKEND_ACTIVE == 0 {
                retired.insert(id);
                continue;
            }
            if owned.contains(&id) {
                continue;
            }
            match backend_socket(b).filter(|_| !removed_ids.contains(&id)) {
                Some(addr) => {
                    orphans.insert(id, *b);
                    summary.orphans += 1;
                    info!(%addr, id, "pinned backend outside every table: kept until its service claims it");
                }
                None => {
                    let gone = Backend { flags: 0, ..*b };
                    lb.set_backend(id, gone)
                        .with_context(|| format!("retiring backend {id}"))?;
                    *b = gone;
                    retired.insert(id);
                    warn!(id, "pinned backend of a removed service: retired");
                }
            }
        }
        summary.quarantined = retired.len();
        let in_use: BTreeSet<u32> = slots
            .iter()
            .filter(|(_, b)| b.flags & BACKEND_ACTIVE != 0)
            .map(|(&id, _)| id)
            .collect();
        *backend_ids = BackendIds::recovered(
            max,
            ids::quarantine_for(config.scoreboard.ttl),
            &in_use,
            &retired,
            now,
        );
        written.extend(slots);
        Ok(summary)
    }
}

/// The distinct backend ids of `key`'s active table.
fn table_ids(lb: &Balancer, key: &ServiceKey) -> BTreeSet<u32> {
    lb.active_table(key)
        .unwrap_or(&[])
        .iter()
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn key(port: u16) -> ServiceKey {
        ServiceKey {
            port,
            ..ServiceKey::default()
        }
    }

    fn value(id: u32) -> ServiceValue {
        ServiceValue {
            id,
            ..ServiceValue::default()
        }
    }

    #[test]
    fn kept_services_keep_their_ids_new_ones_take_free_ones() {
        let pinned = HashMap::from([(key(1), value(2)), (key(2), value(0))]);
        let ids = service_ids(&[key(3), key(1), key(4), key(2)], &pinned, 4);
        assert_eq!(ids, [Some(1), Some(2), Some(3), Some(0)]);
        // No room left: the last one gets none.
        let ids = service_ids(&[key(3), key(1), key(2)], &pinned, 2);
        assert_eq!(ids, [Some(1), None, Some(0)]);
    }

    #[test]
    fn backend_socket_round_trips() {
        for a in ["192.0.2.7:8080", "[2001:db8::5]:443"] {
            let a: SocketAddr = a.parse().expect("addr");
            let b = Backend {
                addr: config::addr_words(a.ip()),
                port: a.port().to_be(),
                family: config::family(a.ip()),
                flags: BACKEND_ACTIVE,
            };
            assert_eq!(backend_socket(&b), Some(a));
        }
        assert_eq!(backend_socket(&Backend::default()), None);
    }
}
