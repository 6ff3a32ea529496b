//! Guest RAM as seen from the host: the QEMU process's private mapping of the
//! memory base. Pages the guest (or QEMU) wrote are private copies; the page
//! map tells them from clean, file-backed pages. Pages are written into a
//! restored VM through `/proc/<pid>/mem`, before its vCPUs run.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// `/proc/<pid>/pagemap` bits.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// The identity of a mapped file as `/proc/<pid>/maps` shows it: device and inode.
/// Paths are not compared: a jailed VMM sees its files at paths of its own mount
/// namespace, and a sealed memory image has no path at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    pub fn of_path(path: &Path) -> io::Result<Self> {
        Ok(Self::of(&std::fs::metadata(path)?))
    }

    /// Matches the "major:minor inode" columns of a maps line (hex, decimal).
    fn matches(&self, dev: &str, ino: &str) -> bool {
        let Some((major, minor)) = dev.split_once(':') else {
            return false;
        };
        let (Ok(major), Ok(minor), Ok(ino)) = (
            u32::from_str_radix(major, 16),
            u32::from_str_radix(minor, 16),
            ino.parse::<u64>(),
        ) else {
            return false;
        };
        ino == self.ino && libc::makedev(major, minor) == self.dev
    }
}

/// Where the (largest) mapping of file `id` lives in process `pid`:
/// `(start address, length)`.
pub fn find_mapping(pid: u32, id: FileId) -> io::Result<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut best: Option<(u64, u64)> = None;
    for line in maps.lines() {
        // "start-end perms offset dev inode   path"
        let mut parts = line.split_ascii_whitespace();
        let (Some(range), Some(_perms), Some(_offset), Some(dev), Some(ino)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        if !id.matches(dev, ino) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if best.is_none_or(|(_, len)| b - a > len) {
            best = Some((a, b - a));
        }
    }
    best.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no mapping of inode {} (device {:#x}) in process {pid}",
                id.ino, id.dev
            ),
        )
    })
}

/// Indexes of pages in `[start, start+len)` that are private copies (written since
/// the mapping was made), present or swapped out.
pub fn private_pages(pid: u32, start: u64, len: u64) -> io::Result<HashSet<u64>> {
    const PAGE: u64 = 4096;
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let pages = len / PAGE;
    let mut out = HashSet::new();
    let chunk_pages: u64 = 64 * 1024;
    let mut buf = vec![0u8; (chunk_pages * 8) as usize];
    let mut done = 0u64;
    while done < pages {
        let n = chunk_pages.min(pages - done);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact_at(bytes, (start / PAGE + done) * 8)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            if v & (PM_PRESENT | PM_SWAPPED) != 0 && v & PM_FILE == 0 {
                out.insert(done + i as u64);
            }
        }
        done += n;
    }
    Ok(out)
}

/// Writes pages into process `pid`'s memory at `start + index * 4096`.
#[derive(Debug)]
pub struct MemWriter {
    file: std::fs::File,
    start: u64,
    len: u64,
    zero: Vec<u8>,
}

impl MemWriter {
    pub fn open(pid: u32, start: u64, len: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        Ok(MemWriter {
            file,
            start,
            len,
            zero: vec![0u8; 4096],
        })
    }

    pub fn write_page(&self, index: u64, data: Option<&[u8]>) -> io::Result<()> {
        let off = index * 4096;
        if off + 4096 > self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("page {index} is beyond guest memory"),
            ));
        }
        self.file
            .write_all_at(data.unwrap_or(&self.zero), self.start + off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_mapping_by_device_and_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mem");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create");
        f.set_len(8 * 4096).expect("size");
        let id = FileId::of_path(&path).expect("stat");
        // SAFETY: maps a file we just created, privately, and unmaps it below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 * 4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let (start, len) = find_mapping(std::process::id(), id).expect("found");
        assert_eq!(start, addr as u64);
        assert_eq!(len, 8 * 4096);
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(addr, 8 * 4096) };
        let other = FileId {
            dev: id.dev,
            ino: id.ino + 1_000_000,
        };
        assert!(find_mapping(std::process::id(), other).is_err());
    }
}
