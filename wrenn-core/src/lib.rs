//! Wrenn's core: domain types, the traits the implementation crates fill in,
//! and the capsule lifecycle logic.
//!
//! This crate performs no syscalls, spawns no processes and opens no sockets,
//! so everything in it can be read and tested in isolation. The implementations
//! live in `wrenn-vmm` (QEMU), `wrenn-net` (namespaces), `wrenn-storage` (disks)
//! and `wrenn-envd` (the guest agent client); the `wrenn` crate wires them.
#![forbid(unsafe_code)]

pub mod addr;
pub mod diskspace;
pub mod egress;
pub mod error;
pub mod fsutil;
pub mod guest;
pub mod host;
pub mod id;
pub mod manager;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod process;
pub mod record;
pub mod scheduler;
pub mod snapshot;
pub mod spec;
pub mod status;
pub mod storage;
pub mod template;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vmm;

pub use error::CapsuleError;
pub use id::CapsuleId;
pub use manager::{
    CapsuleInfo, Capsules, DiskOvercommit, ExecOutput, HostParts, ManagerConfig, PoolStats,
    SweepReport, VmmProcess,
};
pub use spec::{CapsuleSpec, CreateOptions, Limits};
pub use status::CapsuleStatus;

/// Port envd listens on inside every capsule.
pub const ENVD_PORT: u16 = 49983;
