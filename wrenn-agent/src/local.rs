//! The in-process host agent: the capsule manager of this machine.

use async_trait::async_trait;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use wrenn::manager::{error_chain, CapsuleInfo, Capsules};
use wrenn::metrics::MetricsSampler;
use wrenn::{CapsuleError, CreateOptions, Host};
use wrenn_core::egress::EgressPolicy;
use wrenn_core::host::{
    guest_error, CapsuleSpec, Endpoint, GuestStream, HostAgent, HostCapsule, HostError,
    HostErrorKind, HostImage, HostInfo, HostTemplate, HostVersions, ImageSpec, PoolStats,
    TemplateChunks,
};
use wrenn_core::id::CapsuleId;
use wrenn_core::metrics::{MetricPoint, TierSnapshot};
use wrenn_core::scheduler::HostId;
use wrenn_core::snapshot::{PauseMode, ResumeMode};
use wrenn_core::status::CapsuleStatus;
use wrenn_core::template::{TemplateManifest, TemplateName};

/// Longest wait for a capsule port to accept a connection the control plane asked for.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct LocalAgentOptions {
    /// How often each running capsule's CPU, memory and disk are sampled.
    pub sample_period: Duration,
    /// The host's id in the control plane's `hosts` table.
    pub host_id: HostId,
}

impl Default for LocalAgentOptions {
    fn default() -> Self {
        LocalAgentOptions {
            sample_period: Duration::from_millis(500),
            host_id: HostId(LOCAL_HOST.to_string()),
        }
    }
}

pub use wrenn_core::scheduler::LOCAL_HOST;

#[derive(Debug)]
pub struct LocalAgent {
    host: Host,
    sampler: MetricsSampler,
    versions: HostVersions,
    id: HostId,
    /// Set by [`HostAgent::drain`]: new capsules are refused.
    draining: std::sync::atomic::AtomicBool,
    /// Container images made into host templates.
    images: Arc<wrenn_oci::Importer>,
}

impl LocalAgent {
    pub fn new(host: Host, opts: LocalAgentOptions) -> Self {
        let sampler = MetricsSampler::start(host.capsules().clone(), opts.sample_period);
        let kernel_version = host
            .data_dir()
            .kernel()
            .as_deref()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let versions = HostVersions {
            envd_version: wrenn_envd::ENVD_VERSION.to_string(),
            kernel_version,
            vmm_version: "qemu".to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            accel: host.accel_probe().accel.to_string(),
            instance: wrenn_core::id::random_token(),
        };
        let images = Arc::new(wrenn_oci::Importer::new(host.data_dir().templates()));
        LocalAgent {
            host,
            sampler,
            versions,
            id: opts.host_id,
            draining: Default::default(),
            images,
        }
    }

    /// Refuses new capsules while the host drains.
    fn taking_new(&self) -> Result<(), HostError> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            Err(HostError::new(
                HostErrorKind::Unavailable,
                format!("host {} is draining: it takes no new capsules", self.id),
            ))
        } else {
            Ok(())
        }
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    fn capsules(&self) -> &Arc<Capsules> {
        self.host.capsules()
    }

    /// The store of this host's templates (it owns their files).
    fn templates(&self) -> wrenn::FsTemplates {
        wrenn::FsTemplates::new(self.host.data_dir().clone())
    }

    /// The root image an image import takes the guest binaries from: a built-in
    /// template's (built with the host's envd and init).
    fn guest_source(&self) -> Result<std::path::PathBuf, HostError> {
        ["minimal", "base", "python"]
            .iter()
            .map(|t| {
                self.host
                    .data_dir()
                    .template_dir(t)
                    .join(wrenn_oci::ROOTFS)
            })
            .find(|p| p.is_file())
            .ok_or_else(|| {
                HostError::new(
                    HostErrorKind::Unavailable,
                    "this host has no built-in template to take envd and wrenn-init from (run `wrenn image build`)",
                )
            })
    }

    /// A running capsule's guest address on this host, at `port`.
    fn guest_addr(&self, id: &CapsuleId, port: u16) -> Result<SocketAddr, HostError> {
        let info = self.capsules().get(id).map_err(host_error)?;
        if info.status != CapsuleStatus::Running {
            return Err(HostError::new(
                HostErrorKind::InvalidState,
                format!("capsule {id} is {}", info.status),
            ));
        }
        let host = info
            .host_addr
            .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
            .ok_or_else(|| {
                HostError::new(
                    HostErrorKind::InvalidState,
                    format!("capsule {id} has no network"),
                )
            })?;
        Ok(SocketAddr::from((host, port)))
    }

    /// The host's side of a graceful shutdown: drains the warm pools and pauses every
    /// capsule still running (those the control plane did not pause itself); returns
    /// the ones whose pause failed.
    pub async fn shutdown(&self) -> Vec<(CapsuleId, HostError)> {
        // Pool entries are nobody's: they go, not pause.
        let drained = self.capsules().drain_pools().await;
        if drained > 0 {
            tracing::info!(drained, "warm pools drained");
        }
        let running: Vec<CapsuleId> = self
            .capsules()
            .list()
            .into_iter()
            .filter(|c| c.status == CapsuleStatus::Running)
            .map(|c| c.id)
            .collect();
        let mut failed = Vec::new();
        for id in running {
            if let Err(e) = self.capsules().pause(&id).await {
                failed.push((id, host_error(e)));
            }
        }
        failed
    }
}

fn capsule(info: CapsuleInfo) -> HostCapsule {
    HostCapsule {
        id: info.id,
        status: info.status,
        template: info.template,
        vcpus: info.vcpus,
        memory_mb: info.memory_mb,
        disk_mb: info.disk_mb,
        labels: info.metadata,
    }
}

/// Maps the manager's errors; details of internal failures stay in the log.
pub fn host_error(e: CapsuleError) -> HostError {
    use wrenn_core::template::TemplateError;
    let kind = match &e {
        CapsuleError::NotFound { .. } => HostErrorKind::NotFound,
        CapsuleError::InvalidSpec(_) => HostErrorKind::InvalidArgument,
        CapsuleError::Template(TemplateError::Unknown { .. }) => HostErrorKind::NotFound,
        CapsuleError::InvalidState { .. } | CapsuleError::Transition { .. } => {
            HostErrorKind::InvalidState
        }
        CapsuleError::Snapshot(wrenn_core::snapshot::SnapshotError::NameTaken { .. }) => {
            HostErrorKind::Conflict
        }
        CapsuleError::ShuttingDown => HostErrorKind::Unavailable,
        CapsuleError::InsufficientStorage { .. } => HostErrorKind::InsufficientStorage,
        CapsuleError::Agent(a) => return guest_error(a),
        _ => HostErrorKind::Internal,
    };
    let message = match (&e, kind) {
        // Its exit status is safe to show, and says what happened.
        (CapsuleError::Vmm(wrenn_core::vmm::VmmError::Exited { detail }), _) => {
            tracing::error!(error = %error_chain(&e), "capsule operation failed");
            format!(
                "the capsule's VMM exited during the operation ({detail}); the capsule has failed"
            )
        }
        (_, HostErrorKind::Internal) => {
            tracing::error!(error = %error_chain(&e), "capsule operation failed");
            format!("{} ({})", e, e.kind())
        }
        _ => e.to_string(),
    };
    HostError::new(kind, message)
}

fn host_template(t: wrenn_core::template::TemplateInfo) -> HostTemplate {
    HostTemplate {
        name: t.name.to_string(),
        snapshot: t.snapshot.is_some(),
        vcpus: t.snapshot.map(|s| s.vcpus),
        memory_mb: t.snapshot.map(|s| s.memory_mb),
        size_bytes: t.size_bytes,
        created_at: t.created_at,
    }
}

#[async_trait]
impl HostAgent for LocalAgent {
    async fn versions(&self) -> Result<HostVersions, HostError> {
        Ok(self.versions.clone())
    }

    async fn info(&self) -> Result<HostInfo, HostError> {
        let m = machine_specs(self.host.data_dir().root());
        let mut info = HostInfo {
            id: self.id.clone(),
            arch: m.arch,
            cpu_cores: m.cpu_cores,
            memory_mb: m.memory_mb,
            disk_mb: m.disk_mb,
            disk_room_mb: self.capsules().disk_room().map_or(0, |b| b >> 20),
            draining: self.draining.load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        };
        for c in self.capsules().list() {
            match c.status {
                CapsuleStatus::Paused => {
                    info.paused += 1;
                    info.used.paused_memory_mb += u64::from(c.memory_mb);
                }
                CapsuleStatus::Stopped | CapsuleStatus::Error => continue,
                _ => {
                    info.running += 1;
                    info.used.running_vcpus += u64::from(c.vcpus);
                    info.used.running_memory_mb += u64::from(c.memory_mb);
                }
            }
            info.used.disk_mb += c.disk_mb;
        }
        for p in self.capsules().pool_stats() {
            info.used.running_memory_mb += p.memory_mb;
            info.pool_ready
                .insert(p.template, u32::try_from(p.ready).unwrap_or(u32::MAX));
        }
        info.snapshot_templates = self
            .capsules()
            .templates()
            .await
            .map_err(host_error)?
            .into_iter()
            .filter(|t| t.snapshot.is_some())
            .map(|t| t.name.to_string())
            .collect();
        Ok(info)
    }

    async fn create(&self, spec: CapsuleSpec) -> Result<HostCapsule, HostError> {
        self.taking_new()?;
        let opts = CreateOptions {
            template: Some(spec.template),
            vcpus: spec.vcpus,
            memory_mb: spec.memory_mb,
            envs: spec.envs,
            metadata: spec.labels,
            cold_boot: spec.cold_boot,
            network: spec.network,
            ..Default::default()
        };
        self.capsules()
            .create(opts)
            .await
            .map(capsule)
            .map_err(host_error)
    }

    async fn get(&self, id: &CapsuleId) -> Result<HostCapsule, HostError> {
        match self.capsules().get(id) {
            Ok(c) => Ok(capsule(c)),
            // Paused capsules of an earlier server process are adopted on demand.
            Err(CapsuleError::NotFound { .. }) => self
                .capsules()
                .adopt(id)
                .await
                .map(capsule)
                .map_err(|_| HostError::not_found(id)),
            Err(e) => Err(host_error(e)),
        }
    }

    async fn list(&self) -> Result<Vec<HostCapsule>, HostError> {
        self.capsules().adopt_all().await.map_err(host_error)?;
        Ok(self.capsules().list().into_iter().map(capsule).collect())
    }

    async fn pause(&self, id: &CapsuleId, mode: PauseMode) -> Result<(), HostError> {
        self.get(id).await?;
        self.capsules()
            .pause_with(id, mode)
            .await
            .map_err(host_error)?;
        Ok(())
    }

    async fn resume(&self, id: &CapsuleId, mode: ResumeMode) -> Result<HostCapsule, HostError> {
        self.get(id).await?;
        self.capsules()
            .resume_with(id, mode)
            .await
            .map(capsule)
            .map_err(host_error)
    }

    async fn destroy(&self, id: &CapsuleId) -> Result<(), HostError> {
        self.get(id).await?;
        let r = self.capsules().destroy(id).await.map_err(host_error);
        self.sampler.forget(id);
        r
    }

    async fn ensure_space(&self, bytes: u64) -> Result<(), HostError> {
        self.capsules()
            .check_space("take the upload", bytes)
            .map_err(host_error)
    }

    async fn set_network(&self, id: &CapsuleId, policy: EgressPolicy) -> Result<(), HostError> {
        self.get(id).await?;
        self.capsules()
            .set_network(id, policy)
            .await
            .map(|_| ())
            .map_err(host_error)
    }

    async fn fork(
        &self,
        id: &CapsuleId,
        count: usize,
        labels: HashMap<String, String>,
    ) -> Result<Vec<HostCapsule>, HostError> {
        self.taking_new()?;
        let forks = self.capsules().fork(id, count).await.map_err(host_error)?;
        let _ = labels;
        Ok(forks.into_iter().map(capsule).collect())
    }

    async fn snapshot(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError> {
        self.capsules()
            .snapshot(id, name, false)
            .await
            .map_err(host_error)?;
        self.template(name).await
    }

    async fn snapshot_disk(&self, id: &CapsuleId, name: &str) -> Result<HostTemplate, HostError> {
        self.capsules()
            .snapshot_disk(id, name, false)
            .await
            .map_err(host_error)?;
        self.template(name).await
    }

    async fn templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        let mut out: Vec<HostTemplate> = self
            .capsules()
            .templates()
            .await
            .map_err(host_error)?
            .into_iter()
            .map(host_template)
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn template(&self, name: &str) -> Result<HostTemplate, HostError> {
        self.capsules()
            .template(name)
            .await
            .map(host_template)
            .map_err(host_error)
    }

    async fn delete_template(&self, name: &str) -> Result<(), HostError> {
        self.capsules()
            .delete_template(name)
            .await
            .map_err(host_error)
    }

    async fn template_manifest(&self, name: &str) -> Result<TemplateManifest, HostError> {
        TemplateCopies(self.templates()).manifest(name).await
    }

    async fn export_template(
        &self,
        name: &str,
        from: BTreeMap<String, u64>,
    ) -> Result<TemplateChunks, HostError> {
        TemplateCopies(self.templates()).export(name, from).await
    }

    async fn import_state(
        &self,
        manifest: &TemplateManifest,
    ) -> Result<BTreeMap<String, u64>, HostError> {
        TemplateCopies(self.templates())
            .import_state(manifest)
            .await
    }

    async fn import_template(
        &self,
        manifest: TemplateManifest,
        chunks: TemplateChunks,
    ) -> Result<HostTemplate, HostError> {
        let name = TemplateCopies(self.templates())
            .import(manifest, chunks)
            .await?;
        self.template(&name).await
    }

    async fn envd(&self, id: &CapsuleId) -> Result<Endpoint, HostError> {
        // Running with a connected guest agent, or the manager's own error for it.
        self.capsules().agent(id).map_err(host_error)?;
        let addr = self.guest_addr(id, wrenn_core::ENVD_PORT)?;
        let access_token = self.capsules().access_token(id).map_err(host_error)?;
        Ok(Endpoint {
            addr,
            access_token: Some(access_token),
        })
    }

    async fn port(&self, id: &CapsuleId, port: u16) -> Result<Endpoint, HostError> {
        Ok(Endpoint {
            addr: self.guest_addr(id, port)?,
            access_token: None,
        })
    }

    async fn open(&self, id: &CapsuleId, port: u16) -> Result<GuestStream, HostError> {
        let addr = self.guest_addr(id, port)?;
        let unanswered = |e: &dyn std::fmt::Display| {
            HostError::new(
                HostErrorKind::Guest,
                format!("capsule {id} port {port} did not answer: {e}"),
            )
        };
        let stream = tokio::time::timeout(OPEN_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|e| unanswered(&e))?
            .map_err(|e| unanswered(&e))?;
        // Small writes (keystrokes, RPC frames) go out at once.
        let _ = stream.set_nodelay(true);
        Ok(Box::new(stream))
    }

    async fn metrics(
        &self,
        id: &CapsuleId,
        range: Duration,
    ) -> Result<Vec<MetricPoint>, HostError> {
        Ok(self.sampler.points(id, range))
    }

    async fn latest_metric(
        &self,
        id: &CapsuleId,
        within: Duration,
    ) -> Result<Option<MetricPoint>, HostError> {
        let Some(p) = self.sampler.latest(id) else {
            return Ok(None);
        };
        let now_ms = unix_ms_now();
        let from_ms = now_ms.saturating_sub(i64::try_from(within.as_millis()).unwrap_or(i64::MAX));
        // As `metrics` counts them: a fine point stands for its whole second.
        let start_ms = p.timestamp_unix.saturating_mul(1000);
        Ok((start_ms.saturating_add(1000) > from_ms && start_ms <= now_ms).then_some(p))
    }

    async fn export_metrics(&self, id: &CapsuleId) -> Result<Option<TierSnapshot>, HostError> {
        Ok(self.sampler.export(id))
    }

    async fn import_metrics(&self, id: &CapsuleId, saved: TierSnapshot) -> Result<(), HostError> {
        self.sampler.import(id, saved);
        Ok(())
    }

    async fn pools(&self) -> Result<Vec<PoolStats>, HostError> {
        Ok(self.capsules().pool_stats())
    }

    async fn set_pool(&self, template: &str, size: usize) -> Result<(), HostError> {
        self.capsules()
            .set_pool(template, size)
            .await
            .map_err(host_error)
    }

    async fn inspect_image(&self, spec: ImageSpec) -> Result<HostImage, HostError> {
        let s = self
            .images
            .inspect(&image_request(spec))
            .await
            .map_err(image_error)?;
        Ok(host_image(s, None))
    }

    async fn import_image(&self, spec: ImageSpec) -> Result<HostImage, HostError> {
        let source = self.guest_source()?;
        // An import finishes even if its caller stops waiting (a cancelled build):
        // its scratch directory is removed and the template is there for next time.
        let images = self.images.clone();
        let done = tokio::spawn(async move { images.import(&image_request(spec), &source).await })
            .await
            .map_err(|e| HostError::new(HostErrorKind::Internal, format!("image import: {e}")))?
            .map_err(image_error)?;
        Ok(host_image(done.summary.clone(), Some(done)))
    }

    async fn drain(&self, draining: bool) -> Result<(), HostError> {
        let was = self
            .draining
            .swap(draining, std::sync::atomic::Ordering::Relaxed);
        if was != draining {
            tracing::info!(host = %self.id, draining, "drain changed");
        }
        Ok(())
    }
}

fn image_request(spec: ImageSpec) -> wrenn_oci::ImageRequest {
    let credentials = match (spec.username, spec.password) {
        (Some(username), Some(password)) => Some(wrenn_oci::Credentials { username, password }),
        _ => None,
    };
    wrenn_oci::ImageRequest {
        image: spec.image,
        credentials,
        policy: wrenn_oci::PullPolicy {
            allow_private: spec.allow_private,
        },
    }
}

fn image_error(e: wrenn_oci::ImageError) -> HostError {
    let kind = if e.is_request_error() {
        HostErrorKind::InvalidArgument
    } else {
        tracing::error!(error = %e, "image import failed");
        HostErrorKind::Internal
    };
    HostError::new(kind, e.to_string())
}

fn host_image(s: wrenn_oci::ImageSummary, done: Option<wrenn_oci::Imported>) -> HostImage {
    let mut out = HostImage {
        image: s.image,
        digest: s.digest,
        env: s.config.env,
        working_dir: s.config.working_dir,
        user: s.config.user,
        layers: u32::try_from(s.layers).unwrap_or(u32::MAX),
        layer_bytes: s.layer_bytes,
        ..Default::default()
    };
    if let Some(d) = done {
        out.template = d.template;
        out.cached = d.cached;
        out.unpacked_bytes = d.unpacked_bytes;
        out.pull_secs = d.pull_secs;
        out.unpack_secs = d.unpack_secs;
        out.image_secs = d.image_secs;
    }
    out
}

fn template_name(name: &str) -> Result<TemplateName, HostError> {
    TemplateName::parse(name)
        .map_err(|e| HostError::new(HostErrorKind::InvalidArgument, e.to_string()))
}

fn template_error(e: &wrenn_core::template::TemplateError) -> HostError {
    let kind = match e {
        wrenn_core::template::TemplateError::Unknown { .. } => HostErrorKind::NotFound,
        _ => HostErrorKind::Internal,
    };
    HostError::new(kind, error_chain(e))
}

/// Runs template file work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, wrenn_core::template::TemplateError> + Send + 'static,
) -> Result<T, HostError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HostError::new(HostErrorKind::Internal, e.to_string()))?
        .map_err(|e| template_error(&e))
}

/// What this machine is, as a host reports it: architecture, CPUs, memory, and the
/// size of the filesystem holding `data_dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineSpecs {
    pub arch: String,
    pub cpu_cores: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
}

pub fn machine_specs(data_dir: &Path) -> MachineSpecs {
    MachineSpecs {
        arch: std::env::consts::ARCH.to_string(),
        cpu_cores: std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        memory_mb: memory_total_mb().unwrap_or(0),
        disk_mb: nix::sys::statvfs::statvfs(data_dir)
            .map_or(0, |st| st.blocks().saturating_mul(st.fragment_size()) >> 20),
    }
}

/// The machine's memory (`MemTotal` of /proc/meminfo), in MiB.
fn memory_total_mb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A host's side of copying templates between hosts ([`HostAgent::template_manifest`],
/// `export_template`, `import_state`, `import_template`) over its template store, with
/// the file work on blocking threads.
#[derive(Clone, Debug)]
pub struct TemplateCopies(pub wrenn::FsTemplates);

impl TemplateCopies {
    pub async fn manifest(&self, name: &str) -> Result<TemplateManifest, HostError> {
        let (store, name) = (self.0.clone(), template_name(name)?);
        blocking(move || store.manifest(&name)).await
    }

    /// Template `name`'s chunks from the offsets in `from` on.
    pub async fn export(
        &self,
        name: &str,
        from: BTreeMap<String, u64>,
    ) -> Result<TemplateChunks, HostError> {
        let (store, name) = (self.0.clone(), template_name(name)?);
        if !store.data().template_dir(name.as_str()).is_dir() {
            return Err(template_error(
                &wrenn_core::template::TemplateError::Unknown {
                    name: name.to_string(),
                },
            ));
        }
        // A few chunks ahead of the reader; the reading thread stops when the
        // receiver is gone.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let sent = store.export(&name, &from, |chunk| tx.blocking_send(Ok(chunk)).is_ok());
            if let Err(e) = sent {
                let _ = tx.blocking_send(Err(template_error(&e)));
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    pub async fn import_state(
        &self,
        manifest: &TemplateManifest,
    ) -> Result<BTreeMap<String, u64>, HostError> {
        let (store, manifest) = (self.0.clone(), manifest.clone());
        blocking(move || Ok(store.import_state(&manifest))).await
    }

    /// Writes the template `manifest` describes from `chunks` and installs it; returns
    /// its name.
    pub async fn import(
        &self,
        manifest: TemplateManifest,
        mut chunks: TemplateChunks,
    ) -> Result<String, HostError> {
        manifest
            .validate()
            .map_err(|m| HostError::new(HostErrorKind::InvalidArgument, m))?;
        let name = manifest.name.to_string();
        let store = self.0.clone();
        let mut import = blocking(move || store.import(manifest)).await?;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // Kept for a retry to resume.
                    let _ = blocking(move || import.suspend()).await;
                    return Err(e);
                }
            };
            import = tokio::task::spawn_blocking(move || import.write(&chunk).map(|()| import))
                .await
                .map_err(|e| HostError::new(HostErrorKind::Internal, e.to_string()))?
                .map_err(|e| template_error(&e))?;
        }
        blocking(move || import.finish()).await?;
        Ok(name)
    }
}
