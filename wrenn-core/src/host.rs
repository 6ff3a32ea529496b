//! The seam between a control plane and a host: everything the API needs from the
//! machine that runs capsules, as [`HostAgent`].
//!
//! The seam is network-shaped: every method is async, every argument and answer is
//! plain serialisable data, and a capsule's services are reached through an
//! [`Endpoint`] the agent hands out rather than through objects that only exist in
//! its process. The in-process agent (`wrenn_agent::LocalAgent`) implements it over
//! the capsule manager of this machine; a remote agent's client implements the same
//! trait.

use crate::egress::EgressPolicy;
use crate::guest::AgentError;
use crate::id::CapsuleId;
use crate::metrics::{MetricPoint, TierSnapshot};
use crate::scheduler::{HostId, Usage};
use crate::snapshot::{PauseMode, ResumeMode};
use crate::status::CapsuleStatus;
use crate::template::{TemplateChunk, TemplateManifest};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};

pub use crate::manager::PoolStats;

/// What went wrong, as the API maps it to a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostErrorKind {
    NotFound,
    InvalidArgument,
    /// The capsule is not in the state the operation needs.
    InvalidState,
    Conflict,
    /// The host cannot take the work (capacity, shutting down, unreachable).
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
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

/// A guest agent's failure as a host error: missing things, bad arguments and
/// timeouts keep their kind, anything else is the guest's.
pub fn guest_error(e: &AgentError) -> HostError {
    let kind = match e {
        AgentError::NotFound(_) => HostErrorKind::NotFound,
        AgentError::InvalidArgument(_) => HostErrorKind::InvalidArgument,
        AgentError::Timeout(_) => HostErrorKind::Timeout,
        _ => HostErrorKind::Guest,
    };
    HostError::new(kind, e.to_string())
}

/// What to start: sizes are `None` for the host's defaults (snapshot templates impose
/// their own).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTemplate {
    pub name: String,
    /// Has a pre-booted memory snapshot.
    pub snapshot: bool,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub size_bytes: u64,
    pub created_at: Option<SystemTime>,
}

/// Versions of what runs capsules on a host (shown in capsule metadata).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVersions {
    pub envd_version: String,
    pub kernel_version: String,
    pub vmm_version: String,
    pub agent_version: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Differs for every start of the agent: a control plane that sees it change knows
    /// the host restarted (and lost the capsules it was running).
    pub instance: String,
}

/// What a host is, has and holds, as its agent reports it: the control plane places
/// capsules by it and its host monitor takes it as the host's sign of life.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The host's id, stable across restarts of its agent.
    pub id: HostId,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    pub cpu_cores: u32,
    pub memory_mb: u64,
    /// Size of the filesystem holding the host's data directory.
    pub disk_mb: u64,
    /// What capsules may still write there (above the host's reserve, after what
    /// running capsules' disks may grow by).
    pub disk_room_mb: u64,
    /// What the host's capsules use (its warm pools' ready entries included).
    pub used: Usage,
    pub running: u32,
    pub paused: u32,
    /// Templates with a pre-booted snapshot.
    pub snapshot_templates: Vec<String>,
    /// Ready warm-pool entries per template.
    pub pool_ready: BTreeMap<String, u32>,
    /// The host takes no new capsules ([`HostAgent::drain`]).
    #[serde(default)]
    pub draining: bool,
}

/// Where the control plane reaches a service of a capsule (its guest agent, or one of
/// its TCP ports), and the credentials it presents there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The guest agent's access token, for envd endpoints of capsules that have one.
    pub access_token: Option<String>,
}

/// A byte stream both ways (a TCP connection, or one carried by an agent's protocol).
pub trait GuestIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> GuestIo for T {}

/// A connection to a port of a capsule, opened by its host ([`HostAgent::open`]).
pub type GuestStream = Box<dyn GuestIo>;

/// A template's content as a host sends it ([`HostAgent::export_template`]).
pub type TemplateChunks =
    std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<TemplateChunk, HostError>> + Send>>;

/// A container image a host is asked to use as a base ([`HostAgent::inspect_image`],
/// [`HostAgent::import_image`]).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct ImageSpec {
    /// The reference, e.g. `registry.example.com/team/app:1.2`.
    pub image: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Registries at private and loopback addresses may be used (the operator's
    /// choice; else only public ones).
    pub allow_private: bool,
}

impl Debug for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSpec")
            .field("image", &self.image)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("allow_private", &self.allow_private)
            .finish()
    }
}

/// An image as a host found it in its registry, and (after an import) the host
/// template made of it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostImage {
    /// The reference in full.
    pub image: String,
    /// Digest of the `linux/amd64` manifest.
    pub digest: String,
    /// The image's environment (`KEY=value`), working directory and user.
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub layers: u32,
    /// Bytes of the layers as stored (compressed).
    pub layer_bytes: u64,
    /// The host template (empty before an import).
    pub template: String,
    /// The import found the template made already.
    pub cached: bool,
    /// Bytes of the layers uncompressed.
    pub unpacked_bytes: u64,
    pub pull_secs: f64,
    pub unpack_secs: f64,
    pub image_secs: f64,
}

fn no_template_copies() -> HostError {
    HostError::new(
        HostErrorKind::Unavailable,
        "this host does not copy templates",
    )
}

fn no_images() -> HostError {
    HostError::new(
        HostErrorKind::Unavailable,
        "this host does not import container images",
    )
}

#[async_trait]
pub trait HostAgent: Send + Sync + Debug {
    async fn versions(&self) -> Result<HostVersions, HostError>;

    /// The host's identity, size and load (cheap: asked every few seconds).
    async fn info(&self) -> Result<HostInfo, HostError>;

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
    async fn ensure_space(&self, bytes: u64) -> Result<(), HostError> {
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

    /// Saves a running capsule's disk as template `name`, flattened, with no memory
    /// snapshot (capsules cold-boot it); the capsule keeps running.
    async fn snapshot_disk(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError> {
        let _ = (id, name);
        Err(HostError::new(
            HostErrorKind::Unavailable,
            "this host does not save disk-only templates",
        ))
    }

    async fn templates(&self) -> Result<Vec<HostTemplate>, HostError>;

    async fn template(&self, name: &str) -> Result<HostTemplate, HostError>;

    async fn delete_template(&self, name: &str) -> Result<(), HostError>;

    /// The files of template `name` with their checksums, to copy it to another host.
    async fn template_manifest(&self, name: &str) -> Result<TemplateManifest, HostError> {
        let _ = name;
        Err(no_template_copies())
    }

    /// Template `name`'s content from the offsets in `from` (per file; 0 for the
    /// others), as chunks; ranges not sent are zeros.
    async fn export_template(
        &self,
        name: &str,
        from: BTreeMap<String, u64>,
    ) -> Result<TemplateChunks, HostError> {
        let _ = (name, from);
        Err(no_template_copies())
    }

    /// What an interrupted copy of `manifest` left on this host (per file, bytes
    /// written), for the copy to resume from.
    async fn import_state(
        &self,
        manifest: &TemplateManifest,
    ) -> Result<BTreeMap<String, u64>, HostError> {
        let _ = manifest;
        Err(no_template_copies())
    }

    /// Writes a copy of a template from `chunks`, checks every file against
    /// `manifest`'s checksums and installs it (all or nothing).
    async fn import_template(
        &self,
        manifest: TemplateManifest,
        chunks: TemplateChunks,
    ) -> Result<HostTemplate, HostError> {
        let _ = (manifest, chunks);
        Err(no_template_copies())
    }

    /// Where the guest agent (envd) of a running capsule is reached, with its token.
    async fn envd(&self, id: &CapsuleId) -> Result<Endpoint, HostError>;

    /// Where a TCP port of a running capsule is reached.
    async fn port(&self, id: &CapsuleId, port: u16) -> Result<Endpoint, HostError>;

    /// Opens a connection to TCP `port` of running capsule `id` (its guest agent's
    /// port included), made by the host: the control plane reaches capsules only
    /// through their host's agent, wherever that host is.
    async fn open(&self, id: &CapsuleId, port: u16) -> Result<GuestStream, HostError>;

    /// Samples of the last `range`, oldest first.
    async fn metrics(&self, id: &CapsuleId, range: Duration)
        -> Result<Vec<MetricPoint>, HostError>;

    /// The last of [`HostAgent::metrics`] over `within`: the newest sample, if recent.
    /// Implementations answer it without copying the history (it is on `GET` paths).
    async fn latest_metric(
        &self,
        id: &CapsuleId,
        within: Duration,
    ) -> Result<Option<MetricPoint>, HostError> {
        Ok(self.metrics(id, within).await?.last().copied())
    }

    /// The sample history of a capsule, for the control plane to keep while it is
    /// paused.
    async fn export_metrics(&self, id: &CapsuleId) -> Result<Option<TierSnapshot>, HostError>;

    /// Gives a resumed capsule back the history kept while it was paused.
    async fn import_metrics(&self, id: &CapsuleId, saved: TierSnapshot) -> Result<(), HostError>;

    /// The warm pools: ready capsules kept per template.
    async fn pools(&self) -> Result<Vec<PoolStats>, HostError>;

    /// Finds a container image in its registry (manifest and configuration only):
    /// a bad, refused, unreachable or foreign-platform image is `InvalidArgument`.
    async fn inspect_image(&self, spec: ImageSpec) -> Result<HostImage, HostError> {
        let _ = spec;
        Err(no_images())
    }

    /// Pulls a container image and makes a host template of it (once per image
    /// digest; later calls find it), which capsules cold-boot.
    async fn import_image(&self, spec: ImageSpec) -> Result<HostImage, HostError> {
        let _ = spec;
        Err(no_images())
    }

    /// Keeps `size` ready capsules of `template` (0 = none).
    async fn set_pool(&self, template: &str, size: usize) -> Result<(), HostError>;

    /// Drains the host (`true`): it keeps its capsules (they pause, resume, fork and
    /// are destroyed as before) and refuses new ones; `false` ends the drain.
    async fn drain(&self, draining: bool) -> Result<(), HostError> {
        let _ = draining;
        Err(HostError::new(
            HostErrorKind::Unavailable,
            "this host does not drain",
        ))
    }
}
