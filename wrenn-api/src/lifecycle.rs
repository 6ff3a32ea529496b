//! Background work and the server's life: start-up reconciliation of the database with
//! what the host actually runs, the inactivity reaper, bootstrap, and graceful shutdown
//! (running capsules are paused, so nothing is lost across restarts).

use crate::agent::{HostAgent, HostErrorKind, PauseMode};
use crate::hosts::HostConn;
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
    /// Team snapshot templates on the host that no row names, older than
    /// [`ORPHAN_TEMPLATE_AGE`] (a snapshot interrupted between its files and its row):
    /// removed.
    pub orphan_templates_removed: usize,
}

/// How old a team snapshot template no row names must be before a reconciliation
/// removes it: a younger one may be a snapshot whose row a control plane is about to
/// write.
pub const ORPHAN_TEMPLATE_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Makes the database and every host agree at start-up: every live row gets its host's
/// status (or `stopped` when the host has no such capsule); running capsules no live
/// row owns are destroyed, paused ones are quarantined (kept, reported, unreachable
/// through the API). With one host, a host that cannot answer is an error; with
/// several, it is reconciled when it answers (its rows are left as they are).
pub async fn reconcile(st: &AppState) -> Result<ReconcileReport, String> {
    let hosts = st.hosts.all();
    let mut total = ReconcileReport::default();
    for host in &hosts {
        match reconcile_with(st, host, Reconcile::Startup).await {
            Ok(r) => {
                total.updated += r.updated;
                total.lost += r.lost;
                total.orphans_destroyed += r.orphans_destroyed;
                total.quarantined.extend(r.quarantined);
                total.orphan_templates_removed += r.orphan_templates_removed;
            }
            Err(e) if hosts.len() > 1 => {
                tracing::warn!(host = %host.id, error = %e,
                    "host not reconciled at start-up; it will be when it answers");
                host.forget_instance();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(total)
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
    agent: &dyn HostAgent,
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
            match agent.get(&id).await {
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

/// Reconciles the rows of one host's capsules with what that host has.
pub async fn reconcile_with(
    st: &AppState,
    conn: &HostConn,
    mode: Reconcile,
) -> Result<ReconcileReport, String> {
    let agent = conn.agent.as_ref();
    let mut host = agent.list().await.map_err(|e| e.message)?;
    if mode == Reconcile::Startup {
        // A host agent that outlived the control plane finishes what it was doing.
        host = settled(agent, host).await;
    }
    let mut on_host: HashMap<String, CapsuleStatus> =
        host.iter().map(|c| (c.id.to_string(), c.status)).collect();
    let rows = st
        .db
        .system_live_capsules()
        .await
        .map_err(|e| wrenn_core::manager::error_chain(&e))?;
    let mut report = ReconcileReport::default();
    for row in rows.into_iter().filter(|r| r.host_id == conn.id) {
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
        match agent.destroy(&cid).await {
            Ok(()) => report.orphans_destroyed += 1,
            Err(e) if e.kind == HostErrorKind::NotFound => {}
            Err(e) => tracing::error!(capsule = %id, error = %e, "orphan capsule not destroyed"),
        }
    }
    report.orphan_templates_removed = remove_orphan_templates(st, conn).await;
    tracing::info!(host = %conn.id, ?report, "reconciled database with host");
    Ok(report)
}

/// Removes the host's team snapshot templates that no template row names and that are
/// older than [`ORPHAN_TEMPLATE_AGE`]; how many.
async fn remove_orphan_templates(st: &AppState, conn: &HostConn) -> usize {
    let agent = conn.agent.as_ref();
    let (Ok(on_host), Ok(rows)) = (agent.templates().await, st.db.admin_templates().await) else {
        return 0;
    };
    let named: std::collections::HashSet<&str> = rows
        .iter()
        .filter_map(|t| t.metadata.get(crate::service::HOST_TEMPLATE_KEY)?.as_str())
        .collect();
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for t in on_host {
        if !crate::service::is_team_snapshot_name(&t.name) || named.contains(t.name.as_str()) {
            continue;
        }
        let old = t
            .created_at
            .and_then(|c| now.duration_since(c).ok())
            .is_some_and(|age| age >= ORPHAN_TEMPLATE_AGE);
        if !old {
            continue;
        }
        tracing::warn!(host = %conn.id, template = %t.name,
            "snapshot template no row names (its snapshot was interrupted before the row was written): removing it");
        match agent.delete_template(&t.name).await {
            Ok(()) => removed += 1,
            Err(e) => tracing::error!(host = %conn.id, template = %t.name, error = %e,
                "orphan snapshot template not removed"),
        }
    }
    removed
}

/// Runs `check` on every host at once, so a slow or dead agent delays no other host's
/// checks (the checks bound their own calls to the agent).
async fn each_host<F, Fut>(st: &AppState, check: F)
where
    F: Fn(Arc<HostConn>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures_util::future::join_all(st.hosts.all().into_iter().map(check)).await;
}

/// `call` to a host's agent, bounded by the host monitor's timeout.
async fn asked<T>(
    st: &AppState,
    call: impl std::future::Future<Output = Result<T, crate::agent::HostError>>,
) -> Result<T, crate::agent::HostError> {
    let limit = st
        .hosts
        .config
        .timeout
        .max(std::time::Duration::from_secs(1));
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(crate::agent::HostError::new(
            HostErrorKind::Timeout,
            "the host agent did not answer in time",
        ))
    })
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

/// Capsules that failed on their host by themselves (their VMM died): rows the database
/// still holds as live become `error`, so the API stops offering them as running.
pub async fn follow_host_failures(st: &AppState) {
    each_host(st, |h| async move {
        follow_failures(st, &h).await;
    })
    .await;
}

/// [`follow_host_failures`] for one host; returns how many rows changed.
pub async fn follow_failures(st: &AppState, conn: &HostConn) -> usize {
    let failed: std::collections::HashSet<String> = match asked(st, conn.agent.list()).await {
        Ok(host) => host
            .iter()
            .filter(|c| c.status == CapsuleStatus::Error)
            .map(|c| c.id.to_string())
            .collect(),
        Err(e) => {
            tracing::warn!(host = %conn.id, error = %e, "cannot list the host's capsules");
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
    for row in rows.into_iter().filter(|r| r.host_id == conn.id) {
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

/// Reconciles with each host whose agent restarted (its instance changed): the
/// capsules it was running when it died are gone, its paused ones are still there.
pub async fn follow_host_restarts(st: &AppState) {
    each_host(st, |h| async move {
        follow_restart(st, &h).await;
    })
    .await;
}

/// [`follow_host_restarts`] for one host; returns whether it reconciled.
pub async fn follow_restart(st: &AppState, conn: &HostConn) -> bool {
    let Ok(v) = asked(st, conn.agent.versions()).await else {
        // Unreachable: nothing to compare until it answers again.
        return false;
    };
    if !conn.instance_changed(&v.instance) {
        return false;
    }
    tracing::warn!(host = %conn.id, instance = %v.instance, "the host agent restarted; reconciling with it");
    match reconcile_with(st, conn, Reconcile::HostRestarted).await {
        Ok(report) => {
            tracing::info!(?report, "reconciled with the restarted host agent");
            true
        }
        Err(e) => {
            // Tried again on the next tick.
            conn.forget_instance();
            tracing::warn!(error = %e, "reconciling with the restarted host agent failed");
            false
        }
    }
}

/// Records a host that answered as online in the `hosts` table, with its address and
/// the size its last report gave.
pub async fn record_online(db: &wrenn_db::Db, conn: &HostConn) -> Result<(), wrenn_db::DbError> {
    let specs = conn.info().map(|i| wrenn_db::HostSpecs {
        arch: i.arch,
        cpu_cores: i.cpu_cores,
        memory_mb: i.memory_mb,
        disk_gb: i.disk_mb / 1024,
    });
    db.system_host_online(&conn.id, conn.address.as_deref(), specs.as_ref())
        .await
        .map(drop)
}

/// How often a host that keeps answering has its heartbeat written to the `hosts`
/// table (a change of status is written at once).
pub const HEARTBEAT_RECORD_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// One round of the host monitor: takes the `hosts` table's word on each host
/// (draining, team-owned), asks every host for its report at once, records those that
/// answered as online and marks those silent past the timeout `unreachable` (they take
/// no new capsules; their capsules keep their rows and are reconciled when the host
/// answers again). Agents that never answered are asked again.
pub async fn monitor_once(st: &AppState) {
    match st.db.system_hosts().await {
        Ok(rows) => {
            crate::cluster::discover(st, &rows).await;
            for h in rows {
                st.hosts
                    .set_policy(&h.id, h.status == wrenn_db::HostStatus::Draining, h.team_id);
            }
        }
        Err(e) => tracing::warn!(error = %e, "host monitor: cannot read the hosts table"),
    }
    for conn in st.hosts.resolve().await {
        if let Err(e) = record_online(&st.db, &conn).await {
            tracing::warn!(host = %conn.id, error = %e, "host not recorded");
        }
    }
    futures_util::future::join_all(st.hosts.all().into_iter().map(|conn| async move {
        let was_unreachable = conn.unreachable();
        if st.hosts.probe(&conn).await {
            host_event(st, &conn, true);
            if was_unreachable || conn.record_due(HEARTBEAT_RECORD_PERIOD) {
                if let Err(e) = record_online(&st.db, &conn).await {
                    tracing::warn!(host = %conn.id, error = %e, "host heartbeat not recorded");
                }
            }
            if was_unreachable {
                tracing::info!(host = %conn.id, "host answers again; it takes new capsules");
            }
        } else if st.hosts.silent(&conn) {
            tracing::warn!(host = %conn.id, silent_s = st.hosts.config.timeout.as_secs_f64(),
                "host silent: unreachable, it takes no new capsules until it answers");
            host_event(st, &conn, false);
            if let Err(e) = st.db.system_host_unreachable(&conn.id).await {
                tracing::warn!(host = %conn.id, error = %e, "host status not recorded");
            }
        }
    }))
    .await;
}

/// Tells the team that owns `conn`'s host that it is up (it answered) or down (silent
/// past the timeout), when that changes what the team was last told. Shared hosts are
/// the platform's business, not a team's: nothing is published for them.
fn host_event(st: &AppState, conn: &crate::hosts::HostConn, up: bool) {
    let Some(team) = conn.team() else { return };
    if conn.announce(up) {
        let event = if up { "host.up" } else { "host.down" };
        st.events.host_changed(&team, &conn.id.0, event);
    }
}

/// Runs the host monitor until the task is aborted.
pub fn spawn_monitor(st: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(st.hosts.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            monitor_once(&st).await;
        }
    })
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
    // Only this process's hosts: an agent pauses its own capsules when it stops, and
    // keeps them running while a control plane restarts.
    let here: std::collections::BTreeSet<_> = st
        .hosts
        .all()
        .into_iter()
        .filter(|h| h.address.is_none())
        .map(|h| h.id.clone())
        .collect();
    let running: Vec<_> = rows
        .into_iter()
        .filter(|c| c.status == CapsuleStatus::Running && here.contains(&c.host_id))
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
