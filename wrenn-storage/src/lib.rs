//! Capsule disks: per-capsule writable copies of read-only template images, behind
//! [`wrenn_core::storage::CowStore`].
//!
//! - [`Qcow2Store`]: a qcow2 overlay whose backing file is the raw base (`qemu-img`);
//!   creation is instant and costs no copy. For QEMU.
//! - [`RawCopyStore`]: a standalone raw image, reflinked where the filesystem allows
//!   (XFS/btrfs) and otherwise sparse-copied. For VMMs that only open raw files
//!   (Firecracker).
//!
//! Every file this crate publishes is written under a temp name in the destination
//! directory (containing [`TEMP_MARKER`]), fsynced, then moved into place and the
//! directory fsynced, so a failure or crash never leaves a half-written disk at the
//! destination.
//!
//! Deliberately not here: device-mapper snapshots (no dm on the team's hosts), block
//! devices as bases, and deciding when it is safe to flatten a disk that a guest may be
//! writing (the caller pauses or stops it first).

pub mod capsnap;
pub mod error;
pub mod memserver;
pub mod qcow2;
pub mod qemu_img;
pub mod snapshot;
pub mod sparse;

mod cow;

use std::sync::Arc;

use wrenn_core::storage::{CowStore, DiskFormat};

pub use cow::{Qcow2Store, RawCopyStore, TEMP_MARKER};
pub use error::DiskError;
pub use qemu_img::{find_on_path, find_qemu_img, QemuImg, QEMU_IMG_ENV};
pub use sparse::CopyMethod;

/// `"qcow2"` when the file starts with the qcow2 magic, else `"raw"`.
pub fn image_format(path: &std::path::Path) -> &'static str {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"QFI\xfb";
    if is_qcow2 {
        "qcow2"
    } else {
        "raw"
    }
}

pub use capsnap::FsSnapshotStore;

/// The default store for disks of `format`.
pub fn store_for(format: DiskFormat) -> Arc<dyn CowStore> {
    match format {
        DiskFormat::Raw => Arc::new(RawCopyStore::new()),
        DiskFormat::Qcow2 => Arc::new(Qcow2Store::new()),
    }
}
