//! The snapshot error: what was wrong with which file, or which step failed.

use std::io;
use std::path::PathBuf;

/// What went wrong while reading, writing or serving a memory snapshot.
///
/// Format errors name the file; I/O errors name the step and the path. Messages never
/// repeat the `#[source]`, so print the chain once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("{file} is not a Wrenn memory header (bad magic)")]
    BadMagic { file: PathBuf },
    #[error(
        "{file} has format version {major}.{minor}; this build reads {}.0 to {}.{}",
        super::header::FORMAT_MAJOR,
        super::header::FORMAT_MAJOR,
        super::header::FORMAT_MINOR
    )]
    UnsupportedVersion {
        file: PathBuf,
        major: u16,
        minor: u16,
    },
    #[error("{file} is truncated: {expected} bytes expected, {actual} found")]
    Truncated {
        file: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("Checksum mismatch in {file}: stored {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        file: PathBuf,
        expected: u32,
        actual: u32,
    },
    #[error("{file} is corrupt: {reason}")]
    Corrupt { file: PathBuf, reason: String },
    #[error("Generation data file {file} is missing")]
    MissingGeneration { file: PathBuf },
    #[error("Page {page} is out of range (the memory has {page_count} pages)")]
    PageOutOfRange { page: u64, page_count: u64 },
    #[error("Page {page} has {len} bytes, but pages are {page_size} bytes")]
    BadPageLength {
        page: u64,
        len: usize,
        page_size: u64,
    },
    #[error("Invalid snapshot parameters: {0}")]
    InvalidArgument(String),
    #[error(
        "Base memory file {path} is {actual} bytes, but the snapshot's base is {expected} bytes"
    )]
    BaseSizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("The snapshot has a base memory file, but none was given")]
    BaseFileRequired,
    #[error(
        "Snapshot in {dir} is at revision {found}, not {expected}: another write happened since this state was read"
    )]
    Stale {
        dir: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("Destination {path} already exists")]
    DestinationExists { path: PathBuf },
    #[error("Could not {step} {path}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl SnapshotError {
    pub(crate) fn io(
        step: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| SnapshotError::Io { step, path, source }
    }

    /// Replaces the file name in a format error (decoding knows no path).
    pub(crate) fn with_file(mut self, path: &std::path::Path) -> Self {
        match &mut self {
            SnapshotError::BadMagic { file }
            | SnapshotError::UnsupportedVersion { file, .. }
            | SnapshotError::Truncated { file, .. }
            | SnapshotError::ChecksumMismatch { file, .. }
            | SnapshotError::Corrupt { file, .. } => *file = path.to_path_buf(),
            _ => {}
        }
        self
    }
}

impl From<SnapshotError> for io::Error {
    fn from(err: SnapshotError) -> Self {
        let kind = match &err {
            SnapshotError::Io { source, .. } => source.kind(),
            SnapshotError::PageOutOfRange { .. }
            | SnapshotError::BadPageLength { .. }
            | SnapshotError::InvalidArgument(_) => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, err)
    }
}
