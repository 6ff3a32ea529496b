//! Placement: which host a new capsule goes to.
//!
//! A [`Scheduler`] sees each candidate host as a [`HostView`] (what it has, what is
//! reserved, what its capsules use, what it holds ready) and picks one for a
//! [`PlacementRequest`]. [`LeastLoaded`] keeps only the hosts the request may use (tags,
//! team-owned hosts) and that it fits on, then prefers, in order: a host with a ready
//! warm-pool entry of the template, a host the team owns, a host that already holds the
//! template's snapshot, and the least loaded host by its bottleneck resource.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The id of the host `wrenn serve` runs in its own process (and the host of rows
/// written before hosts were recorded).
pub const LOCAL_HOST: &str = "local";

/// A host agent's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub String);

impl HostId {
    /// A host id as a person or an agent chose it: a DNS name in lowercase (letters,
    /// digits, `-`, labels separated by `.`), at most 253 characters — a Kubernetes
    /// node name is one. It names the host's certificate (`<id>.hosts.wrenn.internal`).
    pub fn parse(s: &str) -> Result<HostId, String> {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if s.len() <= 253 && s.split('.').all(label_ok) {
            Ok(HostId(s.to_string()))
        } else {
            Err(format!(
                "{s:?}: a host id is a lowercase DNS name (letters, digits and '-', \
                 labels of at most 63 separated by '.')"
            ))
        }
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Amounts of the resources placement weighs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
}

/// What the capsules on a host use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// vCPUs and memory of the capsules that run.
    pub running_vcpus: u64,
    pub running_memory_mb: u64,
    /// Memory of paused capsules (snapshots on disk; part of it comes back on resume).
    pub paused_memory_mb: u64,
    /// Disk of all capsules, paused ones included.
    pub disk_mb: u64,
}

/// One candidate host, as the scheduler sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub id: HostId,
    /// Takes new capsules (not draining, not lost).
    pub schedulable: bool,
    pub tags: BTreeSet<String>,
    /// A team-owned host (bring your own compute) serves that team only.
    pub team: Option<String>,
    pub capacity: Amounts,
    /// Kept for the host itself (its agent, page cache, the OS).
    pub reserved: Amounts,
    pub used: Usage,
    /// Templates whose pre-booted snapshot the host already has.
    pub templates: BTreeSet<String>,
    /// Ready warm-pool entries per template.
    pub pool_ready: BTreeMap<String, usize>,
}

/// What a new capsule needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRequest {
    pub team: String,
    pub template: String,
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    /// Tags the host must carry.
    pub tags: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error("no host is registered and schedulable")]
    NoHosts,
    #[error("no host may take this capsule: {0}")]
    NoneEligible(String),
    #[error("no host has room for {vcpus} vCPUs, {memory_mb} MiB and {disk_mb} MB of disk")]
    NoCapacity {
        vcpus: u64,
        memory_mb: u64,
        disk_mb: u64,
    },
}

/// Picks a host for a capsule.
pub trait Scheduler: Send + Sync + std::fmt::Debug {
    fn place(&self, req: &PlacementRequest, hosts: &[HostView]) -> Result<HostId, PlacementError>;
}

/// Least loaded by the bottleneck resource, with the preferences of the module doc.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeastLoaded {
    /// vCPUs handed out per physical one.
    pub cpu_overcommit: f64,
    /// Share of a paused capsule's memory counted against a host (it comes back on resume).
    pub paused_memory_share: f64,
}

impl Default for LeastLoaded {
    fn default() -> Self {
        LeastLoaded {
            cpu_overcommit: 1.5,
            paused_memory_share: 0.25,
        }
    }
}

impl LeastLoaded {
    /// The host's load with the request placed on it, per resource (1.0 = full), or
    /// `None` when it does not fit.
    pub fn load_with(&self, h: &HostView, req: &PlacementRequest) -> Option<f64> {
        let avail = |cap: u64, res: u64| cap.saturating_sub(res) as f64;
        let cpu_room = avail(h.capacity.vcpus, h.reserved.vcpus) * self.cpu_overcommit;
        let mem_room = avail(h.capacity.memory_mb, h.reserved.memory_mb);
        let disk_room = avail(h.capacity.disk_mb, h.reserved.disk_mb);
        let cpu = (h.used.running_vcpus + req.vcpus) as f64;
        let mem = h.used.running_memory_mb as f64
            + h.used.paused_memory_mb as f64 * self.paused_memory_share
            + req.memory_mb as f64;
        let disk = (h.used.disk_mb + req.disk_mb) as f64;
        let ratio = |used: f64, room: f64| {
            if used <= 0.0 {
                Some(0.0)
            } else if room <= 0.0 {
                None
            } else {
                Some(used / room)
            }
        };
        let loads = [
            ratio(cpu, cpu_room)?,
            ratio(mem, mem_room)?,
            ratio(disk, disk_room)?,
        ];
        let worst = loads.into_iter().fold(0.0_f64, f64::max);
        (worst <= 1.0).then_some(worst)
    }

    fn eligible(h: &HostView, req: &PlacementRequest) -> Result<(), String> {
        if !h.schedulable {
            return Err(format!("{} is not schedulable", h.id));
        }
        if let Some(t) = &h.team {
            if *t != req.team {
                return Err(format!("{} belongs to another team", h.id));
            }
        }
        if let Some(missing) = req.tags.iter().find(|t| !h.tags.contains(*t)) {
            return Err(format!("{} lacks tag {missing}", h.id));
        }
        Ok(())
    }
}

impl Scheduler for LeastLoaded {
    fn place(&self, req: &PlacementRequest, hosts: &[HostView]) -> Result<HostId, PlacementError> {
        if !hosts.iter().any(|h| h.schedulable) {
            return Err(PlacementError::NoHosts);
        }
        let mut why = Vec::new();
        let eligible: Vec<&HostView> = hosts
            .iter()
            .filter(|h| match Self::eligible(h, req) {
                Ok(()) => true,
                Err(e) => {
                    why.push(e);
                    false
                }
            })
            .collect();
        if eligible.is_empty() {
            return Err(PlacementError::NoneEligible(why.join("; ")));
        }
        // Lower sorts first: pool entry, own host, snapshot held, load, id.
        let best = eligible
            .into_iter()
            .filter_map(|h| {
                let load = self.load_with(h, req)?;
                let pooled = h.pool_ready.get(&req.template).copied().unwrap_or(0) > 0;
                let own = h.team.as_deref() == Some(req.team.as_str());
                let snapshot = h.templates.contains(&req.template);
                Some(((!pooled, !own, !snapshot), load, h))
            })
            .min_by(|a, b| {
                a.0.cmp(&b.0)
                    .then(a.1.total_cmp(&b.1))
                    .then_with(|| a.2.id.cmp(&b.2.id))
            });
        match best {
            Some((_, _, h)) => Ok(h.id.clone()),
            None => Err(PlacementError::NoCapacity {
                vcpus: req.vcpus,
                memory_mb: req.memory_mb,
                disk_mb: req.disk_mb,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, vcpus: u64, memory_mb: u64) -> HostView {
        HostView {
            id: HostId(id.into()),
            schedulable: true,
            capacity: Amounts {
                vcpus,
                memory_mb,
                disk_mb: 100_000,
            },
            reserved: Amounts {
                vcpus: 0,
                memory_mb: 512,
                disk_mb: 1000,
            },
            ..Default::default()
        }
    }

    fn req(memory_mb: u64) -> PlacementRequest {
        PlacementRequest {
            team: "t1".into(),
            template: "minimal".into(),
            vcpus: 1,
            memory_mb,
            disk_mb: 2048,
            tags: BTreeSet::new(),
        }
    }

    #[test]
    fn least_loaded_by_the_bottleneck() {
        let s = LeastLoaded::default();
        let mut a = host("a", 8, 16_384);
        let mut b = host("b", 8, 16_384);
        a.used.running_memory_mb = 8_000; // memory-bound
        b.used.running_vcpus = 10; // cpu-bound: 11 of 12 after overcommit
        assert_eq!(
            s.place(&req(512), &[a.clone(), b.clone()]),
            Ok(HostId("a".into()))
        );
        b.used.running_vcpus = 0;
        assert_eq!(s.place(&req(512), &[a, b]), Ok(HostId("b".into())));
    }

    #[test]
    fn overcommit_and_paused_share_count() {
        let s = LeastLoaded::default();
        let mut h = host("a", 2, 4_608);
        h.used.running_vcpus = 2; // 3 with ×1.5 overcommit: one more fits
        assert!(s.place(&req(512), std::slice::from_ref(&h)).is_ok());
        h.used.running_vcpus = 3;
        assert!(matches!(
            s.place(&req(512), std::slice::from_ref(&h)),
            Err(PlacementError::NoCapacity { .. })
        ));
        // 4 GiB of room; 8 GiB paused counts 2 GiB.
        let mut h = host("a", 8, 4_608);
        h.used.paused_memory_mb = 8_192;
        assert!(s.place(&req(2_048), std::slice::from_ref(&h)).is_ok());
        assert!(s.place(&req(2_049), std::slice::from_ref(&h)).is_err());
    }

    #[test]
    fn tags_and_team_owned_hosts() {
        let s = LeastLoaded::default();
        let mut gpu = host("gpu", 8, 16_384);
        gpu.tags.insert("gpu".into());
        let mut byoc = host("byoc", 8, 16_384);
        byoc.team = Some("t2".into());
        let plain = host("plain", 8, 16_384);
        let mut r = req(512);
        r.tags.insert("gpu".into());
        assert_eq!(
            s.place(&r, &[plain.clone(), gpu.clone(), byoc.clone()]),
            Ok(HostId("gpu".into()))
        );
        // Another team's host is never used; its own is preferred.
        let only_byoc = [byoc.clone()];
        assert!(matches!(
            s.place(&req(512), &only_byoc),
            Err(PlacementError::NoneEligible(m)) if m.contains("another team")
        ));
        let mut r2 = req(512);
        r2.team = "t2".into();
        assert_eq!(s.place(&r2, &[plain, byoc]), Ok(HostId("byoc".into())));
        assert_eq!(s.place(&req(512), &[]), Err(PlacementError::NoHosts));
    }

    #[test]
    fn ready_pool_then_snapshot_then_load() {
        let s = LeastLoaded::default();
        let idle = host("idle", 8, 16_384);
        let mut snap = host("snap", 8, 16_384);
        snap.used.running_memory_mb = 4_000;
        snap.templates.insert("minimal".into());
        let mut pool = host("pool", 8, 16_384);
        pool.used.running_memory_mb = 8_000;
        pool.pool_ready.insert("minimal".into(), 1);
        let all = [idle.clone(), snap.clone(), pool.clone()];
        assert_eq!(s.place(&req(512), &all), Ok(HostId("pool".into())));
        pool.pool_ready.insert("minimal".into(), 0);
        assert_eq!(
            s.place(&req(512), &[idle.clone(), snap.clone(), pool]),
            Ok(HostId("snap".into()))
        );
        assert_eq!(
            s.place(&req(512), &[idle, snap.clone()]),
            Ok(HostId("snap".into()))
        );
        // A full host is not chosen for its pool.
        let mut full = host("full", 1, 1_024);
        full.pool_ready.insert("minimal".into(), 3);
        full.used.running_memory_mb = 512;
        assert_eq!(s.place(&req(512), &[full, snap]), Ok(HostId("snap".into())));
    }

    #[test]
    fn whatever_is_placed_fits_and_is_allowed() {
        // A spread of hosts and requests: the chosen host is always eligible and fits,
        // and when nothing is chosen no eligible host fits.
        let s = LeastLoaded::default();
        let mut hosts = Vec::new();
        for i in 0..12u64 {
            let mut h = host(&format!("h{i}"), 1 + i % 4, 1_024 + 1_024 * (i % 5));
            h.used.running_vcpus = i % 3;
            h.used.running_memory_mb = 300 * (i % 4);
            h.used.paused_memory_mb = 700 * (i % 2);
            h.schedulable = i % 7 != 0;
            if i % 5 == 0 {
                h.team = Some("t2".into());
            }
            if i % 3 == 0 {
                h.tags.insert("ssd".into());
            }
            hosts.push(h);
        }
        for mem in [128u64, 512, 1_024, 2_048, 4_096, 8_192] {
            for team in ["t1", "t2"] {
                for tagged in [false, true] {
                    let mut r = req(mem);
                    r.team = team.into();
                    if tagged {
                        r.tags.insert("ssd".into());
                    }
                    let ok_hosts: Vec<&HostView> = hosts
                        .iter()
                        .filter(|h| LeastLoaded::eligible(h, &r).is_ok())
                        .filter(|h| s.load_with(h, &r).is_some())
                        .collect();
                    match s.place(&r, &hosts) {
                        Ok(id) => assert!(ok_hosts.iter().any(|h| h.id == id), "{id} for {r:?}"),
                        Err(_) => assert!(ok_hosts.is_empty(), "{r:?} fits {:?}", ok_hosts[0].id),
                    }
                }
            }
        }
    }
}
