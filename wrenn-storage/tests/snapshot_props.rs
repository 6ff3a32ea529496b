//! Property tests for the memory snapshot format: mapping overlay against a naive
//! per-page oracle, header encode/decode round trips, and decoding of damaged or random
//! bytes (never a panic, always an error). Plus the golden file of format 1.0.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

use proptest::collection::vec;
use proptest::prelude::*;

use wrenn_storage::snapshot::header::{decode, MAGIC};
use wrenn_storage::snapshot::mapping::{lookup, overlay, push_coalesced, sparse_from_pages};
use wrenn_storage::snapshot::{BaseRef, Extent, GenerationInfo, Header, Id, PageLocation};

/// What a page holds in the chain model: the base, zero, or what layer `l` wrote to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Base(u64),
    Zero,
    Written { layer: usize, page: u64 },
}

/// A layer: sparse writes `(page, is_zero)`.
fn layer(pages: u64) -> impl Strategy<Value = Vec<(u64, bool)>> {
    vec(
        (0..pages, prop::bool::weighted(0.2)),
        0..(pages as usize * 2),
    )
}

fn coalesced(extents: &[Extent]) -> bool {
    extents
        .windows(2)
        .all(|w| !w[0].joins(&w[1]) && w[0].end() == w[1].start)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Building a full map by overlaying a chain of sparse generation maps gives, for
    /// every page, the content a naive newest-first walk of the chain gives.
    #[test]
    fn overlay_chain_matches_oracle(
        pages in 1u64..80,
        base_frac in 0u64..=4,
        layers in vec(layer(80), 0..6),
    ) {
        let base_pages = pages * base_frac / 4;
        // Full initial map, as `create` builds it.
        let mut map = Vec::new();
        push_coalesced(&mut map, Extent { start: 0, count: base_pages, loc: PageLocation::Base });
        push_coalesced(&mut map, Extent { start: base_pages, count: pages - base_pages, loc: PageLocation::Zero });
        // Per layer: the data it stored (data page -> guest page), as add_generation does.
        let mut stored: Vec<Vec<u64>> = Vec::new();
        for (l, writes) in layers.iter().enumerate() {
            let writes: Vec<(u64, bool)> = writes.iter().copied().filter(|(p, _)| *p < pages).collect();
            let mut data = Vec::new();
            let mut entries = Vec::new();
            for (p, is_zero) in &writes {
                if *is_zero {
                    entries.push((*p, PageLocation::Zero));
                } else {
                    entries.push((*p, PageLocation::Gen { gen: l as u32, page: data.len() as u64 }));
                    data.push(*p);
                }
            }
            stored.push(data);
            let sparse = sparse_from_pages(entries);
            prop_assert!(sparse.windows(2).all(|w| w[0].end() <= w[1].start && !w[0].joins(&w[1])));
            map = overlay(&map, &sparse);
            prop_assert!(coalesced(&map));
            prop_assert_eq!(map.first().map(|e| e.start), Some(0));
            prop_assert_eq!(map.last().map(Extent::end), Some(pages));
        }
        for p in 0..pages {
            // Oracle: the newest layer that wrote p (last write within a layer wins).
            let mut want = if p < base_pages { Content::Base(p) } else { Content::Zero };
            for (l, writes) in layers.iter().enumerate() {
                if let Some((_, is_zero)) = writes.iter().rev().find(|(q, _)| *q == p) {
                    want = if *is_zero { Content::Zero } else { Content::Written { layer: l, page: p } };
                }
            }
            let got = match lookup(&map, p).expect("covered") {
                PageLocation::Base => Content::Base(p),
                PageLocation::Zero => Content::Zero,
                PageLocation::Gen { gen, page } => Content::Written {
                    layer: gen as usize,
                    page: stored[gen as usize][page as usize],
                },
            };
            prop_assert_eq!(got, want, "page {}", p);
        }
    }

    #[test]
    fn header_round_trip(h in header()) {
        prop_assert_eq!(h.validate(), Ok(()));
        let bytes = h.encode();
        prop_assert_eq!(decode(&bytes).expect("decode"), h);
    }

    /// Every proper prefix and every single-bit flip of a valid header is an error.
    #[test]
    fn damaged_headers_fail(h in header(), cut in any::<prop::sample::Index>(), bit in any::<prop::sample::Index>()) {
        let bytes = h.encode();
        let cut = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..cut]).is_err());
        let mut flipped = bytes.clone();
        let bit = bit.index(bytes.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(&flipped).is_err());
    }

    /// Random bytes, with or without a valid prefix, never panic the decoder.
    #[test]
    fn random_bytes_never_panic(
        prefix in prop::bool::ANY,
        mut bytes in vec(any::<u8>(), 0..600),
    ) {
        if prefix && bytes.len() >= 12 {
            bytes[..8].copy_from_slice(&MAGIC);
            bytes[8..12].copy_from_slice(&[1, 0, 0, 0]);
        }
        let _ = decode(&bytes);
    }

    /// Overwriting random spans of a valid header never panics the decoder, and a
    /// changed header is never accepted as a different valid one by accident.
    #[test]
    fn scribbled_headers_never_panic(h in header(), spans in vec((any::<prop::sample::Index>(), vec(any::<u8>(), 1..16)), 1..4)) {
        let mut bytes = h.encode();
        for (at, junk) in spans {
            let at = at.index(bytes.len());
            let n = junk.len().min(bytes.len() - at);
            bytes[at..at + n].copy_from_slice(&junk[..n]);
        }
        if let Ok(decoded) = decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }
}

fn id() -> impl Strategy<Value = Id> {
    any::<[u8; 16]>().prop_map(|mut b| {
        b[0] |= 1; // never nil
        Id(b)
    })
}

/// Random valid headers: random per-page locations, coalesced, with unreferenced
/// generations dropped and the rest renumbered.
fn header() -> impl Strategy<Value = Header> {
    (
        prop::sample::select(vec![4096u32, 8192, 2 << 20]),
        1u64..120,
        id(),
        any::<u64>(),
        prop::option::of((id(), any::<u64>())),
        vec((id(), 1u64..50, any::<u32>()), 0..5),
        vec(
            (
                0u8..3,
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
            ),
            120,
        ),
    )
        .prop_map(
            |(page_size, pages, snapshot_id, revision, base, gens, locs)| {
                let ps = u64::from(page_size);
                let base = match base {
                    None => BaseRef::Zero,
                    Some((id, size)) => BaseRef::File {
                        id,
                        size: size % (pages * ps + 2 * ps),
                    },
                };
                let mut h = Header {
                    page_size,
                    mem_size: pages * ps,
                    snapshot_id,
                    revision,
                    base,
                    generations: gens
                        .iter()
                        .map(|&(id, page_count, crc32)| GenerationInfo {
                            id,
                            page_count,
                            crc32,
                        })
                        .collect(),
                    extents: Vec::new(),
                };
                h.generations.sort_by_key(|g| g.id);
                h.generations.dedup_by_key(|g| g.id);
                let base_pages = h.base_pages();
                let mut entries = Vec::new();
                for p in 0..pages {
                    let (kind, g, page) = locs[p as usize];
                    let loc = match kind {
                        0 if p < base_pages => PageLocation::Base,
                        2 if !h.generations.is_empty() => {
                            let gi = g.index(h.generations.len());
                            let page = page.index(h.generations[gi].page_count as usize) as u64;
                            PageLocation::Gen {
                                gen: gi as u32,
                                page,
                            }
                        }
                        _ => PageLocation::Zero,
                    };
                    entries.push((p, loc));
                }
                let mut extents = sparse_from_pages(entries);
                // Drop unreferenced generations, renumber.
                let mut used = vec![false; h.generations.len()];
                for e in &extents {
                    if let PageLocation::Gen { gen, .. } = e.loc {
                        used[gen as usize] = true;
                    }
                }
                let mut renumber = vec![0u32; used.len()];
                let mut kept = Vec::new();
                for (i, g) in h.generations.iter().enumerate() {
                    if used[i] {
                        renumber[i] = kept.len() as u32;
                        kept.push(*g);
                    }
                }
                for e in &mut extents {
                    if let PageLocation::Gen { gen, .. } = &mut e.loc {
                        *gen = renumber[*gen as usize];
                    }
                }
                h.generations = kept;
                h.extents = extents;
                h
            },
        )
}

/// The format 1.0 golden file: decoded by today's reader to exactly this header, and
/// re-encoded to the same bytes. Regenerate only for a new format version, with
/// `WRENN_BLESS=1` (and keep the old file and its test).
#[test]
fn golden_v1_0() {
    let expected = Header {
        page_size: 4096,
        mem_size: 64 * 4096,
        snapshot_id: Id(*b"wrenn-snapshot-1"),
        revision: 7,
        base: BaseRef::File {
            id: Id(*b"template-base-01"),
            size: 40 * 4096,
        },
        generations: vec![
            GenerationInfo {
                id: Id(*b"generation-00001"),
                page_count: 10,
                crc32: 0x1234_5678,
            },
            GenerationInfo {
                id: Id(*b"generation-00002"),
                page_count: 3,
                crc32: 0x9abc_def0,
            },
        ],
        extents: vec![
            Extent {
                start: 0,
                count: 4,
                loc: PageLocation::Base,
            },
            Extent {
                start: 4,
                count: 8,
                loc: PageLocation::Gen { gen: 0, page: 2 },
            },
            Extent {
                start: 12,
                count: 2,
                loc: PageLocation::Zero,
            },
            Extent {
                start: 14,
                count: 3,
                loc: PageLocation::Gen { gen: 1, page: 0 },
            },
            Extent {
                start: 17,
                count: 23,
                loc: PageLocation::Base,
            },
            Extent {
                start: 40,
                count: 24,
                loc: PageLocation::Zero,
            },
        ],
    };
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/memory-v1.0.header");
    if std::env::var_os("WRENN_BLESS").is_some() {
        std::fs::write(&path, expected.encode()).expect("write golden file");
    }
    let bytes = std::fs::read(&path).expect("golden file (WRENN_BLESS=1 to create)");
    assert_eq!(decode(&bytes).expect("decode golden"), expected);
    assert_eq!(expected.encode(), bytes);
}
