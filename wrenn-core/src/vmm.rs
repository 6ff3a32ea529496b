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

/// Starts VMs.
#[async_trait]
pub trait Vmm: Send + Sync + Debug {
    /// The acceleration this VMM uses (decided once, by measurement).
    fn accel(&self) -> Accel;

    /// Boots a VM. On error no process or file of it is left behind.
    async fn spawn(&self, spec: &VmSpec) -> Result<Box<dyn VmmHandle>, VmmError>;
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

    /// Stops the VM and its process: graceful request, bounded wait, then kill.
    /// Idempotent.
    async fn shutdown(&self) -> Result<(), VmmError>;
}
