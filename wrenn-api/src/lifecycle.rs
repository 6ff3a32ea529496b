//! Background work and the server's life: start-up reconciliation of the database with
//! what the host actually runs, the inactivity reaper, bootstrap, and graceful shutdown
//! (running capsules are paused, so nothing is lost across restarts).

use crate::agent::{HostAgent, HostErrorKind, PauseMode};
use crate::service;
use crate::state::AppState;
use std::collections::HashMap;
use std::sync::Arc;
use wrenn_core::status::CapsuleStatus;
use wrenn_db::Actor;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Rows whose status changed to what the host says.
    pub updated: usize,
    /// Rows of capsules the host no longer has (now `stopped`).
    pub lost: usize,
    /// Running capsules no row knew (destroyed: nothing of them was ever saved).
    pub orphans_destroyed: usize,
    /// Paused capsules no row knows (`wrenn run --keep`, another database's): left
    /// untouched on the host with their snapshots, reported, never destroyed.
    pub quarantined: Vec<String>,
}

/// Makes the database and the host agree at start-up: every live row gets the host's
/// status (or `stopped` when the host has no such capsule); running capsules no live
/// row owns are destroyed, paused ones are quarantined (kept, reported, unreachable
/// through the API).
pub async fn reconcile(st: &AppState) -> Result<ReconcileReport, String> {
    reconcile_with(st, Reconcile::Startup).await
}

/// How long a start-up reconciliation waits for the host's capsules that are
/// mid-operation to settle.
pub const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

fn in_motion(s: CapsuleStatus) -> bool {
    matches!(
        s,
        CapsuleStatus::Starting
            | CapsuleStatus::Pausing
            | CapsuleStatus::Resuming
            | CapsuleStatus::Stopping
    )
}

/// `host` once its capsules that were mid-operation have settled (or after
/// [`SETTLE_WAIT`]): rows must not take a status no operation of this process will end.
async fn settled(
    st: &AppState,
    mut host: Vec<crate::agent::HostCapsule>,
) -> Vec<crate::agent::HostCapsule> {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    loop {
        let moving: Vec<_> = host
            .iter()
            .filter(|c| in_motion(c.status))
            .map(|c| c.id.clone())
            .collect();
        if moving.is_empty() {
            return host;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(capsules = ?moving, "capsules still mid-operation on the host");
            return host;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        for id in moving {
            match st.agent.get(&id).await {
                Ok(now) => {
                    if let Some(c) = host.iter_mut().find(|c| c.id == id) {
                        *c = now;
                    }
                }
                Err(e) if e.kind == HostErrorKind::NotFound => host.retain(|c| c.id != id),
                Err(_) => {}
            }
        }
    }
}

/// When a reconciliation runs, which says what it may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reconcile {
    /// Before the server takes requests: everything.
    Startup,
    /// While serving, after the host agent restarted: rows of capsules the host lost
    /// become `stopped` and settled rows take the host's settled status, but rows
    /// mid-operation and capsules without a row (a create in flight) are left alone.
    HostRestarted,
}

pub async fn reconcile_with(st: &AppState, mode: Reconcile) -> Result<ReconcileReport, String> {
    let mut host = st.agent.list().await.map_err(|e| e.message)?;
    if mode == Reconcile::Startup {
        // A host agent that outlived the control plane finishes what it was doing.
        host = settled(st, host).await;
    }
    let mut on_host: HashMap<String, CapsuleStatus> =
        host.iter().map(|c| (c.id.to_string(), c.status)).collect();
    let rows = st
        .db
        .system_live_capsules()
        .await
        .map_err(|e| wrenn_core::manager::error_chain(&e))?;
    let mut report = ReconcileReport::default();
    for row in rows {
        let id = row.id.to_string();
        let settled =
            |s: CapsuleStatus| matches!(s, CapsuleStatus::Running | CapsuleStatus::Paused);
        match on_host.remove(&id) {
            Some(s) if s == row.status => {}
            Some(s) if mode == Reconcile::HostRestarted && !(settled(s) && settled(row.status)) => {
            }
            Some(s) => {
                let settled = match s {
                    CapsuleStatus::Running | CapsuleStatus::Paused => s,
                    // Mid-operation on a host that just started: it settles by itself.
                    other => other,
                };
                let written = st.db.system_set_capsule_status(&id, settled).await;
                st.capsule_cache.invalidate(&id);
                if written.is_ok() {
                    report.updated += 1;
                }
            }
            None => {
                tracing::warn!(capsule = %id, status = %row.status, "capsule no longer exists on the host; marking it stopped");
                let written = st
                    .db
                    .system_set_capsule_status(&id, CapsuleStatus::Stopped)
                    .await;
                st.capsule_cache.invalidate(&id);
                if written.is_ok() {
                    report.lost += 1;
                    st.audit_team(
                        &row.team_id,
                        Actor::System,
                        None,
                        "capsule.reconcile",
                        "capsule",
                        Some(&id),
                        false,
                        Some(serde_json::json!({"reason": "gone from host", "was": row.status.as_str()})),
                    )
                    .await;
                }
            }
        }
    }
    for (id, status) in on_host {
        if mode == Reconcile::HostRestarted {
            // A create in flight has its capsule on the host before its row.
            continue;
        }
        let Ok(cid) = wrenn_core::id::CapsuleId::parse(&id) else {
            continue;
        };
        if status == CapsuleStatus::Paused {
            tracing::warn!(capsule = %id,
                "paused capsule unknown to the database: quarantined (kept on the host with \
                 its snapshot; `wrenn resume`/`wrenn rm` operate on it)");
            report.quarantined.push(id);
            continue;
        }
        tracing::warn!(capsule = %id, %status, "running capsule unknown to the database; destroying it");
        match st.agent.destroy(&cid).await {
            Ok(()) => report.orphans_destroyed += 1,
            Err(e) if e.kind == HostErrorKind::NotFound => {}
            Err(e) => tracing::error!(capsule = %id, error = %e, "orphan capsule not destroyed"),
        }
    }
    tracing::info!(?report, "reconciled database with host");
    Ok(report)
}

/// Capsules whose timeout action (pause or destroy) failed: each is retried after a
/// delay that doubles per failure (up to [`ReaperBackoff::MAX`]) instead of every tick,
/// and is never destroyed in place of the pause it was due.
#[derive(Debug, Default)]
pub struct ReaperBackoff {
    failed: std::sync::Mutex<HashMap<String, (u32, std::time::Instant)>>,
}

impl ReaperBackoff {
    /// The longest wait before the next attempt.
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(300);
    const FIRST: std::time::Duration = std::time::Duration::from_secs(5);

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, std::time::Instant)>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the reaper should leave `id` alone for now.
    pub fn waiting(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|(_, next)| std::time::Instant::now() < *next)
    }

    /// Records a failure; returns how many in a row and the wait before the next try.
    pub fn failed(&self, id: &str) -> (u32, std::time::Duration) {
        let mut map = self.lock();
        let n = map.get(id).map_or(1, |(n, _)| n.saturating_add(1));
        let wait = Self::FIRST
            .saturating_mul(1u32 << (n - 1).min(10))
            .min(Self::MAX);
        map.insert(id.to_owned(), (n, std::time::Instant::now() + wait));
        (n, wait)
    }

    /// How many times in a row the timeout action of `id` has failed.
    pub fn failures(&self, id: &str) -> u32 {
        self.lock().get(id).map_or(0, |(n, _)| *n)
    }

    fn succeeded(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// One pass of the inactivity reaper: idle capsules are paused (or destroyed when their
/// timeout says kill). A pause that fails leaves the capsule as the host has it (running)
/// with its saved state intact, is reported (log and audit row) and retried later; the
/// reaper never destroys a capsule it was asked to pause.
pub async fn reap_once(st: &AppState) {
    let idle = match st.db.system_idle_capsules(wrenn_db::now()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "reaper: cannot list idle capsules");
            return;
        }
    };
    for c in idle {
        let id = c.id.to_string();
        if st.reaper_backoff.waiting(&id) {
            continue;
        }
        let result = if c.pause_on_timeout {
            tracing::info!(capsule = %c.id, memory = c.timeout_pause_memory, "timeout: pausing");
            let mode = PauseMode::keeping_memory(c.timeout_pause_memory);
            service::pause_with(st, &Actor::System, None, &c, mode)
                .await
                .map(|_| ())
        } else {
            tracing::info!(capsule = %c.id, "timeout: destroying");
            service::destroy(st, &Actor::System, None, &c).await
        };
        match result {
            Ok(()) => st.reaper_backoff.succeeded(&id),
            // Someone else (a user's pause or kill) got there first: nothing to do.
            Err(e) if e.code == "invalid_state" => {
                tracing::debug!(capsule = %c.id, error = %e, "reaper: capsule changed meanwhile");
            }
            Err(e) => {
                let (n, wait) = st.reaper_backoff.failed(&id);
                tracing::error!(capsule = %c.id, error = %e, failures = n,
                    retry_in_s = wait.as_secs(), "timeout action failed; the capsule is kept");
            }
        }
    }
}

/// Capsules that failed on the host by themselves (their VMM died): rows the database
/// still holds as live become `error`, so the API stops offering them as running.
/// Returns how many rows changed.
pub async fn follow_host_failures(st: &AppState) -> usize {
    let failed: std::collections::HashSet<String> = match st.agent.list().await {
        Ok(host) => host
            .iter()
            .filter(|c| c.status == CapsuleStatus::Error)
            .map(|c| c.id.to_string())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the host's capsules");
            return 0;
        }
    };
    if failed.is_empty() {
        return 0;
    }
    let rows = match st.db.system_live_capsules().await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list live capsules");
            return 0;
        }
    };
    let mut changed = 0;
    for row in rows {
        let id = row.id.to_string();
        if row.status == CapsuleStatus::Error || !failed.contains(&id) {
            continue;
        }
        tracing::warn!(capsule = %id, was = %row.status, "capsule failed on the host; marking it error");
        let written = st
            .db
            .system_set_capsule_status(&id, CapsuleStatus::Error)
            .await;
        st.capsule_cache.invalidate(&id);
        if written.is_ok() {
            changed += 1;
            st.audit_team(
                &row.team_id,
                Actor::System,
                None,
                "capsule.failed",
                "capsule",
                Some(&id),
                false,
                Some(serde_json::json!({"was": row.status.as_str()})),
            )
            .await;
        }
    }
    changed
}

/// Reconciles with the host when its agent restarted (its instance changed): the
/// capsules it was running when it died are gone, its paused ones are still there.
/// Returns whether it reconciled.
pub async fn follow_host_restarts(st: &AppState) -> bool {
    let Ok(v) = st.agent.versions().await else {
        // Unreachable: nothing to compare until it answers again.
        return false;
    };
    if !st.host_instance_changed(&v.instance) {
        return false;
    }
    tracing::warn!(instance = %v.instance, "the host agent restarted; reconciling with it");
    match reconcile_with(st, Reconcile::HostRestarted).await {
        Ok(report) => {
            tracing::info!(?report, "reconciled with the restarted host agent");
            true
        }
        Err(e) => {
            // Tried again on the next tick.
            st.forget_host_instance();
            tracing::warn!(error = %e, "reconciling with the restarted host agent failed");
            false
        }
    }
}

/// Runs the reaper until the task is aborted.
pub fn spawn_reaper(st: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(st.config.reaper_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            follow_host_restarts(&st).await;
            follow_host_failures(&st).await;
            reap_once(&st).await;
        }
    })
}

/// Graceful shutdown: pauses every running capsule and records it.
pub async fn pause_all_running(st: &AppState) {
    let rows = match st.db.system_live_capsules().await {
        Ok(r) => r,
        Err(e) => {
            // The host pauses what still runs on its own shutdown; the next start's
            // reconciliation records it.
            tracing::error!(error = %e, "shutdown: cannot list capsules; leaving them to the host");
            return;
        }
    };
    let running: Vec<_> = rows
        .into_iter()
        .filter(|c| c.status == CapsuleStatus::Running)
        .collect();
    if !running.is_empty() {
        tracing::info!(
            count = running.len(),
            "pausing running capsules before exit"
        );
    }
    for c in running {
        if let Err(e) = service::pause(st, &Actor::System, None, &c).await {
            tracing::error!(capsule = %c.id, error = %e, "shutdown: pause failed");
        }
    }
}

/// Keeps the trait object's type visible for callers wiring their own agent.
pub type SharedAgent = Arc<dyn HostAgent>;
