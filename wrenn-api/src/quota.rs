//! Per-team limits: how many capsules a team may hold, their vCPUs, memory and disk,
//! its snapshot templates, and how many forks one request may make.
//!
//! A request that would take a team over a limit is refused before anything starts:
//! 429 `quota_exceeded` when it could succeed once the team frees something, 403
//! `quota_exceeded` when it never could (one capsule larger than the whole limit, a
//! fork count above the maximum). Creates in flight are counted too: each holds a
//! [`Reservation`] from the check until its row is written, so concurrent requests of
//! one team cannot together pass a limit that each alone would respect.

use crate::error::ApiError;
use axum::http::StatusCode;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wrenn_db::{Db, TeamUsage};

/// Limits applied to every team; 0 means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TeamLimits {
    /// Capsules not stopped (running, paused, starting…).
    pub capsules: u64,
    /// vCPUs of the capsules not paused.
    pub vcpus: u64,
    /// Memory of the capsules not paused, in MiB.
    pub memory_mb: u64,
    /// Disk of all capsules not stopped, in MB.
    pub disk_mb: u64,
    /// Snapshot templates.
    pub snapshots: u64,
    /// Forks made by one request.
    pub fork_count: u64,
}

impl Default for TeamLimits {
    fn default() -> Self {
        TeamLimits {
            capsules: 100,
            vcpus: 200,
            memory_mb: 400 * 1024,
            disk_mb: 2 * 1024 * 1024,
            snapshots: 500,
            fork_count: 32,
        }
    }
}

/// What one request adds to a team's usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    pub capsules: u64,
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub snapshots: u64,
}

impl Ask {
    /// `n` capsules of these sizes.
    pub fn capsules(n: u64, vcpus: u64, memory_mb: u64, disk_mb: u64) -> Ask {
        Ask {
            capsules: n,
            vcpus: vcpus.saturating_mul(n),
            memory_mb: memory_mb.saturating_mul(n),
            disk_mb: disk_mb.saturating_mul(n),
            snapshots: 0,
        }
    }

    fn add(&mut self, o: &Ask) {
        self.capsules = self.capsules.saturating_add(o.capsules);
        self.vcpus = self.vcpus.saturating_add(o.vcpus);
        self.memory_mb = self.memory_mb.saturating_add(o.memory_mb);
        self.disk_mb = self.disk_mb.saturating_add(o.disk_mb);
        self.snapshots = self.snapshots.saturating_add(o.snapshots);
    }

    fn sub(&mut self, o: &Ask) {
        self.capsules = self.capsules.saturating_sub(o.capsules);
        self.vcpus = self.vcpus.saturating_sub(o.vcpus);
        self.memory_mb = self.memory_mb.saturating_sub(o.memory_mb);
        self.disk_mb = self.disk_mb.saturating_sub(o.disk_mb);
        self.snapshots = self.snapshots.saturating_sub(o.snapshots);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Serialises "read usage, compare, reserve" (and releases) per server.
    check: tokio::sync::Mutex<()>,
    in_flight: Mutex<HashMap<String, Ask>>,
}

/// The server's limits and what is reserved by requests in flight.
#[derive(Debug, Clone)]
pub struct Quotas {
    limits: TeamLimits,
    inner: Arc<Inner>,
}

/// Held by a request from its check until its rows are written (or it failed).
#[derive(Debug)]
pub struct Reservation {
    inner: Arc<Inner>,
    team: String,
    ask: Ask,
}

impl Inner {
    fn release(&self, team: &str, ask: &Ask) {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = map.get_mut(team) {
            held.sub(ask);
            if *held == Ask::default() {
                map.remove(team);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let (inner, team, ask) = (self.inner.clone(), std::mem::take(&mut self.team), self.ask);
        // Released inside the check section, so a check never sees a create neither
        // reserved nor yet in the database; until then it is counted twice (safe).
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _section = inner.check.lock().await;
                    inner.release(&team, &ask);
                });
            }
            Err(_) => inner.release(&team, &ask),
        }
    }
}

fn check_one(what: &str, flag: &str, limit: u64, used: u64, ask: u64) -> Result<(), ApiError> {
    if limit == 0 || ask == 0 || used.saturating_add(ask) <= limit {
        return Ok(());
    }
    let (status, tail) = if ask > limit {
        (StatusCode::FORBIDDEN, "this request alone exceeds it")
    } else {
        (
            StatusCode::TOO_MANY_REQUESTS,
            "free some (destroy capsules or snapshots) and retry",
        )
    };
    Err(ApiError::new(
        status,
        "quota_exceeded",
        format!(
            "team limit of {limit} {what} reached: {used} in use, {ask} more asked; {tail} \
             (the server's {flag} sets the limit)"
        ),
    ))
}

impl Quotas {
    pub fn new(limits: TeamLimits) -> Self {
        Quotas {
            limits,
            inner: Arc::default(),
        }
    }

    pub fn limits(&self) -> TeamLimits {
        self.limits
    }

    /// Refuses a fork of more than the per-request maximum (403).
    pub fn check_fork_count(&self, n: u64) -> Result<(), ApiError> {
        let max = self.limits.fork_count;
        if max > 0 && n > max {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "quota_exceeded",
                format!("at most {max} forks per request (the server's --team-max-forks sets it)"),
            ));
        }
        Ok(())
    }

    /// Checks that `ask` fits the team's limits given what it holds and what its
    /// requests in flight reserved, and reserves it.
    pub async fn reserve(&self, db: &Db, team: &str, ask: Ask) -> Result<Reservation, ApiError> {
        let _section = self.inner.check.lock().await;
        let used: TeamUsage = db.team_usage(team).await?;
        let mut held = {
            let map = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.get(team).copied().unwrap_or_default()
        };
        held.add(&Ask {
            capsules: used.capsules,
            vcpus: used.vcpus,
            memory_mb: used.memory_mb,
            disk_mb: used.disk_mb,
            snapshots: used.snapshots,
        });
        let l = &self.limits;
        check_one(
            "capsules",
            "--team-max-capsules",
            l.capsules,
            held.capsules,
            ask.capsules,
        )?;
        check_one("vCPUs", "--team-max-vcpus", l.vcpus, held.vcpus, ask.vcpus)?;
        check_one(
            "MiB of memory",
            "--team-max-memory-mb",
            l.memory_mb,
            held.memory_mb,
            ask.memory_mb,
        )?;
        check_one(
            "MB of disk",
            "--team-max-disk-mb",
            l.disk_mb,
            held.disk_mb,
            ask.disk_mb,
        )?;
        check_one(
            "snapshots",
            "--team-max-snapshots",
            l.snapshots,
            held.snapshots,
            ask.snapshots,
        )?;
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(team.to_owned())
            .or_default()
            .add(&ask);
        Ok(Reservation {
            inner: self.inner.clone(),
            team: team.to_owned(),
            ask,
        })
    }
}
