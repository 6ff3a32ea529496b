//! The userfaultfd memory server against a real userfaultfd: the test plays the VMM
//! (creates the uffd, maps and registers anonymous memory, sends the Firecracker
//! handshake) and touches its memory, and every byte is compared with the source.
//! Needs root (userfaultfd is denied to unprivileged users on the team's hosts).
// An integration-test crate is test-only as a whole; the lint targets unit tests.
#![allow(clippy::tests_outside_test_module)]

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use wrenn_core::memory::{MemoryServer, MemoryServerError, PageContent, PageSource};
use wrenn_storage::memserver::testing::{
    is_root, measure_fault_rate, pattern_page, FakeVmm, MemPageSource,
};
use wrenn_storage::memserver::{GuestRegion, ServerOptions, UffdMemoryServer, UffdServerHandle};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

/// One test at a time: they are memory hungry and the leak test counts fds/threads.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

macro_rules! require_root {
    () => {
        if !is_root() {
            // Straight to fd 2: the harness captures eprintln! of passing tests.
            let _ = writeln!(io::stderr(), "\n*** SKIPPED: userfaultfd needs root ***");
            return;
        }
    };
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "wrenn-memserver-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("mem.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: deterministic shuffles without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

/// Waits up to 5 s for `cond` (counters are bumped just after the faulting thread is
/// woken, and threads name themselves after they start).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

fn opts(prefetch: bool) -> ServerOptions {
    ServerOptions {
        prefetch,
        handshake_timeout: Duration::from_secs(5),
        ..ServerOptions::default()
    }
}

fn opts_around(prefetch: bool, fault_around_pages: usize) -> ServerOptions {
    ServerOptions {
        fault_around_pages,
        ..opts(prefetch)
    }
}

/// Listens, plays the VMM's handshake, accepts.
fn start(
    dir: &TempDir,
    source: Arc<dyn PageSource>,
    vmm: &mut FakeVmm,
    options: ServerOptions,
) -> UffdServerHandle {
    let listener = UffdMemoryServer::new(options).listen(&dir.sock()).unwrap();
    vmm.connect(&dir.sock()).unwrap();
    let handle = listener.accept(source).unwrap();
    assert!(
        !dir.sock().exists(),
        "socket file removed after the handshake"
    );
    assert_eq!(handle.peer_pid(), Some(std::process::id() as i32));
    handle
}

/// Reads every page of the VMM's memory and compares with `expected(page, buf)`.
fn verify(vmm: &FakeVmm, mut expected: impl FnMut(u64, &mut [u8])) {
    let mut got = vec![0u8; PAGE];
    let mut want = vec![0u8; PAGE];
    for p in 0..(vmm.len() / PAGE) as u64 {
        vmm.read_page(p, &mut got);
        expected(p, &mut want);
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "page {p} differs at byte {i}: got {:#x}, want {:#x}",
                got[i], want[i]
            );
        }
    }
}

/// Touches every page from `threads` threads in random order, reading each page and
/// writing one byte into every fourth; returns the writes (offset, value).
fn touch_all(vmm: &FakeVmm, source: &MemPageSource, threads: u64) -> Vec<(usize, u8)> {
    let pages = (vmm.len() / PAGE) as u64;
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = Rng(0x9E37_79B9 + t);
                    let mut mine: Vec<u64> = (0..pages).filter(|p| p % threads == t).collect();
                    rng.shuffle(&mut mine);
                    let mut writes = Vec::new();
                    let mut got = vec![0u8; PAGE];
                    for p in mine {
                        let mut want = source.page(p).to_vec();
                        if rng.next().is_multiple_of(4) {
                            let at = (rng.next() % PAGE as u64) as usize;
                            let v = !want[at];
                            // A write fault: the page arrives from the source first.
                            vmm.write_u8(p as usize * PAGE + at, v);
                            want[at] = v;
                            writes.push((p as usize * PAGE + at, v));
                        }
                        vmm.read_page(p, &mut got);
                        assert!(got == want, "page {p} differs right after the fault");
                    }
                    writes
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

fn expect_source_with(
    source: &MemPageSource,
    writes: &[(usize, u8)],
) -> impl FnMut(u64, &mut [u8]) {
    let mut by_page = std::collections::HashMap::<u64, Vec<(usize, u8)>>::new();
    for &(off, v) in writes {
        by_page
            .entry((off / PAGE) as u64)
            .or_default()
            .push((off % PAGE, v));
    }
    let source_bytes = source.bytes().to_vec();
    move |p, buf| {
        buf.copy_from_slice(&source_bytes[p as usize * PAGE..(p as usize + 1) * PAGE]);
        for &(at, v) in by_page.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            buf[at] = v;
        }
    }
}

fn zero_pages(source: &MemPageSource) -> u64 {
    source
        .bytes()
        .chunks(PAGE)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count() as u64
}

/// A page source reading a file with `pread`.
#[derive(Debug)]
struct FilePageSource {
    file: File,
    size: u64,
}

impl PageSource for FilePageSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn page_size(&self) -> u64 {
        PAGE as u64
    }
    fn read_page(&self, offset: u64, buf: &mut [u8]) -> io::Result<PageContent> {
        self.file.read_exact_at(&mut buf[..PAGE], offset)?;
        Ok(if buf[..PAGE].iter().all(|&b| b == 0) {
            PageContent::Zero
        } else {
            PageContent::Data
        })
    }
}

#[test]
fn faults_from_many_threads_match_the_source() {
    require_root!();
    let _g = serial();
    let source = Arc::new(MemPageSource::pattern(64 * MIB, 7));
    let pages = (64 * MIB / PAGE) as u64;
    for around in [1, 64] {
        let dir = TempDir::new();
        let mut vmm = FakeVmm::new(64 * MIB).unwrap();
        let handle = start(&dir, source.clone(), &mut vmm, opts_around(false, around));

        let writes = touch_all(&vmm, &source, 4);
        verify(&vmm, expect_source_with(&source, &writes));

        // Every page came in through the fault path exactly once.
        eventually("fault counters", || handle.fault_pages() >= pages);
        let stats = handle.stats();
        assert_eq!(handle.fault_pages(), pages, "{stats:?}");
        if around == 1 {
            assert!(stats.faults_served >= pages, "{stats:?}");
        } else {
            assert!(
                stats.faults_served >= pages / around as u64 && stats.faults_served < pages / 2,
                "{stats:?}"
            );
        }
        assert_eq!(stats.zero_pages, zero_pages(&source), "{stats:?}");
        assert_eq!(stats.pages_prefetched, 0);
        assert_eq!(handle.failed_pages(), 0, "{:?}", handle.last_error());
        assert!(!handle.prefetch_finished());
        handle_stop(handle);
    }
}

fn handle_stop(handle: UffdServerHandle) {
    let boxed: Box<dyn wrenn_core::memory::MemoryServerHandle> = Box::new(handle);
    boxed.stop();
}

#[test]
fn prefetch_completes_before_any_touch() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let image = MemPageSource::pattern(64 * MIB, 5);
    let path = dir.0.join("memfile");
    File::create(&path)
        .unwrap()
        .write_all(image.bytes())
        .unwrap();
    let source = Arc::new(FilePageSource {
        file: File::open(&path).unwrap(),
        size: (64 * MIB) as u64,
    });
    let mut vmm = FakeVmm::new(64 * MIB).unwrap();
    let handle = start(&dir, source, &mut vmm, opts(true));

    assert!(
        handle.wait_prefetch(Duration::from_secs(60)),
        "prefetch did not finish"
    );
    let stats = handle.stats();
    assert_eq!(
        stats.pages_prefetched,
        (64 * MIB / PAGE) as u64,
        "{stats:?}"
    );
    assert_eq!(stats.zero_pages, zero_pages(&image));
    verify(&vmm, |p, buf| buf.copy_from_slice(image.page(p)));
    assert_eq!(handle.stats().faults_served, 0, "everything was prefetched");
}

#[test]
fn prefetch_racing_with_faults() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source = Arc::new(MemPageSource::pattern(64 * MIB, 3));
    let mut vmm = FakeVmm::new(64 * MIB).unwrap();
    let handle = start(&dir, source.clone(), &mut vmm, opts(true));

    let writes = touch_all(&vmm, &source, 3);
    assert!(handle.wait_prefetch(Duration::from_secs(60)));
    verify(&vmm, expect_source_with(&source, &writes));
    eventually("counters", || {
        let stats = handle.stats();
        stats.pages_prefetched + handle.fault_pages() >= (64 * MIB / PAGE) as u64
    });
    // Each page arrived once, from one or the other.
    let stats = handle.stats();
    assert_eq!(
        stats.pages_prefetched + handle.fault_pages(),
        (64 * MIB / PAGE) as u64,
        "{stats:?}"
    );
    assert_eq!(handle.failed_pages(), 0);
}

#[test]
fn regions_map_to_their_offsets() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    // Guest memory 48 MiB; the VMM maps 32 MiB as two regions in swapped order.
    let source = Arc::new(MemPageSource::pattern(48 * MIB, 0));
    let mut vmm = FakeVmm::new(32 * MIB).unwrap();
    let half = (16 * MIB) as u64;
    let regions = [
        GuestRegion {
            size: half,
            offset: 32 * MIB as u64,
            ..vmm.region(0)
        },
        GuestRegion {
            base_host_virt_addr: vmm.base() + half,
            size: half,
            offset: 0,
            ..vmm.region(0)
        },
    ];
    let listener = UffdMemoryServer::new(opts(false))
        .listen(&dir.sock())
        .unwrap();
    vmm.connect_with(&dir.sock(), &regions).unwrap();
    let handle = listener.accept(source.clone()).unwrap();
    let half_pages = half / PAGE as u64;
    verify(&vmm, |p, buf| {
        let guest = if p < half_pages {
            p + 2 * half_pages
        } else {
            p - half_pages
        };
        buf.copy_from_slice(source.page(guest));
    });
    assert_eq!(handle.regions().len(), 2);
}

#[test]
fn discarded_ranges_read_back_as_zeros() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source = Arc::new(MemPageSource::pattern(16 * MIB, 0));
    let mut vmm = FakeVmm::new(16 * MIB).unwrap();
    let handle = start(&dir, source.clone(), &mut vmm, opts(false));

    let mut buf = vec![0u8; PAGE];
    for p in 0..1024 {
        vmm.read_page(p, &mut buf);
        assert_eq!(buf, source.page(p));
    }
    // Populated pages, then never-touched pages.
    vmm.discard(256 * PAGE, 512 * PAGE).unwrap();
    vmm.discard(2000 * PAGE, 100 * PAGE).unwrap();
    // madvise returns once the server has read the event; it counts it just after.
    eventually("removed range counter", || {
        handle.stats().removed_ranges == 2
    });
    let zeroed = |p: u64| (256..768).contains(&p) || (2000..2100).contains(&p);
    verify(&vmm, |p, b| {
        if zeroed(p) {
            b.fill(0)
        } else {
            b.copy_from_slice(source.page(p))
        }
    });
    // A discarded page is ordinary memory again once faulted in.
    vmm.write_u8(300 * PAGE + 5, 0xAB);
    assert_eq!(vmm.read_u8(300 * PAGE + 5), 0xAB);
    eventually("zero page counter", || {
        handle.stats().zero_pages == 512 + 100
    });
}

#[test]
fn prefetch_never_refills_discarded_pages() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source = Arc::new(MemPageSource::pattern(64 * MIB, 0));
    let mut vmm = FakeVmm::new(64 * MIB).unwrap();
    let pages = (64 * MIB / PAGE) as u64;
    let handle = start(&dir, source.clone(), &mut vmm, opts(true));

    // Discard while the prefetch runs: the whole upper half, then scattered ranges.
    vmm.discard(32 * MIB, 32 * MIB).unwrap();
    let mut rng = Rng(7);
    let mut scattered = Vec::new();
    for _ in 0..64 {
        let start = rng.next() % (pages / 2 - 16);
        vmm.discard(start as usize * PAGE, 16 * PAGE).unwrap();
        scattered.push(start..start + 16);
    }
    assert!(handle.wait_prefetch(Duration::from_secs(60)));
    verify(&vmm, |p, b| {
        if p >= pages / 2 || scattered.iter().any(|r| r.contains(&p)) {
            b.fill(0)
        } else {
            b.copy_from_slice(source.page(p))
        }
    });
    eventually("removed range counter", || {
        handle.stats().removed_ranges == 65
    });
}

#[test]
fn malformed_handshakes_are_refused() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source: Arc<dyn PageSource> = Arc::new(MemPageSource::pattern(MIB, 0));
    let vmm = FakeVmm::new(MIB).unwrap();
    let region = |offset: u64, page_size: u64| GuestRegion {
        offset,
        page_size,
        ..vmm.region(0)
    };
    let cases: Vec<(Vec<u8>, bool, &str)> = vec![
        (b"this is not json".to_vec(), true, "JSON"),
        (b"[{\"base_host_virt_addr\": 1".to_vec(), true, "JSON"),
        (b"[]".to_vec(), true, "empty"),
        (
            serde_json::to_vec(&[region(0, 4096)]).unwrap(),
            false,
            "No userfaultfd",
        ),
        (
            serde_json::to_vec(&[region(4096, 4096)]).unwrap(),
            true,
            "exceeds",
        ),
        (
            serde_json::to_vec(&[region(0, 2 * MIB as u64)]).unwrap(),
            true,
            "page size",
        ),
    ];
    for (payload, attach, want) in cases {
        let listener = UffdMemoryServer::new(opts(true))
            .listen(&dir.sock())
            .unwrap();
        let _stream = vmm.send_raw(&dir.sock(), &payload, attach).unwrap();
        match listener.accept(source.clone()) {
            Err(MemoryServerError::Handshake(m)) => {
                assert!(m.contains(want), "{m:?} lacks {want:?}")
            }
            other => panic!(
                "{}: expected a handshake error, got {other:?}",
                String::from_utf8_lossy(&payload)
            ),
        }
        assert!(!dir.sock().exists());
    }
    // Another descriptor than a userfaultfd.
    let listener = UffdMemoryServer::new(opts(true))
        .listen(&dir.sock())
        .unwrap();
    let stream = std::os::unix::net::UnixStream::connect(dir.sock()).unwrap();
    let devnull = File::open("/dev/null").unwrap();
    let fds = [std::os::fd::AsRawFd::as_raw_fd(&devnull)];
    let json = serde_json::to_vec(&[region(0, 4096)]).unwrap();
    nix::sys::socket::sendmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&stream),
        &[io::IoSlice::new(&json)],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert!(
        matches!(listener.accept(source), Err(MemoryServerError::Handshake(m)) if m.contains("not a userfaultfd"))
    );
}

#[test]
fn no_vmm_means_handshake_timeout() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source: Arc<dyn PageSource> = Arc::new(MemPageSource::pattern(MIB, 0));
    let options = ServerOptions {
        prefetch: true,
        handshake_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };

    let t = Instant::now();
    let err = UffdMemoryServer::new(options)
        .serve_blocking(source.clone(), &dir.sock())
        .unwrap_err();
    assert!(
        matches!(err, MemoryServerError::HandshakeTimeout { .. }),
        "{err:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    assert!(!dir.sock().exists(), "socket file removed");

    // Connected but silent.
    let listener = UffdMemoryServer::new(options).listen(&dir.sock()).unwrap();
    let _silent = std::os::unix::net::UnixStream::connect(dir.sock()).unwrap();
    let err = listener.accept(source).unwrap_err();
    assert!(
        matches!(err, MemoryServerError::HandshakeTimeout { .. }),
        "{err:?}"
    );
}

#[test]
fn an_existing_path_is_never_replaced() {
    let _g = serial();
    let dir = TempDir::new();
    std::fs::write(dir.sock(), b"precious").unwrap();
    let err = UffdMemoryServer::default().listen(&dir.sock()).unwrap_err();
    assert!(matches!(err, MemoryServerError::Backend(_)), "{err:?}");
    assert_eq!(std::fs::read(dir.sock()).unwrap(), b"precious");
}

#[test]
fn serve_through_the_trait() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source = Arc::new(MemPageSource::pattern(8 * MIB, 4));
    let server: Arc<dyn MemoryServer> = Arc::new(UffdMemoryServer::new(opts(true)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = dir.sock();
        let src: Arc<dyn PageSource> = source.clone();
        let serving = tokio::spawn({
            let server = server.clone();
            let sock = sock.clone();
            async move { server.serve(src, &sock).await }
        });
        // The path appears once the server listens.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "server never listened");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut vmm = FakeVmm::new(8 * MIB).unwrap();
        vmm.connect(&sock).unwrap();
        let handle = serving.await.unwrap().unwrap();
        let vmm = tokio::task::spawn_blocking(move || {
            verify(&vmm, |p, b| b.copy_from_slice(source.page(p)));
            vmm
        })
        .await
        .unwrap();
        eventually("counters", || {
            let stats = handle.stats();
            // A fault brings in at most a 64-page window.
            stats.faults_served * 64 + stats.pages_prefetched >= (8 * MIB / PAGE) as u64
        });
        handle.stop();
        drop(vmm);
    });
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn server_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("wrenn-uffd"))
        .count()
}

#[test]
fn stopping_leaks_no_threads_or_fds() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source = Arc::new(MemPageSource::pattern(16 * MIB, 2));
    // Warm up lazily opened descriptors (e.g. /dev/userfaultfd probing) first.
    drop(FakeVmm::new(PAGE).unwrap());
    let (fds, threads) = (open_fds(), server_threads());
    for prefetch in [false, true] {
        let mut vmm = FakeVmm::new(16 * MIB).unwrap();
        let handle = start(&dir, source.clone(), &mut vmm, opts(prefetch));
        eventually("server threads", || {
            server_threads() == threads + 1 + usize::from(prefetch)
        });
        for p in (0..(16 * MIB / PAGE) as u64).step_by(3) {
            let mut b = vec![0u8; PAGE];
            vmm.read_page(p, &mut b);
        }
        // Stop mid-prefetch: the threads must still exit promptly.
        let t = Instant::now();
        drop(handle);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            t.elapsed()
        );
        drop(vmm);
    }
    assert_eq!(server_threads(), threads);
    assert_eq!(open_fds(), fds, "descriptor leak");
}

/// Whether `page` of the VMM's memory is populated (without faulting it in).
fn resident(vmm: &FakeVmm, page: u64) -> bool {
    let mut v = 0u8;
    // SAFETY: the range is one page inside the VMM's live mapping; mincore only
    // writes one byte into `v`.
    let rc = unsafe {
        libc::mincore(
            (vmm.base() + page * PAGE as u64) as usize as *mut libc::c_void,
            PAGE,
            &mut v,
        )
    };
    assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
    v & 1 != 0
}

#[test]
fn fault_around_never_fills_discarded_ranges() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source = Arc::new(MemPageSource::pattern(4 * MIB, 0));
    let mut vmm = FakeVmm::new(4 * MIB).unwrap();
    let pages = (4 * MIB / PAGE) as u64;
    let handle = start(&dir, source.clone(), &mut vmm, opts_around(false, 64));

    // Never-touched ranges, discarded: inside a window, a whole window, one page, and
    // a window's last pages.
    let removed = [10..20u64, 64..128, 200..201, 300..320];
    for r in &removed {
        vmm.discard(r.start as usize * PAGE, (r.end - r.start) as usize * PAGE)
            .unwrap();
    }
    eventually("removed range counter", || {
        handle.stats().removed_ranges == removed.len() as u64
    });
    let is_removed = |p: u64| removed.iter().any(|r| r.contains(&p));

    // Faults right next to each removed range.
    let mut b = vec![0u8; PAGE];
    for p in [9, 128, 199, 201, 299] {
        vmm.read_page(p, &mut b);
        assert_eq!(b, source.page(p), "page {p}");
    }
    // Windows [0, 64), [128, 192), [192, 256), [256, 320) are in, less the removed.
    for p in 0..pages {
        let want = p < 320 && !is_removed(p) && !(64..128).contains(&p);
        assert_eq!(resident(&vmm, p), want, "page {p} resident");
    }
    let filled = (0..320).filter(|&p| !is_removed(p)).count() as u64;
    eventually("fault counters", || handle.fault_pages() == filled);
    let stats = handle.stats();
    assert_eq!(stats.faults_served, 4, "{stats:?}"); // 201 came with 199's window
    assert_eq!(stats.zero_pages, 0, "{stats:?}");

    // Removed pages are zeros when they fault themselves, each on its own; the rest
    // come from the source.
    vmm.read_page(15, &mut b);
    assert!(b.iter().all(|&x| x == 0));
    assert!(!resident(&vmm, 14) && !resident(&vmm, 16));
    verify(&vmm, |p, b| {
        if is_removed(p) {
            b.fill(0)
        } else {
            b.copy_from_slice(source.page(p))
        }
    });
    let removed_pages: u64 = removed.iter().map(|r| r.end - r.start).sum();
    eventually("zero page counter", || {
        handle.stats().zero_pages == removed_pages
    });
    // The server counts a window after its copy has woken the reader.
    eventually("fault page counter", || handle.fault_pages() == pages);
    assert_eq!(handle.failed_pages(), 0, "{:?}", handle.last_error());
}

#[test]
fn fault_around_skips_pages_populated_behind_its_back() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source = Arc::new(MemPageSource::pattern(MIB, 0));
    let mut vmm = FakeVmm::new(MIB).unwrap();
    let handle = start(&dir, source.clone(), &mut vmm, opts_around(false, 64));

    // Populate pages the server does not know about through a second handle on the
    // VMM's uffd: the window's copy meets them mid-run (EEXIST / short copy).
    let fd = vmm.uffd_fd().try_clone_to_owned().unwrap();
    // SAFETY: `fd` is a fresh duplicate of a userfaultfd that nothing else owns.
    let uffd = unsafe {
        <userfaultfd::Uffd as std::os::fd::FromRawFd>::from_raw_fd(
            std::os::fd::IntoRawFd::into_raw_fd(fd),
        )
    };
    let marker = memmap2::MmapOptions::new().len(PAGE).map_anon().unwrap();
    let mut marker = marker;
    marker.fill(0xEE);
    let at = |p: u64| (vmm.base() + p * PAGE as u64) as usize as *mut libc::c_void;
    for p in [5u64, 6, 30, 63, 70] {
        // SAFETY: copies one page of our buffer into a missing page of the VMM's
        // registered mapping, which is only ever accessed through raw pointers.
        unsafe { uffd.copy(marker.as_ptr().cast(), at(p), PAGE, true) }.unwrap();
    }
    // SAFETY: as above, mapping the zero page instead.
    unsafe { uffd.zeropage(at(40), PAGE, true) }.unwrap();
    let behind = |p: u64| [5, 6, 30, 63, 70].contains(&p);

    let mut b = vec![0u8; PAGE];
    vmm.read_page(0, &mut b); // window [0, 64)
    vmm.read_page(64, &mut b); // window [64, 128), 70 populated
    eventually("fault counters", || handle.fault_pages() >= 128 - 6);
    assert_eq!(handle.fault_pages(), 128 - 6, "{:?}", handle.stats());
    assert_eq!(handle.stats().faults_served, 2);
    for p in 0..128 {
        assert!(resident(&vmm, p), "page {p}");
    }
    verify(&vmm, |p, b| {
        if behind(p) {
            b.fill(0xEE)
        } else if p == 40 {
            b.fill(0)
        } else {
            b.copy_from_slice(source.page(p))
        }
    });
    assert_eq!(handle.failed_pages(), 0, "{:?}", handle.last_error());
    drop(uffd);
}

#[test]
fn fault_around_across_a_split_mapping() {
    require_root!();
    let _g = serial();
    let dir = TempDir::new();
    let source = Arc::new(MemPageSource::pattern(MIB, 0));
    let mut vmm = FakeVmm::new(MIB).unwrap();
    let handle = start(&dir, source.clone(), &mut vmm, opts_around(false, 64));
    // Split the VMM's mapping into three VMAs inside the first window: one ioctl may
    // not span two, so the server falls back to the faulting page alone there.
    // SAFETY: an advice-only madvise on our own mapping; no contents change.
    let rc = unsafe {
        libc::madvise(
            (vmm.base() + 10 * PAGE as u64) as usize as *mut libc::c_void,
            20 * PAGE,
            libc::MADV_NOHUGEPAGE,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    verify(&vmm, |p, b| b.copy_from_slice(source.page(p)));
    assert_eq!(handle.failed_pages(), 0, "{:?}", handle.last_error());
    eventually("fault counters", || {
        handle.fault_pages() == (MIB / PAGE) as u64
    });
    let stats = handle.stats();
    assert_eq!(stats.zero_pages, zero_pages(&source));
    // One run per window (no zero pages). Pages 0..30 came one fault each (the rest
    // of the window from there crosses a VMA boundary at page 10 or 30), page 30
    // brought in [30, 64), and the other three windows took one fault each.
    assert_eq!(stats.faults_served, 30 + 1 + 3, "{stats:?}");
}

/// Fault service rate with prefetch off (one touch per 4 KiB page, in order), compared
/// with a memcpy of the same bytes, without and with fault-around.
/// Run with `--release --nocapture` for meaningful numbers.
#[test]
fn fault_throughput_vs_memcpy() {
    require_root!();
    let _g = serial();
    let size = 128 * MIB;
    for around in [1, 64] {
        let rate = measure_fault_rate(size, opts_around(false, around)).unwrap();
        eprintln!(
            "fault_around {around:2}: {} pages faulted in {:.1} ms = {:.0} MiB/s \
             ({:.2} us/page); memcpy {:.1} ms = {:.0} MiB/s; rate ratio {:.3} (goal >= 0.5)",
            rate.pages(),
            rate.fault_secs * 1e3,
            rate.fault_mib_per_sec(),
            rate.fault_secs * 1e6 / rate.pages() as f64,
            rate.memcpy_secs * 1e3,
            rate.memcpy_mib_per_sec(),
            rate.ratio(),
        );
        assert_eq!(rate.bytes, size as u64);
        assert!(rate.ratio() > 0.0);
    }
    assert!(
        measure_fault_rate(MIB, opts(true)).is_err(),
        "prefetch must be off"
    );

    // The background prefetch alone, for comparison.
    let dir = TempDir::new();
    let pages = (size / PAGE) as u64;
    let source = Arc::new(MemPageSource::pattern(size, 0));
    let mut vmm = FakeVmm::new(size).unwrap();
    let t = Instant::now();
    let handle = start(&dir, source.clone(), &mut vmm, opts(true));
    assert!(handle.wait_prefetch(Duration::from_secs(120)));
    let prefetch = t.elapsed();
    eprintln!(
        "uffd prefetch: {pages} pages in {prefetch:?} = {:.0} pages/s, {:.0} MiB/s",
        pages as f64 / prefetch.as_secs_f64(),
        size as f64 / MIB as f64 / prefetch.as_secs_f64(),
    );
    let mut b = vec![0u8; PAGE];
    pattern_page(pages - 1, &mut b);
    let mut got = vec![0u8; PAGE];
    vmm.read_page(pages - 1, &mut got);
    assert_eq!(got, b);
}
