//! In-memory fakes of every part a [`Capsules`](crate::Capsules) manager
//! composes, for tests that need no root, QEMU, network or disk: [`Fakes::parts`]
//! gives [`HostParts`], and the shared [`World`] injects faults, holds an
//! operation at a [`Gate`], kills VMMs, and counts what is held so a test can
//! prove nothing leaked. Paths handed out are names only; nothing is written.
//!
//! Enabled by the `testing` feature (and in this crate's own tests).

mod reporting;
pub use reporting::ReportingHost;

use crate::error::CapsuleError;
use crate::guest::{
    AgentError, ByteStream, ExecEvent, ExecRequest, ExecStream, ExitStatus, FileEntry, GuestAgent,
    GuestConnector, GuestInit, ProcessEntry, PtySize,
};
use crate::id::CapsuleId;
use crate::manager::HostParts;
use crate::net::{NetError, NetSlot, Network, SlotIndex, TAP_NAME};
use crate::record::{CapsuleRecord, Owner, StateError, StateStore};
use crate::snapshot::{PauseReport, Restorable, SnapshotError, SnapshotMeta, SnapshotStore};
use crate::storage::{CowDisk, CowStore, DiskFormat, StorageError};
use crate::template::{Pin, Template, TemplateError, TemplateInfo, TemplateName, TemplateStore};
use crate::vmm::{Accel, ChangedPages, PageOverlay, SavedState, VmSpec, Vmm, VmmError, VmmHandle};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{watch, Notify, Semaphore};

/// Where a fake can be told to fail or to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Point {
    NetAllocate,
    DiskCreate,
    DiskFlatten,
    VmmSpawn,
    VmmRestore,
    VmmPause,
    VmmSave,
    AgentReady,
    AgentInit,
    StateCreateDir,
    StateSave,
    CommitPause,
    SnapshotOpen,
}

/// Holds the calls that reach its point until opened.
#[derive(Debug)]
pub struct Gate {
    entered: Notify,
    arrivals: Mutex<usize>,
    release: Semaphore,
}

impl Gate {
    /// Waits until a call has reached the gate.
    pub async fn reached(&self) {
        loop {
            let notified = self.entered.notified();
            if *lock(&self.arrivals) > 0 {
                return;
            }
            notified.await;
        }
    }

    /// Lets every held call (and every later one) through.
    pub fn open(&self) {
        self.release.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// What the fakes currently hold, to check for leaks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub slots: usize,
    pub disks: usize,
    pub vmms: usize,
    pub dirs: usize,
    pub records: usize,
    pub snapshots: usize,
}

impl Held {
    pub fn nothing() -> Held {
        Held::default()
    }
}

#[derive(Debug, Default)]
struct VmState {
    paused: bool,
    exited: bool,
}

#[derive(Debug)]
struct FakeVm {
    pid: u32,
    state: Mutex<VmState>,
    exit: watch::Sender<Option<String>>,
}

/// The state every fake shares.
#[derive(Debug, Default)]
pub struct World {
    /// Per point: calls to let through first, then calls to fail.
    faults: Mutex<HashMap<Point, (u32, u32)>>,
    gates: Mutex<HashMap<Point, Arc<Gate>>>,
    calls: Mutex<HashMap<Point, u32>>,
    slots: Mutex<HashSet<u32>>,
    disks: Mutex<HashSet<PathBuf>>,
    vmms: Mutex<HashMap<u32, Arc<FakeVm>>>,
    next_pid: Mutex<u32>,
    dirs: Mutex<HashSet<CapsuleId>>,
    records: Mutex<HashMap<CapsuleId, CapsuleRecord>>,
    snapshots: Mutex<HashMap<CapsuleId, SnapshotMeta>>,
    templates: Mutex<HashMap<String, SnapshotMeta>>,
    dead_owners: Mutex<HashSet<Owner>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn backend(what: &str) -> Box<dyn std::error::Error + Send + Sync> {
    format!("injected fault: {what}").into()
}

impl World {
    /// Makes the next `times` calls at `point` fail.
    pub fn fail(&self, point: Point, times: u32) {
        lock(&self.faults).insert(point, (0, times));
    }

    /// Makes only the `n`th call from now at `point` fail (1 = the next).
    pub fn fail_nth(&self, point: Point, n: u32) {
        lock(&self.faults).insert(point, (n.saturating_sub(1), 1));
    }

    /// Makes every call at `point` wait at a gate until it is opened.
    pub fn hold(&self, point: Point) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            entered: Notify::new(),
            arrivals: Mutex::new(0),
            release: Semaphore::new(0),
        });
        lock(&self.gates).insert(point, gate.clone());
        gate
    }

    /// How often `point` was reached.
    pub fn calls(&self, point: Point) -> u32 {
        lock(&self.calls).get(&point).copied().unwrap_or(0)
    }

    /// Passes `point`: waits at its gate if one is set, then fails if a fault is due.
    async fn pass(&self, point: Point) -> Result<(), String> {
        *lock(&self.calls).entry(point).or_default() += 1;
        let gate = lock(&self.gates).get(&point).cloned();
        if let Some(gate) = gate {
            *lock(&gate.arrivals) += 1;
            gate.entered.notify_waiters();
            if let Ok(permit) = gate.release.acquire().await {
                permit.forget();
            }
        }
        let mut faults = lock(&self.faults);
        match faults.get_mut(&point) {
            Some((skip, _)) if *skip > 0 => {
                *skip -= 1;
                Ok(())
            }
            Some((_, times)) if *times > 0 => {
                *times -= 1;
                Err(format!("{point:?}"))
            }
            _ => Ok(()),
        }
    }

    /// Kills the VMM of `pid`, as a crash would.
    pub fn kill_vmm(&self, pid: u32) {
        if let Some(vm) = lock(&self.vmms).remove(&pid) {
            lock(&vm.state).exited = true;
            vm.exit.send_replace(Some("killed".into()));
        }
    }

    /// Whether the VMM of `pid` is alive and running its vCPUs.
    pub fn vmm_running(&self, pid: u32) -> bool {
        lock(&self.vmms)
            .get(&pid)
            .is_some_and(|vm| !lock(&vm.state).paused)
    }

    /// Marks records of `owner` as left by a dead process.
    pub fn bury(&self, owner: Owner) {
        lock(&self.dead_owners).insert(owner);
    }

    /// Puts a record on "disk", as another (or a dead) process would have left it.
    pub fn put_record(&self, rec: CapsuleRecord) {
        lock(&self.dirs).insert(rec.id.clone());
        lock(&self.records).insert(rec.id.clone(), rec);
    }

    pub fn record(&self, id: &CapsuleId) -> Option<CapsuleRecord> {
        lock(&self.records).get(id).cloned()
    }

    pub fn has_snapshot(&self, id: &CapsuleId) -> bool {
        lock(&self.snapshots).contains_key(id)
    }

    /// What is held now.
    pub fn held(&self) -> Held {
        Held {
            slots: lock(&self.slots).len(),
            disks: lock(&self.disks).len(),
            vmms: lock(&self.vmms).len(),
            dirs: lock(&self.dirs).len(),
            records: lock(&self.records).len(),
            snapshots: lock(&self.snapshots).len(),
        }
    }
}

/// Every fake, over one [`World`].
#[derive(Clone, Debug, Default)]
pub struct Fakes {
    pub world: Arc<World>,
}

/// The owner fakes report for this process.
pub const OWNER: Owner = Owner {
    pid: 1,
    start_time: 1,
};

impl Fakes {
    pub fn new() -> Fakes {
        Fakes::default()
    }

    pub fn parts(&self) -> HostParts {
        let w = self.world.clone();
        HostParts {
            vmm: Arc::new(FakeVmm(w.clone())),
            net: Arc::new(FakeNet(w.clone())),
            disks: Arc::new(FakeDisks(w.clone())),
            templates: Arc::new(FakeTemplates),
            guests: Arc::new(FakeGuests(w.clone())),
            state: Arc::new(FakeState(w.clone())),
            snapshots: Arc::new(FakeSnapshots(w)),
        }
    }
}

// ---------------------------------------------------------------------------
// VMM

#[derive(Debug)]
struct FakeVmm(Arc<World>);

impl FakeVmm {
    fn start(&self) -> Box<dyn VmmHandle> {
        let pid = {
            let mut p = lock(&self.0.next_pid);
            *p += 1;
            1000 + *p
        };
        let (exit, _) = watch::channel(None);
        let vm = Arc::new(FakeVm {
            pid,
            state: Mutex::new(VmState::default()),
            exit,
        });
        lock(&self.0.vmms).insert(pid, vm.clone());
        Box::new(FakeHandle {
            world: self.0.clone(),
            vm,
        })
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn accel(&self) -> Accel {
        Accel::Tcg
    }

    async fn spawn(&self, _spec: &VmSpec) -> Result<Box<dyn VmmHandle>, VmmError> {
        self.0
            .pass(Point::VmmSpawn)
            .await
            .map_err(|p| VmmError::Backend(backend(&p)))?;
        Ok(self.start())
    }

    async fn restore(
        &self,
        _spec: &VmSpec,
        _device_state: &Path,
        _overlay: Arc<dyn PageOverlay>,
    ) -> Result<Box<dyn VmmHandle>, VmmError> {
        self.0
            .pass(Point::VmmRestore)
            .await
            .map_err(|p| VmmError::Backend(backend(&p)))?;
        Ok(self.start())
    }
}

#[derive(Debug)]
struct FakeHandle {
    world: Arc<World>,
    vm: Arc<FakeVm>,
}

impl FakeHandle {
    fn alive(&self) -> Result<(), VmmError> {
        if lock(&self.vm.state).exited {
            Err(VmmError::Exited {
                detail: "killed".into(),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl VmmHandle for FakeHandle {
    fn pid(&self) -> Option<u32> {
        Some(self.vm.pid)
    }

    async fn wait_exit(&self) -> String {
        let mut rx = self.vm.exit.subscribe();
        let detail = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            // The sender lives as long as this handle: unreachable, but never hang.
            Err(_) => "gone".into(),
        };
        detail
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.world
            .pass(Point::VmmPause)
            .await
            .map_err(|p| VmmError::Backend(backend(&p)))?;
        self.alive()?;
        lock(&self.vm.state).paused = true;
        Ok(())
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.alive()?;
        lock(&self.vm.state).paused = false;
        Ok(())
    }

    async fn save(&self, dir: &Path) -> Result<SavedState, VmmError> {
        self.world
            .pass(Point::VmmSave)
            .await
            .map_err(|p| VmmError::Backend(backend(&p)))?;
        self.alive()?;
        Ok(SavedState {
            device_state: dir.join("fake.state"),
            changed: Arc::new(ChangedPages {
                page_size: 4096,
                pages: vec![0],
                data: vec![7; 4096],
            }),
        })
    }

    async fn shutdown(&self) -> Result<(), VmmError> {
        self.world.kill_vmm(self.vm.pid);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Network, disks, templates

#[derive(Debug)]
struct FakeNet(Arc<World>);

#[async_trait]
impl Network for FakeNet {
    async fn allocate(&self, _policy: &crate::egress::EgressPolicy) -> Result<NetSlot, NetError> {
        self.0
            .pass(Point::NetAllocate)
            .await
            .map_err(|p| NetError::Backend(backend(&p)))?;
        let mut slots = lock(&self.0.slots);
        let index = (0..).find(|i| !slots.contains(i)).unwrap_or(0);
        slots.insert(index);
        let octet = u8::try_from(index % 250).unwrap_or(0);
        Ok(NetSlot {
            index: SlotIndex(index),
            netns: format!("fake-{index}"),
            netns_path: PathBuf::from(format!("/run/netns/fake-{index}")),
            tap: TAP_NAME.into(),
            host_veth: format!("fv{index}"),
            host_addr: Ipv4Addr::new(10, 99, 0, octet),
        })
    }

    async fn set_egress(
        &self,
        _slot: &NetSlot,
        _policy: &crate::egress::EgressPolicy,
    ) -> Result<(), NetError> {
        Ok(())
    }

    async fn release(&self, slot: &NetSlot) -> Result<(), NetError> {
        lock(&self.0.slots).remove(&slot.index.0);
        Ok(())
    }

    fn adopt(&self, slot: &NetSlot) {
        lock(&self.0.slots).insert(slot.index.0);
    }

    async fn sweep(&self, keep: &[SlotIndex]) -> Result<usize, NetError> {
        let mut slots = lock(&self.0.slots);
        let before = slots.len();
        slots.retain(|i| keep.iter().any(|k| k.0 == *i));
        Ok(before - slots.len())
    }
}

#[derive(Debug)]
struct FakeDisks(Arc<World>);

#[async_trait]
impl CowStore for FakeDisks {
    fn format(&self) -> DiskFormat {
        DiskFormat::Qcow2
    }

    async fn create(
        &self,
        base: &Path,
        dest: &Path,
        size_mb: u64,
    ) -> Result<CowDisk, StorageError> {
        self.0
            .pass(Point::DiskCreate)
            .await
            .map_err(|p| StorageError::Backend(backend(&p)))?;
        lock(&self.0.disks).insert(dest.to_path_buf());
        Ok(CowDisk {
            path: dest.to_path_buf(),
            format: DiskFormat::Qcow2,
            base: base.to_path_buf(),
            size_bytes: size_mb << 20,
        })
    }

    async fn remove(&self, disk: &CowDisk) -> Result<(), StorageError> {
        lock(&self.0.disks).remove(&disk.path);
        Ok(())
    }

    async fn flatten(&self, _disk: &CowDisk, _dest: &Path) -> Result<(), StorageError> {
        self.0
            .pass(Point::DiskFlatten)
            .await
            .map_err(|p| StorageError::Backend(backend(&p)))
    }
}

/// Knows one template, `minimal`.
#[derive(Debug)]
struct FakeTemplates;

#[async_trait]
impl TemplateStore for FakeTemplates {
    async fn get(&self, name: &TemplateName) -> Result<Template, TemplateError> {
        if name.as_str() != "minimal" {
            return Err(TemplateError::Unknown {
                name: name.to_string(),
            });
        }
        Ok(Template {
            name: name.clone(),
            rootfs: PathBuf::from("/fake/templates/minimal/rootfs.img"),
            kernel: PathBuf::from("/fake/vmlinux"),
            kernel_args: String::new(),
        })
    }

    async fn list(&self) -> Result<Vec<TemplateName>, TemplateError> {
        Ok(TemplateName::parse("minimal").into_iter().collect())
    }

    async fn describe(&self, name: &TemplateName) -> Result<TemplateInfo, TemplateError> {
        self.get(name).await?;
        Ok(TemplateInfo {
            name: name.clone(),
            snapshot: None,
            size_bytes: 0,
            created_at: None,
        })
    }

    async fn delete(&self, name: &TemplateName) -> Result<(), TemplateError> {
        Err(TemplateError::Backend(
            format!("the fake store keeps template {name}").into(),
        ))
    }

    async fn pin(&self, _path: &Path, dir: &Path, what: Pin) -> Result<PathBuf, TemplateError> {
        Ok(dir.join(format!("{what:?}")))
    }
}

// ---------------------------------------------------------------------------
// Guest agent

#[derive(Debug)]
struct FakeGuests(Arc<World>);

impl GuestConnector for FakeGuests {
    fn connect(&self, _addr: SocketAddr, _access_token: Option<String>) -> Arc<dyn GuestAgent> {
        Arc::new(FakeAgent(self.0.clone()))
    }
}

/// Answers health and init, and runs any command as `echo`: its stdout is the
/// command line, exit code 0.
#[derive(Debug)]
struct FakeAgent(Arc<World>);

fn unsupported(what: &str) -> AgentError {
    AgentError::Protocol(format!("the fake agent does not {what}"))
}

#[async_trait]
impl GuestAgent for FakeAgent {
    async fn health(&self) -> Result<(), AgentError> {
        Ok(())
    }

    async fn wait_ready(&self, _timeout: std::time::Duration) -> Result<(), AgentError> {
        self.0
            .pass(Point::AgentReady)
            .await
            .map_err(|_| AgentError::NotReady { secs: 0 })
    }

    async fn init(&self, _init: &GuestInit) -> Result<(), AgentError> {
        self.0
            .pass(Point::AgentInit)
            .await
            .map_err(AgentError::Unreachable)
    }

    async fn exec(&self, req: &ExecRequest) -> Result<ExecStream, AgentError> {
        let (tx, events) = tokio::sync::mpsc::channel(4);
        let mut line = req.cmd.clone();
        for a in &req.args {
            line.push(' ');
            line.push_str(a);
        }
        for ev in [
            ExecEvent::Started { pid: 7 },
            ExecEvent::Stdout(line.into_bytes().into()),
            ExecEvent::Exited(ExitStatus {
                code: 0,
                exited: true,
                status: "exit status 0".into(),
            }),
        ] {
            let _ = tx.try_send(Ok(ev));
        }
        Ok(ExecStream { pid: 7, events })
    }

    async fn connect(&self, _pid: u32) -> Result<ExecStream, AgentError> {
        Err(unsupported("connect to processes"))
    }

    async fn list_processes(&self) -> Result<Vec<ProcessEntry>, AgentError> {
        Ok(Vec::new())
    }

    async fn send_stdin(&self, _pid: u32, _data: bytes::Bytes) -> Result<(), AgentError> {
        Ok(())
    }

    async fn close_stdin(&self, _pid: u32) -> Result<(), AgentError> {
        Ok(())
    }

    async fn send_pty_input(&self, _pid: u32, _data: bytes::Bytes) -> Result<(), AgentError> {
        Err(unsupported("have terminals"))
    }

    async fn resize_pty(&self, _pid: u32, _size: PtySize) -> Result<(), AgentError> {
        Err(unsupported("have terminals"))
    }

    async fn signal(&self, _pid: u32, _kill: bool) -> Result<(), AgentError> {
        Ok(())
    }

    async fn read_file(&self, path: &str) -> Result<ByteStream, AgentError> {
        Err(AgentError::NotFound(path.into()))
    }

    async fn write_file(&self, _path: &str, _data: ByteStream) -> Result<(), AgentError> {
        Err(unsupported("store files"))
    }

    async fn list_dir(&self, path: &str, _depth: u32) -> Result<Vec<FileEntry>, AgentError> {
        Err(AgentError::NotFound(path.into()))
    }

    async fn stat(&self, path: &str) -> Result<FileEntry, AgentError> {
        Err(AgentError::NotFound(path.into()))
    }

    async fn make_dir(&self, _path: &str) -> Result<FileEntry, AgentError> {
        Err(unsupported("store files"))
    }

    async fn remove(&self, path: &str) -> Result<(), AgentError> {
        Err(AgentError::NotFound(path.into()))
    }
}

// ---------------------------------------------------------------------------
// Records and snapshots

#[derive(Debug)]
struct FakeState(Arc<World>);

fn state_error(p: String) -> StateError {
    StateError {
        context: "fake state store".into(),
        source: backend(&p),
    }
}

fn capsule_dir(id: &CapsuleId) -> PathBuf {
    PathBuf::from("/fake/capsules").join(id.as_str())
}

#[async_trait]
impl StateStore for FakeState {
    async fn create_dir(&self, id: &CapsuleId) -> Result<PathBuf, StateError> {
        self.0
            .pass(Point::StateCreateDir)
            .await
            .map_err(state_error)?;
        lock(&self.0.dirs).insert(id.clone());
        Ok(capsule_dir(id))
    }

    async fn remove_dir(&self, id: &CapsuleId) -> Result<(), StateError> {
        lock(&self.0.dirs).remove(id);
        lock(&self.0.records).remove(id);
        Ok(())
    }

    async fn scratch_dir(&self, id: &CapsuleId, what: &str) -> Result<PathBuf, StateError> {
        Ok(capsule_dir(id).join(what))
    }

    async fn remove_scratch(&self, _dir: &Path) {}

    async fn save(&self, record: &CapsuleRecord) -> Result<(), StateError> {
        self.0.pass(Point::StateSave).await.map_err(state_error)?;
        lock(&self.0.records).insert(record.id.clone(), record.clone());
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(CapsuleId, Option<CapsuleRecord>)>, StateError> {
        let records = lock(&self.0.records);
        Ok(lock(&self.0.dirs)
            .iter()
            .map(|id| (id.clone(), records.get(id).cloned()))
            .collect())
    }

    fn current_owner(&self) -> Owner {
        OWNER
    }

    fn owner_alive(&self, owner: &Owner) -> bool {
        !lock(&self.0.dead_owners).contains(owner)
    }

    async fn kill_orphan_vmms(&self, _keep: &[CapsuleId]) -> usize {
        0
    }
}

#[derive(Debug)]
struct FakeSnapshots(Arc<World>);

fn snapshot_error(p: String) -> SnapshotError {
    SnapshotError::Backend(backend(&p))
}

fn restorable(meta: SnapshotMeta, dir: PathBuf) -> Restorable {
    Restorable {
        meta,
        device_state: dir.join("device.state"),
        overlay: Arc::new(ChangedPages::default()),
        disk_base: dir.join("disk.base"),
    }
}

#[async_trait]
impl SnapshotStore for FakeSnapshots {
    async fn begin_pause(&self, id: &CapsuleId) -> Result<PathBuf, SnapshotError> {
        Ok(PathBuf::from("/fake/snapshots").join(id.as_str()))
    }

    async fn commit_pause(
        &self,
        id: &CapsuleId,
        meta: &SnapshotMeta,
        saved: &SavedState,
        _disk: &CowDisk,
    ) -> Result<PauseReport, SnapshotError> {
        self.0
            .pass(Point::CommitPause)
            .await
            .map_err(snapshot_error)?;
        lock(&self.0.snapshots).insert(id.clone(), meta.clone());
        Ok(PauseReport {
            memory_bytes_written: saved.changed.data.len() as u64,
            pages_reported: saved.changed.pages.len() as u64,
            device_state_bytes: 0,
            generations: 1,
            merged: false,
        })
    }

    async fn commit_disk_only(
        &self,
        id: &CapsuleId,
        meta: &SnapshotMeta,
        _disk: Option<&CowDisk>,
    ) -> Result<PauseReport, SnapshotError> {
        let mut meta = meta.clone();
        meta.disk_only = true;
        lock(&self.0.snapshots).insert(id.clone(), meta);
        Ok(PauseReport {
            memory_bytes_written: 0,
            pages_reported: 0,
            device_state_bytes: 0,
            generations: 0,
            merged: false,
        })
    }

    async fn open(&self, id: &CapsuleId) -> Result<Restorable, SnapshotError> {
        self.0
            .pass(Point::SnapshotOpen)
            .await
            .map_err(snapshot_error)?;
        let meta = lock(&self.0.snapshots)
            .get(id)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound { id: id.to_string() })?;
        Ok(restorable(
            meta,
            PathBuf::from("/fake/snapshots").join(id.as_str()),
        ))
    }

    async fn remove(&self, id: &CapsuleId) -> Result<(), SnapshotError> {
        lock(&self.0.snapshots).remove(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<CapsuleId>, SnapshotError> {
        Ok(lock(&self.0.snapshots).keys().cloned().collect())
    }

    async fn write_template(
        &self,
        name: &TemplateName,
        meta: &SnapshotMeta,
        _saved: &SavedState,
        _disk: &CowDisk,
        overwrite: bool,
    ) -> Result<(), SnapshotError> {
        let mut t = lock(&self.0.templates);
        if t.contains_key(name.as_str()) && !overwrite {
            return Err(SnapshotError::NameTaken {
                name: name.to_string(),
            });
        }
        t.insert(name.to_string(), meta.clone());
        Ok(())
    }

    async fn write_disk_template(
        &self,
        name: &TemplateName,
        _disk: &CowDisk,
        overwrite: bool,
    ) -> Result<(), SnapshotError> {
        let mut t = lock(&self.0.templates);
        if t.contains_key(name.as_str()) && !overwrite {
            return Err(SnapshotError::NameTaken {
                name: name.to_string(),
            });
        }
        // No memory: the template cold-boots, so there is nothing to restore.
        t.remove(name.as_str());
        Ok(())
    }

    async fn open_template(
        &self,
        name: &TemplateName,
    ) -> Result<Option<Restorable>, SnapshotError> {
        Ok(lock(&self.0.templates).get(name.as_str()).map(|meta| {
            restorable(
                meta.clone(),
                PathBuf::from("/fake/templates").join(name.as_str()),
            )
        }))
    }
}

/// Whether `e` is the error of an injected fault (anywhere in its chain).
pub fn injected(e: &CapsuleError) -> bool {
    crate::manager::error_chain(e).contains("injected fault")
}

/// A new capsule's record (status `Starting`, owned by [`OWNER`]) of `template`
/// with the default limits' sizes.
///
/// # Panics
/// If `template` is not a valid template name.
pub fn record(template: &str) -> CapsuleRecord {
    let spec = crate::spec::CreateOptions {
        template: Some(template.into()),
        ..Default::default()
    }
    .validate(&crate::spec::Limits::default())
    .unwrap_or_else(|e| panic!("record({template:?}): {e}"));
    CapsuleRecord {
        id: CapsuleId::random(),
        status: crate::status::CapsuleStatus::Starting,
        spec,
        accel: Accel::Tcg,
        owner: OWNER,
        created_at: 0,
        vmm_pid: None,
        slot: None,
        disk: None,
        access_token: "token".into(),
        error: None,
        memory_base: crate::vmm::MemoryBase::Zero,
        kernel: PathBuf::new(),
        cmdline: String::new(),
        pooled: false,
    }
}
