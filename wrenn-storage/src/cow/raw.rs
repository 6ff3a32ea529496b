//! Standalone raw copies of the base image, for VMMs that need plain raw disks
//! (Firecracker).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use wrenn_core::storage::{CowDisk, CowStore, DiskFormat, StorageError};

use super::{blocking, check_base, ensure_distinct, remove_file, CancelOnDrop, TempPath};
use crate::error::DiskError;
use crate::sparse::{sparse_copy, try_reflink, CopyMethod};

/// Capsule disks as full raw copies of the base: a reflink clone where the filesystem
/// can (XFS `reflink=1`, btrfs), else a sparse copy of the base's data extents.
///
/// On ext4 each `create` costs a copy of the base's data (not of its holes).
#[derive(Clone, Debug)]
pub struct RawCopyStore {
    reflink: bool,
}

impl Default for RawCopyStore {
    fn default() -> Self {
        RawCopyStore { reflink: true }
    }
}

impl RawCopyStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Never tries a reflink; always sparse-copies.
    pub fn without_reflink() -> Self {
        RawCopyStore { reflink: false }
    }

    /// Like [`CowStore::create`], also telling how the copy was made.
    pub async fn create_with_method(
        &self,
        base: &Path,
        dest: &Path,
        size_mb: u64,
    ) -> Result<(CowDisk, CopyMethod), StorageError> {
        let (base, size_bytes) = check_base(base, size_mb).await?;
        let tmp = TempPath::for_dest(dest)?;
        let (_guard, cancelled) = CancelOnDrop::new();
        let reflink = self.reflink;
        let base_path = base.path.clone();
        let dest_owned = dest.to_path_buf();
        let method = blocking(move || {
            let src = open(&base_path)?;
            let dst = tmp.create()?;
            let method = copy_into(&src, &base_path, &dst, tmp.path(), base.len, reflink)?;
            dst.set_len(size_bytes)
                .map_err(|source| DiskError::SetLen {
                    path: tmp.path().to_path_buf(),
                    size: size_bytes,
                    source,
                })?;
            drop(dst);
            if cancelled.load(Ordering::Acquire) {
                // Nobody awaits this disk any more: do not publish it (`tmp` is removed).
                return Ok(method);
            }
            tmp.commit_new(&dest_owned)?;
            Ok(method)
        })
        .await?;
        tracing::debug!(disk = %dest.display(), base = %base.path.display(), size_bytes, ?method, "raw disk created");
        let disk = CowDisk {
            path: dest.to_path_buf(),
            format: DiskFormat::Raw,
            base: base.path,
            size_bytes,
        };
        Ok((disk, method))
    }
}

fn open(path: &Path) -> Result<File, DiskError> {
    File::open(path).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Fills the empty `dst` with the first `len` bytes of `src`: reflink if allowed and
/// possible, else a sparse copy.
fn copy_into(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    len: u64,
    reflink: bool,
) -> Result<CopyMethod, DiskError> {
    let paths = || (src_path.to_path_buf(), dst_path.to_path_buf());
    if reflink {
        let cloned = try_reflink(src, dst).map_err(|source| {
            let (src, dest) = paths();
            DiskError::Reflink { src, dest, source }
        })?;
        if cloned {
            return Ok(CopyMethod::Reflink);
        }
    }
    sparse_copy(src, dst, len).map_err(|source| {
        let (src, dest) = paths();
        DiskError::Copy { src, dest, source }
    })?;
    Ok(CopyMethod::Sparse)
}

#[async_trait]
impl CowStore for RawCopyStore {
    fn format(&self) -> DiskFormat {
        DiskFormat::Raw
    }

    async fn create(
        &self,
        base: &Path,
        dest: &Path,
        size_mb: u64,
    ) -> Result<CowDisk, StorageError> {
        self.create_with_method(base, dest, size_mb)
            .await
            .map(|(disk, _)| disk)
    }

    async fn remove(&self, disk: &CowDisk) -> Result<(), StorageError> {
        remove_file(&disk.path).await
    }

    /// Sparse-copies the disk to a temp file next to `dest` and renames it over `dest`.
    /// The disk should not be written meanwhile (pause the guest first).
    async fn flatten(&self, disk: &CowDisk, dest: &Path) -> Result<(), StorageError> {
        if disk.format != DiskFormat::Raw {
            return Err(DiskError::WrongFormat {
                path: disk.path.clone(),
                expected: DiskFormat::Raw.as_str(),
                found: disk.format.as_str(),
            }
            .into());
        }
        ensure_distinct(&disk.path, dest).await?;
        let tmp = TempPath::for_dest(dest)?;
        let (_guard, cancelled) = CancelOnDrop::new();
        let src_path: PathBuf = disk.path.clone();
        let dest_owned = dest.to_path_buf();
        blocking(move || {
            let src = open(&src_path)?;
            let len = src
                .metadata()
                .map_err(|source| DiskError::Open {
                    path: src_path.clone(),
                    source,
                })?
                .len();
            let dst = tmp.create()?;
            copy_into(&src, &src_path, &dst, tmp.path(), len, false)?;
            drop(dst);
            if cancelled.load(Ordering::Acquire) {
                return Ok(());
            }
            tmp.commit_replace(&dest_owned)
        })
        .await?;
        Ok(())
    }
}
