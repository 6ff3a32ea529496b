//! Memory snapshots on real files: generations against an in-memory oracle, merge,
//! corruption and truncation, crash consistency (in-process at every commit step, and
//! by aborting a child process), page serving, raw images.

#![allow(clippy::tests_outside_test_module)] // integration tests are their own crate

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use wrenn_core::memory::{PageContent, PageSource};
use wrenn_storage::snapshot::testing::{set_commit_hook, CommitStep};
use wrenn_storage::snapshot::{
    BaseRef, Id, MemorySnapshot, PageLocation, SnapshotError, HEADER_FILE, PAGE_SIZE,
};

const PS: usize = PAGE_SIZE as usize;

/// A scratch directory, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wrenn-snapshot-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic page content: a non-zero pattern derived from `seed`.
fn page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..PS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// Expected content of every page.
struct Oracle {
    pages: Vec<Vec<u8>>,
}

impl Oracle {
    fn from_base(base: &[u8], page_count: usize) -> Self {
        let mut pages = vec![vec![0u8; PS]; page_count];
        for (i, chunk) in base.chunks(PS).enumerate().take(page_count) {
            pages[i][..chunk.len()].copy_from_slice(chunk);
        }
        Oracle { pages }
    }

    fn apply(&mut self, writes: &[(u64, Vec<u8>)]) {
        for (p, data) in writes {
            self.pages[*p as usize] = data.clone();
        }
    }

    fn check_source(&self, src: &dyn PageSource) {
        assert_eq!(src.size(), (self.pages.len() * PS) as u64);
        let mut buf = vec![0xAAu8; PS];
        for (i, want) in self.pages.iter().enumerate() {
            let got = src.read_page((i * PS) as u64, &mut buf).expect("read_page");
            match got {
                PageContent::Zero => {
                    assert!(want.iter().all(|&b| b == 0), "page {i} served as zero")
                }
                PageContent::Data => assert_eq!(&buf, want, "page {i} content"),
            }
        }
    }

    /// `for_each_changed_page` reports exactly the non-base pages (zeros only inside
    /// the base range), each with the right content.
    fn check_changed(&self, snap: &MemorySnapshot) {
        let mut seen = BTreeMap::new();
        snap.for_each_changed_page(|p, data| {
            let want = &self.pages[p as usize];
            match data {
                Some(d) => assert_eq!(d, &want[..], "changed page {p}"),
                None => assert!(want.iter().all(|&b| b == 0), "page {p} reported zero"),
            }
            assert!(
                seen.insert(p, data.is_some()).is_none(),
                "page {p} reported twice"
            );
            Ok::<(), SnapshotError>(())
        })
        .expect("for_each_changed_page");
        let base_pages = match snap.base() {
            BaseRef::Zero => 0,
            BaseRef::File { size, .. } => size.div_ceil(PAGE_SIZE),
        };
        for p in 0..snap.page_count() {
            let loc = snap.lookup(p).expect("lookup");
            let expected = match loc {
                PageLocation::Base => false,
                PageLocation::Zero => p < base_pages,
                PageLocation::Gen { .. } => true,
            };
            assert_eq!(seen.contains_key(&p), expected, "page {p} at {loc:?}");
        }
    }
}

fn add(snap: &MemorySnapshot, writes: &[(u64, Vec<u8>)]) -> MemorySnapshot {
    snap.add_generation(writes.iter().map(|(p, d)| (*p, d.as_slice())))
        .expect("add_generation")
}

fn zero() -> Vec<u8> {
    vec![0u8; PS]
}

/// Sorted file names in a directory.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every file's name and bytes.
fn dir_contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    entries(dir)
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).expect("read");
            (n, bytes)
        })
        .collect()
}

const PAGES: u64 = 64;

/// A base file of 48 pages (the last 16 pages of memory lie past its end), with a zero
/// page at 25; a snapshot over it with three overlapping generations including zero pages.
fn three_generations(s: &Scratch) -> (MemorySnapshot, Oracle, PathBuf) {
    let mut base = Vec::new();
    for p in 0..48u64 {
        base.extend(if p == 25 { zero() } else { page(1000 + p) });
    }
    let base_path = s.path("base.mem");
    std::fs::write(&base_path, &base).expect("write base");
    let dir = s.path("snap");
    let snap = MemorySnapshot::create(
        &dir,
        PAGES * PAGE_SIZE,
        BaseRef::File {
            id: Id::random(),
            size: base.len() as u64,
        },
    )
    .expect("create");
    let mut oracle = Oracle::from_base(&base, PAGES as usize);
    assert_eq!(snap.generations(), 0);
    assert_eq!(snap.lookup(0), Some(PageLocation::Base));
    assert_eq!(snap.lookup(48), Some(PageLocation::Zero));
    assert_eq!(snap.lookup(PAGES), None);

    // Generation 1: pages 0..10 (5 zeroed), ascending.
    let g1: Vec<(u64, Vec<u8>)> = (0..10)
        .map(|p| (p, if p == 5 { zero() } else { page(1 + p) }))
        .collect();
    // Generation 2: overlapping 8..20 in descending order with zeros at 12, 13 and a
    // page written twice (the last write wins); one page past the base file.
    let mut g2: Vec<(u64, Vec<u8>)> = (8..20)
        .rev()
        .map(|p| {
            (
                p,
                if p == 12 || p == 13 {
                    zero()
                } else {
                    page(100 + p)
                },
            )
        })
        .collect();
    g2.push((9, page(999)));
    g2.push((50, page(150)));
    // Generation 3: scattered, zeroing a generation-2 page and a page past the base.
    let mut g3: Vec<(u64, Vec<u8>)> =
        vec![(3, page(203)), (15, zero()), (9, page(209)), (55, zero())];
    g3.extend((40..46).map(|p| (p, page(200 + p))));

    let mut snap = snap;
    for g in [&g1, &g2, &g3] {
        snap = add(&snap, g);
        oracle.apply(g);
    }
    (snap, oracle, base_path)
}

#[test]
fn generations_and_merge_match_the_oracle() {
    let s = Scratch::new("gens");
    let (snap, oracle, base) = three_generations(&s);
    assert_eq!(snap.generations(), 3);
    assert_eq!(snap.revision(), 3);
    // Stored: g1 9 pages, g2 11 (9..19 minus 12,13 = 10, +9 again, +50), g3 8.
    assert_eq!(snap.changed_bytes(), (9 + 12 + 8) * PAGE_SIZE);

    let loaded = MemorySnapshot::load(snap.dir()).expect("load");
    assert_eq!(loaded, snap);
    assert_eq!(loaded.lookup(5), Some(PageLocation::Zero));
    assert_eq!(loaded.lookup(25), Some(PageLocation::Base));
    assert!(matches!(
        loaded.lookup(9),
        Some(PageLocation::Gen { gen: 2, .. })
    ));
    oracle.check_source(&loaded.page_source(Some(&base)).expect("page_source"));
    oracle.check_changed(&loaded);

    let gen_files: Vec<PathBuf> = (0..3).map(|i| loaded.generation_path(i)).collect();
    let merged = loaded.merge().expect("merge");
    assert_eq!(merged.generations(), 1);
    assert_eq!(merged.revision(), 4);
    assert!(merged.changed_bytes() < snap.changed_bytes()); // shadowed pages dropped
    for f in &gen_files {
        assert!(!f.exists(), "{} survived the merge", f.display());
    }
    assert_eq!(entries(snap.dir()).len(), 2, "{:?}", entries(snap.dir()));
    let reloaded = MemorySnapshot::load(snap.dir()).expect("load merged");
    assert_eq!(reloaded, merged);
    oracle.check_source(&reloaded.page_source(Some(&base)).expect("page_source"));
    oracle.check_changed(&reloaded);
    // The pre-merge value is stale now: writing from it would lose the merge.
    let err = snap.add_generation([(0, &page(1)[..])]).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::Stale {
                expected: 3,
                found: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(loaded.merge(), Err(SnapshotError::Stale { .. })));
    assert_eq!(entries(snap.dir()).len(), 2, "a refused write left files");
    // Merging again is a no-op on content.
    let again = reloaded.merge().expect("merge again");
    assert_eq!(again.extents(), reloaded.extents());
}

#[test]
fn zero_base_and_shadowed_generations() {
    let s = Scratch::new("zero");
    let dir = s.path("snap");
    let snap = MemorySnapshot::create(&dir, 32 * PAGE_SIZE, BaseRef::Zero).expect("create");
    assert_eq!(snap.extents().len(), 1);
    assert_eq!(snap.lookup(31), Some(PageLocation::Zero));
    let mut oracle = Oracle::from_base(&[], 32);
    let g1 = vec![(1, page(1)), (2, page(2)), (3, zero())];
    let snap = add(&snap, &g1);
    oracle.apply(&g1);
    // Overwrites all of generation 1: its file is dropped at commit.
    let g1_file = snap.generation_path(0);
    let g2 = vec![(1, zero()), (2, page(22)), (4, page(4))];
    let snap = add(&snap, &g2);
    oracle.apply(&g2);
    assert_eq!(snap.generations(), 1);
    assert!(!g1_file.exists());
    // An all-zero generation writes no data file.
    let g3 = vec![(4, zero())];
    let snap = add(&snap, &g3);
    oracle.apply(&g3);
    assert_eq!(snap.generations(), 1);
    assert_eq!(entries(&dir).len(), 2);
    let loaded = MemorySnapshot::load(&dir).expect("load");
    assert_eq!(loaded, snap);
    // No base file needed; zero pages of a zero base are not "changed".
    oracle.check_source(&loaded.page_source(None).expect("page_source"));
    oracle.check_changed(&loaded);
    let mut changed = Vec::new();
    loaded
        .for_each_changed_page(|p, d| {
            changed.push((p, d.is_some()));
            Ok::<_, SnapshotError>(())
        })
        .expect("iterate");
    assert_eq!(changed, vec![(2, true)]);
}

#[test]
fn invalid_input_is_rejected_and_leaves_no_files() {
    let s = Scratch::new("input");
    let dir = s.path("snap");
    assert!(matches!(
        MemorySnapshot::create(&dir, 4095, BaseRef::Zero),
        Err(SnapshotError::InvalidArgument(_))
    ));
    let snap = MemorySnapshot::create(&dir, 8 * PAGE_SIZE, BaseRef::Zero).expect("create");
    assert!(matches!(
        MemorySnapshot::create(&dir, 8 * PAGE_SIZE, BaseRef::Zero),
        Err(SnapshotError::DestinationExists { .. })
    ));
    let before = dir_contents(&dir);
    let p = page(1);
    let err = snap.add_generation([(0, &p[..]), (8, &p[..])]).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::PageOutOfRange {
                page: 8,
                page_count: 8
            }
        ),
        "{err}"
    );
    let err = snap.add_generation([(0, &p[..100])]).unwrap_err();
    assert!(
        matches!(err, SnapshotError::BadPageLength { len: 100, .. }),
        "{err}"
    );
    assert_eq!(
        dir_contents(&dir),
        before,
        "a failed write left files behind"
    );
}

#[test]
fn corrupt_or_missing_data_files_fail_at_load() {
    let s = Scratch::new("corrupt");
    let (snap, _, _) = three_generations(&s);
    let dir = snap.dir().to_path_buf();
    let victim = snap.generation_path(1);

    let mut bytes = std::fs::read(&victim).expect("read");
    bytes[5000] ^= 0x40;
    std::fs::write(&victim, &bytes).expect("write");
    let before = dir_contents(&dir);
    let err = MemorySnapshot::load(&dir).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::ChecksumMismatch { file, .. } if *file == victim),
        "{err}"
    );
    assert_eq!(dir_contents(&dir), before, "load modified the directory");
    // Readers that skip the full check still refuse a wrong size.
    bytes[5000] ^= 0x40;
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&victim, &bytes).expect("write");
    assert!(matches!(
        MemorySnapshot::load(&dir),
        Err(SnapshotError::Truncated { .. })
    ));
    assert!(matches!(
        snap.page_source(None),
        Err(SnapshotError::BaseFileRequired)
    ));
    std::fs::remove_file(&victim).expect("rm");
    let err = MemorySnapshot::load(&dir).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::MissingGeneration { file } if *file == victim),
        "{err}"
    );
}

#[test]
fn damaged_headers_are_typed_errors() {
    let s = Scratch::new("header");
    let (snap, _, _) = three_generations(&s);
    let path = snap.dir().join(HEADER_FILE);
    let good = std::fs::read(&path).expect("read");

    for cut in [0, 3, 11, 50, 91, good.len() - 33, good.len() - 1] {
        std::fs::write(&path, &good[..cut]).expect("write");
        let err = MemorySnapshot::load(snap.dir()).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
    let mut flipped = good.clone();
    flipped[100] ^= 1;
    std::fs::write(&path, &flipped).expect("write");
    let err = MemorySnapshot::load(snap.dir()).unwrap_err();
    assert!(
        matches!(err, SnapshotError::ChecksumMismatch { ref file, .. } if *file == path),
        "{err}"
    );

    let mut magic = good.clone();
    magic[0] = b'X';
    std::fs::write(&path, &magic).expect("write");
    assert!(matches!(
        MemorySnapshot::load(snap.dir()),
        Err(SnapshotError::BadMagic { .. })
    ));

    let mut newer = good.clone();
    newer[10] = 7;
    std::fs::write(&path, &newer).expect("write");
    let err = MemorySnapshot::load(snap.dir()).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::UnsupportedVersion {
                major: 1,
                minor: 7,
                ..
            }
        ),
        "{err}"
    );

    let mut longer = good.clone();
    longer.push(0);
    std::fs::write(&path, &longer).expect("write");
    assert!(matches!(
        MemorySnapshot::load(snap.dir()),
        Err(SnapshotError::Corrupt { .. })
    ));

    std::fs::remove_file(&path).expect("rm");
    let err = MemorySnapshot::load(snap.dir()).unwrap_err();
    assert!(
        matches!(err, SnapshotError::Io { step: "open", .. }),
        "{err}"
    );

    std::fs::write(&path, &good).expect("write");
    assert_eq!(MemorySnapshot::load(snap.dir()).expect("restored"), snap);
}

/// At every step of a write, the directory loads as the old state until the header
/// rename and as the new state from then on.
fn check_every_step(
    prev: &MemorySnapshot,
    op: impl FnOnce(&MemorySnapshot) -> MemorySnapshot,
) -> MemorySnapshot {
    use std::cell::RefCell;
    use std::rc::Rc;
    let seen: Rc<RefCell<Vec<(CommitStep, MemorySnapshot)>>> = Rc::default();
    let dir = prev.dir().to_path_buf();
    let log = seen.clone();
    set_commit_hook(Some(Box::new(move |step| {
        let loaded =
            MemorySnapshot::load(&dir).unwrap_or_else(|e| panic!("not loadable at {step:?}: {e}"));
        log.borrow_mut().push((step, loaded));
    })));
    let next = op(prev);
    set_commit_hook(None);
    let seen = seen.borrow();
    let steps: Vec<CommitStep> = seen.iter().map(|(s, _)| *s).collect();
    assert!(steps.contains(&CommitStep::HeaderRenamed), "{steps:?}");
    let mut committed = false;
    for (step, loaded) in seen.iter() {
        committed |= *step == CommitStep::HeaderRenamed;
        let want = if committed { &next } else { prev };
        assert_eq!(loaded, want, "state at {step:?}");
    }
    next
}

#[test]
fn every_intermediate_state_loads() {
    let s = Scratch::new("steps");
    let (snap, oracle, base) = three_generations(&s);
    let writes = vec![(2, page(77)), (3, zero()), (60, page(60))];
    let next = check_every_step(&snap, |p| add(p, &writes));
    let merged = check_every_step(&next, |p| p.merge().expect("merge"));
    let mut oracle = oracle;
    oracle.apply(&writes);
    oracle.check_source(&merged.page_source(Some(&base)).expect("source"));
}

const CRASH_DIR: &str = "WRENN_SNAPSHOT_TEST_CRASH_DIR";
const CRASH_AT: &str = "WRENN_SNAPSHOT_TEST_CRASH_AT";
const CRASH_OP: &str = "WRENN_SNAPSHOT_TEST_CRASH_OP";

/// Child half of `killed_writers_leave_the_previous_state`: does nothing unless the
/// parent set the variables; then aborts the process at the chosen step.
#[test]
fn crash_child() {
    let (Ok(dir), Ok(at), Ok(op)) = (
        std::env::var(CRASH_DIR),
        std::env::var(CRASH_AT),
        std::env::var(CRASH_OP),
    ) else {
        return;
    };
    let snap = MemorySnapshot::load(&dir).expect("child load");
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass by reference for the duration of the
    // call; disabling core dumps only affects this child process.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    set_commit_hook(Some(Box::new(move |step| {
        if format!("{step:?}") == at {
            std::process::abort(); // no unwinding, no destructors: as abrupt as a kill
        }
    })));
    match op.as_str() {
        "add" => {
            let p = page(4242);
            snap.add_generation((0..16).map(|i| (i, &p[..])))
                .expect("child add");
        }
        "merge" => {
            snap.merge().expect("child merge");
        }
        other => panic!("unknown op {other}"),
    }
    // Reaching here means the step never came: the parent sees exit 0 and fails.
}

#[test]
fn killed_writers_leave_the_previous_state() {
    let exe = std::env::current_exe().expect("current_exe");
    for (op, at) in [
        ("add", "DataSynced"),
        ("add", "DataRenamed"),
        ("add", "HeaderSynced"),
        ("merge", "DataRenamed"),
        ("merge", "HeaderSynced"),
        ("merge", "Committed"),
    ] {
        let s = Scratch::new("kill");
        let (snap, oracle, base) = three_generations(&s);
        let status = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR, snap.dir())
            .env(CRASH_AT, at)
            .env(CRASH_OP, op)
            .output()
            .expect("spawn child");
        assert_eq!(
            status.status.signal(),
            Some(libc::SIGABRT),
            "{op}/{at}: the child did not abort at the step: {}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        );
        let loaded = MemorySnapshot::load(snap.dir()).expect("load after crash");
        if at == "Committed" {
            // Past the commit point: the merged state, with the old files left over.
            assert_eq!(loaded.generations(), 1, "{op}/{at}");
            assert_eq!(loaded.revision(), snap.revision() + 1);
        } else {
            assert_eq!(loaded, snap, "{op}/{at}");
        }
        oracle.check_source(&loaded.page_source(Some(&base)).expect("source"));
        let leftovers = loaded.remove_unreferenced_files().expect("cleanup");
        // Every crash point leaves a temp file, an unreferenced data file or old files.
        assert!(!leftovers.is_empty(), "{op}/{at}: nothing left over");
        assert_eq!(
            entries(snap.dir()).len(),
            1 + loaded.generations(),
            "{op}/{at}"
        );
        // And the snapshot goes on.
        let after = add(&loaded, &[(1, page(5))]);
        assert_eq!(MemorySnapshot::load(snap.dir()).expect("load"), after);
    }
}

#[test]
fn page_source_checks_the_base_file() {
    let s = Scratch::new("base");
    let (snap, _, base) = three_generations(&s);
    assert!(matches!(
        snap.page_source(None),
        Err(SnapshotError::BaseFileRequired)
    ));
    let short = s.path("short.mem");
    std::fs::write(&short, vec![1u8; PS]).expect("write");
    assert!(matches!(
        snap.page_source(Some(&short)),
        Err(SnapshotError::BaseSizeMismatch { .. })
    ));
    let src = snap.page_source(Some(&base)).expect("source");
    let mut buf = vec![0u8; PS];
    assert!(src.read_page(1, &mut buf).is_err());
    assert!(src.read_page(PAGES * PAGE_SIZE, &mut buf).is_err());
    assert!(src.read_page(0, &mut buf[..10]).is_err());
    assert_eq!(
        src.read_page(5 * PAGE_SIZE, &mut buf).expect("zero"),
        PageContent::Zero
    );
}

#[test]
fn page_source_survives_merge() {
    let s = Scratch::new("survive");
    let (snap, oracle, base) = three_generations(&s);
    let src = snap.page_source(Some(&base)).expect("source");
    snap.merge().expect("merge");
    oracle.check_source(&src); // maps of unlinked files stay valid
}

#[test]
fn raw_image_is_sparse_and_exact() {
    let s = Scratch::new("raw");
    let (snap, oracle, base) = three_generations(&s);
    let dest = s.path("image.mem");
    std::fs::write(&dest, b"old").expect("write");
    snap.write_raw_image(Some(&base), &dest)
        .expect("write_raw_image");
    let bytes = std::fs::read(&dest).expect("read");
    assert_eq!(bytes.len() as u64, snap.mem_size());
    for (i, want) in oracle.pages.iter().enumerate() {
        assert_eq!(&bytes[i * PS..(i + 1) * PS], &want[..], "page {i}");
    }
    let nonzero = oracle
        .pages
        .iter()
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64;
    let allocated = std::fs::metadata(&dest).expect("stat").blocks() * 512;
    assert!(
        allocated <= nonzero * PAGE_SIZE + 64 * 1024,
        "allocated {allocated} bytes for {nonzero} non-zero pages"
    );
    assert!(allocated < snap.mem_size());
    // A snapshot over the image as its base reads the same.
    let s2 = Scratch::new("raw2");
    let over = MemorySnapshot::create(
        s2.path("snap"),
        snap.mem_size(),
        BaseRef::File {
            id: Id::random(),
            size: snap.mem_size(),
        },
    )
    .expect("create");
    oracle.check_source(&over.page_source(Some(&dest)).expect("source"));
    assert!(entries(&s.dir).iter().all(|n| !n.contains("tmp")));
}

#[test]
fn copy_to_moves_only_the_snapshot() {
    let s = Scratch::new("copy");
    let (snap, oracle, base) = three_generations(&s);
    std::fs::write(snap.dir().join("memory.gen-leftover"), b"junk").expect("write");
    let dest = s.path("copy");
    let copy = snap.copy_to(&dest).expect("copy_to");
    assert_eq!(MemorySnapshot::load(&dest).expect("load copy"), copy);
    assert_eq!(copy.header(), snap.header());
    assert_eq!(entries(&dest).len(), 1 + snap.generations());
    oracle.check_source(&copy.page_source(Some(&base)).expect("source"));
    assert!(matches!(
        snap.copy_to(&dest),
        Err(SnapshotError::DestinationExists { .. })
    ));
}

/// Throughput of the write and read paths (numbers are printed; meaningful in --release).
#[test]
fn throughput_100_mib() {
    let mib: u64 = if cfg!(debug_assertions) { 16 } else { 100 };
    let pages = mib * 1024 * 1024 / PAGE_SIZE;
    let s = Scratch::new("perf");
    let snap = MemorySnapshot::create(s.path("snap"), 2 * pages * PAGE_SIZE, BaseRef::Zero)
        .expect("create");
    let mut data = vec![0u8; (pages * PAGE_SIZE) as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    let t = Instant::now();
    let snap = snap
        .add_generation(
            data.chunks_exact(PS)
                .enumerate()
                .map(|(i, p)| (i as u64, p)),
        )
        .expect("add");
    let write = t.elapsed();
    let t = Instant::now();
    let loaded = MemorySnapshot::load(snap.dir()).expect("load");
    let load = t.elapsed();
    let t = Instant::now();
    let mut sum = 0u64;
    loaded
        .for_each_changed_page(|_, d| {
            sum += u64::from(d.map_or(0, |d| d[100]));
            Ok::<_, SnapshotError>(())
        })
        .expect("iterate");
    let read = t.elapsed();
    let t = Instant::now();
    loaded.merge().expect("merge");
    let merge = t.elapsed();
    assert!(sum > 0);
    let rate = |d: std::time::Duration| mib as f64 / d.as_secs_f64();
    eprintln!(
        "{mib} MiB: add_generation {write:?} ({:.0} MiB/s), load+crc {load:?} ({:.0} MiB/s), \
         for_each_changed_page {read:?} ({:.0} MiB/s), merge {merge:?} ({:.0} MiB/s)",
        rate(write),
        rate(load),
        rate(read),
        rate(merge)
    );
}
