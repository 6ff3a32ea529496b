//! The capsule manager: composes a [`Vmm`], a [`Network`], a [`CowStore`], a
//! [`TemplateStore`] and a [`GuestConnector`] into capsules.
//!
//! Each capsule has one actor task that owns its live resources (VMM handle,
//! network slot, disk). Lifecycle operations are messages to that actor, so two of
//! them never interleave and a caller that goes away cannot cancel one halfway.
//! Every resource is released on every failure path; a capsule whose VMM dies is
//! marked failed and its resources are released at once.

use crate::error::CapsuleError;
use crate::guest::{
    ExecEvent, ExecRequest, ExecStream, ExitStatus, GuestAgent, GuestConnector, GuestInit,
};
use crate::id::CapsuleId;
use crate::net::{NetSlot, Network, GUEST_MAC, TAP_NAME};
use crate::record::{CapsuleRecord, StateStore};
use crate::spec::{CreateOptions, Limits};
use crate::status::CapsuleStatus;
use crate::storage::{CowDisk, CowStore};
use crate::template::{Template, TemplateStore};
use crate::vmm::{Accel, BootSource, Drive, MachineConfig, NetIface, VmSpec, Vmm, VmmHandle};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// The parts a manager composes.
#[derive(Clone, Debug)]
pub struct HostParts {
    pub vmm: Arc<dyn Vmm>,
    pub net: Arc<dyn Network>,
    pub disks: Arc<dyn CowStore>,
    pub templates: Arc<dyn TemplateStore>,
    pub guests: Arc<dyn GuestConnector>,
    pub state: Arc<dyn StateStore>,
}

/// Manager settings.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub limits: Limits,
    /// How long a booting guest may take to answer envd health.
    pub ready_timeout: Duration,
    /// Path of the guest's init.
    pub guest_init: String,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            limits: Limits::default(),
            ready_timeout: Duration::from_secs(60),
            guest_init: "/usr/local/bin/wrenn-init".into(),
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
    /// Records of dead owners whose leftovers were removed.
    pub removed_capsules: usize,
    pub killed_vmms: usize,
    pub removed_slots: usize,
}

enum Command {
    Destroy(oneshot::Sender<Result<(), CapsuleError>>),
}

#[derive(Debug)]
struct Entry {
    record: Mutex<CapsuleRecord>,
    agent: Arc<dyn GuestAgent>,
    tx: mpsc::Sender<Command>,
}

impl Entry {
    fn snapshot(&self) -> Option<CapsuleRecord> {
        self.record.lock().ok().map(|r| r.clone())
    }

    fn status(&self) -> CapsuleStatus {
        self.record
            .lock()
            .map(|r| r.status)
            .unwrap_or(CapsuleStatus::Error)
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

fn random_token() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

/// The capsule manager.
#[derive(Debug)]
pub struct Capsules {
    parts: HostParts,
    config: ManagerConfig,
    table: Mutex<HashMap<CapsuleId, Arc<Entry>>>,
}

impl Capsules {
    /// A manager over `parts`. Call [`Capsules::recover`] once at startup.
    pub fn new(parts: HostParts, config: ManagerConfig) -> Arc<Self> {
        Arc::new(Capsules {
            parts,
            config,
            table: Mutex::new(HashMap::new()),
        })
    }

    pub fn accel(&self) -> Accel {
        self.parts.vmm.accel()
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Startup sweep: removes what crashed processes left behind (VMMs, network
    /// slots, disks, records) and leaves capsules of live processes alone.
    pub async fn recover(&self) -> Result<SweepReport, CapsuleError> {
        let mut report = SweepReport::default();
        let records = self.parts.state.list().await?;
        let mut keep_ids = Vec::new();
        let mut keep_slots = Vec::new();
        let mut dead = Vec::new();
        for (id, rec) in records {
            match rec {
                Some(r) if self.parts.state.owner_alive(&r.owner) => {
                    if let Some(slot) = &r.slot {
                        self.parts.net.adopt(slot);
                        keep_slots.push(slot.index);
                    }
                    keep_ids.push(id);
                    report.kept += 1;
                }
                other => dead.push((id, other)),
            }
        }
        report.killed_vmms = self.parts.state.kill_orphan_vmms(&keep_ids).await;
        for (id, rec) in dead {
            if let Some(disk) = rec.as_ref().and_then(|r| r.disk.as_ref()) {
                if let Err(e) = self.parts.disks.remove(disk).await {
                    tracing::warn!(capsule = %id, error = %error_chain(&e), "removing leftover disk");
                }
            }
            self.parts.state.remove_dir(&id).await?;
            report.removed_capsules += 1;
        }
        report.removed_slots = self.parts.net.sweep(&keep_slots).await?;
        tracing::info!(
            kept = report.kept,
            removed_capsules = report.removed_capsules,
            killed_vmms = report.killed_vmms,
            removed_slots = report.removed_slots,
            "startup sweep done"
        );
        Ok(report)
    }

    /// Creates a capsule and returns once its agent is healthy and initialised.
    pub async fn create(
        self: &Arc<Self>,
        opts: CreateOptions,
    ) -> Result<CapsuleInfo, CapsuleError> {
        let spec = opts.validate(&self.config.limits)?;
        let template = self.parts.templates.get(&spec.template).await?;
        let id = CapsuleId::random();
        let dir = self.parts.state.create_dir(&id).await?;
        let mut record = CapsuleRecord {
            id: id.clone(),
            status: CapsuleStatus::Starting,
            spec,
            accel: self.parts.vmm.accel(),
            owner: self.parts.state.current_owner(),
            created_at: now_unix(),
            vmm_pid: None,
            slot: None,
            disk: None,
            access_token: random_token(),
            error: None,
        };
        let mut res = Resources::default();
        let started = tokio::time::Instant::now();
        match self.bring_up(&mut record, &mut res, &template, &dir).await {
            Ok(agent) => {
                record.status = CapsuleStatus::Running;
                self.parts.state.save(&record).await?;
                tracing::info!(capsule = %id, template = %record.spec.template, accel = %record.accel,
                    ms = started.elapsed().as_millis() as u64, "capsule running");
                let info = CapsuleInfo::from(&record);
                self.start_actor(record, res, agent);
                Ok(info)
            }
            Err(e) => {
                tracing::warn!(capsule = %id, error = %error_chain(&e), "create failed; releasing");
                for err in res.release(&self.parts).await {
                    tracing::warn!(capsule = %id, %err, "cleanup after failed create");
                }
                if let Err(err) = self.parts.state.remove_dir(&id).await {
                    tracing::warn!(capsule = %id, error = %error_chain(&err), "removing capsule dir");
                }
                Err(e)
            }
        }
    }

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

    async fn bring_up(
        &self,
        record: &mut CapsuleRecord,
        res: &mut Resources,
        template: &Template,
        dir: &Path,
    ) -> Result<Arc<dyn GuestAgent>, CapsuleError> {
        self.parts.state.save(record).await?;
        let slot = self.parts.net.allocate().await?;
        res.slot = Some(slot.clone());
        record.slot = Some(slot.clone());

        let disk_name = format!("disk.{}", self.parts.disks.format().as_str());
        let disk = self
            .parts
            .disks
            .create(&template.rootfs, &dir.join(disk_name), record.spec.disk_mb)
            .await?;
        res.disk = Some(disk.clone());
        record.disk = Some(disk.clone());
        self.parts.state.save(record).await?;

        let vm = VmSpec {
            name: record.id.vmm_tag(),
            run_dir: dir.to_path_buf(),
            boot: BootSource {
                kernel: template.kernel.clone(),
                cmdline: self.kernel_cmdline(template),
            },
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
        };
        let handle = self.parts.vmm.spawn(&vm).await?;
        record.vmm_pid = handle.pid();
        self.parts.state.save(record).await?;

        let addr = SocketAddr::new(slot.host_addr.into(), crate::ENVD_PORT);
        let agent = self
            .parts
            .guests
            .connect(addr, Some(record.access_token.clone()));
        let ready = tokio::select! {
            r = agent.wait_ready(self.config.ready_timeout) => r.map_err(CapsuleError::from),
            detail = handle.wait_exit() => Err(CapsuleError::VmmExited {
                id: record.id.clone(), phase: "boot", detail,
            }),
        };
        res.vmm = Some(handle);
        ready?;
        agent
            .init(&GuestInit {
                access_token: Some(record.access_token.clone()),
                env_vars: record.spec.envs.clone(),
                default_user: None,
                default_workdir: None,
                timestamp: Some(SystemTime::now()),
            })
            .await?;
        Ok(agent)
    }

    fn start_actor(
        self: &Arc<Self>,
        record: CapsuleRecord,
        res: Resources,
        agent: Arc<dyn GuestAgent>,
    ) {
        let (tx, rx) = mpsc::channel(8);
        let id = record.id.clone();
        let entry = Arc::new(Entry {
            record: Mutex::new(record),
            agent,
            tx,
        });
        if let Ok(mut t) = self.table.lock() {
            t.insert(id, entry.clone());
        }
        let parts = self.parts.clone();
        tokio::spawn(actor(parts, entry, res, rx));
    }

    fn entry(&self, id: &CapsuleId) -> Result<Arc<Entry>, CapsuleError> {
        self.table
            .lock()
            .ok()
            .and_then(|t| t.get(id).cloned())
            .ok_or_else(|| CapsuleError::NotFound { id: id.to_string() })
    }

    fn running(&self, id: &CapsuleId, op: &'static str) -> Result<Arc<Entry>, CapsuleError> {
        let e = self.entry(id)?;
        let status = e.status();
        if status != CapsuleStatus::Running {
            return Err(CapsuleError::InvalidState {
                id: id.clone(),
                status,
                op,
                needed: "running",
            });
        }
        Ok(e)
    }

    /// Capsules this manager runs.
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

    pub fn get(&self, id: &CapsuleId) -> Result<CapsuleInfo, CapsuleError> {
        let e = self.entry(id)?;
        e.snapshot()
            .map(|r| CapsuleInfo::from(&r))
            .ok_or_else(|| CapsuleError::NotFound { id: id.to_string() })
    }

    /// The agent of a running capsule, for calls the manager does not wrap.
    pub fn agent(&self, id: &CapsuleId) -> Result<Arc<dyn GuestAgent>, CapsuleError> {
        Ok(self.running(id, "agent access")?.agent.clone())
    }

    /// Starts a command; events arrive on the returned stream.
    pub async fn exec(
        &self,
        id: &CapsuleId,
        req: &ExecRequest,
    ) -> Result<ExecStream, CapsuleError> {
        let e = self.running(id, "exec")?;
        Ok(e.agent.exec(req).await?)
    }

    /// Runs a command to completion, optionally feeding `stdin` first, and collects its output.
    pub async fn run(
        &self,
        id: &CapsuleId,
        req: &ExecRequest,
        stdin: Option<Bytes>,
    ) -> Result<ExecOutput, CapsuleError> {
        let e = self.running(id, "exec")?;
        let mut req = req.clone();
        req.stdin = stdin.is_some();
        let mut stream = e.agent.exec(&req).await?;
        if let Some(data) = stdin {
            if !data.is_empty() {
                e.agent.send_stdin(stream.pid, data).await?;
            }
            e.agent.close_stdin(stream.pid).await?;
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(ev) = stream.events.recv().await {
            match ev? {
                ExecEvent::Started { .. } => {}
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

    /// Destroys a capsule: stops its VM and releases everything it holds.
    pub async fn destroy(&self, id: &CapsuleId) -> Result<(), CapsuleError> {
        let e = self.entry(id)?;
        let (tx, rx) = oneshot::channel();
        let result = match e.tx.send(Command::Destroy(tx)).await {
            Ok(()) => rx.await.unwrap_or(Err(CapsuleError::ShuttingDown)),
            Err(_) => Err(CapsuleError::ShuttingDown),
        };
        if let Ok(mut t) = self.table.lock() {
            t.remove(id);
        }
        result?;
        self.parts.state.remove_dir(id).await?;
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

fn set_status(entry: &Entry, to: CapsuleStatus, error: Option<String>) -> Option<CapsuleRecord> {
    let mut r = entry.record.lock().ok()?;
    match r.status.transition(to) {
        Ok(s) => r.status = s,
        Err(e) => tracing::warn!(capsule = %r.id, %e, "ignoring transition"),
    }
    if error.is_some() {
        r.error = error;
    }
    Some(r.clone())
}

/// The one task that owns a capsule's live resources.
async fn actor(
    parts: HostParts,
    entry: Arc<Entry>,
    mut res: Resources,
    mut rx: mpsc::Receiver<Command>,
) {
    // Phase 1: running, watching the VMM.
    let cmd = loop {
        let Some(vmm) = res.vmm.as_ref() else {
            break rx.recv().await;
        };
        tokio::select! {
            cmd = rx.recv() => break cmd,
            detail = vmm.wait_exit() => {
                let id = entry.snapshot().map(|r| r.id.to_string()).unwrap_or_default();
                tracing::warn!(capsule = %id, %detail, "VMM exited unexpectedly; releasing the capsule's resources");
                res.vmm = None; // already gone; nothing to stop
                let errors = res.release(&parts).await;
                let mut msg = format!("VMM exited unexpectedly: {detail}");
                if !errors.is_empty() {
                    msg.push_str(&format!(" (cleanup: {})", errors.join("; ")));
                }
                if let Some(mut rec) = set_status(&entry, CapsuleStatus::Error, Some(msg)) {
                    rec.slot = None;
                    rec.disk = None;
                    rec.vmm_pid = None;
                    if let Ok(mut r) = entry.record.lock() {
                        *r = rec.clone();
                    }
                    let _ = parts.state.save(&rec).await;
                }
            }
        }
    };
    // Phase 2: a command (or the manager went away: tear down either way).
    set_status(&entry, CapsuleStatus::Stopping, None);
    let errors = res.release(&parts).await;
    let result = if errors.is_empty() {
        set_status(&entry, CapsuleStatus::Stopped, None);
        Ok(())
    } else {
        let msg = errors.join("; ");
        if let Some(rec) = set_status(&entry, CapsuleStatus::Error, Some(msg.clone())) {
            let _ = parts.state.save(&rec).await;
        }
        Err(CapsuleError::Vmm(crate::vmm::VmmError::Backend(msg.into())))
    };
    match cmd {
        Some(Command::Destroy(reply)) => {
            let _ = reply.send(result);
        }
        None => {
            if let Err(e) = result {
                tracing::warn!(error = %error_chain(&e), "teardown on manager drop");
            }
        }
    }
}
