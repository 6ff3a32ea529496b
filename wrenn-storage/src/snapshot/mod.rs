//! Memory snapshots: a capsule's guest RAM as a base image plus generations of changed
//! pages, described by a versioned, checksummed header.
//!
//! A capsule's RAM is a private mapping of a **base** raw memory file (a template's full
//! memory image, or nothing: all zeros for a cold-booted VM). At each pause the pages the
//! guest changed are written as a new **generation**: a dense data file of pages. The
//! header maps every guest page to where its current content is: the base, zero, or a
//! page of one generation's data file.
//!
//! # Files (one snapshot per directory)
//!
//! | File | Content |
//! |---|---|
//! | `memory.header` | the [`Header`], format below |
//! | `memory.gen-<32 hex id>` | a generation's pages, densely, in the order written; never zero pages |
//! | `.wrenn-tmp-memory.*` | a write in progress or interrupted by a crash; ignored, removed by [`MemorySnapshot::remove_unreferenced_files`] |
//!
//! # `memory.header`, format 1.0 (little-endian)
//!
//! | Offset | Field |
//! |---|---|
//! | 0 | magic `WRNMEMHD` |
//! | 8 | `u16` major = 1, `u16` minor = 0 (independent of the crate version) |
//! | 12 | `u32` page size (power of two, 4 KiB..2 MiB; written as 4096) |
//! | 16 | `u64` memory size in bytes (non-zero multiple of the page size) |
//! | 24 | `u64` revision (0 at create, +1 per header write) |
//! | 32 | `[16]` snapshot id |
//! | 48 | `u32` base kind (0 = zero, 1 = file) · `u32` generation count *G* |
//! | 56 | `[16]` base file id · `u64` base file size (both 0 for a zero base) |
//! | 80 | `u64` extent count *E* |
//! | 88 | *G* × 32 B: `[16]` id · `u64` page count · `u32` CRC32 of the data file · `u32` reserved (0) |
//! | … | *E* × 32 B: `u64` first page · `u64` page count · `u32` location (0 base, 1 zero, 2 generation) · `u32` generation index · `u64` first page in that generation's data file (both 0 unless generation) |
//! | end − 4 | `u32` CRC32 of every preceding byte |
//!
//! Extents are sorted, cover every page exactly once and are coalesced; every generation
//! is referenced; base extents stay inside the base file. A reader refuses another major
//! or a newer minor, checks that the counts match the file length before allocating, then
//! the checksum, then every invariant ([`Header::validate`]). [`MemorySnapshot::load`]
//! also checks every referenced data file's size and CRC32, so a corrupt or truncated
//! generation is an error at load rather than garbage in a guest.
//!
//! # Crash safety
//!
//! Every file is written under a temp name in the snapshot directory, fsynced and renamed
//! into place, and the directory fsynced. Data files are published before the header that
//! references them, and obsolete ones are removed only after it; the header rename is the
//! commit point, so a crash at any moment leaves a loadable snapshot (the old or the new
//! one), possibly with unreferenced files that loading ignores.
//!
//! Writers ([`MemorySnapshot::add_generation`], [`MemorySnapshot::merge`]) return the new
//! state; the value they were called on describes the previous header and may name data
//! files the write deleted, so writing from it again fails with
//! [`SnapshotError::Stale`]. One writer per directory at a time: callers serialize (the
//! capsule's actor owns its snapshot directory); the stale check catches misuse, it is
//! not a lock.
//!
//! Deliberately not here: finding which pages a guest dirtied, deciding when to merge
//! (the reference merges when an eighth generation would be written), and serving faults.

mod error;
mod files;
pub mod header;
pub mod mapping;
mod source;
#[doc(hidden)]
pub mod testing;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use error::SnapshotError;
pub use header::{BaseRef, GenerationInfo, Header, Id, FORMAT_MAJOR, FORMAT_MINOR};
pub use mapping::{Extent, PageLocation};
pub use source::SnapshotPageSource;

use files::{map_file, open_data_file, write_atomic, TempFile, IO_CHUNK};
use mapping::{overlay, push_coalesced, sparse_from_pages};
use testing::{step, CommitStep};

/// Name of the header file in a snapshot directory.
pub const HEADER_FILE: &str = "memory.header";
/// Prefix of generation data file names (followed by the generation id in hex).
pub const GEN_FILE_PREFIX: &str = "memory.gen-";
/// Page size of the snapshots this crate creates.
pub const PAGE_SIZE: u64 = 4096;

/// File name of a generation's data file.
pub fn generation_file_name(id: &Id) -> String {
    format!("{GEN_FILE_PREFIX}{id}")
}

/// A memory snapshot on disk: its directory and parsed, validated header.
///
/// Holds no open files; readers ([`Self::for_each_changed_page`], [`Self::page_source`])
/// open what they need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemorySnapshot {
    dir: PathBuf,
    header: Header,
}

impl MemorySnapshot {
    /// Starts a snapshot of `mem_size` bytes in `dir` (created if missing) with no
    /// generations: every page is [`PageLocation::Base`], or [`PageLocation::Zero`] past
    /// the base file's end (so everywhere for [`BaseRef::Zero`]).
    pub fn create(
        dir: impl AsRef<Path>,
        mem_size: u64,
        base: BaseRef,
    ) -> Result<MemorySnapshot, SnapshotError> {
        let dir = dir.as_ref();
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE_SIZE) {
            return Err(SnapshotError::InvalidArgument(format!(
                "memory size {mem_size} is not a non-zero multiple of {PAGE_SIZE}"
            )));
        }
        if matches!(base, BaseRef::File { id, .. } if id.is_nil()) {
            return Err(SnapshotError::InvalidArgument("nil base file id".into()));
        }
        std::fs::create_dir_all(dir).map_err(SnapshotError::io("create directory", dir))?;
        let path = dir.join(HEADER_FILE);
        if path.exists() {
            return Err(SnapshotError::DestinationExists { path });
        }
        let mut header = Header {
            page_size: PAGE_SIZE as u32,
            mem_size,
            snapshot_id: Id::random(),
            revision: 0,
            base,
            generations: Vec::new(),
            extents: Vec::new(),
        };
        let (base_pages, page_count) = (header.base_pages(), header.page_count());
        for (start, end, loc) in [
            (0, base_pages, PageLocation::Base),
            (base_pages, page_count, PageLocation::Zero),
        ] {
            push_coalesced(
                &mut header.extents,
                Extent {
                    start,
                    count: end - start,
                    loc,
                },
            );
        }
        write_atomic(
            &path,
            &header.encode(),
            CommitStep::HeaderSynced,
            CommitStep::HeaderRenamed,
        )?;
        step(CommitStep::Committed);
        Ok(MemorySnapshot {
            dir: dir.to_path_buf(),
            header,
        })
    }

    /// Reads and validates `dir/memory.header` and the size and CRC32 of every data file
    /// it references (reading them in full). Unreferenced files are ignored. Read-only.
    pub fn load(dir: impl AsRef<Path>) -> Result<MemorySnapshot, SnapshotError> {
        let dir = dir.as_ref();
        let path = dir.join(HEADER_FILE);
        let file = File::open(&path).map_err(SnapshotError::io("open", &path))?;
        let len = file
            .metadata()
            .map_err(SnapshotError::io("stat", &path))?
            .len();
        if len > header::MAX_HEADER_BYTES {
            return Err(SnapshotError::Corrupt {
                file: path,
                reason: format!("{len} bytes is larger than any valid header"),
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut &file, &mut bytes)
            .map_err(SnapshotError::io("read", &path))?;
        let header = header::decode(&bytes).map_err(|e| e.with_file(&path))?;
        let snap = MemorySnapshot {
            dir: dir.to_path_buf(),
            header,
        };
        for i in 0..snap.header.generations.len() {
            let g = snap.header.generations[i];
            open_data_file(
                &snap.generation_path(i),
                snap.generation_len(&g),
                Some(g.crc32),
            )?;
        }
        Ok(snap)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn id(&self) -> Id {
        self.header.snapshot_id
    }

    /// Bumped by every header write.
    pub fn revision(&self) -> u64 {
        self.header.revision
    }

    pub fn mem_size(&self) -> u64 {
        self.header.mem_size
    }

    pub fn page_size(&self) -> u64 {
        u64::from(self.header.page_size)
    }

    pub fn page_count(&self) -> u64 {
        self.header.page_count()
    }

    pub fn base(&self) -> &BaseRef {
        &self.header.base
    }

    /// Number of generation data files.
    pub fn generations(&self) -> usize {
        self.header.generations.len()
    }

    /// The page map.
    pub fn extents(&self) -> &[Extent] {
        &self.header.extents
    }

    /// Bytes stored in generation data files.
    pub fn changed_bytes(&self) -> u64 {
        self.header
            .generations
            .iter()
            .map(|g| self.generation_len(g))
            .sum()
    }

    /// Where `page`'s content is; `None` past the end of memory.
    pub fn lookup(&self, page: u64) -> Option<PageLocation> {
        mapping::lookup(&self.header.extents, page)
    }

    /// Path of generation `index`'s data file.
    pub fn generation_path(&self, index: usize) -> PathBuf {
        self.dir
            .join(generation_file_name(&self.header.generations[index].id))
    }

    fn generation_len(&self, g: &GenerationInfo) -> u64 {
        g.page_count * self.page_size()
    }

    /// Refuses to write from a state that is no longer the directory's current header
    /// (a stale value whose files a later write may have removed; writing from it would
    /// silently drop that write). Reads only the header.
    fn check_current(&self) -> Result<(), SnapshotError> {
        let path = self.dir.join(HEADER_FILE);
        let bytes = std::fs::read(&path).map_err(SnapshotError::io("read", &path))?;
        let on_disk = header::decode(&bytes).map_err(|e| e.with_file(&path))?;
        if on_disk != self.header {
            return Err(SnapshotError::Stale {
                dir: self.dir.clone(),
                expected: self.header.revision,
                found: on_disk.revision,
            });
        }
        Ok(())
    }

    /// Maps every generation's data file (sizes checked, checksums not re-read).
    fn map_generations(&self) -> Result<Vec<Mmap>, SnapshotError> {
        (0..self.header.generations.len())
            .map(|i| {
                let path = self.generation_path(i);
                let len = self.generation_len(&self.header.generations[i]);
                let file = open_data_file(&path, len, None)?;
                let map = map_file(&file, len, &path)?;
                let _ = map.advise(memmap2::Advice::Sequential);
                Ok(map)
            })
            .collect()
    }

    /// Records the pages a guest changed since the current state as a new generation.
    ///
    /// `pages` yields `(page index, page bytes)` in any order (ascending is cheapest);
    /// when a page comes twice the last one wins. All-zero pages become
    /// [`PageLocation::Zero`] and are not stored. The data file is streamed through a
    /// large buffer with its CRC32 computed on the way, published, then the new header is
    /// committed. Generations no longer referenced by any page are dropped and their files
    /// removed after the commit. If every page is zero no data file is written.
    pub fn add_generation<'a, I>(&self, pages: I) -> Result<MemorySnapshot, SnapshotError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        self.check_current()?;
        let ps = self.page_size();
        let page_count = self.page_count();
        let gen = u32::try_from(self.header.generations.len())
            .map_err(|_| SnapshotError::InvalidArgument("too many generations".into()))?;
        let id = Id::random();
        let name = generation_file_name(&id);
        let tmp = TempFile::create(&self.dir, &name)?;
        let mut out = BufWriter::with_capacity(IO_CHUNK, &tmp.file);
        let mut hasher = crc32fast::Hasher::new();
        let mut runs: Vec<Extent> = Vec::new();
        let mut sorted = true;
        let mut stored = 0u64;
        for (page, data) in pages {
            if page >= page_count {
                return Err(SnapshotError::PageOutOfRange { page, page_count });
            }
            if data.len() as u64 != ps {
                return Err(SnapshotError::BadPageLength {
                    page,
                    len: data.len(),
                    page_size: ps,
                });
            }
            let loc = if is_zero(data) {
                PageLocation::Zero
            } else {
                out.write_all(data)
                    .map_err(SnapshotError::io("write", &tmp.path))?;
                hasher.update(data);
                stored += 1;
                PageLocation::Gen {
                    gen,
                    page: stored - 1,
                }
            };
            if runs.last().is_some_and(|last| page < last.end()) {
                sorted = false;
            }
            push_coalesced(
                &mut runs,
                Extent {
                    start: page,
                    count: 1,
                    loc,
                },
            );
        }
        out.flush().map_err(SnapshotError::io("write", &tmp.path))?;
        drop(out);
        if !sorted {
            let pages = runs
                .iter()
                .flat_map(|e| (e.start..e.end()).map(move |p| (p, e.location_of(p))))
                .collect();
            runs = sparse_from_pages(pages);
        }
        let mut generations = self.header.generations.clone();
        if stored > 0 {
            generations.push(GenerationInfo {
                id,
                page_count: stored,
                crc32: hasher.finalize(),
            });
            tmp.publish(
                &self.dir.join(&name),
                CommitStep::DataSynced,
                CommitStep::DataRenamed,
            )?;
        } else {
            drop(tmp);
        }
        let extents = overlay(&self.header.extents, &runs);
        let (generations, extents, obsolete) = self.drop_unreferenced(generations, extents);
        self.commit(
            Header {
                revision: self.header.revision + 1,
                generations,
                extents,
                ..self.header.clone()
            },
            obsolete,
        )
    }

    /// Removes generations no extent refers to and renumbers the rest; returns the new
    /// table, the renumbered map and the paths of the dropped files.
    fn drop_unreferenced(
        &self,
        generations: Vec<GenerationInfo>,
        mut extents: Vec<Extent>,
    ) -> (Vec<GenerationInfo>, Vec<Extent>, Vec<PathBuf>) {
        let mut used = vec![false; generations.len()];
        for e in &extents {
            if let PageLocation::Gen { gen, .. } = e.loc {
                used[gen as usize] = true;
            }
        }
        let mut renumber = vec![0u32; generations.len()];
        let mut kept = Vec::with_capacity(generations.len());
        let mut obsolete = Vec::new();
        for (i, g) in generations.into_iter().enumerate() {
            if used[i] {
                renumber[i] = kept.len() as u32;
                kept.push(g);
            } else {
                obsolete.push(self.dir.join(generation_file_name(&g.id)));
            }
        }
        if !obsolete.is_empty() {
            for e in &mut extents {
                if let PageLocation::Gen { gen, .. } = &mut e.loc {
                    *gen = renumber[*gen as usize];
                }
            }
        }
        (kept, extents, obsolete)
    }

    /// Commits `header` (the commit point), then removes `obsolete` data files.
    fn commit(
        &self,
        header: Header,
        obsolete: Vec<PathBuf>,
    ) -> Result<MemorySnapshot, SnapshotError> {
        write_atomic(
            &self.dir.join(HEADER_FILE),
            &header.encode(),
            CommitStep::HeaderSynced,
            CommitStep::HeaderRenamed,
        )?;
        step(CommitStep::Committed);
        if !obsolete.is_empty() {
            // The new state is committed; a leftover file only wastes space and is
            // removed by `remove_unreferenced_files`, so failures here are not errors.
            for path in &obsolete {
                if let Err(e) = std::fs::remove_file(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove obsolete generation file");
                    }
                }
            }
            if let Err(e) = files::fsync_dir(&self.dir) {
                tracing::warn!(error = %e, "could not fsync snapshot directory after cleanup");
            }
        }
        step(CommitStep::CleanedUp);
        Ok(MemorySnapshot {
            dir: self.dir.clone(),
            header,
        })
    }

    /// Rewrites every referenced generation page, in guest page order, into one new data
    /// file, commits a header pointing at it, then removes the old data files.
    /// Without generations there is nothing to merge and the state is returned as is.
    pub fn merge(&self) -> Result<MemorySnapshot, SnapshotError> {
        if self.header.generations.is_empty() {
            return Ok(self.clone());
        }
        self.check_current()?;
        let ps = self.page_size();
        let maps = self.map_generations()?;
        let id = Id::random();
        let name = generation_file_name(&id);
        let tmp = TempFile::create(&self.dir, &name)?;
        let mut out = BufWriter::with_capacity(IO_CHUNK, &tmp.file);
        let mut hasher = crc32fast::Hasher::new();
        let mut extents = Vec::with_capacity(self.header.extents.len());
        let mut next = 0u64;
        for e in &self.header.extents {
            let PageLocation::Gen { gen, page } = e.loc else {
                push_coalesced(&mut extents, *e);
                continue;
            };
            let bytes = &maps[gen as usize][(page * ps) as usize..((page + e.count) * ps) as usize];
            out.write_all(bytes)
                .map_err(SnapshotError::io("write", &tmp.path))?;
            hasher.update(bytes);
            push_coalesced(
                &mut extents,
                Extent {
                    start: e.start,
                    count: e.count,
                    loc: PageLocation::Gen { gen: 0, page: next },
                },
            );
            next += e.count;
        }
        out.flush().map_err(SnapshotError::io("write", &tmp.path))?;
        drop(out);
        drop(maps);
        tmp.publish(
            &self.dir.join(&name),
            CommitStep::DataSynced,
            CommitStep::DataRenamed,
        )?;
        let obsolete = (0..self.header.generations.len())
            .map(|i| self.generation_path(i))
            .collect();
        self.commit(
            Header {
                revision: self.header.revision + 1,
                generations: vec![GenerationInfo {
                    id,
                    page_count: next,
                    crc32: hasher.finalize(),
                }],
                extents,
                ..self.header.clone()
            },
            obsolete,
        )
    }

    /// Calls `f(first page, page count, data)` for every run of pages whose content is
    /// not what the base gives, in guest page order: runs stored in generations with
    /// their bytes (`count * page_size`, straight from a read-only map of the data file),
    /// and zeroed runs inside the base file's range with `None`. Pages past the base file
    /// (everything, for a zero base) that are zero are not reported: the base gives zeros
    /// there too.
    pub fn for_each_changed_extent<E>(
        &self,
        mut f: impl FnMut(u64, u64, Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<SnapshotError>,
    {
        let ps = self.page_size();
        let maps = self.map_generations()?;
        let base_pages = self.header.base_pages();
        for e in &self.header.extents {
            match e.loc {
                PageLocation::Base => {}
                PageLocation::Zero => {
                    if e.start < base_pages {
                        f(e.start, e.end().min(base_pages) - e.start, None)?;
                    }
                }
                PageLocation::Gen { gen, page } => {
                    let map = &maps[gen as usize];
                    f(
                        e.start,
                        e.count,
                        Some(&map[(page * ps) as usize..((page + e.count) * ps) as usize]),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// [`Self::for_each_changed_extent`] one page at a time: `f(page, Some(bytes))` for
    /// stored pages, `f(page, None)` for zeroed ones.
    pub fn for_each_changed_page<E>(
        &self,
        mut f: impl FnMut(u64, Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<SnapshotError>,
    {
        let ps = self.page_size() as usize;
        self.for_each_changed_extent(|start, count, data| {
            match data {
                Some(bytes) => {
                    for (i, page) in bytes.chunks_exact(ps).enumerate() {
                        f(start + i as u64, Some(page))?;
                    }
                }
                None => {
                    for page in start..start + count {
                        f(page, None)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// A [`wrenn_core::memory::PageSource`] serving every page of this state: base pages
    /// from `base_file` (required when some page is [`PageLocation::Base`]; its size must
    /// match the header's), zero pages as [`wrenn_core::memory::PageContent::Zero`],
    /// generation pages from read-only maps of the data files.
    ///
    /// The base file must not be modified or truncated while the source lives (base
    /// memory files are immutable templates).
    pub fn page_source(
        &self,
        base_file: Option<&Path>,
    ) -> Result<SnapshotPageSource, SnapshotError> {
        let base = self.map_base(base_file)?;
        let gens = self.map_generations()?;
        Ok(SnapshotPageSource::new(&self.header, base, gens))
    }

    /// Maps the base file when the map refers to it.
    fn map_base(&self, base_file: Option<&Path>) -> Result<Option<Mmap>, SnapshotError> {
        let BaseRef::File { size, .. } = self.header.base else {
            return Ok(None);
        };
        let needed = self
            .header
            .extents
            .iter()
            .any(|e| e.loc == PageLocation::Base);
        let Some(path) = base_file else {
            return if needed {
                Err(SnapshotError::BaseFileRequired)
            } else {
                Ok(None)
            };
        };
        let file = File::open(path).map_err(SnapshotError::io("open", path))?;
        let actual = file
            .metadata()
            .map_err(SnapshotError::io("stat", path))?
            .len();
        if actual != size {
            return Err(SnapshotError::BaseSizeMismatch {
                path: path.to_path_buf(),
                expected: size,
                actual,
            });
        }
        if !needed || size == 0 {
            return Ok(None);
        }
        map_file(&file, size, path).map(Some)
    }

    /// Writes the full memory as a raw image at `dest` (replacing it atomically): zero
    /// pages, including zero pages of the base, are left as holes, so the file is sparse.
    /// `base_file` as for [`Self::page_source`]. Used to make a template's base memory file.
    pub fn write_raw_image(
        &self,
        base_file: Option<&Path>,
        dest: &Path,
    ) -> Result<(), SnapshotError> {
        let ps = self.page_size();
        let base = self.map_base(base_file)?;
        let gens = self.map_generations()?;
        let (dir, name) = split_dest(dest)?;
        let tmp = TempFile::create(dir, &name)?;
        tmp.file
            .set_len(self.mem_size())
            .map_err(SnapshotError::io("resize", &tmp.path))?;
        for e in &self.header.extents {
            let offset = e.start * ps;
            let bytes: &[u8] = match (e.loc, &base) {
                (PageLocation::Zero, _) | (PageLocation::Base, None) => continue,
                (PageLocation::Base, Some(map)) => {
                    let from = (offset as usize).min(map.len());
                    let to = ((e.end() * ps) as usize).min(map.len());
                    &map[from..to]
                }
                (PageLocation::Gen { gen, page }, _) => {
                    &gens[gen as usize][(page * ps) as usize..((page + e.count) * ps) as usize]
                }
            };
            write_nonzero_runs(&tmp.file, offset, bytes, ps as usize)
                .map_err(SnapshotError::io("write", &tmp.path))?;
        }
        tmp.publish(dest, CommitStep::FileSynced, CommitStep::FileRenamed)
    }

    /// Copies the snapshot (header and referenced data files, nothing else) into
    /// `dest_dir`, created if missing; refuses a directory that already has a header.
    /// Data files are copied first, the header last, each atomically.
    pub fn copy_to(&self, dest_dir: impl AsRef<Path>) -> Result<MemorySnapshot, SnapshotError> {
        let dest_dir = dest_dir.as_ref();
        std::fs::create_dir_all(dest_dir)
            .map_err(SnapshotError::io("create directory", dest_dir))?;
        let header_path = dest_dir.join(HEADER_FILE);
        if header_path.exists() {
            return Err(SnapshotError::DestinationExists { path: header_path });
        }
        for i in 0..self.header.generations.len() {
            let src = self.generation_path(i);
            let name = generation_file_name(&self.header.generations[i].id);
            let mut tmp = TempFile::create(dest_dir, &name)?;
            let mut from = match File::open(&src) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SnapshotError::MissingGeneration { file: src })
                }
                Err(e) => return Err(SnapshotError::io("open", &src)(e)),
            };
            // File-to-file io::copy uses copy_file_range (reflink/server-side where possible).
            let copied =
                std::io::copy(&mut from, &mut tmp.file).map_err(SnapshotError::io("copy", &src))?;
            let expected = self.generation_len(&self.header.generations[i]);
            if copied != expected {
                return Err(SnapshotError::Truncated {
                    file: src,
                    expected,
                    actual: copied,
                });
            }
            tmp.publish(
                &dest_dir.join(&name),
                CommitStep::FileSynced,
                CommitStep::FileRenamed,
            )?;
        }
        write_atomic(
            &header_path,
            &self.header.encode(),
            CommitStep::HeaderSynced,
            CommitStep::HeaderRenamed,
        )?;
        step(CommitStep::Committed);
        Ok(MemorySnapshot {
            dir: dest_dir.to_path_buf(),
            header: self.header.clone(),
        })
    }

    /// Removes generation data files this header does not reference and temp files of
    /// interrupted writes (leftovers of a crash); returns what was removed. Must not run
    /// while another writer works in the directory.
    pub fn remove_unreferenced_files(&self) -> Result<Vec<PathBuf>, SnapshotError> {
        let referenced: HashSet<String> = self
            .header
            .generations
            .iter()
            .map(|g| generation_file_name(&g.id))
            .collect();
        let temp_prefix = format!("{}memory.", crate::TEMP_MARKER);
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(SnapshotError::io("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(SnapshotError::io("list", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = (name.starts_with(GEN_FILE_PREFIX) && !referenced.contains(name))
                || name.starts_with(&temp_prefix);
            if stale {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(SnapshotError::io("remove", &path))?;
                removed.push(path);
            }
        }
        if !removed.is_empty() {
            files::fsync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

/// Whether a page is all zeros (vectorizes; stops at the first non-zero 64-byte block).
fn is_zero(page: &[u8]) -> bool {
    let blocks = page.chunks_exact(64);
    let tail = blocks.remainder();
    blocks
        .into_iter()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && tail.iter().all(|&x| x == 0)
}

/// Writes the non-zero pages of `bytes` at `offset`, batching adjacent ones into large
/// writes and leaving zero pages as holes.
fn write_nonzero_runs(file: &File, offset: u64, bytes: &[u8], ps: usize) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < bytes.len() {
        let end = (pos + ps).min(bytes.len());
        let zero = is_zero(&bytes[pos..end]);
        if let Some(s) = run_start {
            if zero || pos - s >= IO_CHUNK {
                file.write_all_at(&bytes[s..pos], offset + s as u64)?;
                run_start = None;
            }
        }
        if !zero && run_start.is_none() {
            run_start = Some(pos);
        }
        pos = end;
    }
    if let Some(s) = run_start {
        file.write_all_at(&bytes[s..], offset + s as u64)?;
    }
    Ok(())
}

fn split_dest(dest: &Path) -> Result<(&Path, String), SnapshotError> {
    let name = dest.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        SnapshotError::InvalidArgument(format!("{} has no file name", dest.display()))
    })?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((dir, name.to_string()))
}

/// A restore writes exactly the changed pages over the VM's memory base.
impl wrenn_core::vmm::PageOverlay for MemorySnapshot {
    fn for_each(&self, f: &mut wrenn_core::vmm::PageVisitor<'_>) -> std::io::Result<()> {
        self.for_each_changed_page(f)
    }
}
