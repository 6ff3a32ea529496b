//! What a capsule holds while it runs, and the host disk space operations are promised.

use super::*;

/// Live resources of one capsule, released in reverse order of acquisition.
#[derive(Debug, Default)]
pub(super) struct Resources {
    pub(super) slot: Option<NetSlot>,
    pub(super) disk: Option<CowDisk>,
    pub(super) vmm: Option<Box<dyn VmmHandle>>,
}

impl Resources {
    /// Releases everything held; returns the failures (each resource is still attempted).
    pub(super) async fn release(&mut self, parts: &HostParts) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(vmm) = self.vmm.take() {
            if let Err(e) = vmm.shutdown().await {
                errors.push(format!("stopping VMM: {}", error_chain(&e)));
            }
            tracing::debug!("release: VMM stopped");
        }
        if let Some(slot) = self.slot.take() {
            if let Err(e) = parts.net.release(&slot).await {
                errors.push(format!(
                    "releasing network slot {}: {}",
                    slot.index,
                    error_chain(&e)
                ));
            }
        }
        if let Some(disk) = self.disk.take() {
            if let Err(e) = parts.disks.remove(&disk).await {
                errors.push(format!(
                    "removing disk {}: {}",
                    disk.path.display(),
                    error_chain(&e)
                ));
            }
        }
        errors
    }
}

/// Disk space promised to one operation in flight; released on drop.
#[derive(Debug)]
pub(super) struct SpaceClaim {
    pub(super) pending: Arc<Mutex<u64>>,
    pub(super) bytes: u64,
}

impl Drop for SpaceClaim {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            *p = p.saturating_sub(self.bytes);
        }
    }
}

impl Capsules {
    /// Room kept for a new writable disk of `disk_mb` MiB to grow into.
    pub(super) fn disk_growth(&self, disk_mb: u64) -> u64 {
        self.ctx.config.disk_overcommit.provisioned(disk_mb << 20)
    }

    /// What operations may still write to the data directory's disk, in bytes (`None`
    /// when its filesystem cannot say): free space less the reserve, what running
    /// capsules' disks may still grow by and what operations in flight were promised.
    pub fn disk_room(&self) -> Option<u64> {
        let room = self.unpromised_room()?;
        let pending = self.pending_disk.lock().map(|p| *p).unwrap_or(u64::MAX);
        Some(room.saturating_sub(pending))
    }

    /// Free space above the reserve before what operations in flight were promised:
    /// what running capsules' writable disks may still grow by (their size minus what
    /// they hold now, divided by the disk overcommit) counts as used.
    fn unpromised_room(&self) -> Option<u64> {
        let state = &self.ctx.parts.state;
        let avail = state.available_bytes()?;
        let entries: Vec<Arc<Entry>> = self
            .table
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        let growth: u64 = entries
            .iter()
            .filter_map(|e| e.snapshot())
            .filter(|r| r.status != CapsuleStatus::Paused)
            .map(|r| {
                let held = r
                    .disk
                    .as_ref()
                    .map(|d| state.allocated_bytes(&d.path))
                    .unwrap_or(0);
                (r.spec.disk_mb << 20).saturating_sub(held)
            })
            .map(|bytes| self.ctx.config.disk_overcommit.provisioned(bytes))
            .sum();
        let reserve = self.ctx.config.disk_reserve_mb << 20;
        Some(avail.saturating_sub(growth).saturating_sub(reserve))
    }

    /// Checks that `bytes` more can be written to the host's disk (an upload)
    /// without taking it below the reserve.
    pub fn check_space(&self, op: &'static str, bytes: u64) -> Result<(), CapsuleError> {
        self.reserve_space(op, bytes).map(drop)
    }

    /// Promises `need` bytes of the data directory's disk to operation `op`, or
    /// refuses it when that could take the host below the configured reserve:
    /// what running capsules' writable disks may still grow by (their size minus
    /// what they hold now, divided by the disk overcommit) and what other
    /// operations in flight were promised count as used.
    pub(super) fn reserve_space(
        &self,
        op: &'static str,
        need: u64,
    ) -> Result<SpaceClaim, CapsuleError> {
        let claim = |bytes| SpaceClaim {
            pending: self.pending_disk.clone(),
            bytes,
        };
        let Some(room) = self.unpromised_room() else {
            return Ok(claim(0));
        };
        let mut pending = self
            .pending_disk
            .lock()
            .map_err(|_| CapsuleError::ShuttingDown)?;
        let free = room.saturating_sub(*pending);
        if need > free {
            tracing::warn!(
                op,
                need_mb = need >> 20,
                free_mb = free >> 20,
                "refused: host disk space"
            );
            return Err(CapsuleError::InsufficientStorage {
                op,
                needed_mb: need.div_ceil(1 << 20),
                available_mb: free >> 20,
                reserve_mb: self.ctx.config.disk_reserve_mb,
            });
        }
        *pending += need;
        Ok(claim(need))
    }
}
