//! Raw-image copying: reflink clones (`FICLONE`) and sparse copies that walk the source's
//! data extents with `SEEK_DATA`/`SEEK_HOLE`.
//!
//! Blocking code: call it from `spawn_blocking` or a dedicated thread.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// Granularity at which runs of zeros inside data extents are left as holes.
pub const ZERO_BLOCK: usize = 4096;

/// Read buffer size for sparse copies.
const CHUNK: usize = 1 << 20;

/// How a raw copy was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// Extents shared with the source (XFS with `reflink=1`, btrfs).
    Reflink,
    /// Data extents copied; holes and zero blocks left unallocated.
    Sparse,
}

/// Makes `dst` share all of `src`'s extents with the `FICLONE` ioctl.
///
/// Returns `Ok(false)` when the filesystem pair cannot reflink (ext4, tmpfs, a different
/// filesystem), in which case `dst` is untouched and the caller should copy instead.
/// Other failures (I/O errors, no space) are returned.
pub fn try_reflink(src: &File, dst: &File) -> io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument and reads no
    // memory from us; both descriptors are borrowed from live `File`s for the whole call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // EOPNOTSUPP: the filesystem has no reflink (ext4). EXDEV: different filesystems.
        // EINVAL / ENOTTY / ENOSYS: the ioctl is unknown to this filesystem or kernel.
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS) => {
            Ok(false)
        }
        _ => Err(err),
    }
}

/// Copies the first `len` bytes of `src` into `dst`, which must be a fresh empty file, and
/// sets `dst`'s length to `len`.
///
/// Only `src`'s data extents are read (found with `SEEK_DATA`/`SEEK_HOLE`), and
/// [`ZERO_BLOCK`]-sized blocks of zeros inside them are skipped too, so holes stay holes and
/// zeroed data becomes holes. Returns the number of bytes written. If `src` shrinks during
/// the copy, the missing tail reads as zeros.
pub fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(src, pos, Whence::SeekData)? else {
            break; // ENXIO: only holes from `pos` to EOF.
        };
        if data >= len {
            break;
        }
        // There is always a hole at EOF, so SEEK_HOLE from a data offset succeeds.
        let hole = seek(src, data, Whence::SeekHole)?.unwrap_or(len).min(len);
        written += copy_range(src, dst, data, hole, &mut buf)?;
        pos = hole;
    }
    dst.set_len(len)?;
    Ok(written)
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when no such offset exists (ENXIO).
fn seek(file: &File, offset: u64, whence: Whence) -> io::Result<Option<u64>> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match lseek(file.as_raw_fd(), offset, whence) {
        Ok(found) => u64::try_from(found)
            .map(Some)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData)),
        Err(Errno::ENXIO) => Ok(None),
        Err(errno) => Err(errno.into()),
    }
}

/// Copies `[start, end)` from `src` to the same offsets in `dst`, skipping zero blocks.
fn copy_range(src: &File, dst: &File, start: u64, end: u64, buf: &mut [u8]) -> io::Result<u64> {
    let mut written = 0u64;
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos).map_or(buf.len(), |n| n.min(buf.len()));
        let got = read_full_at(src, &mut buf[..want], pos)?;
        if got == 0 {
            break; // The source shrank under us.
        }
        written += write_nonzero_at(dst, &buf[..got], pos)?;
        pos += got as u64;
    }
    Ok(written)
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes `buf` at `offset`, leaving out [`ZERO_BLOCK`]s that are all zero; adjacent
/// non-zero blocks go out as one write. Returns the number of bytes written.
fn write_nonzero_at(file: &File, buf: &[u8], offset: u64) -> io::Result<u64> {
    let is_zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    let mut written = 0u64;
    let mut i = 0;
    while i < buf.len() {
        let block_end = (i + ZERO_BLOCK).min(buf.len());
        if is_zero(&buf[i..block_end]) {
            i = block_end;
            continue;
        }
        let run_start = i;
        i = block_end;
        while i < buf.len() {
            let block_end = (i + ZERO_BLOCK).min(buf.len());
            if is_zero(&buf[i..block_end]) {
                break;
            }
            i = block_end;
        }
        file.write_all_at(&buf[run_start..i], offset + run_start as u64)?;
        written += (i - run_start) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    const MIB: u64 = 1 << 20;
    const MIB_USIZE: usize = 1 << 20;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("wrenn-storage-unit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rw(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("open")
    }

    /// Data extents of `file`, as found by SEEK_DATA/SEEK_HOLE.
    fn extents(file: &File, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < len {
            let Some(data) = seek(file, pos, Whence::SeekData).expect("seek data") else {
                break;
            };
            let hole = seek(file, data, Whence::SeekHole)
                .expect("seek hole")
                .unwrap_or(len);
            out.push((data, hole));
            pos = hole;
        }
        out
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = Scratch::new("holes");
        let src_path = dir.0.join("src");
        let dst_path = dir.0.join("dst");
        let len = 16 * MIB;
        let src = rw(&src_path);
        src.set_len(len).expect("set_len");
        // Several data islands separated by holes, including one straddling a MiB boundary,
        // one at the very start and one ending exactly at EOF.
        let pieces: [(u64, u8, usize); 5] = [
            (0, 0x11, 4096),
            (3 * MIB - 8192, 0x22, 16384),
            (7 * MIB + 4096, 0x33, 100_000),
            (11 * MIB, 0x44, 2 * MIB_USIZE),
            (len - 4096, 0x55, 4096),
        ];
        for &(off, byte, n) in &pieces {
            src.write_all_at(&vec![byte; n], off).expect("write");
        }
        // A data extent that is all zeros must come out as a hole.
        src.write_all_at(&vec![0u8; 64 * 1024], 5 * MIB)
            .expect("write zeros");
        src.sync_all().expect("sync");
        assert!(
            extents(&src, len).len() >= 4,
            "test filesystem must support holes"
        );

        let dst = rw(&dst_path);
        let written = sparse_copy(&src, &dst, len).expect("sparse copy");
        let data_bytes: u64 = pieces.iter().map(|p| p.2 as u64).sum();
        // Partial blocks are written whole, so allow up to one block of slack per piece.
        assert!(written >= data_bytes, "wrote {written} < {data_bytes}");
        assert!(written <= data_bytes + 5 * ZERO_BLOCK as u64);

        assert_eq!(
            std::fs::read(&src_path).unwrap(),
            std::fs::read(&dst_path).unwrap()
        );
        let meta = dst.metadata().unwrap();
        assert_eq!(meta.len(), len);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated <= data_bytes + 64 * 1024,
            "copy not sparse: {allocated} bytes allocated for {data_bytes} of data"
        );
        // The zeroed extent at 5 MiB became a hole.
        let dst_extents = extents(&dst, len);
        assert!(
            !dst_extents
                .iter()
                .any(|&(a, b)| a <= 5 * MIB && 5 * MIB < b),
            "zero extent copied: {dst_extents:?}"
        );
    }

    #[test]
    fn sparse_copy_of_all_hole_file_and_truncation() {
        let dir = Scratch::new("empty");
        let src = rw(&dir.0.join("src"));
        src.set_len(4 * MIB).unwrap();
        let dst = rw(&dir.0.join("dst"));
        assert_eq!(sparse_copy(&src, &dst, 4 * MIB).unwrap(), 0);
        assert_eq!(dst.metadata().unwrap().len(), 4 * MIB);
        assert_eq!(dst.metadata().unwrap().blocks(), 0);

        // Copying a prefix stops at `len`, even inside a data extent.
        src.write_all_at(&[7u8; 8192], MIB).unwrap();
        let dst2 = rw(&dir.0.join("dst2"));
        sparse_copy(&src, &dst2, MIB + 100).unwrap();
        let got = std::fs::read(dir.0.join("dst2")).unwrap();
        assert_eq!(got.len() as u64, MIB + 100);
        assert!(got[..MIB_USIZE].iter().all(|&b| b == 0));
        assert!(got[MIB_USIZE..].iter().all(|&b| b == 7));
    }

    #[test]
    fn reflink_reports_unsupported_on_ext4_or_clones() {
        let dir = Scratch::new("reflink");
        let src_path = dir.0.join("src");
        let src = rw(&src_path);
        src.write_all_at(b"hello", 0).unwrap();
        let dst = rw(&dir.0.join("dst"));
        // Either outcome is valid depending on the filesystem under $TMPDIR; it must not error.
        if try_reflink(&src, &dst).expect("reflink") {
            assert_eq!(std::fs::read(dir.0.join("dst")).unwrap(), b"hello");
        } else {
            assert_eq!(dst.metadata().unwrap().len(), 0);
        }
    }
}
