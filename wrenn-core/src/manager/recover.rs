//! Startup recovery: takes over running capsules whose VMMs outlived their process,
//! adopts paused capsules left by dead processes, and removes the rest.

use super::*;

impl Capsules {
    /// Startup sweep: takes over running capsules whose VMM outlived its dead owner
    /// (a host agent killed and restarted: they keep running), removes what crashed
    /// processes left behind (VMMs, network slots, disks, records), adopts paused
    /// capsules (their snapshots survive), and leaves capsules of live processes alone.
    pub async fn recover(self: &Arc<Self>) -> Result<SweepReport, CapsuleError> {
        let parts = &self.ctx.parts;
        let mut report = SweepReport::default();
        let records = parts.state.list().await?;
        let with_snapshot = parts.snapshots.list().await?;
        let mut keep_ids = Vec::new();
        let mut keep_slots = Vec::new();
        let mut dead = Vec::new();
        let mut adopt = Vec::new();
        let mut take_over = Vec::new();
        for (id, rec) in records {
            match rec {
                Some(r) if parts.state.owner_alive(&r.owner) => {
                    if let Some(slot) = &r.slot {
                        parts.net.adopt(slot);
                        keep_slots.push(slot.index);
                    }
                    keep_ids.push(id);
                    report.kept += 1;
                }
                // The owner died but the capsule's VMM runs on (set to outlive it):
                // taken over below, with its slot and disk. (A warm-pool entry is
                // not: the pool it belonged to went with its owner.)
                Some(r)
                    if r.status == CapsuleStatus::Running
                        && !r.pooled
                        && r.slot.is_some()
                        && r.disk.is_some()
                        && r.vmm_pid.is_some_and(crate::process::runs) =>
                {
                    if let Some(slot) = &r.slot {
                        parts.net.adopt(slot);
                        keep_slots.push(slot.index);
                    }
                    keep_ids.push(id);
                    take_over.push(r);
                }
                // The owner died. A capsule with a committed snapshot is kept, as of
                // its last completed pause (a pause or resume cut short loses nothing
                // more than what happened since); the rest is removed.
                Some(r) if with_snapshot.contains(&r.id) => adopt.push(r),
                other => dead.push((id, other)),
            }
        }
        report.killed_vmms = parts.state.kill_orphan_vmms(&keep_ids).await;
        for (id, rec) in dead {
            if let Some(disk) = rec.as_ref().and_then(|r| r.disk.as_ref()) {
                if let Err(e) = parts.disks.remove(disk).await {
                    tracing::warn!(capsule = %id, error = %error_chain(&e), "removing leftover disk");
                }
            }
            parts.state.remove_dir(&id).await?;
            if let Err(e) = parts.snapshots.remove(&id).await {
                tracing::warn!(capsule = %id, error = %error_chain(&e), "removing leftover snapshot");
            }
            report.removed_capsules += 1;
        }
        for mut rec in adopt {
            if rec.status != CapsuleStatus::Paused || rec.disk.is_some() || rec.slot.is_some() {
                if let Some(disk) = rec.disk.take() {
                    // The writable disk of a VM that died after its last pause: not part of the snapshot.
                    if let Err(e) = parts.disks.remove(&disk).await {
                        tracing::warn!(capsule = %rec.id, error = %error_chain(&e), "removing leftover disk");
                    }
                }
                if rec.status != CapsuleStatus::Paused {
                    tracing::warn!(capsule = %rec.id, was = %rec.status,
                        "its process stopped while the capsule ran: kept as of its last pause \
                         (what changed since is lost)");
                }
                rec.restate_paused();
                parts.state.save(&rec).await?;
            }
            // Left on disk for whichever process operates on it next (see `adopt`).
            report.paused += 1;
        }
        let mut failed = Vec::new();
        for rec in take_over {
            match self.take_over(rec.clone()).await {
                Ok(()) => report.taken_over += 1,
                Err(e) => {
                    tracing::warn!(capsule = %rec.id, error = %error_chain(&e),
                        "cannot take over the capsule's running VMM: stopping it");
                    failed.push(rec);
                }
            }
        }
        if !failed.is_empty() {
            keep_ids.retain(|id| !failed.iter().any(|r| &r.id == id));
            report.killed_vmms += parts.state.kill_orphan_vmms(&keep_ids).await;
        }
        for mut rec in failed {
            if let Some(slot) = rec.slot.take() {
                keep_slots.retain(|i| *i != slot.index);
                if let Err(e) = parts.net.release(&slot).await {
                    tracing::warn!(capsule = %rec.id, error = %error_chain(&e), "releasing its slot");
                }
            }
            if let Some(disk) = rec.disk.take() {
                if let Err(e) = parts.disks.remove(&disk).await {
                    tracing::warn!(capsule = %rec.id, error = %error_chain(&e), "removing its disk");
                }
            }
            if with_snapshot.contains(&rec.id) {
                // As of its last pause, as when its VMM dies with its owner.
                rec.restate_paused();
                parts.state.save(&rec).await?;
                report.paused += 1;
            } else {
                parts.state.remove_dir(&rec.id).await?;
                report.removed_capsules += 1;
            }
        }
        report.removed_slots = parts.net.sweep(&keep_slots).await?;
        let known: Vec<CapsuleId> = parts
            .state
            .list()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for id in with_snapshot.iter().filter(|id| !known.contains(id)) {
            let _ = parts.snapshots.remove(id).await;
        }
        tracing::info!(
            kept = report.kept,
            paused = report.paused,
            removed_capsules = report.removed_capsules,
            killed_vmms = report.killed_vmms,
            removed_slots = report.removed_slots,
            taken_over = report.taken_over,
            "startup sweep done"
        );
        Ok(report)
    }

    /// Takes over running capsule `rec` whose VMM outlived its owner: the VMM, its
    /// guest agent (reachable again), its egress rules (the DNS filter restarted) and
    /// an actor of this process. On error nothing is started; the caller cleans up.
    async fn take_over(self: &Arc<Self>, mut rec: CapsuleRecord) -> Result<(), CapsuleError> {
        let parts = &self.ctx.parts;
        let (Some(pid), Some(slot), Some(disk)) = (rec.vmm_pid, rec.slot.clone(), rec.disk.clone())
        else {
            return Err(CapsuleError::NotFound {
                id: rec.id.to_string(),
            });
        };
        let dir = parts.state.create_dir(&rec.id).await?;
        let vm = super::bring_up::vm_spec(&rec, &dir, &slot, &disk);
        let handle = parts.vmm.attach(&vm, pid).await?;
        parts.net.set_egress(&slot, &rec.spec.network).await?;
        let addr = SocketAddr::new(slot.host_addr.into(), crate::ENVD_PORT);
        let agent = parts.guests.connect(addr, Some(rec.access_token.clone()));
        agent
            .wait_ready(self.ctx.config.restore_ready_timeout)
            .await?;
        rec.owner = parts.state.current_owner();
        parts.state.save(&rec).await?;
        tracing::info!(capsule = %rec.id, pid, "took over running capsule");
        let res = Resources {
            slot: Some(slot),
            disk: Some(disk),
            vmm: Some(handle),
        };
        self.start_actor(rec, res, Some(agent));
        Ok(())
    }

    /// Takes over a paused capsule found on disk whose owner process is gone.
    pub async fn adopt(&self, id: &CapsuleId) -> Result<CapsuleInfo, CapsuleError> {
        if let Ok(info) = self.get(id) {
            return Ok(info);
        }
        let parts = &self.ctx.parts;
        let not_found = || CapsuleError::NotFound { id: id.to_string() };
        let mut rec = parts
            .state
            .list()
            .await?
            .into_iter()
            .find(|(i, _)| i == id)
            .and_then(|(_, r)| r)
            .ok_or_else(not_found)?;
        if rec.status != CapsuleStatus::Paused || parts.state.owner_alive(&rec.owner) {
            return Err(not_found());
        }
        rec.owner = parts.state.current_owner();
        parts.state.save(&rec).await?;
        tracing::info!(capsule = %id, "adopted paused capsule");
        let info = CapsuleInfo::from(&rec);
        self.start_actor(rec, Resources::default(), None);
        Ok(info)
    }

    /// Adopts every paused capsule on disk whose owner process is gone.
    pub async fn adopt_all(&self) -> Result<Vec<CapsuleInfo>, CapsuleError> {
        let mut out = Vec::new();
        for (id, rec) in self.ctx.parts.state.list().await? {
            if rec.is_some_and(|r| {
                r.status == CapsuleStatus::Paused && !self.ctx.parts.state.owner_alive(&r.owner)
            }) {
                out.push(self.adopt(&id).await?);
            }
        }
        Ok(out)
    }
}
