//! File plumbing: temp files that vanish unless published, atomic publication
//! (temp → fsync → rename → fsync dir), whole-file checksums and read-only maps.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::header::Id;
use super::testing::{step, CommitStep};
use super::SnapshotError;
use crate::TEMP_MARKER;

/// Read/write buffer size for streaming data files.
pub(crate) const IO_CHUNK: usize = 4 << 20;

/// A file under a temp name (with [`TEMP_MARKER`]) next to its final name; removed on
/// drop unless [`TempFile::publish`]ed.
#[derive(Debug)]
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    published: bool,
}

impl TempFile {
    /// Creates `<dir>/<TEMP_MARKER><final_name>-<random>`.
    pub(crate) fn create(dir: &Path, final_name: &str) -> Result<TempFile, SnapshotError> {
        let path = dir.join(format!("{TEMP_MARKER}{final_name}-{}", Id::random()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(SnapshotError::io("create", &path))?;
        Ok(TempFile {
            path,
            file,
            published: false,
        })
    }

    /// fsync → `synced` hook → rename over `dest` → `renamed` hook → fsync the directory.
    pub(crate) fn publish(
        mut self,
        dest: &Path,
        synced: CommitStep,
        renamed: CommitStep,
    ) -> Result<(), SnapshotError> {
        self.file
            .sync_all()
            .map_err(SnapshotError::io("fsync", &self.path))?;
        step(synced);
        std::fs::rename(&self.path, dest).map_err(|source| SnapshotError::Io {
            step: "rename into place",
            path: dest.to_path_buf(),
            source,
        })?;
        self.published = true;
        step(renamed);
        fsync_dir(dest.parent().unwrap_or(Path::new(".")))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to `dest` atomically (temp in the same directory, fsync, rename, fsync dir).
pub(crate) fn write_atomic(
    dest: &Path,
    bytes: &[u8],
    synced: CommitStep,
    renamed: CommitStep,
) -> Result<(), SnapshotError> {
    use std::io::Write;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = TempFile::create(dir, &name)?;
    tmp.file
        .write_all(bytes)
        .map_err(SnapshotError::io("write", &tmp.path))?;
    tmp.publish(dest, synced, renamed)
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SnapshotError::io("fsync directory", dir))
}

/// Opens a generation data file, checks its size and (if `verify`) its CRC32.
pub(crate) fn open_data_file(
    path: &Path,
    expected_len: u64,
    expected_crc: Option<u32>,
) -> Result<File, SnapshotError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::MissingGeneration {
                file: path.to_path_buf(),
            })
        }
        Err(e) => return Err(SnapshotError::io("open", path)(e)),
    };
    let actual = file
        .metadata()
        .map_err(SnapshotError::io("stat", path))?
        .len();
    if actual < expected_len {
        return Err(SnapshotError::Truncated {
            file: path.to_path_buf(),
            expected: expected_len,
            actual,
        });
    }
    if actual > expected_len {
        return Err(SnapshotError::Corrupt {
            file: path.to_path_buf(),
            reason: format!("{actual} bytes, but the header says {expected_len}"),
        });
    }
    if let Some(expected) = expected_crc {
        let actual = crc32_of(&file, expected_len).map_err(SnapshotError::io("read", path))?;
        if actual != expected {
            return Err(SnapshotError::ChecksumMismatch {
                file: path.to_path_buf(),
                expected,
                actual,
            });
        }
    }
    Ok(file)
}

/// CRC32 of the first `len` bytes, read sequentially in large chunks.
fn crc32_of(mut file: &File, len: u64) -> io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; IO_CHUNK];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher.finalize())
}

/// Maps the first `len` (> 0) bytes of `file` read-only.
///
/// The map is sound to read only while nobody truncates or rewrites the file; this module
/// guarantees that for every file it maps: data files and base memory files are written
/// once under a temp name and never modified after their rename (merges write new files
/// and unlink old ones, which leaves existing maps intact). `len` was checked against the
/// file size just before.
pub(crate) fn map_file(file: &File, len: u64, path: &Path) -> Result<Mmap, SnapshotError> {
    let len = usize::try_from(len).map_err(|_| SnapshotError::Corrupt {
        file: path.to_path_buf(),
        reason: "larger than the address space".into(),
    })?;
    // SAFETY: memmap2 requires that the file is not modified or truncated while mapped
    // (otherwise reads may see changing bytes or fault with SIGBUS). Data files are
    // immutable after publication and are only ever unlinked, never truncated; base files
    // are templates' immutable memory images (documented contract of `page_source` and
    // `write_raw_image`). The length was checked against the file's size by the caller.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(file) }
        .map_err(SnapshotError::io("mmap", path))?;
    Ok(map)
}
