//! qcow2 overlays over raw base images, made and flattened with `qemu-img`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use async_trait::async_trait;
use wrenn_core::storage::{CowDisk, CowStore, DiskFormat, StorageError};

use super::{check_base, ensure_distinct, remove_file, TempPath};
use crate::error::DiskError;
use crate::qemu_img::QemuImg;

/// Capsule disks as qcow2 overlays whose backing file is the (raw) base image.
///
/// `create` is O(1) in the base size; the base must stay unchanged while overlays use it.
/// The overlay records the base's canonical absolute path.
#[derive(Clone, Debug, Default)]
pub struct Qcow2Store {
    qemu_img: QemuImg,
    force_share: bool,
}

impl Qcow2Store {
    /// A store that looks `qemu-img` up at each call (see [`crate::find_qemu_img`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that runs the given `qemu-img` binary.
    pub fn with_qemu_img(path: impl Into<PathBuf>) -> Self {
        Qcow2Store {
            qemu_img: QemuImg::with_program(path),
            force_share: false,
        }
    }

    /// Passes `-U` (force share) to `qemu-img convert`, so `flatten` works on an overlay
    /// still opened by a *paused* QEMU. The caller guarantees the guest is paused and QEMU
    /// has flushed the disk; otherwise the flattened image may be inconsistent.
    pub fn force_share(mut self, on: bool) -> Self {
        self.force_share = on;
        self
    }

    /// Runs qemu-img with `args`; returns its exit status and the tail of its stderr.
    async fn run(
        &self,
        step: &'static str,
        args: &[&OsStr],
    ) -> Result<(ExitStatus, String), DiskError> {
        self.qemu_img.run(step, args).await
    }

    /// Rebases a copy of `layer` onto `backing` (relative to the layer's directory)
    /// and renames it over `layer`. `copy_data`: the copy takes in what the images
    /// between hold; otherwise only its header changes.
    async fn rebase(
        &self,
        layer: &Path,
        backing: &Path,
        copy_data: bool,
    ) -> Result<(), StorageError> {
        let dir = layer.parent().unwrap_or(Path::new("."));
        let backing_path = dir.join(backing);
        if !backing_path.is_file() {
            return Err(StorageError::BaseMissing { path: backing_path });
        }
        let backing_format = crate::image_format(&backing_path);
        let tmp = TempPath::for_dest(layer)?;
        let (src, dest) = (layer.to_path_buf(), tmp.path().to_path_buf());
        super::blocking(move || {
            std::fs::copy(&src, &dest)
                .map(drop)
                .map_err(|source| DiskError::Copy { src, dest, source })
        })
        .await?;
        let mut args = vec![OsStr::new("rebase")];
        if !copy_data {
            args.push(OsStr::new("-u"));
        }
        args.extend([
            OsStr::new("-F"),
            OsStr::new(backing_format),
            OsStr::new("-b"),
            backing.as_os_str(),
            tmp.path().as_os_str(),
        ]);
        let (status, stderr) = self.run("rebase", &args).await?;
        if !status.success() {
            return Err(DiskError::QemuImgRebase {
                layer: layer.to_path_buf(),
                backing: backing.to_path_buf(),
                status,
                stderr,
            }
            .into());
        }
        let layer = layer.to_path_buf();
        Ok(super::blocking(move || tmp.commit_replace(&layer)).await?)
    }
}

#[async_trait]
impl CowStore for Qcow2Store {
    fn format(&self) -> DiskFormat {
        DiskFormat::Qcow2
    }

    async fn create(
        &self,
        base: &Path,
        dest: &Path,
        size_mb: u64,
    ) -> Result<CowDisk, StorageError> {
        let (base, size_bytes) = check_base(base, size_mb).await?;
        let tmp = TempPath::for_dest(dest)?;
        let size_arg = size_bytes.to_string();
        // Bases are raw template images, or qcow2 layers of a snapshot chain.
        let base_format = crate::image_format(&base.path);
        let (status, stderr) = self
            .run(
                "create",
                &[
                    OsStr::new("create"),
                    OsStr::new("-q"),
                    OsStr::new("-f"),
                    OsStr::new("qcow2"),
                    OsStr::new("-F"),
                    OsStr::new(base_format),
                    OsStr::new("-b"),
                    base.path.as_os_str(),
                    tmp.path().as_os_str(),
                    OsStr::new(&size_arg),
                ],
            )
            .await?;
        if !status.success() {
            return Err(DiskError::QemuImgCreate {
                base: base.path,
                dest: dest.to_path_buf(),
                status,
                stderr,
            }
            .into());
        }
        let dest_owned = dest.to_path_buf();
        super::blocking(move || tmp.commit_new(&dest_owned)).await?;
        tracing::debug!(disk = %dest.display(), base = %base.path.display(), size_bytes, "qcow2 overlay created");
        Ok(CowDisk {
            path: dest.to_path_buf(),
            format: DiskFormat::Qcow2,
            base: base.path,
            size_bytes,
        })
    }

    async fn remove(&self, disk: &CowDisk) -> Result<(), StorageError> {
        remove_file(&disk.path).await
    }

    /// The guest could have rewritten the qcow2 header: it must still name the base
    /// the overlay was made over, and no data file.
    async fn check(&self, disk: &CowDisk) -> Result<(), StorageError> {
        if disk.format != DiskFormat::Qcow2 {
            return Ok(());
        }
        let (path, base) = (disk.path.clone(), disk.base.clone());
        super::blocking(move || crate::qcow2::check_guest_layer(&path, &base)).await?;
        Ok(())
    }

    async fn rebind(&self, layer: &Path, backing: &Path) -> Result<(), StorageError> {
        self.rebase(layer, backing, false).await
    }

    async fn fold(&self, layer: &Path, backing: &Path) -> Result<(), StorageError> {
        self.rebase(layer, backing, true).await
    }

    /// Also flattens raw disks (the input format is always passed explicitly, never probed).
    async fn flatten(&self, disk: &CowDisk, dest: &Path) -> Result<(), StorageError> {
        ensure_distinct(&disk.path, dest).await?;
        // qemu-img follows a qcow2 header, which the VM's VMM could write (a raw
        // disk is read as raw: `-f` below).
        self.check(disk).await?;
        let tmp = TempPath::for_dest(dest)?;
        let mut args = vec![
            OsStr::new("convert"),
            OsStr::new("-f"),
            OsStr::new(disk.format.as_str()),
            OsStr::new("-O"),
            OsStr::new("raw"),
            OsStr::new("-S"),
            OsStr::new("4k"),
        ];
        if self.force_share {
            args.push(OsStr::new("-U"));
        }
        args.extend([disk.path.as_os_str(), tmp.path().as_os_str()]);
        let (status, stderr) = self.run("convert", &args).await?;
        if !status.success() {
            return Err(DiskError::QemuImgConvert {
                src: disk.path.clone(),
                dest: dest.to_path_buf(),
                status,
                stderr,
            }
            .into());
        }
        let dest_owned = dest.to_path_buf();
        super::blocking(move || tmp.commit_replace(&dest_owned)).await?;
        Ok(())
    }
}
