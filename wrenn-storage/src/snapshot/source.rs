//! [`PageSource`] over a snapshot: base pages from a map of the base file, generation
//! pages from maps of the data files, zero pages as [`PageContent::Zero`].

use std::fmt;
use std::io;

use memmap2::Mmap;
use wrenn_core::memory::{PageContent, PageSource};

use super::header::Header;
use super::mapping::{self, Extent, PageLocation};

/// Serves any page of one snapshot state; built by [`super::MemorySnapshot::page_source`].
///
/// Owns read-only maps, so it keeps working after a merge unlinks the files it maps.
pub struct SnapshotPageSource {
    page_size: u64,
    mem_size: u64,
    extents: Vec<Extent>,
    base: Option<Mmap>,
    gens: Vec<Mmap>,
}

impl SnapshotPageSource {
    pub(crate) fn new(header: &Header, base: Option<Mmap>, gens: Vec<Mmap>) -> Self {
        SnapshotPageSource {
            page_size: u64::from(header.page_size),
            mem_size: header.mem_size,
            extents: header.extents.clone(),
            base,
            gens,
        }
    }

    /// Where the page at byte `offset` is (`None` past the end).
    pub fn location(&self, offset: u64) -> Option<PageLocation> {
        mapping::lookup(&self.extents, offset / self.page_size)
    }
}

impl fmt::Debug for SnapshotPageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotPageSource")
            .field("page_size", &self.page_size)
            .field("mem_size", &self.mem_size)
            .field("extents", &self.extents.len())
            .field("base_len", &self.base.as_ref().map(|m| m.len()))
            .field("generations", &self.gens.len())
            .finish()
    }
}

impl PageSource for SnapshotPageSource {
    fn size(&self) -> u64 {
        self.mem_size
    }

    fn page_size(&self) -> u64 {
        self.page_size
    }

    fn read_page(&self, offset: u64, buf: &mut [u8]) -> io::Result<PageContent> {
        let ps = self.page_size;
        if !offset.is_multiple_of(ps) || offset >= self.mem_size || buf.len() as u64 != ps {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "read of {} bytes at offset {offset}: not one aligned page of {ps} inside {} bytes",
                    buf.len(),
                    self.mem_size
                ),
            ));
        }
        let loc = mapping::lookup(&self.extents, offset / ps).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "page not covered by the map")
        })?;
        match loc {
            PageLocation::Zero => Ok(PageContent::Zero),
            PageLocation::Base => {
                // The header guarantees Base extents lie inside the base file, whose map
                // `page_source` created whenever some extent is Base.
                let map = self.base.as_ref().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "base page without a base file")
                })?;
                let from = (offset as usize).min(map.len());
                let to = ((offset + ps) as usize).min(map.len());
                let n = to - from;
                buf[..n].copy_from_slice(&map[from..to]);
                buf[n..].fill(0);
                Ok(PageContent::Data)
            }
            PageLocation::Gen { gen, page } => {
                let map = &self.gens[gen as usize];
                let from = (page * ps) as usize;
                buf.copy_from_slice(&map[from..from + ps as usize]);
                Ok(PageContent::Data)
            }
        }
    }
}
