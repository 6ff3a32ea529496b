//! Errors of the capsule manager: what callers branch on.

use crate::guest::AgentError;
use crate::id::CapsuleId;
use crate::net::NetError;
use crate::record::StateError;
use crate::spec::InvalidSpec;
use crate::status::CapsuleStatus;
use crate::storage::StorageError;
use crate::template::TemplateError;
use crate::vmm::VmmError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CapsuleError {
    #[error(transparent)]
    InvalidSpec(#[from] InvalidSpec),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("Capsule {id} not found")]
    NotFound { id: String },
    #[error("Capsule {id} is {status}; {op} needs it {needed}")]
    InvalidState {
        id: CapsuleId,
        status: CapsuleStatus,
        op: &'static str,
        needed: &'static str,
    },
    /// A status change the lifecycle does not allow (nothing was changed).
    #[error("Capsule {id}: {source}")]
    Transition {
        id: CapsuleId,
        #[source]
        source: crate::status::InvalidTransition,
    },
    #[error("Network setup failed")]
    Network(#[from] NetError),
    #[error("Disk setup failed")]
    Storage(#[from] StorageError),
    #[error("VMM failed")]
    Vmm(#[from] VmmError),
    #[error("Capsule {id}'s VMM exited during {phase}: {detail}")]
    VmmExited {
        id: CapsuleId,
        phase: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("Capsule manager is shutting down")]
    ShuttingDown,
    #[error("The command's output exceeds {limit} bytes; it was stopped (stream it instead)")]
    OutputTooLarge { limit: usize },
    #[error(
        "Not enough disk space on the host to {op}: needs {needed_mb} MiB more, \
         {available_mb} MiB free beyond what running capsules may still use and the \
         {reserve_mb} MiB reserve"
    )]
    InsufficientStorage {
        op: &'static str,
        needed_mb: u64,
        available_mb: u64,
        reserve_mb: u64,
    },
}

impl CapsuleError {
    /// A short, stable name of the error kind (for bindings and logs).
    pub fn kind(&self) -> &'static str {
        match self {
            CapsuleError::InvalidSpec(_) => "invalid_argument",
            CapsuleError::Template(TemplateError::Unknown { .. }) => "template_not_found",
            CapsuleError::Template(_) => "template_error",
            CapsuleError::NotFound { .. } => "not_found",
            CapsuleError::InvalidState { .. } | CapsuleError::Transition { .. } => "invalid_state",
            CapsuleError::Network(NetError::Permission { .. }) => "permission_denied",
            CapsuleError::Network(_) => "network_error",
            CapsuleError::Storage(_) => "storage_error",
            CapsuleError::Vmm(_) | CapsuleError::VmmExited { .. } => "vmm_error",
            CapsuleError::Agent(AgentError::NotFound(_)) => "guest_not_found",
            CapsuleError::Agent(AgentError::InvalidArgument(_)) => "invalid_argument",
            CapsuleError::Agent(AgentError::Timeout(_)) => "timeout",
            CapsuleError::Agent(_) => "guest_error",
            CapsuleError::State(_) => "state_error",
            CapsuleError::Snapshot(crate::snapshot::SnapshotError::NameTaken { .. }) => {
                "already_exists"
            }
            CapsuleError::Snapshot(crate::snapshot::SnapshotError::NotFound { .. }) => "not_found",
            CapsuleError::Snapshot(crate::snapshot::SnapshotError::Corrupt { .. }) => {
                "snapshot_corrupt"
            }
            CapsuleError::Snapshot(_) => "snapshot_error",
            CapsuleError::ShuttingDown => "shutting_down",
            CapsuleError::OutputTooLarge { .. } => "too_large",
            CapsuleError::InsufficientStorage { .. } => "insufficient_storage",
        }
    }
}
