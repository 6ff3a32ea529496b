//! Copy-on-write capsule disks over read-only template images.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::{Path, PathBuf};

/// On-disk format of a capsule's writable disk, as the VMM must open it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A capsule's writable disk. Plain data; the [`CowStore`] that made it removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CowDisk {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// The read-only image it is layered over (raw copies keep it for reference).
    pub base: PathBuf,
    /// Virtual size the guest sees, in bytes.
    pub size_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("Base image {path} not found")]
    BaseMissing { path: PathBuf },
    #[error("Requested disk of {requested_mb} MB is smaller than the base image ({base_mb} MB)")]
    TooSmall { requested_mb: u64, base_mb: u64 },
    #[error("Operation {op} is not supported by this disk store")]
    Unsupported { op: &'static str },
    #[error("Disk backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Makes per-capsule writable disks over read-only base images.
#[async_trait]
pub trait CowStore: Send + Sync + Debug {
    /// Format of the disks this store makes.
    fn format(&self) -> DiskFormat;

    /// Where a capsule's writable disk made by this store lives in its directory `dir`.
    fn disk_path(&self, dir: &Path) -> std::path::PathBuf {
        dir.join(format!("disk.{}", self.format().as_str()))
    }

    /// Creates a writable disk at `dest` over `base`, of `size_mb` (at least the base's size).
    async fn create(&self, base: &Path, dest: &Path, size_mb: u64)
        -> Result<CowDisk, StorageError>;

    /// Checks a disk of this store that a VMM has written (its guest could have
    /// written its metadata) before the host reads or keeps it: it still stands on
    /// the base it was made over and refers to nothing else.
    async fn check(&self, disk: &CowDisk) -> Result<(), StorageError> {
        let _ = disk;
        Ok(())
    }

    /// Re-points `layer`, a disk of this store, at `backing`: a file with the same
    /// content as the image under it now, named relative to the layer's directory
    /// (so a directory of layers can move as one). Only the reference changes.
    /// The layer file is replaced, not written: other links to it keep the old one.
    async fn rebind(&self, layer: &Path, backing: &Path) -> Result<(), StorageError> {
        let _ = (layer, backing);
        Err(StorageError::Unsupported { op: "rebind" })
    }

    /// Makes `layer` stand directly on `backing` (named as for
    /// [`CowStore::rebind`]), an image lower in its chain, by copying into it what
    /// the images between hold; they are no longer needed by it afterwards.
    /// Replaces the layer file as `rebind` does.
    async fn fold(&self, layer: &Path, backing: &Path) -> Result<(), StorageError> {
        let _ = (layer, backing);
        Err(StorageError::Unsupported { op: "fold" })
    }

    /// Deletes a disk made by this store. Idempotent.
    async fn remove(&self, disk: &CowDisk) -> Result<(), StorageError>;

    /// Writes the disk's full content (base + changes) as a standalone raw image at
    /// `dest`, atomically (temp file + rename), sparse where the data is zero.
    async fn flatten(&self, disk: &CowDisk, dest: &Path) -> Result<(), StorageError>;
}
