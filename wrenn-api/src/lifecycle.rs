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
    /// Capsules the host ran that no row knew (destroyed).
    pub orphans_destroyed: usize,
}

/// Makes the database and the host agree: every live row gets the host's status (or
/// `stopped` when the host has no such capsule), and capsules no live row owns are
/// destroyed.
pub async fn reconcile(st: &AppState) -> Result<ReconcileReport, String> {
    let host = st.agent.list().await.map_err(|e| e.message)?;
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
        match on_host.remove(&id) {
            Some(s) if s == row.status => {}
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
        let Ok(cid) = wrenn_core::id::CapsuleId::parse(&id) else {
            continue;
        };
        tracing::warn!(capsule = %id, %status, "host capsule unknown to the database; destroying it");
        match st.agent.destroy(&cid).await {
            Ok(()) => report.orphans_destroyed += 1,
            Err(e) if e.kind == HostErrorKind::NotFound => {}
            Err(e) => tracing::error!(capsule = %id, error = %e, "orphan capsule not destroyed"),
        }
    }
    tracing::info!(?report, "reconciled database with host");
    Ok(report)
}

/// One pass of the inactivity reaper: idle capsules are paused (or destroyed when their
/// timeout says kill).
pub async fn reap_once(st: &AppState) {
    let idle = match st.db.system_idle_capsules(wrenn_db::now()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "reaper: cannot list idle capsules");
            return;
        }
    };
    for c in idle {
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
        if let Err(e) = result {
            tracing::warn!(capsule = %c.id, error = %e, "reaper action failed");
            if c.pause_on_timeout {
                // A capsule that cannot be paused is not left running forever.
                let _ = service::destroy(st, &Actor::System, None, &c).await;
            }
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
            reap_once(&st).await;
        }
    })
}

/// Graceful shutdown: pauses every running capsule and records it.
pub async fn pause_all_running(st: &AppState) {
    let rows = match st.db.system_live_capsules().await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "shutdown: cannot list capsules; pausing on the host only");
            for (id, e) in st.agent.pause_all().await {
                tracing::error!(capsule = %id, error = %e, "shutdown: pause failed");
            }
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
