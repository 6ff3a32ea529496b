//! The one task per capsule that owns its live resources, and the commands it serves.

use super::ops::{fork_state, pause, resume, set_network, snapshot, ForkState};
use super::*;

pub(super) enum Command {
    Destroy(oneshot::Sender<Result<(), CapsuleError>>),
    Pause(
        PauseMode,
        oneshot::Sender<Result<PauseReport, CapsuleError>>,
    ),
    Resume(ResumeMode, oneshot::Sender<Result<(), CapsuleError>>),
    Snapshot {
        name: TemplateName,
        overwrite: bool,
        /// The disk only (flattened), no memory: the template cold-boots.
        disk_only: bool,
        reply: oneshot::Sender<Result<(), CapsuleError>>,
    },
    Fork(oneshot::Sender<Result<ForkState, CapsuleError>>),
    SetNetwork(
        crate::egress::EgressPolicy,
        oneshot::Sender<Result<(), CapsuleError>>,
    ),
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) record: Mutex<CapsuleRecord>,
    pub(super) agent: Mutex<Option<Arc<dyn GuestAgent>>>,
    pub(super) tx: mpsc::Sender<Command>,
}

impl Entry {
    pub(super) fn snapshot(&self) -> Option<CapsuleRecord> {
        self.record.lock().ok().map(|r| r.clone())
    }

    pub(super) fn agent(&self) -> Option<Arc<dyn GuestAgent>> {
        self.agent.lock().ok().and_then(|a| a.clone())
    }

    pub(super) fn set_agent(&self, agent: Option<Arc<dyn GuestAgent>>) {
        if let Ok(mut a) = self.agent.lock() {
            *a = agent;
        }
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut CapsuleRecord)) -> Option<CapsuleRecord> {
        let mut r = self.record.lock().ok()?;
        f(&mut r);
        Some(r.clone())
    }
}

/// Moves the capsule to `to` (recording `error` with it), or refuses an illegal
/// step and changes nothing. Returns the updated record.
pub(super) fn transition(
    entry: &Entry,
    to: CapsuleStatus,
    error: Option<String>,
) -> Result<CapsuleRecord, CapsuleError> {
    let mut r = entry
        .record
        .lock()
        .map_err(|_| CapsuleError::ShuttingDown)?;
    r.transition(to)?;
    if error.is_some() {
        r.error = error;
    }
    Ok(r.clone())
}

/// [`transition`] on paths that have no caller to tell (teardown, a VMM's
/// death): an illegal step is logged.
fn transition_or_log(
    entry: &Entry,
    to: CapsuleStatus,
    error: Option<String>,
) -> Option<CapsuleRecord> {
    match transition(entry, to, error) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "status unchanged");
            None
        }
    }
}

pub(super) async fn save_record(ctx: &Ctx, rec: Option<CapsuleRecord>) {
    if let Some(rec) = rec {
        if let Err(e) = ctx.parts.state.save(&rec).await {
            tracing::warn!(capsule = %rec.id, error = %error_chain(&e), "saving capsule record");
        }
    }
}

/// The one task that owns a capsule's live resources.
pub(super) async fn run(
    ctx: Ctx,
    entry: Arc<Entry>,
    mut res: Resources,
    mut rx: mpsc::Receiver<Command>,
) {
    loop {
        let cmd = match res.vmm.as_ref() {
            None => rx.recv().await,
            Some(vmm) => tokio::select! {
                cmd = rx.recv() => cmd,
                detail = vmm.wait_exit() => {
                    vmm_died(&ctx, &entry, &mut res, detail).await;
                    continue;
                }
            },
        };
        match cmd {
            None => {
                // The manager is gone: running VMs go with it; paused snapshots stay.
                for err in res.release(&ctx.parts).await {
                    tracing::warn!(%err, "teardown on manager drop");
                }
                return;
            }
            Some(Command::Destroy(reply)) => {
                transition_or_log(&entry, CapsuleStatus::Stopping, None);
                let mut errors = res.release(&ctx.parts).await;
                if let Some(id) = entry.snapshot().map(|r| r.id) {
                    if let Err(e) = ctx.parts.snapshots.remove(&id).await {
                        errors.push(format!("removing snapshot: {}", error_chain(&e)));
                    }
                }
                entry.set_agent(None);
                let result = if errors.is_empty() {
                    transition_or_log(&entry, CapsuleStatus::Stopped, None);
                    Ok(())
                } else {
                    let msg = errors.join("; ");
                    save_record(
                        &ctx,
                        transition_or_log(&entry, CapsuleStatus::Error, Some(msg.clone())),
                    )
                    .await;
                    Err(CapsuleError::Vmm(crate::vmm::VmmError::Backend(msg.into())))
                };
                let _ = reply.send(result);
                return;
            }
            Some(Command::Pause(mode, reply)) => {
                let r = pause(&ctx, &entry, &mut res, mode).await;
                let _ = reply.send(r);
            }
            Some(Command::Resume(mode, reply)) => {
                let r = resume(&ctx, &entry, &mut res, mode).await;
                let _ = reply.send(r);
            }
            Some(Command::Snapshot {
                name,
                overwrite,
                disk_only,
                reply,
            }) => {
                let r = snapshot(&ctx, &entry, &res, &name, overwrite, disk_only).await;
                let _ = reply.send(r);
            }
            Some(Command::Fork(reply)) => {
                let r = fork_state(&ctx, &entry, &res).await;
                let _ = reply.send(r);
            }
            Some(Command::SetNetwork(policy, reply)) => {
                let r = set_network(&ctx, &entry, &res, policy).await;
                let _ = reply.send(r);
            }
        }
    }
}

pub(super) async fn vmm_died(ctx: &Ctx, entry: &Entry, res: &mut Resources, detail: String) {
    let id = entry
        .snapshot()
        .map(|r| r.id.to_string())
        .unwrap_or_default();
    tracing::warn!(capsule = %id, %detail, "VMM exited unexpectedly; releasing the capsule's resources");
    res.vmm = None; // already gone; nothing to stop
    let errors = res.release(&ctx.parts).await;
    let mut msg = format!("VMM exited unexpectedly: {detail}");
    if !errors.is_empty() {
        msg.push_str(&format!(" (cleanup: {})", errors.join("; ")));
    }
    entry.set_agent(None);
    transition_or_log(entry, CapsuleStatus::Error, Some(msg));
    let rec = entry.update(|r| {
        r.slot = None;
        r.disk = None;
        r.vmm_pid = None;
    });
    save_record(ctx, rec).await;
}

/// Paused: nothing of the capsule runs, its state is its snapshot.
pub(super) fn mark_paused(entry: &Entry) -> Result<CapsuleRecord, CapsuleError> {
    transition(entry, CapsuleStatus::Paused, None)?;
    entry
        .update(|r| {
            r.slot = None;
            r.disk = None;
            r.vmm_pid = None;
        })
        .ok_or(CapsuleError::ShuttingDown)
}
