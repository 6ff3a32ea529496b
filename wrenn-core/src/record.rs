//! What is persisted about a capsule (`capsules/<id>/state.json`), so a restarted
//! process can adopt or clean up everything it finds.

use crate::error::CapsuleError;
use crate::id::CapsuleId;
use crate::net::NetSlot;
use crate::spec::CapsuleSpec;
use crate::status::CapsuleStatus;
use crate::storage::CowDisk;
use crate::vmm::Accel;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::PathBuf;

/// The process that owns a capsule (pid plus its start time, which survives pid reuse).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub start_time: u64,
}

/// Persisted facts about one capsule. Plain data: no handles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleRecord {
    pub id: CapsuleId,
    pub status: CapsuleStatus,
    pub spec: CapsuleSpec,
    pub accel: Accel,
    pub owner: Owner,
    /// Unix seconds.
    pub created_at: i64,
    pub vmm_pid: Option<u32>,
    pub slot: Option<NetSlot>,
    pub disk: Option<CowDisk>,
    /// envd access token (never shown outside the owner).
    pub access_token: String,
    /// Why the capsule failed, when it did.
    pub error: Option<String>,
    /// What the running VM's memory is layered over.
    #[serde(default)]
    pub memory_base: crate::vmm::MemoryBase,
    /// Kernel and command line the guest booted with (restores reuse them).
    #[serde(default)]
    pub kernel: std::path::PathBuf,
    #[serde(default)]
    pub cmdline: String,
    /// A warm-pool entry: restored ahead of time, not yet anyone's capsule.
    #[serde(default)]
    pub pooled: bool,
}

impl CapsuleRecord {
    /// The one way a capsule's status changes: only to a status its lifecycle
    /// allows from the current one ([`CapsuleStatus::can_become`]); otherwise
    /// nothing changes and the error names both.
    pub fn transition(&mut self, to: CapsuleStatus) -> Result<(), CapsuleError> {
        self.status = self
            .status
            .transition(to)
            .map_err(|source| CapsuleError::Transition {
                id: self.id.clone(),
                source,
            })?;
        Ok(())
    }

    /// Restates the record of a capsule whose process died, as its last committed
    /// snapshot has it: paused, holding no VMM, slot or writable disk. Not a
    /// lifecycle step (nothing ran the capsule there): the record was out of date.
    pub fn restate_paused(&mut self) {
        self.status = CapsuleStatus::Paused;
        self.slot = None;
        self.disk = None;
        self.vmm_pid = None;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Capsule state store failed: {context}")]
pub struct StateError {
    pub context: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Where capsule records and per-capsule directories live, and facts about host
/// processes that the sweep needs.
#[async_trait]
pub trait StateStore: Send + Sync + Debug {
    /// Creates and returns the capsule's own directory.
    async fn create_dir(&self, id: &CapsuleId) -> Result<PathBuf, StateError>;
    /// Removes the capsule's directory and everything in it. Idempotent.
    async fn remove_dir(&self, id: &CapsuleId) -> Result<(), StateError>;
    /// A new empty directory inside the capsule's directory, for a snapshot or fork in progress.
    async fn scratch_dir(&self, id: &CapsuleId, what: &str) -> Result<PathBuf, StateError>;
    /// Removes a scratch directory. Idempotent.
    async fn remove_scratch(&self, dir: &std::path::Path);
    /// Writes the record atomically.
    async fn save(&self, record: &CapsuleRecord) -> Result<(), StateError>;
    /// Every record on disk (unreadable ones are reported by id with `None`).
    async fn list(&self) -> Result<Vec<(CapsuleId, Option<CapsuleRecord>)>, StateError>;
    /// This process, as an owner.
    fn current_owner(&self) -> Owner;
    /// Whether the owner process is still alive.
    fn owner_alive(&self, owner: &Owner) -> bool;
    /// Kills VMM processes tagged for capsules other than `keep` (orphans of a crash).
    /// Returns how many were killed.
    async fn kill_orphan_vmms(&self, keep: &[CapsuleId]) -> usize;
    /// Bytes free for capsule data on the host (`None`: unknown, nothing is checked).
    fn available_bytes(&self) -> Option<u64> {
        None
    }
    /// Bytes the file at `path` takes on disk (sparse holes excluded); 0 if missing.
    fn allocated_bytes(&self, path: &std::path::Path) -> u64 {
        let _ = path;
        0
    }
}
