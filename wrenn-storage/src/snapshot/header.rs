//! The `memory.header` file: a versioned, checksummed, little-endian description of a
//! memory snapshot (see the module docs of [`super`] for the layout).
//!
//! [`decode`] dispatches on the major version and keeps one reader per version; every
//! count is checked against the input length before anything is allocated, and the
//! CRC32 trailer is verified before any field is trusted.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use super::mapping::{Extent, PageLocation};
use super::SnapshotError;

/// Magic bytes opening every memory header.
pub const MAGIC: [u8; 8] = *b"WRNMEMHD";
/// Format major version written by this build; another major is refused.
pub const FORMAT_MAJOR: u16 = 1;
/// Format minor version written by this build; a newer minor is refused.
pub const FORMAT_MINOR: u16 = 0;
/// Largest header file [`super::MemorySnapshot::load`] reads (checked before reading).
pub const MAX_HEADER_BYTES: u64 = 256 << 20;
/// Smallest and largest page sizes a header may declare.
pub const MIN_PAGE_SIZE: u32 = 4096;
pub const MAX_PAGE_SIZE: u32 = 2 << 20;

const V1_FIXED: usize = 88;
const V1_GEN: usize = 32;
const V1_EXTENT: usize = 32;
const TRAILER: usize = 4;

const BASE_ZERO: u32 = 0;
const BASE_FILE: u32 = 1;
const LOC_BASE: u32 = 0;
const LOC_ZERO: u32 = 1;
const LOC_GEN: u32 = 2;

/// A 16-byte identifier (snapshots, generations, base memory files).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 16]);

impl Id {
    /// The all-zero id, never used for a real object.
    pub const NIL: Id = Id([0; 16]);

    /// A fresh random id.
    pub fn random() -> Id {
        let mut bytes = [0u8; 16];
        // Cannot fail on Linux ≥ 3.17 (getrandom(2)); a failure means a broken host.
        getrandom::fill(&mut bytes).expect("the OS random number generator failed");
        if bytes == [0; 16] {
            bytes[15] = 1; // keep NIL reserved (probability 2^-128)
        }
        Id(bytes)
    }

    pub fn is_nil(&self) -> bool {
        *self == Id::NIL
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({self})")
    }
}

/// What pages mapped [`PageLocation::Base`] read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BaseRef {
    /// No base file: base pages are zeros (a cold-booted VM).
    Zero,
    /// A raw memory file (a template's full memory image) identified by id and size.
    /// Pages past its end read as zeros and are mapped [`PageLocation::Zero`].
    File { id: Id, size: u64 },
}

/// One generation: a dense data file of pages written at one pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GenerationInfo {
    pub id: Id,
    /// Pages in the data file (its size is `page_count * page_size`).
    pub page_count: u64,
    /// CRC32 (IEEE, crc32fast) of the whole data file.
    pub crc32: u32,
}

/// A parsed memory header. [`Header::validate`] states the invariants that [`decode`]
/// guarantees and [`Header::encode`] expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub page_size: u32,
    /// Guest memory size in bytes (a non-zero multiple of `page_size`).
    pub mem_size: u64,
    /// Which snapshot this is; kept across generations and merges.
    pub snapshot_id: Id,
    /// Bumped by every header write (create = 0).
    pub revision: u64,
    pub base: BaseRef,
    pub generations: Vec<GenerationInfo>,
    /// Full, coalesced page map (see [`super::mapping`]).
    pub extents: Vec<Extent>,
}

impl Header {
    pub fn page_count(&self) -> u64 {
        self.mem_size / u64::from(self.page_size)
    }

    /// Pages backed by the base file (0 for a zero base).
    pub fn base_pages(&self) -> u64 {
        match self.base {
            BaseRef::Zero => 0,
            BaseRef::File { size, .. } => size
                .div_ceil(u64::from(self.page_size))
                .min(self.page_count()),
        }
    }

    /// Checks every structural invariant; the error is the reason.
    pub fn validate(&self) -> Result<(), String> {
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
            return Err(format!(
                "page size {ps} is not a power of two in 4 KiB..2 MiB"
            ));
        }
        let ps = u64::from(ps);
        if self.mem_size == 0 || !self.mem_size.is_multiple_of(ps) {
            return Err(format!(
                "memory size {} is not a non-zero multiple of the page size",
                self.mem_size
            ));
        }
        if self.snapshot_id.is_nil() {
            return Err("nil snapshot id".into());
        }
        if let BaseRef::File { id, .. } = self.base {
            if id.is_nil() {
                return Err("nil base file id".into());
            }
        }
        let mut ids = HashSet::with_capacity(self.generations.len());
        for (i, g) in self.generations.iter().enumerate() {
            if g.id.is_nil() || !ids.insert(g.id) {
                return Err(format!("generation {i} has a nil or duplicate id"));
            }
            if g.page_count == 0 || g.page_count.checked_mul(ps).is_none() {
                return Err(format!(
                    "generation {i} has an invalid page count {}",
                    g.page_count
                ));
            }
        }
        if u32::try_from(self.generations.len()).is_err() {
            return Err("too many generations".into());
        }
        let page_count = self.page_count();
        let base_pages = self.base_pages();
        let mut referenced = vec![false; self.generations.len()];
        let mut next = 0u64;
        let mut prev: Option<&Extent> = None;
        for (i, e) in self.extents.iter().enumerate() {
            if e.start != next || e.count == 0 {
                return Err(format!(
                    "extent {i} does not start at page {next} or is empty"
                ));
            }
            let end = e
                .start
                .checked_add(e.count)
                .filter(|&end| end <= page_count)
                .ok_or_else(|| format!("extent {i} ends past page {page_count}"))?;
            match e.loc {
                PageLocation::Base => {
                    if end > base_pages {
                        return Err(format!("extent {i} maps pages past the base file to Base"));
                    }
                }
                PageLocation::Zero => {}
                PageLocation::Gen { gen, page } => {
                    let g = usize::try_from(gen)
                        .ok()
                        .and_then(|g| self.generations.get(g).map(|info| (g, info)));
                    let Some((g, info)) = g else {
                        return Err(format!("extent {i} refers to missing generation {gen}"));
                    };
                    if page
                        .checked_add(e.count)
                        .is_none_or(|last| last > info.page_count)
                    {
                        return Err(format!("extent {i} reaches past generation {gen}'s data"));
                    }
                    referenced[g] = true;
                }
            }
            if prev.is_some_and(|p| p.joins(e)) {
                return Err(format!("extent {i} is not coalesced with its predecessor"));
            }
            prev = Some(e);
            next = end;
        }
        if next != page_count {
            return Err(format!("the map covers {next} of {page_count} pages"));
        }
        if let Some(g) = referenced.iter().position(|r| !r) {
            return Err(format!("generation {g} is not referenced by the map"));
        }
        Ok(())
    }

    /// Encodes in the current format version.
    ///
    /// # Panics
    /// If the header is invalid ([`Header::validate`]); writers build headers from
    /// validated ones with the pure functions of [`super::mapping`].
    pub fn encode(&self) -> Vec<u8> {
        if let Err(reason) = self.validate() {
            panic!("refusing to encode an invalid memory header: {reason}");
        }
        let len =
            V1_FIXED + V1_GEN * self.generations.len() + V1_EXTENT * self.extents.len() + TRAILER;
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
        b.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.mem_size.to_le_bytes());
        b.extend_from_slice(&self.revision.to_le_bytes());
        b.extend_from_slice(&self.snapshot_id.0);
        let (kind, id, size) = match self.base {
            BaseRef::Zero => (BASE_ZERO, Id::NIL, 0),
            BaseRef::File { id, size } => (BASE_FILE, id, size),
        };
        b.extend_from_slice(&kind.to_le_bytes());
        // validate() checked that the count fits in a u32.
        let gens = u32::try_from(self.generations.len()).unwrap_or(u32::MAX);
        b.extend_from_slice(&gens.to_le_bytes());
        b.extend_from_slice(&id.0);
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        debug_assert_eq!(b.len(), V1_FIXED);
        for g in &self.generations {
            b.extend_from_slice(&g.id.0);
            b.extend_from_slice(&g.page_count.to_le_bytes());
            b.extend_from_slice(&g.crc32.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        for e in &self.extents {
            let (kind, gen, page) = match e.loc {
                PageLocation::Base => (LOC_BASE, 0, 0),
                PageLocation::Zero => (LOC_ZERO, 0, 0),
                PageLocation::Gen { gen, page } => (LOC_GEN, gen, page),
            };
            b.extend_from_slice(&e.start.to_le_bytes());
            b.extend_from_slice(&e.count.to_le_bytes());
            b.extend_from_slice(&kind.to_le_bytes());
            b.extend_from_slice(&gen.to_le_bytes());
            b.extend_from_slice(&page.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(b.len(), len);
        b
    }
}

/// Parses a header of any supported version. Errors name the file as `memory.header`;
/// [`super::MemorySnapshot::load`] substitutes the full path.
pub fn decode(bytes: &[u8]) -> Result<Header, SnapshotError> {
    let file = || PathBuf::from(super::HEADER_FILE);
    if bytes.len() < 12 {
        if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::BadMagic { file: file() });
        }
        return Err(SnapshotError::Truncated {
            file: file(),
            expected: 12,
            actual: bytes.len() as u64,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic { file: file() });
    }
    let major = u16::from_le_bytes([bytes[8], bytes[9]]);
    let minor = u16::from_le_bytes([bytes[10], bytes[11]]);
    // FORMAT_MINOR is 0 today; the comparison is for the minors to come.
    #[allow(clippy::absurd_extreme_comparisons)]
    let known_minor = minor <= FORMAT_MINOR;
    match major {
        1 if known_minor => v1::decode(bytes),
        _ => Err(SnapshotError::UnsupportedVersion {
            file: file(),
            major,
            minor,
        }),
    }
}

/// Format 1.0 reader. Keep it unchanged once released; a new major gets a new module.
mod v1 {
    use super::*;

    /// Little-endian cursor over input whose length was checked up front.
    struct Reader<'a> {
        b: &'a [u8],
        pos: usize,
    }

    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> [u8; N] {
            let mut out = [0u8; N];
            out.copy_from_slice(&self.b[self.pos..self.pos + N]);
            self.pos += N;
            out
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take())
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take())
        }
        fn id(&mut self) -> Id {
            Id(self.take())
        }
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Header, SnapshotError> {
        let file = || PathBuf::from(super::super::HEADER_FILE);
        let corrupt = |reason: String| SnapshotError::Corrupt {
            file: file(),
            reason,
        };
        let actual = bytes.len() as u64;
        if bytes.len() < V1_FIXED + TRAILER {
            return Err(SnapshotError::Truncated {
                file: file(),
                expected: (V1_FIXED + TRAILER) as u64,
                actual,
            });
        }
        // Counts first, checked against the input length before any allocation.
        let mut r = Reader { b: bytes, pos: 12 };
        let page_size = r.u32();
        let mem_size = r.u64();
        let revision = r.u64();
        let snapshot_id = r.id();
        let base_kind = r.u32();
        let gen_count = r.u32();
        let base_id = r.id();
        let base_size = r.u64();
        let extent_count = r.u64();
        debug_assert_eq!(r.pos, V1_FIXED);
        let expected = u64::from(gen_count)
            .checked_mul(V1_GEN as u64)
            .and_then(|g| extent_count.checked_mul(V1_EXTENT as u64)?.checked_add(g))
            .and_then(|t| t.checked_add((V1_FIXED + TRAILER) as u64))
            .ok_or_else(|| corrupt(format!("extent count {extent_count} overflows")))?;
        if actual < expected {
            return Err(SnapshotError::Truncated {
                file: file(),
                expected,
                actual,
            });
        }
        if actual > expected {
            return Err(corrupt(format!(
                "{} bytes after the end of the header",
                actual - expected
            )));
        }
        let body = bytes.len() - TRAILER;
        let stored = u32::from_le_bytes([
            bytes[body],
            bytes[body + 1],
            bytes[body + 2],
            bytes[body + 3],
        ]);
        let computed = crc32fast::hash(&bytes[..body]);
        if stored != computed {
            return Err(SnapshotError::ChecksumMismatch {
                file: file(),
                expected: stored,
                actual: computed,
            });
        }
        let base = match base_kind {
            BASE_ZERO if base_id.is_nil() && base_size == 0 => BaseRef::Zero,
            BASE_ZERO => return Err(corrupt("zero base with an id or size".into())),
            BASE_FILE => BaseRef::File {
                id: base_id,
                size: base_size,
            },
            other => return Err(corrupt(format!("unknown base kind {other}"))),
        };
        // The lengths above bound both counts by the input size.
        let mut generations = Vec::with_capacity(gen_count as usize);
        for i in 0..gen_count {
            let id = r.id();
            let page_count = r.u64();
            let crc32 = r.u32();
            if r.u32() != 0 {
                return Err(corrupt(format!(
                    "generation {i} has non-zero reserved bits"
                )));
            }
            generations.push(GenerationInfo {
                id,
                page_count,
                crc32,
            });
        }
        let mut extents = Vec::with_capacity((extent_count as usize).min(body / V1_EXTENT));
        for i in 0..extent_count {
            let start = r.u64();
            let count = r.u64();
            let kind = r.u32();
            let gen = r.u32();
            let page = r.u64();
            let loc = match kind {
                LOC_GEN => PageLocation::Gen { gen, page },
                LOC_BASE | LOC_ZERO if gen == 0 && page == 0 => {
                    if kind == LOC_BASE {
                        PageLocation::Base
                    } else {
                        PageLocation::Zero
                    }
                }
                LOC_BASE | LOC_ZERO => {
                    return Err(corrupt(format!(
                        "extent {i} has a generation on a non-generation location"
                    )))
                }
                other => {
                    return Err(corrupt(format!(
                        "extent {i} has unknown location kind {other}"
                    )))
                }
            };
            extents.push(Extent { start, count, loc });
        }
        debug_assert_eq!(r.pos, body);
        let header = Header {
            page_size,
            mem_size,
            snapshot_id,
            revision,
            base,
            generations,
            extents,
        };
        header.validate().map_err(corrupt)?;
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            page_size: 4096,
            mem_size: 16 * 4096,
            snapshot_id: Id([1; 16]),
            revision: 3,
            base: BaseRef::File {
                id: Id([2; 16]),
                size: 8 * 4096,
            },
            generations: vec![GenerationInfo {
                id: Id([3; 16]),
                page_count: 4,
                crc32: 0xdead_beef,
            }],
            extents: vec![
                Extent {
                    start: 0,
                    count: 2,
                    loc: PageLocation::Base,
                },
                Extent {
                    start: 2,
                    count: 4,
                    loc: PageLocation::Gen { gen: 0, page: 0 },
                },
                Extent {
                    start: 6,
                    count: 10,
                    loc: PageLocation::Zero,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(bytes.len(), V1_FIXED + V1_GEN + 3 * V1_EXTENT + TRAILER);
        assert_eq!(decode(&bytes).expect("decode"), h);
    }

    #[test]
    fn refuses_newer_minor_and_other_major() {
        let mut bytes = sample().encode();
        bytes[10] = 1; // minor 1
        assert!(matches!(
            decode(&bytes),
            Err(SnapshotError::UnsupportedVersion {
                major: 1,
                minor: 1,
                ..
            })
        ));
        bytes[10] = 0;
        bytes[8] = 2;
        assert!(matches!(
            decode(&bytes),
            Err(SnapshotError::UnsupportedVersion {
                major: 2,
                minor: 0,
                ..
            })
        ));
    }

    #[test]
    fn huge_count_does_not_allocate() {
        let mut bytes = sample().encode();
        bytes[80..88].copy_from_slice(&(u64::MAX / 64).to_le_bytes());
        assert!(matches!(
            decode(&bytes),
            Err(SnapshotError::Truncated { .. })
        ));
        bytes[80..88].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&bytes), Err(SnapshotError::Corrupt { .. })));
    }

    #[test]
    fn invalid_maps_are_rejected() {
        let mut h = sample();
        h.extents[2].count = 9; // leaves a page uncovered
        assert!(h.validate().is_err());
        let mut h = sample();
        h.extents[0].count = 3; // Base past the base file... and overlap
        h.extents[1].start = 3;
        assert!(h.validate().is_err());
        let mut h = sample();
        h.extents[2].loc = PageLocation::Gen { gen: 0, page: 4 }; // past gen data
        assert!(h.validate().is_err());
        let mut h = sample();
        h.generations.push(GenerationInfo {
            id: Id([4; 16]),
            page_count: 1,
            crc32: 0,
        });
        assert!(h.validate().is_err()); // unreferenced generation
    }
}
