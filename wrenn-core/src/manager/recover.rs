//! Startup recovery and adoption of paused capsules left by dead processes.

use super::*;

impl Capsules {
    /// Startup sweep: removes what crashed processes left behind (VMMs, network
    /// slots, disks, records), adopts paused capsules (their snapshots survive),
    /// and leaves capsules of live processes alone.
    pub async fn recover(self: &Arc<Self>) -> Result<SweepReport, CapsuleError> {
        let parts = &self.ctx.parts;
        let mut report = SweepReport::default();
        let records = parts.state.list().await?;
        let with_snapshot = parts.snapshots.list().await?;
        let mut keep_ids = Vec::new();
        let mut keep_slots = Vec::new();
        let mut dead = Vec::new();
        let mut adopt = Vec::new();
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
            "startup sweep done"
        );
        Ok(report)
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
