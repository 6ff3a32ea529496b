//! The capsule manager: composes a [`Vmm`], a [`Network`], a [`CowStore`], a
//! [`TemplateStore`], a [`SnapshotStore`] and a [`GuestConnector`] into capsules.
//!
//! Each capsule has one actor task that owns its live resources (VMM handle,
//! network slot, disk). Lifecycle operations (pause, resume, snapshot, fork,
//! destroy) are messages to that actor, so two of them never interleave and a
//! caller that goes away cannot cancel one halfway. Every resource is released on
//! every failure path; a capsule whose VMM dies is marked failed and its resources
//! are released at once.

pub use crate::diskspace::DiskOvercommit;
use crate::error::CapsuleError;
use crate::guest::{
    ExecEvent, ExecRequest, ExecStream, ExitStatus, GuestAgent, GuestConnector, GuestInit,
};
use crate::id::{random_token, CapsuleId};
use crate::net::{NetSlot, Network, GUEST_MAC, TAP_NAME};
use crate::record::{CapsuleRecord, StateStore};
use crate::snapshot::{
    PauseMode, PauseReport, ResumeMode, SnapshotError, SnapshotMeta, SnapshotStore,
};
use crate::spec::{CreateOptions, Limits};
use crate::status::CapsuleStatus;
use crate::storage::{CowDisk, CowStore};
use crate::template::{Template, TemplateName, TemplateStore};
use crate::vmm::{
    Accel, BootSource, ChangedPages, Drive, MachineConfig, MemoryBase, NetIface, PageOverlay,
    VmSpec, Vmm, VmmHandle,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

mod pool;
pub use pool::PoolStats;

/// The parts a manager composes.
#[derive(Clone, Debug)]
pub struct HostParts {
    pub vmm: Arc<dyn Vmm>,
    pub net: Arc<dyn Network>,
    pub disks: Arc<dyn CowStore>,
    pub templates: Arc<dyn TemplateStore>,
    pub guests: Arc<dyn GuestConnector>,
    pub state: Arc<dyn StateStore>,
    pub snapshots: Arc<dyn SnapshotStore>,
}

/// Manager settings.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub limits: Limits,
    /// How long a booting guest may take to answer envd health.
    pub ready_timeout: Duration,
    /// How long a restored guest may take to answer (it is already running).
    pub restore_ready_timeout: Duration,
    /// Path of the guest's init.
    pub guest_init: String,
    /// Guest memory all warm pools together may hold, in MiB (0 = no cap).
    pub pool_memory_budget_mb: u64,
    /// Disk space (MiB) on the data directory's filesystem that capsules may never
    /// take: creates, resumes, forks, pauses and snapshots that could eat into it are
    /// refused ([`CapsuleError::InsufficientStorage`]).
    pub disk_reserve_mb: u64,
    /// How far writable disks are thin-provisioned: what capsules' disks may still
    /// grow by counts against the host's free space divided by this.
    pub disk_overcommit: DiskOvercommit,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            limits: Limits::default(),
            ready_timeout: Duration::from_secs(60),
            restore_ready_timeout: Duration::from_secs(30),
            guest_init: "/usr/local/bin/wrenn-init".into(),
            pool_memory_budget_mb: 4096,
            disk_reserve_mb: 1024,
            disk_overcommit: DiskOvercommit::NONE,
        }
    }
}

/// A snapshot of a capsule's public facts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleInfo {
    pub id: CapsuleId,
    pub status: CapsuleStatus,
    pub template: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_mb: u64,
    pub accel: Accel,
    pub created_at: i64,
    pub host_addr: Option<String>,
    pub metadata: HashMap<String, String>,
    pub error: Option<String>,
}

impl From<&CapsuleRecord> for CapsuleInfo {
    fn from(r: &CapsuleRecord) -> Self {
        CapsuleInfo {
            id: r.id.clone(),
            status: r.status,
            template: r.spec.template.to_string(),
            vcpus: r.spec.vcpus,
            memory_mb: r.spec.memory_mb,
            disk_mb: r.spec.disk_mb,
            accel: r.accel,
            created_at: r.created_at,
            host_addr: r.slot.as_ref().map(|s| s.host_addr.to_string()),
            metadata: r.spec.metadata.clone(),
            error: r.error.clone(),
        }
    }
}

/// Host-side facts about a running capsule's VMM process, for resource accounting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmProcess {
    pub id: CapsuleId,
    /// Pid of the VMM process on this host.
    pub pid: u32,
    pub vcpus: u32,
    /// The capsule's writable disk layer, when it has one.
    pub disk: Option<PathBuf>,
}

/// Collected output of a finished command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: ExitStatus,
}

/// What startup recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Capsules of other live processes, left alone.
    pub kept: usize,
    /// Paused capsules of dead processes, kept on disk for adoption.
    pub paused: usize,
    /// Records of dead owners whose leftovers were removed.
    pub removed_capsules: usize,
    pub killed_vmms: usize,
    pub removed_slots: usize,
}

/// What a fork hands from the source capsule to each child.
struct ForkState {
    meta: SnapshotMeta,
    device_state: PathBuf,
    changed: Arc<ChangedPages>,
    /// The source's disk at the fork point (read-only, in the scratch dir).
    disk: PathBuf,
    scratch: PathBuf,
}

enum Command {
    Destroy(oneshot::Sender<Result<(), CapsuleError>>),
    Pause(
        PauseMode,
        oneshot::Sender<Result<PauseReport, CapsuleError>>,
    ),
    Resume(ResumeMode, oneshot::Sender<Result<(), CapsuleError>>),
    Snapshot {
        name: TemplateName,
        overwrite: bool,
        reply: oneshot::Sender<Result<(), CapsuleError>>,
    },
    Fork(oneshot::Sender<Result<ForkState, CapsuleError>>),
    SetNetwork(
        crate::egress::EgressPolicy,
        oneshot::Sender<Result<(), CapsuleError>>,
    ),
}

#[derive(Debug)]
struct Entry {
    record: Mutex<CapsuleRecord>,
    agent: Mutex<Option<Arc<dyn GuestAgent>>>,
    tx: mpsc::Sender<Command>,
}

impl Entry {
    fn snapshot(&self) -> Option<CapsuleRecord> {
        self.record.lock().ok().map(|r| r.clone())
    }

    fn agent(&self) -> Option<Arc<dyn GuestAgent>> {
        self.agent.lock().ok().and_then(|a| a.clone())
    }

    fn set_agent(&self, agent: Option<Arc<dyn GuestAgent>>) {
        if let Ok(mut a) = self.agent.lock() {
            *a = agent;
        }
    }

    fn update(&self, f: impl FnOnce(&mut CapsuleRecord)) -> Option<CapsuleRecord> {
        let mut r = self.record.lock().ok()?;
        f(&mut r);
        Some(r.clone())
    }
}

/// Live resources of one capsule, released in reverse order of acquisition.
#[derive(Debug, Default)]
struct Resources {
    slot: Option<NetSlot>,
    disk: Option<CowDisk>,
    vmm: Option<Box<dyn VmmHandle>>,
}

impl Resources {
    /// Releases everything held; returns the failures (each resource is still attempted).
    async fn release(&mut self, parts: &HostParts) -> Vec<String> {
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

/// `error: cause: cause…` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Bytes of fresh randomness every started guest gets at `/init`.
pub const INIT_ENTROPY_BYTES: usize = 64;

/// Fresh randomness for a guest's kernel RNG (from the host's CSPRNG).
fn fresh_entropy() -> Vec<u8> {
    let bytes: [u8; INIT_ENTROPY_BYTES] = rand::random();
    bytes.to_vec()
}

/// How a VM gets its state: booted from a template, or restored.
enum Start {
    Boot {
        template: Template,
    },
    Restore {
        kernel: PathBuf,
        cmdline: String,
        memory: MemoryBase,
        device_state: PathBuf,
        overlay: Arc<dyn PageOverlay>,
        disk_base: PathBuf,
        /// The token the restored guest's envd still holds.
        old_token: String,
    },
    /// A fresh boot from a saved disk (the memory was not kept).
    Reboot {
        kernel: PathBuf,
        cmdline: String,
        disk_base: PathBuf,
    },
}

/// What every lifecycle step needs; cheap to clone into actors.
#[derive(Clone, Debug)]
struct Ctx {
    parts: HostParts,
    config: ManagerConfig,
}

impl Ctx {
    fn kernel_cmdline(&self, template: &Template) -> String {
        let mut cmdline = format!(
            "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init={} quiet {}",
            self.config.guest_init,
            crate::net::guest_ip_kernel_arg()
        );
        if !template.kernel_args.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&template.kernel_args);
        }
        cmdline
    }

    /// Acquires a slot, a disk and a VM for `record`, then waits for and
    /// initialises its agent. Everything acquired is in `res`, for the caller to
    /// keep or release.
    async fn bring_up(
        &self,
        record: &mut CapsuleRecord,
        res: &mut Resources,
        start: Start,
        dir: &Path,
    ) -> Result<Arc<dyn GuestAgent>, CapsuleError> {
        // The caller has saved the record; it is saved again as resources are acquired.
        let parts = &self.parts;
        let slot = parts.net.allocate(&record.spec.network).await?;
        res.slot = Some(slot.clone());
        record.slot = Some(slot.clone());

        let (disk_base, boot, memory) = match &start {
            Start::Boot { template } => {
                let base = parts
                    .templates
                    .pin(&template.rootfs, dir, "rootfs.base")
                    .await?;
                let boot = BootSource {
                    kernel: template.kernel.clone(),
                    cmdline: self.kernel_cmdline(template),
                };
                (base, boot, MemoryBase::Zero)
            }
            Start::Reboot {
                kernel,
                cmdline,
                disk_base,
            } => (
                disk_base.clone(),
                BootSource {
                    kernel: kernel.clone(),
                    cmdline: cmdline.clone(),
                },
                MemoryBase::Zero,
            ),
            Start::Restore {
                kernel,
                cmdline,
                memory,
                disk_base,
                ..
            } => (
                disk_base.clone(),
                BootSource {
                    kernel: kernel.clone(),
                    cmdline: cmdline.clone(),
                },
                memory.clone(),
            ),
        };
        let disk_name = format!("disk.{}", parts.disks.format().as_str());
        let disk = parts
            .disks
            .create(&disk_base, &dir.join(disk_name), record.spec.disk_mb)
            .await?;
        res.disk = Some(disk.clone());
        record.disk = Some(disk.clone());
        record.memory_base = memory.clone();
        record.kernel = boot.kernel.clone();
        record.cmdline = boot.cmdline.clone();
        parts.state.save(record).await?;

        let vm = VmSpec {
            name: record.id.vmm_tag(),
            run_dir: dir.to_path_buf(),
            boot,
            machine: MachineConfig {
                vcpus: u8::try_from(record.spec.vcpus).unwrap_or(1),
                memory_mb: record.spec.memory_mb,
            },
            drives: vec![Drive {
                id: "rootfs".into(),
                path: disk.path.clone(),
                format: disk.format,
                read_only: false,
                root: true,
            }],
            nets: vec![NetIface {
                id: "eth0".into(),
                tap: TAP_NAME.into(),
                mac: GUEST_MAC.into(),
                netns_path: slot.netns_path.clone(),
            }],
            memory,
        };
        let (handle, old_token, ready_timeout) = match &start {
            Start::Boot { .. } | Start::Reboot { .. } => {
                (parts.vmm.spawn(&vm).await?, None, self.config.ready_timeout)
            }
            Start::Restore {
                device_state,
                overlay,
                old_token,
                ..
            } => (
                parts
                    .vmm
                    .restore(&vm, device_state, overlay.as_ref())
                    .await?,
                Some(old_token.clone()),
                self.config.restore_ready_timeout,
            ),
        };
        record.vmm_pid = handle.pid();
        parts.state.save(record).await?;

        let addr = SocketAddr::new(slot.host_addr.into(), crate::ENVD_PORT);
        // A restored envd still holds the old token; it authorises setting the new one.
        let init_agent = parts.guests.connect(
            addr,
            old_token.or_else(|| Some(record.access_token.clone())),
        );
        let ready = tokio::select! {
            r = init_agent.wait_ready(ready_timeout) => r.map_err(CapsuleError::from),
            detail = handle.wait_exit() => Err(CapsuleError::VmmExited {
                id: record.id.clone(), phase: "start", detail,
            }),
        };
        res.vmm = Some(handle);
        ready?;
        tracing::debug!(capsule = %record.id, "agent ready");
        init_agent
            .init(&GuestInit {
                access_token: Some(record.access_token.clone()),
                env_vars: record.spec.envs.clone(),
                default_user: None,
                default_workdir: None,
                timestamp: Some(SystemTime::now()),
                entropy: Some(fresh_entropy()),
            })
            .await?;
        Ok(parts
            .guests
            .connect(addr, Some(record.access_token.clone())))
    }

    fn meta(&self, rec: &CapsuleRecord) -> SnapshotMeta {
        SnapshotMeta {
            spec: rec.spec.clone(),
            accel: rec.accel,
            mem_bytes: u64::from(rec.spec.memory_mb) * 1024 * 1024,
            memory_base: rec.memory_base.clone(),
            access_token: rec.access_token.clone(),
            kernel: rec.kernel.clone(),
            cmdline: rec.cmdline.clone(),
            created_at: now_unix(),
            disk_only: false,
        }
    }
}

fn invalid(rec: &CapsuleRecord, op: &'static str, needed: &'static str) -> CapsuleError {
    CapsuleError::InvalidState {
        id: rec.id.clone(),
        status: rec.status,
        op,
        needed,
    }
}

/// The capsule manager.
#[derive(Debug)]
pub struct Capsules {
    ctx: Ctx,
    table: Mutex<HashMap<CapsuleId, Arc<Entry>>>,
    pools: pool::Pools,
    /// Disk bytes promised to operations in flight (see [`Capsules::reserve_space`]).
    pending_disk: Arc<Mutex<u64>>,
}

/// Disk space promised to one operation in flight; released on drop.
#[derive(Debug)]
struct SpaceClaim {
    pending: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Drop for SpaceClaim {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            *p = p.saturating_sub(self.bytes);
        }
    }
}

impl Capsules {
    /// A manager over `parts`. Call [`Capsules::recover`] once at startup.
    pub fn new(parts: HostParts, config: ManagerConfig) -> Arc<Self> {
        Arc::new(Capsules {
            pools: pool::Pools::new(config.pool_memory_budget_mb),
            ctx: Ctx { parts, config },
            table: Mutex::new(HashMap::new()),
            pending_disk: Arc::new(Mutex::new(0)),
        })
    }

    /// Room kept for a new writable disk of `disk_mb` MiB to grow into.
    fn disk_growth(&self, disk_mb: u64) -> u64 {
        self.ctx.config.disk_overcommit.provisioned(disk_mb << 20)
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
    fn reserve_space(&self, op: &'static str, need: u64) -> Result<SpaceClaim, CapsuleError> {
        let state = &self.ctx.parts.state;
        let claim = |bytes| SpaceClaim {
            pending: self.pending_disk.clone(),
            bytes,
        };
        let Some(avail) = state.available_bytes() else {
            return Ok(claim(0));
        };
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
        let mut pending = self
            .pending_disk
            .lock()
            .map_err(|_| CapsuleError::ShuttingDown)?;
        let free = avail
            .saturating_sub(growth)
            .saturating_sub(*pending)
            .saturating_sub(reserve);
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

    pub fn accel(&self) -> Accel {
        self.ctx.parts.vmm.accel()
    }

    pub fn limits(&self) -> &Limits {
        &self.ctx.config.limits
    }

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
                rec.status = CapsuleStatus::Paused;
                rec.slot = None;
                rec.vmm_pid = None;
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

    fn new_record(&self, spec: crate::spec::CapsuleSpec) -> CapsuleRecord {
        CapsuleRecord {
            id: CapsuleId::random(),
            status: CapsuleStatus::Starting,
            spec,
            accel: self.ctx.parts.vmm.accel(),
            owner: self.ctx.parts.state.current_owner(),
            created_at: now_unix(),
            vmm_pid: None,
            slot: None,
            disk: None,
            access_token: random_token(),
            error: None,
            memory_base: MemoryBase::Zero,
            kernel: PathBuf::new(),
            cmdline: String::new(),
            pooled: false,
        }
    }

    /// Creates the capsule's directory with its record in it. The record (with its
    /// owner) comes first: a concurrent startup sweep elsewhere must see the capsule as
    /// someone's before any other file of it exists.
    async fn open_record(&self, record: &CapsuleRecord) -> Result<PathBuf, CapsuleError> {
        let parts = &self.ctx.parts;
        let dir = parts.state.create_dir(&record.id).await?;
        if let Err(e) = parts.state.save(record).await {
            let _ = parts.state.remove_dir(&record.id).await;
            return Err(e.into());
        }
        Ok(dir)
    }

    /// Brings up `record` and registers it, or releases everything on failure.
    async fn launch(
        self: &Arc<Self>,
        mut record: CapsuleRecord,
        start: impl FnOnce(
            &Path,
        )
            -> futures_core::future::BoxFuture<'static, Result<Start, CapsuleError>>,
    ) -> Result<CapsuleInfo, CapsuleError> {
        let parts = &self.ctx.parts;
        let id = record.id.clone();
        let dir = self.open_record(&record).await?;
        let mut res = Resources::default();
        let started = tokio::time::Instant::now();
        let result = match start(&dir).await {
            Ok(start) => self.ctx.bring_up(&mut record, &mut res, start, &dir).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(agent) => {
                record.status = CapsuleStatus::Running;
                parts.state.save(&record).await?;
                tracing::info!(capsule = %id, template = %record.spec.template, accel = %record.accel,
                    ms = started.elapsed().as_millis() as u64, "capsule running");
                let info = CapsuleInfo::from(&record);
                self.start_actor(record, res, Some(agent));
                Ok(info)
            }
            Err(e) => {
                tracing::warn!(capsule = %id, error = %error_chain(&e), "create failed; releasing");
                for err in res.release(parts).await {
                    tracing::warn!(capsule = %id, %err, "cleanup after failed create");
                }
                if let Err(err) = parts.state.remove_dir(&id).await {
                    tracing::warn!(capsule = %id, error = %error_chain(&err), "removing capsule dir");
                }
                Err(e)
            }
        }
    }

    /// Creates a capsule and returns once its agent is healthy and initialised.
    /// Templates with a pre-booted snapshot start by restoring it (their vCPUs and
    /// memory are the snapshot's); others boot.
    pub async fn create(
        self: &Arc<Self>,
        opts: CreateOptions,
    ) -> Result<CapsuleInfo, CapsuleError> {
        let mut spec = opts.validate(&self.ctx.config.limits)?;
        let parts = self.ctx.parts.clone();
        let template = parts.templates.get(&spec.template).await?;
        // The new capsule's writable disk may grow to its full size.
        let _space = self.reserve_space("create a capsule", self.disk_growth(spec.disk_mb))?;
        let snap = match parts.snapshots.open_template(&spec.template).await {
            Ok(_) if opts.cold_boot => None,
            Ok(s) => s.filter(|r| r.meta.accel == parts.vmm.accel()),
            Err(e) => {
                tracing::warn!(template = %spec.template, error = %error_chain(&e), "template snapshot unusable; booting");
                None
            }
        };
        if let Some(r) = &snap {
            spec.vcpus = r.meta.spec.vcpus;
            spec.memory_mb = r.meta.spec.memory_mb;
            spec.disk_mb = spec.disk_mb.max(r.meta.spec.disk_mb);
            // A ready capsule of the warm pool, when there is one of this snapshot.
            let mut stale = Vec::new();
            let taken = self.pools.take(
                spec.template.as_str(),
                &pool::Origin::of(r),
                spec.disk_mb,
                &mut stale,
            );
            for old in stale {
                self.discard(old).await;
            }
            let claimed = match taken {
                Some(ready) => match self.claim(ready, spec.clone()).await {
                    Ok(info) => Some(info),
                    Err(e) => {
                        tracing::warn!(template = %spec.template, error = %error_chain(&e),
                            "pool entry unusable; restoring instead");
                        None
                    }
                },
                None => None,
            };
            self.refill(spec.template.as_str());
            if let Some(info) = claimed {
                return Ok(info);
            }
        }
        let record = self.new_record(spec);
        self.launch(record, move |dir| {
            let dir = dir.to_path_buf();
            Box::pin(async move {
                match snap {
                    Some(r) => pool::restore_start(&parts, &r, &dir).await,
                    None => Ok(Start::Boot { template }),
                }
            })
        })
        .await
    }

    fn start_actor(
        &self,
        record: CapsuleRecord,
        res: Resources,
        agent: Option<Arc<dyn GuestAgent>>,
    ) {
        let (tx, rx) = mpsc::channel(8);
        let id = record.id.clone();
        let entry = Arc::new(Entry {
            record: Mutex::new(record),
            agent: Mutex::new(agent),
            tx,
        });
        if let Ok(mut t) = self.table.lock() {
            t.insert(id, entry.clone());
        }
        tokio::spawn(actor(self.ctx.clone(), entry, res, rx));
    }

    fn entry(&self, id: &CapsuleId) -> Result<Arc<Entry>, CapsuleError> {
        self.table
            .lock()
            .ok()
            .and_then(|t| t.get(id).cloned())
            .ok_or_else(|| CapsuleError::NotFound { id: id.to_string() })
    }

    fn running(
        &self,
        id: &CapsuleId,
        op: &'static str,
    ) -> Result<(Arc<Entry>, Arc<dyn GuestAgent>), CapsuleError> {
        let e = self.entry(id)?;
        let rec = e
            .snapshot()
            .ok_or_else(|| CapsuleError::NotFound { id: id.to_string() })?;
        match (rec.status, e.agent()) {
            (CapsuleStatus::Running, Some(agent)) => Ok((e, agent)),
            _ => Err(invalid(&rec, op, "running")),
        }
    }

    /// Capsules this manager runs or holds paused.
    pub fn list(&self) -> Vec<CapsuleInfo> {
        let entries: Vec<Arc<Entry>> = self
            .table
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        let mut out: Vec<CapsuleInfo> = entries
            .iter()
            .filter_map(|e| e.snapshot())
            .map(|r| CapsuleInfo::from(&r))
            .collect();
        out.sort_by_key(|c| (c.created_at, c.id.clone()));
        out
    }

    /// The running capsules whose VMM process is known (read-only; for samplers).
    pub fn running_vmms(&self) -> Vec<VmmProcess> {
        let entries: Vec<Arc<Entry>> = self
            .table
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        let mut out: Vec<VmmProcess> = entries
            .iter()
            .filter_map(|e| e.snapshot())
            .filter(|r| r.status == CapsuleStatus::Running)
            .filter_map(|r| {
                Some(VmmProcess {
                    pid: r.vmm_pid?,
                    vcpus: r.spec.vcpus,
                    disk: r.disk.map(|d| d.path),
                    id: r.id,
                })
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn get(&self, id: &CapsuleId) -> Result<CapsuleInfo, CapsuleError> {
        let e = self.entry(id)?;
        e.snapshot()
            .map(|r| CapsuleInfo::from(&r))
            .ok_or_else(|| CapsuleError::NotFound { id: id.to_string() })
    }

    /// The envd access token of a capsule (for its owner only).
    pub fn access_token(&self, id: &CapsuleId) -> Result<String, CapsuleError> {
        let e = self.entry(id)?;
        e.snapshot()
            .map(|r| r.access_token)
            .ok_or_else(|| CapsuleError::NotFound { id: id.to_string() })
    }

    /// The agent of a running capsule, for calls the manager does not wrap.
    pub fn agent(&self, id: &CapsuleId) -> Result<Arc<dyn GuestAgent>, CapsuleError> {
        Ok(self.running(id, "agent access")?.1)
    }

    /// Starts a command; events arrive on the returned stream.
    pub async fn exec(
        &self,
        id: &CapsuleId,
        req: &ExecRequest,
    ) -> Result<ExecStream, CapsuleError> {
        let (_, agent) = self.running(id, "exec")?;
        Ok(agent.exec(req).await?)
    }

    /// Runs a command to completion, optionally feeding `stdin` first, and collects its output.
    pub async fn run(
        &self,
        id: &CapsuleId,
        req: &ExecRequest,
        stdin: Option<Bytes>,
    ) -> Result<ExecOutput, CapsuleError> {
        let (_, agent) = self.running(id, "exec")?;
        run_to_exit(agent.as_ref(), req, stdin).await
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

    async fn ask<T>(
        &self,
        id: &CapsuleId,
        make: impl FnOnce(oneshot::Sender<Result<T, CapsuleError>>) -> Command,
    ) -> Result<T, CapsuleError> {
        if self.entry(id).is_err() {
            self.adopt(id).await?;
        }
        let e = self.entry(id)?;
        let (tx, rx) = oneshot::channel();
        e.tx.send(make(tx))
            .await
            .map_err(|_| CapsuleError::ShuttingDown)?;
        rx.await.unwrap_or(Err(CapsuleError::ShuttingDown))
    }

    /// Pauses a running capsule: its memory, devices and disk go to its snapshot,
    /// its VM, slot and process are released. Two pauses of one capsule queue.
    pub async fn pause(&self, id: &CapsuleId) -> Result<PauseReport, CapsuleError> {
        self.pause_with(id, PauseMode::Full).await
    }

    /// [`Capsules::pause`], keeping what `mode` says: with [`PauseMode::DiskOnly`] the
    /// guest syncs its filesystems, then only the disk is kept (a resume boots afresh).
    pub async fn pause_with(
        &self,
        id: &CapsuleId,
        mode: PauseMode,
    ) -> Result<PauseReport, CapsuleError> {
        // A full pause writes up to the guest's memory (and its device state).
        let need = match (mode, self.entry(id).ok().and_then(|e| e.snapshot())) {
            (PauseMode::Full, Some(r)) => (u64::from(r.spec.memory_mb) << 20) + (8 << 20),
            _ => 8 << 20,
        };
        let _space = self.reserve_space("pause the capsule", need)?;
        self.ask(id, |reply| Command::Pause(mode, reply)).await
    }

    /// Resumes a paused capsule, in whatever network slot is free.
    pub async fn resume(&self, id: &CapsuleId) -> Result<CapsuleInfo, CapsuleError> {
        self.resume_with(id, ResumeMode::Restore).await
    }

    /// [`Capsules::resume`]; [`ResumeMode::Reboot`] drops the saved memory and boots
    /// afresh from the saved disk.
    pub async fn resume_with(
        &self,
        id: &CapsuleId,
        mode: ResumeMode,
    ) -> Result<CapsuleInfo, CapsuleError> {
        if self.entry(id).is_err() {
            self.adopt(id).await?;
        }
        let disk = self
            .entry(id)
            .ok()
            .and_then(|e| e.snapshot())
            .map(|r| self.disk_growth(r.spec.disk_mb))
            .unwrap_or(0);
        let _space = self.reserve_space("resume the capsule", disk)?;
        self.ask(id, |reply| Command::Resume(mode, reply)).await?;
        self.get(id)
    }

    /// Saves a running capsule as snapshot template `name` (flattened: it does not
    /// depend on the capsule); the capsule keeps running.
    pub async fn snapshot(
        &self,
        id: &CapsuleId,
        name: &str,
        overwrite: bool,
    ) -> Result<(), CapsuleError> {
        let name = TemplateName::parse(name).map_err(crate::spec::InvalidSpec::from)?;
        // A flattened disk and the whole memory, at most.
        let need = self
            .entry(id)
            .ok()
            .and_then(|e| e.snapshot())
            .map(|r| (r.spec.disk_mb << 20) + (u64::from(r.spec.memory_mb) << 20))
            .unwrap_or(0);
        let _space = self.reserve_space("snapshot the capsule", need)?;
        self.ask(id, |reply| Command::Snapshot {
            name,
            overwrite,
            reply,
        })
        .await
    }

    /// Forks a running capsule into `n` new capsules that continue from its current
    /// state, each with its own identity (id, envd token) and copy-on-write disk.
    pub async fn fork(
        self: &Arc<Self>,
        id: &CapsuleId,
        n: usize,
    ) -> Result<Vec<CapsuleInfo>, CapsuleError> {
        let rec = self.entry(id).ok().and_then(|e| e.snapshot());
        let per_child = rec
            .as_ref()
            .map(|r| self.disk_growth(r.spec.disk_mb) + (u64::from(r.spec.memory_mb) << 20))
            .unwrap_or(0);
        let _space = self.reserve_space(
            "fork the capsule",
            per_child.saturating_mul(u64::try_from(n).unwrap_or(u64::MAX)),
        )?;
        let state = self.ask(id, Command::Fork).await?;
        let mut out = Vec::new();
        let mut first_err = None;
        for _ in 0..n {
            let mut spec = state.meta.spec.clone();
            spec.metadata.insert("forked_from".into(), id.to_string());
            let record = self.new_record(spec);
            let (meta, device_state, changed, disk) = (
                state.meta.clone(),
                state.device_state.clone(),
                state.changed.clone(),
                state.disk.clone(),
            );
            let templates = self.ctx.parts.templates.clone();
            let launched = self
                .launch(record, move |dir| {
                    let dir = dir.to_path_buf();
                    Box::pin(async move {
                        let memory = match &meta.memory_base {
                            MemoryBase::File(p) => {
                                MemoryBase::File(templates.pin(p, &dir, "memory.base").await?)
                            }
                            MemoryBase::Zero => MemoryBase::Zero,
                        };
                        let disk_base = templates.pin(&disk, &dir, "fork.base").await?;
                        let device = templates.pin(&device_state, &dir, "fork.state").await?;
                        Ok(Start::Restore {
                            kernel: meta.kernel.clone(),
                            cmdline: meta.cmdline.clone(),
                            memory,
                            device_state: device,
                            overlay: changed as Arc<dyn PageOverlay>,
                            disk_base,
                            old_token: meta.access_token.clone(),
                        })
                    })
                })
                .await;
            match launched {
                Ok(info) => out.push(info),
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
        }
        self.ctx.parts.state.remove_scratch(&state.scratch).await;
        match first_err {
            None => Ok(out),
            Some(e) => {
                for c in &out {
                    let _ = self.destroy(&c.id).await;
                }
                Err(e)
            }
        }
    }

    /// Replaces the egress policy of a running or paused capsule. On a running
    /// capsule it is in force when this returns; a paused one resumes with it.
    pub async fn set_network(
        &self,
        id: &CapsuleId,
        policy: crate::egress::EgressPolicy,
    ) -> Result<CapsuleInfo, CapsuleError> {
        self.ask(id, |reply| Command::SetNetwork(policy, reply))
            .await?;
        self.get(id)
    }

    /// Destroys a capsule: stops its VM and releases everything it holds, its
    /// snapshot included.
    pub async fn destroy(&self, id: &CapsuleId) -> Result<(), CapsuleError> {
        let result = self.ask(id, Command::Destroy).await;
        if let Ok(mut t) = self.table.lock() {
            t.remove(id);
        }
        result?;
        self.ctx.parts.state.remove_dir(id).await?;
        tracing::info!(capsule = %id, "capsule destroyed");
        Ok(())
    }

    /// Destroys every capsule of this manager.
    pub async fn destroy_all(&self) -> Vec<(CapsuleId, CapsuleError)> {
        let ids: Vec<CapsuleId> = self
            .table
            .lock()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let mut failed = Vec::new();
        for id in ids {
            if let Err(e) = self.destroy(&id).await {
                failed.push((id, e));
            }
        }
        failed
    }
}

impl PageOverlay for ChangedPages {
    fn for_each(&self, f: &mut crate::vmm::PageVisitor<'_>) -> std::io::Result<()> {
        for (page, data) in self.iter() {
            f(page, Some(data))?;
        }
        Ok(())
    }
}

fn set_status(entry: &Entry, to: CapsuleStatus, error: Option<String>) -> Option<CapsuleRecord> {
    entry.update(|r| {
        match r.status.transition(to) {
            Ok(s) => r.status = s,
            Err(e) => tracing::warn!(capsule = %r.id, %e, "ignoring transition"),
        }
        if error.is_some() {
            r.error = error;
        }
    })
}

async fn save_record(ctx: &Ctx, rec: Option<CapsuleRecord>) {
    if let Some(rec) = rec {
        if let Err(e) = ctx.parts.state.save(&rec).await {
            tracing::warn!(capsule = %rec.id, error = %error_chain(&e), "saving capsule record");
        }
    }
}

/// The one task that owns a capsule's live resources.
async fn actor(ctx: Ctx, entry: Arc<Entry>, mut res: Resources, mut rx: mpsc::Receiver<Command>) {
    loop {
        let cmd = match res.vmm.as_ref() {
            None => rx.recv().await,
            Some(vmm) => tokio::select! {
                cmd = rx.recv() => cmd,
                detail = vmm.wait_exit() => {
                    vmm_died(&ctx, &entry, &mut res, detail).await;
                    continue;
                }
            },
        };
        match cmd {
            None => {
                // The manager is gone: running VMs go with it; paused snapshots stay.
                for err in res.release(&ctx.parts).await {
                    tracing::warn!(%err, "teardown on manager drop");
                }
                return;
            }
            Some(Command::Destroy(reply)) => {
                set_status(&entry, CapsuleStatus::Stopping, None);
                let mut errors = res.release(&ctx.parts).await;
                if let Some(id) = entry.snapshot().map(|r| r.id) {
                    if let Err(e) = ctx.parts.snapshots.remove(&id).await {
                        errors.push(format!("removing snapshot: {}", error_chain(&e)));
                    }
                }
                entry.set_agent(None);
                let result = if errors.is_empty() {
                    set_status(&entry, CapsuleStatus::Stopped, None);
                    Ok(())
                } else {
                    let msg = errors.join("; ");
                    save_record(
                        &ctx,
                        set_status(&entry, CapsuleStatus::Error, Some(msg.clone())),
                    )
                    .await;
                    Err(CapsuleError::Vmm(crate::vmm::VmmError::Backend(msg.into())))
                };
                let _ = reply.send(result);
                return;
            }
            Some(Command::Pause(mode, reply)) => {
                let r = pause(&ctx, &entry, &mut res, mode).await;
                let _ = reply.send(r);
            }
            Some(Command::Resume(mode, reply)) => {
                let r = resume(&ctx, &entry, &mut res, mode).await;
                let _ = reply.send(r);
            }
            Some(Command::Snapshot {
                name,
                overwrite,
                reply,
            }) => {
                let r = snapshot(&ctx, &entry, &res, &name, overwrite).await;
                let _ = reply.send(r);
            }
            Some(Command::Fork(reply)) => {
                let r = fork_state(&ctx, &entry, &res).await;
                let _ = reply.send(r);
            }
            Some(Command::SetNetwork(policy, reply)) => {
                let r = set_network(&ctx, &entry, &res, policy).await;
                let _ = reply.send(r);
            }
        }
    }
}

async fn vmm_died(ctx: &Ctx, entry: &Entry, res: &mut Resources, detail: String) {
    let id = entry
        .snapshot()
        .map(|r| r.id.to_string())
        .unwrap_or_default();
    tracing::warn!(capsule = %id, %detail, "VMM exited unexpectedly; releasing the capsule's resources");
    res.vmm = None; // already gone; nothing to stop
    let errors = res.release(&ctx.parts).await;
    let mut msg = format!("VMM exited unexpectedly: {detail}");
    if !errors.is_empty() {
        msg.push_str(&format!(" (cleanup: {})", errors.join("; ")));
    }
    entry.set_agent(None);
    set_status(entry, CapsuleStatus::Error, Some(msg));
    let rec = entry.update(|r| {
        r.slot = None;
        r.disk = None;
        r.vmm_pid = None;
    });
    save_record(ctx, rec).await;
}

/// Stops the VM and saves its device state and changed pages into `dir`.
async fn freeze(vmm: &dyn VmmHandle, device_state: &Path) -> Result<ChangedPages, CapsuleError> {
    vmm.pause().await?;
    match vmm.save(device_state).await {
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
async fn run_to_exit(
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
async fn guest_sync(entry: &Entry, limit: Duration) -> Result<(), CapsuleError> {
    match tokio::time::timeout(limit, guest_sync_inner(entry, limit)).await {
        Ok(r) => r,
        Err(_) => Err(CapsuleError::Agent(crate::guest::AgentError::Timeout(
            format!("sync in the guest took over {} s", limit.as_secs()),
        ))),
    }
}

async fn guest_sync_inner(entry: &Entry, limit: Duration) -> Result<(), CapsuleError> {
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

async fn pause(
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
    set_status(entry, CapsuleStatus::Pausing, None);
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
        let changed = freeze(vmm.as_ref(), &dir.join("device.state")).await?;
        match ctx
            .parts
            .snapshots
            .commit_pause(&rec.id, &ctx.meta(&rec), &changed, &disk)
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
            set_status(entry, CapsuleStatus::Running, None);
            return Err(e);
        }
    };
    // Committed: the VM, its slot and its disk file (a copy lives in the snapshot) go.
    entry.set_agent(None);
    for err in res.release(&ctx.parts).await {
        tracing::warn!(capsule = %rec.id, %err, "releasing after pause");
    }
    let rec = mark_paused(entry);
    save_record(ctx, rec).await;
    tracing::info!(capsule = %entry.snapshot().map(|r| r.id.to_string()).unwrap_or_default(),
        ms = started.elapsed().as_millis() as u64, bytes = report.memory_bytes_written,
        generations = report.generations, "capsule paused");
    Ok(report)
}

/// Paused: nothing of the capsule runs, its state is its snapshot.
fn mark_paused(entry: &Entry) -> Option<CapsuleRecord> {
    entry.update(|r| {
        r.status = CapsuleStatus::Paused;
        r.slot = None;
        r.disk = None;
        r.vmm_pid = None;
    })
}

async fn resume(
    ctx: &Ctx,
    entry: &Entry,
    res: &mut Resources,
    mode: ResumeMode,
) -> Result<(), CapsuleError> {
    let mut rec = entry.snapshot().ok_or(CapsuleError::ShuttingDown)?;
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
    set_status(entry, CapsuleStatus::Resuming, None);
    rec.status = CapsuleStatus::Resuming;
    let dir = ctx.parts.state.create_dir(&rec.id).await?;
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
    match ctx.bring_up(&mut rec, res, start, &dir).await {
        Ok(agent) => {
            rec.status = CapsuleStatus::Running;
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
            let rec = mark_paused(entry);
            save_record(ctx, rec).await;
            Err(e)
        }
    }
}

/// Replaces a capsule's egress policy: in its slot at once when it runs, and in
/// its record (a paused capsule gets it on resume).
async fn set_network(
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
async fn scratch_dir(ctx: &Ctx, rec: &CapsuleRecord, what: &str) -> Result<PathBuf, CapsuleError> {
    Ok(ctx.parts.state.scratch_dir(&rec.id, what).await?)
}

async fn snapshot(
    ctx: &Ctx,
    entry: &Entry,
    res: &Resources,
    name: &TemplateName,
    overwrite: bool,
) -> Result<(), CapsuleError> {
    let rec = entry.snapshot().ok_or(CapsuleError::ShuttingDown)?;
    let (Some(vmm), Some(disk), CapsuleStatus::Running) =
        (res.vmm.as_ref(), res.disk.as_ref(), rec.status)
    else {
        return Err(invalid(&rec, "snapshot", "running"));
    };
    let scratch = scratch_dir(ctx, &rec, "snapshot").await?;
    let result = async {
        let state = scratch.join("device.state");
        let changed = freeze(vmm.as_ref(), &state).await?;
        let written = ctx
            .parts
            .snapshots
            .write_template(name, &ctx.meta(&rec), &state, &changed, disk, overwrite)
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

async fn fork_state(ctx: &Ctx, entry: &Entry, res: &Resources) -> Result<ForkState, CapsuleError> {
    let rec = entry.snapshot().ok_or(CapsuleError::ShuttingDown)?;
    let (Some(vmm), Some(disk), CapsuleStatus::Running) =
        (res.vmm.as_ref(), res.disk.as_ref(), rec.status)
    else {
        return Err(invalid(&rec, "fork", "running"));
    };
    let scratch = scratch_dir(ctx, &rec, "fork").await?;
    let result = async {
        let device_state = scratch.join("device.state");
        let changed = freeze(vmm.as_ref(), &device_state).await?;
        // The disk at this instant: a standalone copy of the writable layer over the same base.
        let frozen = scratch.join("disk.qcow2");
        let copied = ctx.parts.disks.flatten(disk, &frozen).await;
        vmm.resume().await?;
        copied?;
        Ok(ForkState {
            meta: ctx.meta(&rec),
            device_state,
            changed: Arc::new(changed),
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
