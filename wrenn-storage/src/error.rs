//! The crate's rich disk error, converted to [`StorageError::Backend`] at the trait seam.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use wrenn_core::storage::StorageError;

/// What went wrong while making, flattening or removing a capsule disk, and at which step.
///
/// Callers of [`wrenn_core::storage::CowStore`] receive it boxed inside
/// [`StorageError::Backend`]; downcast to branch on the step. Messages never repeat the
/// `#[source]`, so print the chain once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    #[error("Could not stat base image {path}")]
    StatBase {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Base image {path} is not a regular file")]
    BaseNotFile { path: PathBuf },
    #[error("Requested size of {size_mb} MiB overflows a byte count")]
    SizeOverflow { size_mb: u64 },
    #[error("Destination {path} has no parent directory or file name")]
    BadDestination { path: PathBuf },
    #[error("Destination {path} already exists")]
    DestinationExists { path: PathBuf },
    #[error("Disk {path} is {found}, but this store handles {expected}")]
    WrongFormat {
        path: PathBuf,
        expected: &'static str,
        found: &'static str,
    },
    #[error("Refusing to read disk layer {path}: {reason} (its VMM may have rewritten it)")]
    UntrustedLayer { path: PathBuf, reason: String },
    #[error("Refusing to flatten {path} onto itself")]
    FlattenOntoSelf { path: PathBuf },
    #[error("qemu-img not found on PATH (set WRENN_QEMU_IMG)")]
    QemuImgNotFound,
    #[error("Could not spawn {program} for {step}")]
    SpawnQemuImg {
        program: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("qemu-img {step} failed ({status}): {stderr}")]
    QemuImgFailed {
        step: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    #[error("qemu-img create of {dest} over {base} failed ({status}): {stderr}")]
    QemuImgCreate {
        base: PathBuf,
        dest: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    #[error("qemu-img convert of {src} to {dest} failed ({status}): {stderr}")]
    QemuImgConvert {
        src: PathBuf,
        dest: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    #[error("qemu-img rebase of {layer} onto {backing} failed ({status}): {stderr}")]
    QemuImgRebase {
        layer: PathBuf,
        backing: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    #[error("Could not open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not create temporary file {path}")]
    CreateTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Reflink clone of {src} to {dest} failed")]
    Reflink {
        src: PathBuf,
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Copy of {src} to {dest} failed")]
    Copy {
        src: PathBuf,
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not resize {path} to {size} bytes")]
    SetLen {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("Could not fsync {path}")]
    Fsync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Blocking disk task failed")]
    Join(#[source] tokio::task::JoinError),
}

impl From<DiskError> for StorageError {
    fn from(err: DiskError) -> Self {
        StorageError::Backend(Box::new(err))
    }
}
