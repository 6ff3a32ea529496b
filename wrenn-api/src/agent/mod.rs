//! The seam between the control plane and a host: everything the API needs from the
//! machine that runs capsules. [`LocalAgent`] implements it in process over the
//! capsule manager; a remote host agent (gRPC) implements the same trait.

mod local;

pub use local::{guest_error, LocalAgent, LocalAgentOptions};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
pub use wrenn_core::egress::EgressPolicy;
use wrenn_core::guest::GuestAgent;
use wrenn_core::id::CapsuleId;
pub use wrenn_core::snapshot::{PauseMode, ResumeMode};
use wrenn_core::status::CapsuleStatus;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostErrorKind {
    NotFound,
    InvalidArgument,
    /// The capsule is not in the state the operation needs.
    InvalidState,
    Conflict,
    /// The host cannot take the work (capacity, shutting down).
    Unavailable,
    /// The host's disk cannot take what the operation would write.
    InsufficientStorage,
    Timeout,
    /// The guest agent failed or answered an error.
    Guest,
    Internal,
}

/// A host operation's failure: a kind the API maps to a status, and a message that is
/// safe to show the caller.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct HostError {
    pub kind: HostErrorKind,
    pub message: String,
}

impl HostError {
    pub fn new(kind: HostErrorKind, message: impl Into<String>) -> Self {
        HostError {
            kind,
            message: message.into(),
        }
    }

    pub fn not_found(id: &CapsuleId) -> Self {
        Self::new(HostErrorKind::NotFound, format!("capsule {id} not found"))
    }
}

/// What to start: sizes are `None` for the host's defaults (snapshot templates impose
/// their own).
#[derive(Clone, Debug, Default)]
pub struct CapsuleSpec {
    /// The template's name on the host.
    pub template: String,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub envs: HashMap<String, String>,
    /// Labels kept with the capsule on the host (the owning team is one of them).
    pub labels: HashMap<String, String>,
    /// Boot the template's kernel even when it has a pre-booted snapshot (whose sizes
    /// differ from the requested ones).
    pub cold_boot: bool,
    /// Egress policy, in force before the guest runs.
    pub network: EgressPolicy,
}

/// A capsule as the host sees it.
#[derive(Clone, Debug)]
pub struct HostCapsule {
    pub id: CapsuleId,
    pub status: CapsuleStatus,
    pub template: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u64,
    pub labels: HashMap<String, String>,
}

/// A template the host can start capsules from.
#[derive(Clone, Debug)]
pub struct HostTemplate {
    pub name: String,
    /// Has a pre-booted memory snapshot.
    pub snapshot: bool,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub size_bytes: u64,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Versions of what runs capsules on this host (shown in capsule metadata).
#[derive(Clone, Debug, Default)]
pub struct HostVersions {
    pub envd_version: String,
    pub kernel_version: String,
    pub vmm_version: String,
    pub agent_version: String,
    /// `kvm` or `tcg`.
    pub accel: String,
}

/// One resource sample of a capsule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub timestamp_unix: i64,
    pub cpu_pct: f64,
    pub mem_bytes: u64,
    pub disk_bytes: u64,
}

#[async_trait]
pub trait HostAgent: Send + Sync + Debug {
    fn versions(&self) -> HostVersions;

    /// Creates a capsule; returns once its guest agent is ready.
    async fn create(&self, spec: CapsuleSpec) -> Result<HostCapsule, HostError>;

    async fn get(&self, id: &CapsuleId) -> Result<HostCapsule, HostError>;

    /// Every capsule the host runs or holds paused.
    async fn list(&self) -> Result<Vec<HostCapsule>, HostError>;

    /// Pauses a running capsule, keeping what `mode` says (memory and disk, or the
    /// disk only).
    async fn pause(&self, id: &CapsuleId, mode: PauseMode) -> Result<(), HostError>;

    /// Resumes a paused capsule: restores its memory, or boots afresh from its disk
    /// (`ResumeMode::Reboot`, or when only the disk was kept).
    async fn resume(&self, id: &CapsuleId, mode: ResumeMode) -> Result<HostCapsule, HostError>;

    async fn destroy(&self, id: &CapsuleId) -> Result<(), HostError>;

    /// Checks that `bytes` more (an upload) fit on the host's disk above its reserve.
    fn ensure_space(&self, bytes: u64) -> Result<(), HostError> {
        let _ = bytes;
        Ok(())
    }

    /// Replaces the egress policy of a running capsule (in force when this returns)
    /// or a paused one (in force when it resumes).
    async fn set_network(&self, id: &CapsuleId, policy: EgressPolicy) -> Result<(), HostError>;

    /// Forks a running capsule into `count` new ones.
    async fn fork(
        &self,
        id: &CapsuleId,
        count: usize,
        labels: HashMap<String, String>,
    ) -> Result<Vec<HostCapsule>, HostError>;

    /// Saves a running capsule as snapshot template `name`; the capsule keeps running.
    async fn snapshot(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError>;

    async fn templates(&self) -> Result<Vec<HostTemplate>, HostError>;

    async fn template(&self, name: &str) -> Result<HostTemplate, HostError>;

    async fn delete_template(&self, name: &str) -> Result<(), HostError>;

    /// A client of the capsule's guest agent (envd).
    fn guest(&self, id: &CapsuleId) -> Result<Arc<dyn GuestAgent>, HostError>;

    /// The capsule's envd access token.
    fn envd_token(&self, id: &CapsuleId) -> Result<String, HostError>;

    /// Where a TCP port of a running capsule is reached from the control plane.
    fn port_addr(&self, id: &CapsuleId, port: u16) -> Result<SocketAddr, HostError>;

    /// Samples of the last `range`, oldest first.
    fn metrics(&self, id: &CapsuleId, range: Duration) -> Vec<MetricPoint>;

    /// The last of [`HostAgent::metrics`] over `within`: the newest sample, if recent.
    /// Implementations answer it without copying the history (it is on `GET` paths).
    fn latest_metric(&self, id: &CapsuleId, within: Duration) -> Option<MetricPoint> {
        self.metrics(id, within).last().copied()
    }

    /// The sample history of a capsule, to keep while it is paused.
    fn export_metrics(&self, id: &CapsuleId) -> Option<serde_json::Value>;

    fn import_metrics(&self, id: &CapsuleId, saved: serde_json::Value);

    /// Pauses every running capsule (graceful shutdown); returns those that failed.
    async fn pause_all(&self) -> Vec<(CapsuleId, HostError)>;

    /// The warm pools: ready capsules kept per template.
    fn pools(&self) -> Vec<PoolStats>;

    /// Keeps `size` ready capsules of `template` (0 = none).
    async fn set_pool(&self, template: &str, size: usize) -> Result<(), HostError>;
}

pub use wrenn_core::manager::PoolStats;
