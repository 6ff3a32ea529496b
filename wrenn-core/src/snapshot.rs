//! Where paused capsules and snapshot templates live on disk.
//!
//! A paused capsule is a chain of memory generations over a memory base, its
//! device state, and its disk layers. Every pause writes a new version of the
//! snapshot next to the current one and switches to it in one atomic step, so a
//! crash at any moment leaves the previous version loadable.

use crate::id::CapsuleId;
use crate::spec::CapsuleSpec;
use crate::storage::CowDisk;
use crate::template::TemplateName;
use crate::vmm::{Accel, MemoryBase, PageOverlay, SavedState};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

/// Facts about a snapshot, persisted with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub spec: CapsuleSpec,
    /// Acceleration the VM ran under; a snapshot is only restored under the same.
    pub accel: Accel,
    /// Guest memory size in bytes.
    pub mem_bytes: u64,
    /// What the memory generations are layered over.
    pub memory_base: MemoryBase,
    /// The envd access token the guest holds.
    pub access_token: String,
    /// The kernel the guest runs (a restore must use the same one).
    pub kernel: PathBuf,
    /// Kernel command line the guest booted with.
    pub cmdline: String,
    /// Unix seconds.
    pub created_at: i64,
    /// This version keeps the disk only: a resume boots the guest afresh from it.
    #[serde(default)]
    pub disk_only: bool,
}

/// What a pause keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseMode {
    /// Memory, devices and disk: a resume continues where the guest was.
    #[default]
    Full,
    /// The disk only (after the guest synced it): a resume boots afresh from it.
    DiskOnly,
}

impl PauseMode {
    /// `Full` when the memory is kept, else `DiskOnly` (E2B's `memory` flag).
    pub fn keeping_memory(memory: bool) -> Self {
        if memory {
            PauseMode::Full
        } else {
            PauseMode::DiskOnly
        }
    }
}

/// How a paused capsule comes back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeMode {
    /// Restore the saved memory (boot from the disk when only the disk was kept).
    #[default]
    Restore,
    /// Boot afresh from the saved disk; the saved memory is dropped.
    Reboot,
}

impl ResumeMode {
    /// `Restore` when the memory is wanted, else `Reboot` (E2B's `memory` flag).
    pub fn keeping_memory(memory: bool) -> Self {
        if memory {
            ResumeMode::Restore
        } else {
            ResumeMode::Reboot
        }
    }
}

/// A saved VM state ready to be restored.
#[derive(Clone)]
pub struct Restorable {
    pub meta: SnapshotMeta,
    pub device_state: PathBuf,
    /// Pages to write over the memory base.
    pub overlay: Arc<dyn PageOverlay>,
    /// The disk layer the restored VM's writable disk goes on top of.
    pub disk_base: PathBuf,
}

impl Debug for Restorable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restorable")
            .field("meta", &self.meta)
            .field("device_state", &self.device_state)
            .field("disk_base", &self.disk_base)
            .finish()
    }
}

/// What a pause wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReport {
    /// Bytes of guest memory written (changed pages, zero pages elided).
    pub memory_bytes_written: u64,
    /// Pages the VM reported as changed (before dropping unchanged ones).
    pub pages_reported: u64,
    pub device_state_bytes: u64,
    pub generations: usize,
    pub merged: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("No snapshot for capsule {id}")]
    NotFound { id: String },
    #[error("A template named '{name}' already exists")]
    NameTaken { name: String },
    #[error("Snapshot is corrupt: {reason}")]
    Corrupt { reason: String },
    #[error("Snapshot was taken under {saved}; this host runs guests under {current}")]
    AccelMismatch { saved: Accel, current: Accel },
    #[error("Snapshot store failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Snapshot persistence.
#[async_trait]
pub trait SnapshotStore: Send + Sync + Debug {
    /// Directory (created empty) where a VM that will later be paused into `id`'s
    /// snapshot saves its device state, so that the commit moves rather than copies it.
    async fn begin_pause(&self, id: &CapsuleId) -> Result<PathBuf, SnapshotError>;

    /// Commits a pause: the VM's saved state (its device state file, best saved in
    /// the `begin_pause` directory, is taken over; its changed pages are kept, the
    /// ones equal to the snapshot's are dropped here) and its writable disk (moved
    /// into the snapshot, the caller no longer owns it). Generations are merged at
    /// the cap. Atomic: on error or crash the previous version stays.
    async fn commit_pause(
        &self,
        id: &CapsuleId,
        meta: &SnapshotMeta,
        saved: &SavedState,
        disk: &CowDisk,
    ) -> Result<PauseReport, SnapshotError>;

    /// Commits a version that keeps the disk only (`meta.disk_only`): `disk`, when
    /// given, joins the disk chain as in [`SnapshotStore::commit_pause`]; without it the
    /// current version's disk is kept and its memory dropped. The next full pause after
    /// a disk-only version starts a new memory chain. Atomic as `commit_pause`.
    async fn commit_disk_only(
        &self,
        id: &CapsuleId,
        meta: &SnapshotMeta,
        disk: Option<&CowDisk>,
    ) -> Result<PauseReport, SnapshotError>;

    /// Opens the current version of `id`'s snapshot for a restore (for a disk-only
    /// version: its disk; the device state is absent and the overlay empty).
    async fn open(&self, id: &CapsuleId) -> Result<Restorable, SnapshotError>;

    /// Deletes `id`'s snapshot (all versions). Idempotent.
    async fn remove(&self, id: &CapsuleId) -> Result<(), SnapshotError>;

    /// Ids with a snapshot on disk.
    async fn list(&self) -> Result<Vec<CapsuleId>, SnapshotError>;

    /// Writes a standalone snapshot template `name` (flattened memory image, device
    /// state, flattened disk) from a paused-for-a-moment VM. `overwrite` replaces
    /// an existing template.
    async fn write_template(
        &self,
        name: &TemplateName,
        meta: &SnapshotMeta,
        saved: &SavedState,
        disk: &CowDisk,
        overwrite: bool,
    ) -> Result<(), SnapshotError>;

    /// Saves `disk` (its full content, flattened and sparse) as template `name` with
    /// no memory snapshot: capsules cold-boot it. The VM must be stopped.
    async fn write_disk_template(
        &self,
        name: &TemplateName,
        disk: &CowDisk,
        overwrite: bool,
    ) -> Result<(), SnapshotError>;

    /// Opens template `name`'s snapshot, if it has one.
    async fn open_template(&self, name: &TemplateName)
        -> Result<Option<Restorable>, SnapshotError>;
}
