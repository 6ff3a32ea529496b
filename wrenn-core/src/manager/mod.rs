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
use crate::template::{Pin, Template, TemplateName, TemplateStore};
use crate::vmm::{
    Accel, BootSource, ChangedPages, Drive, MachineConfig, MemoryBase, NetIface, PageOverlay,
    SavedState, VmSpec, Vmm, VmmHandle,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

mod actor;
mod bring_up;
mod ops;
mod pool;
mod recover;
mod resources;

use actor::{Command, Entry};
pub use bring_up::INIT_ENTROPY_BYTES;
use bring_up::{fresh_entropy, Start};
use ops::run_to_exit;
pub use ops::MAX_COLLECTED_OUTPUT;
pub use pool::PoolStats;
use resources::Resources;

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
    /// VMs brought up (booted or restored, until their agent answers) at once; more
    /// wait their turn, so a burst of creates cannot starve the capsules already
    /// running of CPU. 0: one per CPU of the host.
    pub max_concurrent_starts: usize,
}

impl ManagerConfig {
    fn concurrent_starts(&self) -> usize {
        match self.max_concurrent_starts {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        }
    }
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
            max_concurrent_starts: 0,
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
    /// Running capsules of dead processes whose VMMs outlived them, taken over by
    /// this process (they keep running).
    pub taken_over: usize,
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

/// What every lifecycle step needs; cheap to clone into actors.
#[derive(Clone, Debug)]
struct Ctx {
    parts: HostParts,
    config: ManagerConfig,
    /// Permits to bring a VM up (boot or restore and wait for its agent); see
    /// [`ManagerConfig::max_concurrent_starts`].
    starts: Arc<tokio::sync::Semaphore>,
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

impl Capsules {
    /// A manager over `parts`. Call [`Capsules::recover`] once at startup.
    pub fn new(parts: HostParts, config: ManagerConfig) -> Arc<Self> {
        Arc::new(Capsules {
            pools: pool::Pools::new(config.pool_memory_budget_mb),
            ctx: Ctx {
                starts: Arc::new(tokio::sync::Semaphore::new(config.concurrent_starts())),
                parts,
                config,
            },
            table: Mutex::new(HashMap::new()),
            pending_disk: Arc::new(Mutex::new(0)),
        })
    }

    pub fn accel(&self) -> Accel {
        self.ctx.parts.vmm.accel()
    }

    pub fn limits(&self) -> &Limits {
        &self.ctx.config.limits
    }

    /// The templates capsules can start from, described.
    pub async fn templates(&self) -> Result<Vec<crate::template::TemplateInfo>, CapsuleError> {
        let store = &self.ctx.parts.templates;
        let mut out = Vec::new();
        for name in store.list().await? {
            match store.describe(&name).await {
                Ok(info) => out.push(info),
                // Removed meanwhile.
                Err(crate::template::TemplateError::Unknown { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// One template, described.
    pub async fn template(
        &self,
        name: &str,
    ) -> Result<crate::template::TemplateInfo, CapsuleError> {
        let name = TemplateName::parse(name).map_err(crate::spec::InvalidSpec::from)?;
        Ok(self.ctx.parts.templates.describe(&name).await?)
    }

    /// Removes a template and its warm pool. Capsules started from it keep running
    /// (they hold their own links to its files).
    pub async fn delete_template(self: &Arc<Self>, name: &str) -> Result<(), CapsuleError> {
        let parsed = TemplateName::parse(name).map_err(crate::spec::InvalidSpec::from)?;
        self.ctx.parts.templates.describe(&parsed).await?;
        // Its ready capsules are of a template that no longer exists.
        self.set_pool(name, 0).await?;
        Ok(self.ctx.parts.templates.delete(&parsed).await?)
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
        let result = async {
            let start = start(&dir).await?;
            let agent = self
                .ctx
                .bring_up(&mut record, &mut res, start, &dir)
                .await?;
            record.transition(CapsuleStatus::Running)?;
            parts.state.save(&record).await?;
            Ok::<_, CapsuleError>(agent)
        }
        .await;
        match result {
            Ok(agent) => {
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
        tokio::spawn(actor::run(self.ctx.clone(), entry, res, rx));
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

    async fn ask<T>(
        &self,
        id: &CapsuleId,
        make: impl FnOnce(oneshot::Sender<Result<T, CapsuleError>>) -> Command,
    ) -> Result<T, CapsuleError> {
        if self.entry(id).is_err() {
            self.adopt(id).await?;
        }
        let e = self.entry(id)?;
        // The actor ends after a destroy: a call that raced it finds no capsule.
        let gone = || match e.snapshot() {
            Some(r) if r.status == CapsuleStatus::Stopped => {
                CapsuleError::NotFound { id: id.to_string() }
            }
            _ => CapsuleError::ShuttingDown,
        };
        let (tx, rx) = oneshot::channel();
        e.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.unwrap_or_else(|_| Err(gone()))
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
        self.save_template(id, name, overwrite, false).await
    }

    /// Saves a running capsule's disk as template `name`: flattened and sparse, with
    /// no memory snapshot, so capsules cold-boot it. The guest syncs first and is
    /// stopped while its disk is copied; then it runs on.
    pub async fn snapshot_disk(
        &self,
        id: &CapsuleId,
        name: &str,
        overwrite: bool,
    ) -> Result<(), CapsuleError> {
        self.save_template(id, name, overwrite, true).await
    }

    async fn save_template(
        &self,
        id: &CapsuleId,
        name: &str,
        overwrite: bool,
        disk_only: bool,
    ) -> Result<(), CapsuleError> {
        let name = TemplateName::parse(name).map_err(crate::spec::InvalidSpec::from)?;
        // A flattened disk and (unless disk-only) the whole memory, at most.
        let need = self
            .entry(id)
            .ok()
            .and_then(|e| e.snapshot())
            .map(|r| {
                let memory = if disk_only {
                    0
                } else {
                    u64::from(r.spec.memory_mb) << 20
                };
                (r.spec.disk_mb << 20) + memory
            })
            .unwrap_or(0);
        let _space = self.reserve_space("snapshot the capsule", need)?;
        self.ask(id, |reply| Command::Snapshot {
            name,
            overwrite,
            disk_only,
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
                                MemoryBase::File(templates.pin(p, &dir, Pin::Memory).await?)
                            }
                            MemoryBase::Zero => MemoryBase::Zero,
                        };
                        let disk_base = templates.pin(&disk, &dir, Pin::RootDisk).await?;
                        let device = templates.pin(&device_state, &dir, Pin::DeviceState).await?;
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

#[cfg(test)]
mod tests;
