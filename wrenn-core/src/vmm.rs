//! Virtual machine monitors. [`Vmm`] is a factory; the per-VM operations live on
//! the [`VmmHandle`] it returns. Backend-specific knobs go to the backend's
//! constructor, never into these traits.

use crate::storage::DiskFormat;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::PathBuf;

/// How guests are executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization that was measured to run guests at native speed.
    Kvm,
    /// Software emulation (QEMU TCG).
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The boot source: kernel image and command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel: PathBuf,
    pub cmdline: String,
}

/// A block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub id: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
    pub root: bool,
}

/// A NIC attached to an existing tap device inside a network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIface {
    pub id: String,
    pub tap: String,
    pub mac: String,
    /// Namespace file the VMM process must run in (`/run/netns/<name>`).
    pub netns_path: PathBuf,
}

/// vCPUs and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_mb: u32,
}

/// What guest memory holds when the VM starts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBase {
    /// All zeros (a cold boot, or a restore whose every non-zero page is overlaid).
    #[default]
    Zero,
    /// A raw memory image mapped copy-on-write: clean pages are shared by every VM
    /// started from it, and the file is never written.
    File(PathBuf),
}

/// Everything needed to start one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Tag the VMM process carries (`wrenn-<capsule id>`), so sweeps can find orphans.
    pub name: String,
    /// Per-VM run directory (control socket, console log).
    pub run_dir: PathBuf,
    pub boot: BootSource,
    pub machine: MachineConfig,
    pub drives: Vec<Drive>,
    pub nets: Vec<NetIface>,
    #[serde(default)]
    pub memory: MemoryBase,
}

/// Receives one page: its index and bytes (`None` = all zeros).
pub type PageVisitor<'a> = dyn FnMut(u64, Option<&[u8]>) -> std::io::Result<()> + 'a;

/// Guest pages, for writing into a restored VM before it runs.
pub trait PageOverlay: Send + Sync {
    /// Calls `f(page index, bytes)` for every page that differs from the memory
    /// base; `None` means an all-zero page.
    fn for_each(&self, f: &mut PageVisitor<'_>) -> std::io::Result<()>;
}

/// No pages: the memory base is the memory.
#[derive(Debug, Default)]
pub struct NoOverlay;

impl PageOverlay for NoOverlay {
    fn for_each(&self, _f: &mut PageVisitor<'_>) -> std::io::Result<()> {
        Ok(())
    }
}

/// Pages a VM changed relative to its memory base (4 KiB each, in `data` order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangedPages {
    pub page_size: u64,
    /// Page indexes, ascending.
    pub pages: Vec<u64>,
    /// `pages.len() * page_size` bytes.
    pub data: Vec<u8>,
}

impl ChangedPages {
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// `(page index, bytes)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let ps = usize::try_from(self.page_size).unwrap_or(4096);
        self.pages.iter().copied().zip(self.data.chunks(ps))
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    #[error("Operation {op} is not supported by this VMM")]
    Unsupported { op: &'static str },
    #[error("VM is not in a state that allows {op}")]
    InvalidState { op: &'static str },
    #[error("VMM did not answer within {secs} s during {op}")]
    Timeout { op: &'static str, secs: u64 },
    #[error("VMM process exited: {detail}")]
    Exited { detail: String },
    #[error("VMM failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What [`VmmHandle::save`] wrote: the device state file (restored by
/// [`Vmm::restore`]) and the guest pages to keep with it (shared, never copied:
/// a fork restores many VMs from them).
#[derive(Clone, Debug)]
pub struct SavedState {
    pub device_state: std::path::PathBuf,
    pub changed: std::sync::Arc<ChangedPages>,
}

/// Starts VMs.
#[async_trait]
pub trait Vmm: Send + Sync + Debug {
    /// The acceleration this VMM uses (decided once, by measurement).
    fn accel(&self) -> Accel;

    /// Boots a VM. On error no process or file of it is left behind.
    async fn spawn(&self, spec: &VmSpec) -> Result<Box<dyn VmmHandle>, VmmError>;

    /// Starts a VM from saved device state: its memory is `spec.memory` with
    /// `overlay` written over it, and it runs only once everything is in place.
    /// The overlay is shared (forks restore many VMs from one), and writing it is
    /// blocking work an implementation does off the async workers.
    async fn restore(
        &self,
        spec: &VmSpec,
        device_state: &std::path::Path,
        overlay: std::sync::Arc<dyn PageOverlay>,
    ) -> Result<Box<dyn VmmHandle>, VmmError> {
        let _ = (spec, device_state, overlay);
        Err(VmmError::Unsupported { op: "restore" })
    }

    /// Takes over VMM process `pid`, running `spec`, that an earlier process of this
    /// host started and left running when it died (only VMMs set to outlive their
    /// owner do).
    async fn attach(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn VmmHandle>, VmmError> {
        let _ = (spec, pid);
        Err(VmmError::Unsupported { op: "attach" })
    }
}

/// One running VM. Dropping it kills the VMM process (backstop only).
#[async_trait]
pub trait VmmHandle: Send + Sync + Debug {
    /// OS process id of the VMM.
    fn pid(&self) -> Option<u32>;

    /// Resolves when the VMM process has exited, with a description of how.
    async fn wait_exit(&self) -> String;

    /// Pauses the vCPUs.
    async fn pause(&self) -> Result<(), VmmError> {
        Err(VmmError::Unsupported { op: "pause" })
    }

    /// Resumes paused vCPUs.
    async fn resume(&self) -> Result<(), VmmError> {
        Err(VmmError::Unsupported { op: "resume" })
    }

    /// Writes the device state of a paused VM into the directory `dir` (the
    /// implementation names the file) and returns it with the guest pages that
    /// differ from the VM's memory base.
    async fn save(&self, dir: &std::path::Path) -> Result<SavedState, VmmError> {
        let _ = dir;
        Err(VmmError::Unsupported { op: "save" })
    }

    /// Stops the VM and its process: graceful request, bounded wait, then kill.
    /// Idempotent.
    async fn shutdown(&self) -> Result<(), VmmError>;

    /// What the VMM process uses on the host, from its cgroup (`None` when it
    /// runs without one).
    fn usage(&self) -> Option<VmmUsage> {
        None
    }
}

/// Host resources a VMM uses (its cgroup's counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmUsage {
    /// Memory charged to the VMM: guest RAM it touched plus its own.
    pub memory_bytes: u64,
    /// CPU time used since it started, in µs (`None` where the host does not
    /// account CPU per group, e.g. a v1 `cpuacct` hierarchy apart from `cpu`).
    pub cpu_usage_us: Option<u64>,
}
