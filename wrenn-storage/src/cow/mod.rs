//! Copy-on-write capsule disks: the two [`CowStore`](wrenn_core::storage::CowStore)
//! implementations and what they share (base checks, temp files, atomic commit).

mod qcow2;
mod raw;

pub use qcow2::Qcow2Store;
pub use raw::RawCopyStore;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use wrenn_core::storage::StorageError;

use crate::error::DiskError;

pub(crate) const MIB: u64 = 1 << 20;

/// A validated base image.
#[derive(Debug)]
pub(crate) struct Base {
    /// Canonical absolute path (symlinks resolved, so the disk pins the actual file).
    pub path: PathBuf,
    pub len: u64,
}

/// Checks that `base` is an existing regular file no larger than `size_mb` MiB; returns it
/// and the disk size in bytes.
pub(crate) async fn check_base(base: &Path, size_mb: u64) -> Result<(Base, u64), StorageError> {
    let missing = || StorageError::BaseMissing {
        path: base.to_path_buf(),
    };
    let stat_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            missing()
        } else {
            DiskError::StatBase {
                path: base.to_path_buf(),
                source,
            }
            .into()
        }
    };
    let path = tokio::fs::canonicalize(base).await.map_err(stat_err)?;
    let meta = tokio::fs::metadata(&path).await.map_err(stat_err)?;
    if !meta.is_file() {
        return Err(DiskError::BaseNotFile { path }.into());
    }
    let len = meta.len();
    let size_bytes = size_mb
        .checked_mul(MIB)
        .ok_or(DiskError::SizeOverflow { size_mb })?;
    if size_bytes < len {
        return Err(StorageError::TooSmall {
            requested_mb: size_mb,
            base_mb: len.div_ceil(MIB),
        });
    }
    Ok((Base { path, len }, size_bytes))
}

/// Fails if `dest` names the same file as `disk` (flattening a disk onto itself would swap
/// the inode under a guest that may still hold it open).
pub(crate) async fn ensure_distinct(disk: &Path, dest: &Path) -> Result<(), DiskError> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(a), Ok(b)) = (
        tokio::fs::metadata(disk).await,
        tokio::fs::metadata(dest).await,
    ) else {
        return Ok(());
    };
    if a.dev() == b.dev() && a.ino() == b.ino() {
        return Err(DiskError::FlattenOntoSelf {
            path: disk.to_path_buf(),
        });
    }
    Ok(())
}

/// Removes a disk file; a missing file is success.
pub(crate) async fn remove_file(path: &Path) -> Result<(), StorageError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DiskError::Remove {
            path: path.to_path_buf(),
            source,
        }
        .into()),
    }
}

/// Runs blocking disk work off the async workers.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, DiskError>
where
    F: FnOnce() -> Result<T, DiskError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(DiskError::Join)?
}

/// Set when the future that started some blocking work is dropped, so the work does not
/// publish a result nobody waits for.
#[derive(Debug)]
pub(crate) struct CancelOnDrop(Arc<AtomicBool>);

impl CancelOnDrop {
    pub fn new() -> (Self, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (CancelOnDrop(Arc::clone(&flag)), flag)
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Marker in temp names, so a startup sweep can recognise leftovers of a crash.
pub const TEMP_MARKER: &str = ".wrenn-tmp-";

/// A not-yet-published file next to its destination. Removed on drop unless committed.
#[derive(Debug)]
pub(crate) struct TempPath {
    path: PathBuf,
    dir: PathBuf,
    armed: bool,
}

impl TempPath {
    /// Picks an unused-looking temp name in `dest`'s directory (the file is not created):
    /// `.<name>.wrenn-tmp-<pid>-<n>`.
    pub fn for_dest(dest: &Path) -> Result<Self, DiskError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let bad = || DiskError::BadDestination {
            path: dest.to_path_buf(),
        };
        let name = dest.file_name().ok_or_else(bad)?;
        let dir = match dest.parent() {
            Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
            Some(p) => p.to_path_buf(),
            None => return Err(bad()),
        };
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            "{TEMP_MARKER}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(TempPath {
            path: dir.join(tmp_name),
            dir,
            armed: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the temp file for writing (it must not exist yet).
    pub fn create(&self) -> Result<File, DiskError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&self.path)
            .map_err(|source| DiskError::CreateTemp {
                path: self.path.clone(),
                source,
            })
    }

    /// fsync → rename over `dest` (replacing it) → fsync the directory.
    pub fn commit_replace(mut self, dest: &Path) -> Result<(), DiskError> {
        self.fsync_file()?;
        std::fs::rename(&self.path, dest).map_err(|source| DiskError::Rename {
            from: self.path.clone(),
            to: dest.to_path_buf(),
            source,
        })?;
        self.armed = false;
        self.fsync_dir()
    }

    /// fsync → publish at `dest` only if nothing is there yet → fsync the directory.
    ///
    /// Uses link + unlink, which is atomic and refuses to clobber on every Linux filesystem
    /// (unlike `renameat2(RENAME_NOREPLACE)`). A crash in between leaves a marked temp
    /// name for the sweep.
    pub fn commit_new(mut self, dest: &Path) -> Result<(), DiskError> {
        self.fsync_file()?;
        std::fs::hard_link(&self.path, dest).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                DiskError::DestinationExists {
                    path: dest.to_path_buf(),
                }
            } else {
                DiskError::Rename {
                    from: self.path.clone(),
                    to: dest.to_path_buf(),
                    source,
                }
            }
        })?;
        // `dest` is published; the temp name is only a second link now. Failing to unlink
        // it leaves a marked leftover for the sweep, not a broken disk.
        let _ = std::fs::remove_file(&self.path);
        self.armed = false;
        self.fsync_dir()
    }

    fn fsync_file(&self) -> Result<(), DiskError> {
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(|source| DiskError::Fsync {
                path: self.path.clone(),
                source,
            })
    }

    fn fsync_dir(&self) -> Result<(), DiskError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| DiskError::Fsync {
                path: self.dir.clone(),
                source,
            })
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the error paths already report the real failure.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
