//! Virtual machine monitors for Wrenn capsules.
//!
//! [`qemu::QemuVmm`] runs one `qemu-system-x86_64 -M microvm` process per capsule,
//! with virtio-mmio disk and net, the serial console in a per-capsule log file and
//! QMP on a Unix socket. [`accel::probe`] decides between KVM and TCG by measuring
//! a real guest boot, not by checking that `/dev/kvm` exists.

pub mod accel;
pub mod cgroup;
pub mod jail;
pub mod qemu;

pub use accel::{probe, AccelProbe};
pub use qemu::{QemuConfig, QemuVmm};
