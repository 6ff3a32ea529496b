//! Lifecycle operations run by a capsule's actor: pause, resume, snapshot,
//! fork, egress changes.

use super::actor::{mark_paused, save_record, transition};
use super::*;

/// What a fork hands from the source capsule to each child.
pub(super) struct ForkState {
    pub(super) meta: SnapshotMeta,
    pub(super) device_state: PathBuf,
    pub(super) changed: Arc<ChangedPages>,
    /// The source's disk at the fork point (read-only, in the scratch dir).
    pub(super) disk: PathBuf,
    pub(super) scratch: PathBuf,
}

impl PageOverlay for ChangedPages {
    fn for_each(&self, f: &mut crate::vmm::PageVisitor<'_>) -> std::io::Result<()> {
        for (page, data) in self.iter() {
            f(page, Some(data))?;
        }
        Ok(())
    }
}

/// Stops the VM and saves its device state (into `dir`) and changed pages.
pub(super) async fn freeze(vmm: &dyn VmmHandle, dir: &Path) -> Result<SavedState, CapsuleError> {
    vmm.pause().await?;
    match vmm.save(dir).await {
        Ok(c) => Ok(c),
        Err(e) => {
            let _ = vmm.resume().await;
            Err(e.into())
        }
    }
}

/// Most output (stdout and stderr together) [`Capsules::run`] collects; a command
/// printing more is stopped and the run fails with [`CapsuleError::OutputTooLarge`].
pub const MAX_COLLECTED_OUTPUT: usize = 64 * 1024 * 1024;

/// Runs a command through `agent` to completion, optionally feeding `stdin` first, and
/// collects its output.
pub(super) async fn run_to_exit(
    agent: &dyn GuestAgent,
    req: &ExecRequest,
    stdin: Option<Bytes>,
) -> Result<ExecOutput, CapsuleError> {
    let mut req = req.clone();
    req.stdin = stdin.is_some();
    let mut stream = agent.exec(&req).await?;
    if let Some(data) = stdin {
        if !data.is_empty() {
            agent.send_stdin(stream.pid, data).await?;
        }
        agent.close_stdin(stream.pid).await?;
    }
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(ev) = stream.events.recv().await {
        match ev? {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) | ExecEvent::Stderr(b)
                if stdout.len() + stderr.len() + b.len() > MAX_COLLECTED_OUTPUT =>
            {
                // The guest decides how much it prints: collect no more than the cap.
                let _ = agent.signal(stream.pid, true).await;
                return Err(CapsuleError::OutputTooLarge {
                    limit: MAX_COLLECTED_OUTPUT,
                });
            }
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
            ExecEvent::Exited(exit) => {
                // The stream may still end with an error (e.g. the command's deadline ran out).
                while let Some(trailer) = stream.events.recv().await {
                    trailer?;
                }
                return Ok(ExecOutput {
                    pid: stream.pid,
                    stdout,
                    stderr,
                    exit,
                });
            }
        }
    }
    Err(CapsuleError::Agent(crate::guest::AgentError::Protocol(
        "command ended without an exit event".into(),
    )))
}

/// Flushes the guest's filesystems to its disk (before a pause), within `limit`.
pub(super) async fn guest_sync(entry: &Entry, limit: Duration) -> Result<(), CapsuleError> {
    match tokio::time::timeout(limit, guest_sync_inner(entry, limit)).await {
        Ok(r) => r,
        Err(_) => Err(CapsuleError::Agent(crate::guest::AgentError::Timeout(
            format!("sync in the guest took over {} s", limit.as_secs()),
        ))),
    }
}

pub(super) async fn guest_sync_inner(entry: &Entry, limit: Duration) -> Result<(), CapsuleError> {
    let agent = entry.agent().ok_or(CapsuleError::ShuttingDown)?;
    let req = ExecRequest {
        cmd: "/bin/sync".into(),
        user: Some("root".into()),
        timeout: Some(limit),
        ..Default::default()
    };
    let out = run_to_exit(agent.as_ref(), &req, None).await?;
    if out.exit.code != 0 {
        return Err(CapsuleError::Agent(crate::guest::AgentError::Protocol(
            format!("sync in the guest failed: {:?}", out.exit),
        )));
    }
    Ok(())
}

pub(super) async fn pause(
    ctx: &Ctx,
    entry: &Entry,
    res: &mut Resources,
    mode: PauseMode,
) -> Result<PauseReport, CapsuleError> {
    let rec = entry.snapshot().ok_or(CapsuleError::ShuttingDown)?;
    let (Some(vmm), Some(disk)) = (res.vmm.as_ref(), res.disk.clone()) else {
        return Err(invalid(&rec, "pause", "running"));
    };
    if rec.status != CapsuleStatus::Running {
        return Err(invalid(&rec, "pause", "running"));
    }
    transition(entry, CapsuleStatus::Pausing, None)?;
    let started = tokio::time::Instant::now();
    let attempt = async {
        if mode == PauseMode::DiskOnly {
            guest_sync(entry, Duration::from_secs(60)).await?;
            // QMP stop drains and flushes the VMM's block layer too.
            vmm.pause().await?;
            let mut meta = ctx.meta(&rec);
            meta.disk_only = true;
            return match ctx
                .parts
                .snapshots
                .commit_disk_only(&rec.id, &meta, Some(&disk))
                .await
            {
                Ok(report) => Ok(report),
                Err(e) => {
                    let _ = vmm.resume().await;
                    Err(CapsuleError::from(e))
                }
            };
        }
        // The disk layer of every version is consistent on its own, so a later resume
        // can also boot from it (ResumeMode::Reboot); the memory has the rest anyway.
        if let Err(e) = guest_sync(entry, Duration::from_secs(10)).await {
            tracing::warn!(capsule = %rec.id, error = %error_chain(&e), "guest sync before pause failed");
        }
        let dir = ctx.parts.snapshots.begin_pause(&rec.id).await?;
        let saved = freeze(vmm.as_ref(), &dir).await?;
        match ctx
            .parts
            .snapshots
            .commit_pause(&rec.id, &ctx.meta(&rec), &saved, &disk)
            .await
        {
            Ok(report) => Ok(report),
            Err(e) => {
                let _ = vmm.resume().await;
                Err(CapsuleError::from(e))
            }
        }
    }
    .await;
    let report = match attempt {
        Ok(r) => r,
        Err(e) => {
            // Nothing was committed and the VM runs again (each step above resumes it).
            transition(entry, CapsuleStatus::Running, None)?;
            return Err(e);
        }
    };
    // Committed: the VM, its slot and its disk file (a copy lives in the snapshot) go.
    entry.set_agent(None);
    for err in res.release(&ctx.parts).await {
        tracing::warn!(capsule = %rec.id, %err, "releasing after pause");
    }
    save_record(ctx, mark_paused(entry).ok()).await;
    tracing::info!(capsule = %entry.snapshot().map(|r| r.id.to_string()).unwrap_or_default(),
        ms = started.elapsed().as_millis() as u64, bytes = report.memory_bytes_written,
        generations = report.generations, "capsule paused");
    Ok(report)
}

pub(super) async fn resume(
    ctx: &Ctx,
    entry: &Entry,
    res: &mut Resources,
    mode: ResumeMode,
) -> Result<(), CapsuleError> {
    let rec = entry.snapshot().ok_or(CapsuleError::ShuttingDown)?;
    if rec.status != CapsuleStatus::Paused {
        return Err(invalid(&rec, "resume", "paused"));
    }
    let mut r = ctx.parts.snapshots.open(&rec.id).await?;
    if mode == ResumeMode::Reboot && !r.meta.disk_only {
        // The saved memory goes: the snapshot keeps its disk only, so the next pause
        // starts a new memory chain for the freshly booted guest.
        let mut meta = r.meta.clone();
        meta.disk_only = true;
        ctx.parts
            .snapshots
            .commit_disk_only(&rec.id, &meta, None)
            .await?;
        r = ctx.parts.snapshots.open(&rec.id).await?;
    }
    if !r.meta.disk_only && r.meta.accel != ctx.parts.vmm.accel() {
        return Err(SnapshotError::AccelMismatch {
            saved: r.meta.accel,
            current: ctx.parts.vmm.accel(),
        }
        .into());
    }
    let mut rec = transition(entry, CapsuleStatus::Resuming, None)?;
    let start = if r.meta.disk_only {
        Start::Reboot {
            kernel: r.meta.kernel.clone(),
            cmdline: r.meta.cmdline.clone(),
            disk_base: r.disk_base.clone(),
        }
    } else {
        Start::Restore {
            kernel: r.meta.kernel.clone(),
            cmdline: r.meta.cmdline.clone(),
            memory: r.meta.memory_base.clone(),
            device_state: r.device_state.clone(),
            overlay: r.overlay.clone(),
            disk_base: r.disk_base.clone(),
            old_token: rec.access_token.clone(),
        }
    };
    let started = tokio::time::Instant::now();
    let up = async {
        let dir = ctx.parts.state.create_dir(&rec.id).await?;
        let agent = ctx.bring_up(&mut rec, res, start, &dir).await?;
        rec.transition(CapsuleStatus::Running)?;
        Ok::<_, CapsuleError>(agent)
    };
    match up.await {
        Ok(agent) => {
            entry.update(|r| *r = rec.clone());
            entry.set_agent(Some(agent));
            save_record(ctx, Some(rec.clone())).await;
            tracing::info!(capsule = %rec.id, ms = started.elapsed().as_millis() as u64, "capsule resumed");
            Ok(())
        }
        Err(e) => {
            for err in res.release(&ctx.parts).await {
                tracing::warn!(capsule = %rec.id, %err, "cleanup after failed resume");
            }
            save_record(ctx, mark_paused(entry).ok()).await;
            Err(e)
        }
    }
}

/// Replaces a capsule's egress policy: in its slot at once when it runs, and in
/// its record (a paused capsule gets it on resume).
pub(super) async fn set_network(
    ctx: &Ctx,
    entry: &Entry,
    res: &Resources,
    policy: crate::egress::EgressPolicy,
) -> Result<(), CapsuleError> {
    let rec = entry.snapshot().ok_or(CapsuleError::ShuttingDown)?;
    if !matches!(rec.status, CapsuleStatus::Running | CapsuleStatus::Paused) {
        return Err(invalid(&rec, "set_network", "running or paused"));
    }
    if let Some(slot) = res.slot.as_ref() {
        ctx.parts.net.set_egress(slot, &policy).await?;
    }
    save_record(ctx, entry.update(|r| r.spec.network = policy.clone())).await;
    tracing::info!(capsule = %rec.id, open = policy.is_open(), "egress policy changed");
    Ok(())
}

/// Scratch directory for a snapshot or fork, inside the capsule's directory.
pub(super) async fn scratch_dir(
    ctx: &Ctx,
    rec: &CapsuleRecord,
    what: &str,
) -> Result<PathBuf, CapsuleError> {
    Ok(ctx.parts.state.scratch_dir(&rec.id, what).await?)
}

pub(super) async fn snapshot(
    ctx: &Ctx,
    entry: &Entry,
    res: &Resources,
    name: &TemplateName,
    overwrite: bool,
    disk_only: bool,
) -> Result<(), CapsuleError> {
    let rec = entry.snapshot().ok_or(CapsuleError::ShuttingDown)?;
    let (Some(vmm), Some(disk), CapsuleStatus::Running) =
        (res.vmm.as_ref(), res.disk.as_ref(), rec.status)
    else {
        return Err(invalid(&rec, "snapshot", "running"));
    };
    if disk_only {
        // The guest's page cache on the disk, then the VM stopped while it is copied.
        guest_sync(entry, Duration::from_secs(60)).await?;
        vmm.pause().await?;
        let written = ctx
            .parts
            .snapshots
            .write_disk_template(name, disk, overwrite)
            .await;
        vmm.resume().await?;
        written?;
        tracing::info!(capsule = %rec.id, template = %name, "disk-only template written");
        return Ok(());
    }
    let scratch = scratch_dir(ctx, &rec, "snapshot").await?;
    let result = async {
        let saved = freeze(vmm.as_ref(), &scratch).await?;
        let written = ctx
            .parts
            .snapshots
            .write_template(name, &ctx.meta(&rec), &saved, disk, overwrite)
            .await;
        vmm.resume().await?;
        written.map_err(CapsuleError::from)
    }
    .await;
    ctx.parts.state.remove_scratch(&scratch).await;
    if result.is_ok() {
        tracing::info!(capsule = %rec.id, template = %name, "snapshot template written");
    }
    result
}

pub(super) async fn fork_state(
    ctx: &Ctx,
    entry: &Entry,
    res: &Resources,
) -> Result<ForkState, CapsuleError> {
    let rec = entry.snapshot().ok_or(CapsuleError::ShuttingDown)?;
    let (Some(vmm), Some(disk), CapsuleStatus::Running) =
        (res.vmm.as_ref(), res.disk.as_ref(), rec.status)
    else {
        return Err(invalid(&rec, "fork", "running"));
    };
    let scratch = scratch_dir(ctx, &rec, "fork").await?;
    let result = async {
        let saved = freeze(vmm.as_ref(), &scratch).await?;
        // The disk at this instant: a standalone (raw) copy of the writable layer.
        let frozen = scratch.join("disk-at-fork.raw");
        let copied = ctx.parts.disks.flatten(disk, &frozen).await;
        vmm.resume().await?;
        copied?;
        Ok(ForkState {
            meta: ctx.meta(&rec),
            device_state: saved.device_state,
            changed: saved.changed,
            disk: frozen,
            scratch: scratch.clone(),
        })
    }
    .await;
    if result.is_err() {
        ctx.parts.state.remove_scratch(&scratch).await;
    }
    result
}
