//! The page map: sorted, coalesced extents saying where each guest page's content is,
//! and the pure functions that build and combine such maps.
//!
//! A *full* map covers pages `[0, page_count)` exactly once, in order, with no two
//! adjacent extents that could be one ([`Extent::joins`]). A *sparse* map has the same
//! shape but may leave gaps; [`overlay`] lays a sparse map of newer content over a full map.

/// Where a page's current content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageLocation {
    /// The snapshot's base memory file at the same offset (all zeros for a zero base).
    Base,
    /// All zeros, stored nowhere.
    Zero,
    /// Page `page` of generation `gen`'s data file (index into the header's generation table).
    Gen { gen: u32, page: u64 },
}

impl PageLocation {
    /// The location `pages` pages further on inside the same run.
    fn advance(self, pages: u64) -> Self {
        match self {
            PageLocation::Gen { gen, page } => PageLocation::Gen {
                gen,
                page: page + pages,
            },
            other => other,
        }
    }
}

/// `count` consecutive guest pages from `start`, whose content is at `loc` onwards
/// (for [`PageLocation::Gen`], page `start + i` is data page `loc.page + i`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub start: u64,
    pub count: u64,
    pub loc: PageLocation,
}

impl Extent {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start + self.count
    }

    /// The location of `page`, which must lie inside the extent.
    pub fn location_of(&self, page: u64) -> PageLocation {
        debug_assert!(page >= self.start && page < self.end());
        self.loc.advance(page - self.start)
    }

    /// Whether `next` continues this extent: it starts where this one ends and its
    /// location is the continuation of this one's (same kind; for generations, same
    /// generation and the next data page).
    pub fn joins(&self, next: &Extent) -> bool {
        self.end() == next.start
            && match (self.loc, next.loc) {
                (PageLocation::Base, PageLocation::Base) => true,
                (PageLocation::Zero, PageLocation::Zero) => true,
                (
                    PageLocation::Gen { gen: g1, page: p1 },
                    PageLocation::Gen { gen: g2, page: p2 },
                ) => g1 == g2 && p1.checked_add(self.count) == Some(p2),
                _ => false,
            }
    }

    /// The part of the extent covering `[from, to)` (which must lie inside it).
    fn slice(&self, from: u64, to: u64) -> Extent {
        debug_assert!(self.start <= from && from < to && to <= self.end());
        Extent {
            start: from,
            count: to - from,
            loc: self.loc.advance(from - self.start),
        }
    }
}

/// Appends `e` to `out`, merging it into the last extent when it continues it.
pub fn push_coalesced(out: &mut Vec<Extent>, e: Extent) {
    if e.count == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.joins(&e) {
            last.count += e.count;
            return;
        }
    }
    out.push(e);
}

/// The extent holding `page` in a sorted map, if any.
pub fn find(extents: &[Extent], page: u64) -> Option<&Extent> {
    let i = extents.partition_point(|e| e.end() <= page);
    extents.get(i).filter(|e| e.start <= page)
}

/// Where `page` is according to a sorted map (`None` if no extent covers it).
pub fn lookup(extents: &[Extent], page: u64) -> Option<PageLocation> {
    find(extents, page).map(|e| e.location_of(page))
}

/// A sorted, coalesced sparse map from single-page entries given in any order; when a
/// page appears more than once, the last entry wins.
pub fn sparse_from_pages(mut pages: Vec<(u64, PageLocation)>) -> Vec<Extent> {
    if !pages.windows(2).all(|w| w[0].0 < w[1].0) {
        // Stable: among equal pages the original order is kept, so the last is the newest.
        pages.sort_by_key(|&(page, _)| page);
        let mut deduped: Vec<(u64, PageLocation)> = Vec::with_capacity(pages.len());
        for entry in pages {
            match deduped.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => deduped.push(entry),
            }
        }
        pages = deduped;
    }
    let mut out = Vec::new();
    for (page, loc) in pages {
        push_coalesced(
            &mut out,
            Extent {
                start: page,
                count: 1,
                loc,
            },
        );
    }
    out
}

/// Lays `newer` (a sorted sparse map) over `older` (a full map): pages covered by `newer`
/// take its locations, every other page keeps `older`'s. The result is a full, coalesced
/// map over the same pages.
///
/// # Panics
/// If `newer` is unsorted, overlapping, or reaches past the end of `older`.
pub fn overlay(older: &[Extent], newer: &[Extent]) -> Vec<Extent> {
    let total = older.last().map_or(0, Extent::end);
    let mut out = Vec::with_capacity(older.len() + 2 * newer.len());
    let mut cursor = 0usize; // first older extent that may still overlap `pos`
    let mut pos = 0u64; // next page to emit
    for n in newer {
        assert!(
            n.start >= pos && n.end() <= total,
            "overlay: newer extent {n:?} is unsorted, overlapping or out of range"
        );
        copy_older(&mut out, older, &mut cursor, pos, n.start);
        push_coalesced(&mut out, *n);
        pos = n.end();
    }
    copy_older(&mut out, older, &mut cursor, pos, total);
    out
}

/// Appends `older`'s coverage of `[from, to)` to `out`.
fn copy_older(out: &mut Vec<Extent>, older: &[Extent], cursor: &mut usize, mut from: u64, to: u64) {
    while *cursor < older.len() && older[*cursor].end() <= from {
        *cursor += 1;
    }
    while from < to {
        let e = &older[*cursor];
        let upto = e.end().min(to);
        push_coalesced(out, e.slice(from.max(e.start), upto));
        from = upto;
        if upto == e.end() {
            *cursor += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, count: u64, loc: PageLocation) -> Extent {
        Extent { start, count, loc }
    }

    #[test]
    fn overlay_splits_and_coalesces() {
        let older = vec![
            ext(0, 4, PageLocation::Base),
            ext(4, 4, PageLocation::Gen { gen: 0, page: 0 }),
        ];
        let newer = vec![ext(2, 3, PageLocation::Zero), ext(6, 1, PageLocation::Zero)];
        let merged = overlay(&older, &newer);
        assert_eq!(
            merged,
            vec![
                ext(0, 2, PageLocation::Base),
                ext(2, 3, PageLocation::Zero),
                ext(5, 1, PageLocation::Gen { gen: 0, page: 1 }),
                ext(6, 1, PageLocation::Zero),
                ext(7, 1, PageLocation::Gen { gen: 0, page: 3 }),
            ]
        );
    }

    #[test]
    fn overlay_rejoins_split_runs() {
        // Overwriting the middle of a gen run with the same continuation rejoins it.
        let older = vec![ext(0, 3, PageLocation::Gen { gen: 0, page: 0 })];
        let newer = vec![ext(1, 1, PageLocation::Gen { gen: 0, page: 1 })];
        assert_eq!(overlay(&older, &newer), older);
    }

    #[test]
    fn sparse_from_pages_last_wins() {
        let pages = vec![
            (5, PageLocation::Zero),
            (1, PageLocation::Gen { gen: 1, page: 1 }),
            (5, PageLocation::Gen { gen: 1, page: 2 }),
            (0, PageLocation::Gen { gen: 1, page: 0 }),
        ];
        assert_eq!(
            sparse_from_pages(pages),
            vec![
                ext(0, 2, PageLocation::Gen { gen: 1, page: 0 }),
                ext(5, 1, PageLocation::Gen { gen: 1, page: 2 }),
            ]
        );
    }

    #[test]
    fn find_edges() {
        let m = vec![ext(0, 2, PageLocation::Base), ext(2, 3, PageLocation::Zero)];
        assert_eq!(lookup(&m, 0), Some(PageLocation::Base));
        assert_eq!(lookup(&m, 2), Some(PageLocation::Zero));
        assert_eq!(lookup(&m, 4), Some(PageLocation::Zero));
        assert_eq!(lookup(&m, 5), None);
        assert_eq!(lookup(&[], 0), None);
    }
}
