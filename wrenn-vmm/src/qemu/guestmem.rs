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

/// Where the mapping of `file` lives in process `pid`: `(start address, length)`.
pub fn find_mapping(pid: u32, file: &Path) -> io::Result<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let want = file.canonicalize()?;
    let want = want.to_string_lossy();
    let mut best: Option<(u64, u64)> = None;
    for line in maps.lines() {
        // "start-end perms offset dev inode   path"
        let mut parts = line.splitn(6, ' ');
        let range = parts.next().unwrap_or("");
        let path = parts.nth(4).map(str::trim).unwrap_or("");
        if path != want {
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
            format!("no mapping of {want} in process {pid}"),
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
