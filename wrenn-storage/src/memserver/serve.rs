//! The running server: a fault thread and a prefetch thread sharing one userfaultfd.
//!
//! Ordering against balloon discards (`UFFD_EVENT_REMOVE`) is the delicate part. When
//! the VMM calls `madvise(MADV_DONTNEED)` on registered memory, the kernel queues a
//! REMOVE event, and until the event is *read* every UFFDIO_COPY fails with EAGAIN;
//! once read, the VMM's thread zaps the range shortly afterwards. A prefetch copy that
//! lands after that zap would resurrect snapshot data the guest threw away. So the fault
//! thread reads events only while holding the `marks` lock and records every discarded
//! range before releasing it, and the prefetch thread checks the marks and copies under
//! the same lock: either its copy precedes the read of the event (then the zap follows
//! it and wins), or the event was read first (then the page is marked and skipped), or
//! the event is still unread (then the copy gets EAGAIN and is retried later).
//!
//! Fault-around: a fault is answered with an aligned window of up to
//! `fault_around_pages` pages around the faulting one (clipped to its region), copied
//! with one `UFFDIO_COPY` per run of data pages and one `UFFDIO_ZEROPAGE` per run of zero
//! pages. The window is filled under the same lock and by the same rules as a prefetch
//! copy: pages marked removed or gone are left out (a removed page is served, as zeros,
//! only when it faults itself), and so are pages already known to be present. A page
//! populated behind our back makes the copy stop there (EEXIST, or a partial copy); it
//! is skipped and the rest of the run copied. The faulting page is always attempted, and
//! woken if it turns out to be present already.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use userfaultfd::{Event, EventBuffer, Uffd};
use wrenn_core::memory::{MemoryServerHandle, MemoryServerStats, PageContent, PageSource};

use super::handshake::{GuestRegion, PAGE_SIZE};

/// Page size as a `usize` (the handshake only accepts 4 KiB pages).
const PAGE: usize = PAGE_SIZE as usize;
/// Events read per `read(2)` on the uffd.
const EVENT_BATCH: usize = 64;
/// Reads per drain before serving what was read (bounds the time the lock is held).
const MAX_READS_PER_DRAIN: usize = 16;
/// EAGAIN retries for one fault before going back to poll (and retrying 1 ms later).
/// EAGAIN means a non-cooperative event (remove, unmap, remap) is in flight: after we
/// read it the VMM thread still has to run before the kernel lets copies through.
const FAULT_AGAIN_RETRIES: u32 = 64;
/// EAGAIN retries for one prefetched page; after that the page is left to the fault path.
const PREFETCH_AGAIN_RETRIES: u32 = 200;
/// Attempts at reading a page from the source before the error is final.
const SOURCE_READ_ATTEMPTS: u32 = 3;
/// Consecutive failed reads of the uffd before the fault thread gives up.
const MAX_READ_ERRORS: u32 = 100;
/// How long the prefetch thread defers to a fault thread waiting for the lock.
const YIELD_SPINS: u32 = 10_000;

/// A fixed-size bit set over the pages of one region.
#[derive(Debug)]
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(bits: u64) -> Self {
        Bitmap(vec![
            0;
            usize::try_from(bits.div_ceil(64)).unwrap_or(usize::MAX)
        ])
    }
    fn get(&self, bit: u64) -> bool {
        let (w, b) = ((bit / 64) as usize, bit % 64);
        self.0.get(w).is_some_and(|word| word & (1 << b) != 0)
    }
    fn set_range(&mut self, start: u64, end: u64) {
        for bit in start..end {
            let (w, b) = ((bit / 64) as usize, bit % 64);
            if let Some(word) = self.0.get_mut(w) {
                *word |= 1 << b;
            }
        }
    }
}

/// Per-region page marks, all changed under the `marks` lock only.
#[derive(Debug)]
struct Marks {
    /// Discarded by the VMM (balloon): served as zeros, never prefetched or filled by
    /// fault-around. Set by the fault thread while reading events.
    removed: Bitmap,
    /// Unmapped or moved away by the VMM: not served any more. Set like `removed`.
    gone: Bitmap,
    /// Populated by us (or found populated). Only an optimisation: such pages are left
    /// out of fault-around windows and the prefetch. A discard makes the bit stale, but
    /// a discarded page is also marked `removed`, which wins; and a faulting page is
    /// always attempted whatever its bit says.
    present: Bitmap,
}

#[derive(Debug, Default)]
struct Counters {
    faults_served: AtomicU64,
    /// Pages populated by the fault path (faulting pages plus fault-around).
    fault_pages: AtomicU64,
    pages_prefetched: AtomicU64,
    zero_pages: AtomicU64,
    removed_ranges: AtomicU64,
    failed_pages: AtomicU64,
}

/// What filling one page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Done,
    /// EEXIST: someone populated the page first (prefetch vs fault race).
    Exists,
    /// EAGAIN: a non-cooperative event is pending; read events and retry.
    Again,
    /// ENOENT: the range is no longer mapped / registered.
    NoRange,
    /// ESRCH: the VMM's address space is gone (it exited).
    NoProcess,
    Failed(i32),
}

impl Fill {
    fn from_errno(errno: i32) -> Fill {
        match errno {
            libc::EEXIST => Fill::Exists,
            libc::EAGAIN => Fill::Again,
            libc::ENOENT => Fill::NoRange,
            libc::ESRCH => Fill::NoProcess,
            e => Fill::Failed(e),
        }
    }
}

/// A page-aligned buffer of whole pages (UFFDIO_COPY's source).
struct PageBuf(memmap2::MmapMut);

impl PageBuf {
    fn new(pages: usize) -> std::io::Result<Self> {
        Ok(PageBuf(
            memmap2::MmapOptions::new()
                .len(pages.max(1) * PAGE)
                .map_anon()?,
        ))
    }
}

/// How far filling a run of pages got (see [`Shared::fill_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunFill {
    /// Pages from the start of the run that are now populated, by this call or before.
    reached: u64,
    /// Of those, the pages this call populated.
    filled: u64,
    /// Why it stopped at page `reached`: [`Fill::Done`] if the whole run is populated.
    stop: Fill,
    /// Whether the page at the `watch` index was found populated already (EEXIST).
    watch_existed: bool,
}

/// The fault thread's reusable buffers.
struct FaultScratch {
    /// One fault-around window of page contents.
    buf: PageBuf,
    /// What each page of the window holds, `None` if it is not to be filled.
    kinds: Vec<Option<PageContent>>,
    /// Runs `(first, end, kind)` of the window, as page indices in the region.
    runs: Vec<(u64, u64, PageContent)>,
}

impl FaultScratch {
    fn new(window: usize) -> std::io::Result<Self> {
        Ok(FaultScratch {
            buf: PageBuf::new(window)?,
            kinds: Vec::with_capacity(window),
            runs: Vec::with_capacity(window),
        })
    }
}

/// State shared by the handle and both threads.
pub(crate) struct Shared {
    uffd: Uffd,
    regions: Vec<GuestRegion>,
    source: Arc<dyn PageSource>,
    /// Fault-around window in pages (at least 1).
    fault_around: u64,
    marks: Mutex<Vec<Marks>>,
    /// Set by the fault thread while it waits for `marks`, so prefetch steps aside.
    fault_waiting: AtomicBool,
    stop: AtomicBool,
    prefetch_done: AtomicBool,
    counters: Counters,
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("uffd", &self.uffd)
            .field("regions", &self.regions)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder leaves the marks consistent (bits are only ever set), so a
    // poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn new(
        uffd: Uffd,
        regions: Vec<GuestRegion>,
        source: Arc<dyn PageSource>,
        fault_around_pages: usize,
    ) -> Self {
        let marks = regions
            .iter()
            .map(|r| Marks {
                removed: Bitmap::new(r.size / PAGE_SIZE),
                gone: Bitmap::new(r.size / PAGE_SIZE),
                present: Bitmap::new(r.size / PAGE_SIZE),
            })
            .collect();
        Shared {
            uffd,
            regions,
            source,
            fault_around: fault_around_pages.max(1) as u64,
            marks: Mutex::new(marks),
            fault_waiting: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            prefetch_done: AtomicBool::new(false),
            counters: Counters::default(),
            last_error: Mutex::new(None),
        }
    }

    fn record_error(&self, msg: String) {
        tracing::error!("{msg}");
        *lock(&self.last_error) = Some(msg);
    }

    /// The region and page index holding host address `addr`.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .position(|r| r.contains(addr))
            .map(|i| (i, (addr - self.regions[i].base_host_virt_addr) / PAGE_SIZE))
    }

    /// Marks `[start, end)` (host addresses) in every region it overlaps.
    fn mark(&self, marks: &mut [Marks], start: u64, end: u64, removed: bool) {
        let start = start & !(PAGE_SIZE - 1);
        let end = end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        for (r, m) in self.regions.iter().zip(marks.iter_mut()) {
            let (lo, hi) = (
                start.max(r.base_host_virt_addr),
                end.min(r.base_host_virt_addr + r.size),
            );
            if lo < hi {
                let (a, b) = (
                    (lo - r.base_host_virt_addr) / PAGE_SIZE,
                    (hi - r.base_host_virt_addr) / PAGE_SIZE,
                );
                if removed {
                    m.removed.set_range(a, b);
                } else {
                    m.gone.set_range(a, b);
                }
            }
        }
    }

    /// Populates the missing page at `dst` (page aligned) with `data`'s first page, or
    /// with zeros when `data` is `None`, and wakes any thread faulting on it.
    fn fill(&self, dst: u64, data: Option<&PageBuf>) -> Fill {
        let run = self.fill_run(dst, 1, data.map(|b| &b.0[..PAGE]), Some(0));
        match run {
            RunFill {
                reached: 1,
                filled: 1,
                ..
            } => Fill::Done,
            RunFill { reached: 1, .. } => Fill::Exists,
            RunFill { stop, .. } => stop,
        }
    }

    /// Populates the missing pages of `[dst, dst + pages * 4 KiB)` (page aligned) with
    /// the first `pages` pages of `data`, or with zeros when `data` is `None`, in as few
    /// ioctls as it can, waking any thread faulting on them. Pages found populated are
    /// skipped (EEXIST); it stops at the first page it can neither fill nor skip.
    /// `watch` is a page index whose EEXIST the caller wants to know about.
    fn fill_run(&self, dst: u64, pages: u64, data: Option<&[u8]>, watch: Option<u64>) -> RunFill {
        debug_assert_eq!(dst % PAGE_SIZE, 0);
        debug_assert!(data.is_none_or(|d| d.len() as u64 >= pages * PAGE_SIZE));
        let mut run = RunFill {
            reached: 0,
            filled: 0,
            stop: Fill::Done,
            watch_existed: false,
        };
        // UFFDIO_ZEROPAGE reports a partial fill as a bare EAGAIN (the userfaultfd crate
        // drops the count), indistinguishable from "an event is pending": after one,
        // go on a page at a time, where EAGAIN means only the latter.
        let mut single = false;
        while run.reached < pages {
            let at = run.reached;
            let count = if single { 1 } else { pages - at };
            let dst_ptr = (dst + at * PAGE_SIZE) as usize as *mut libc::c_void;
            let len = count as usize * PAGE;
            let result = match data {
                Some(d) => {
                    let src = d[at as usize * PAGE..].as_ptr();
                    // SAFETY: UFFDIO_COPY writes only into the address space of the
                    // process that registered the range with this uffd (the VMM), and only
                    // into pages that are currently missing in a range registered with
                    // this uffd: the kernel refuses anything else (ENOENT/EINVAL) and never
                    // overwrites a populated page (EEXIST). Filling those holes is exactly
                    // the job the VMM handed us with the uffd, and no Rust object of this
                    // process lives in them (when the "VMM" is this very process, as in
                    // tests, that memory is only accessed through raw pointers). The
                    // source is our own buffer, valid for reads of `len` bytes from `src`
                    // (checked above) for the whole call.
                    unsafe { self.uffd.copy(src.cast(), dst_ptr, len, true) }
                }
                // SAFETY: as for UFFDIO_COPY above: UFFDIO_ZEROPAGE only maps the zero
                // page into missing pages of a range the VMM registered with this uffd; it
                // reads no memory of ours and never replaces a populated page.
                None => unsafe { self.uffd.zeropage(dst_ptr, len, true) },
            };
            // The kernel stops a multi-page copy at the first page it cannot fill and
            // reports the bytes copied before it (as EAGAIN); the next ioctl, starting at
            // that page, tells why (EEXIST: skip it; EAGAIN: an event is pending).
            let done = match result {
                Ok(n) => Ok(n),
                Err(userfaultfd::Error::PartiallyCopied(n)) if (n as isize) > 0 => Ok(n),
                Err(userfaultfd::Error::PartiallyCopied(_)) => Err(libc::EAGAIN),
                Err(userfaultfd::Error::CopyFailed(e))
                | Err(userfaultfd::Error::ZeropageFailed(e))
                | Err(userfaultfd::Error::SystemError(e)) => Err(e as i32),
                Err(_) => Err(libc::EIO),
            };
            match done {
                Ok(n) => {
                    let k = (n / PAGE) as u64;
                    if k == 0 {
                        // Not even one page (never seen): retry later rather than spin.
                        run.stop = Fill::Again;
                        return run;
                    }
                    run.reached += k.min(count);
                    run.filled += k.min(count);
                }
                Err(errno) => match Fill::from_errno(errno) {
                    Fill::Exists => {
                        run.watch_existed |= watch == Some(at);
                        run.reached += 1;
                    }
                    Fill::Again if data.is_none() && count > 1 => single = true,
                    stop => {
                        run.stop = stop;
                        return run;
                    }
                },
            }
        }
        run
    }

    /// Reads the page at guest offset `offset` into `buf`, retrying transient errors.
    fn read_source(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<PageContent> {
        let mut attempt = 0;
        loop {
            match self.source.read_page(offset, buf) {
                Ok(c) => return Ok(c),
                Err(e) if attempt + 1 < SOURCE_READ_ATTEMPTS => {
                    tracing::warn!(offset, error = %e, "page source read failed, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads pending uffd events: faults are queued, discards and unmaps are marked.
    /// Must be called with `marks` locked (see the module docs).
    fn drain(
        &self,
        marks: &mut [Marks],
        events: &mut EventBuffer,
        pending: &mut VecDeque<u64>,
    ) -> userfaultfd::Result<()> {
        for _ in 0..MAX_READS_PER_DRAIN {
            let mut n = 0;
            for event in self.uffd.read_events(events)? {
                n += 1;
                match event {
                    Ok(Event::Pagefault { addr, .. }) => pending.push_back(addr as u64),
                    Ok(Event::Remove { start, end }) => {
                        tracing::debug!(start = ?start, end = ?end, "uffd remove");
                        self.mark(marks, start as u64, end as u64, true);
                        self.counters.removed_ranges.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Unmap { start, end }) => {
                        tracing::debug!(start = ?start, end = ?end, "uffd unmap");
                        self.mark(marks, start as u64, end as u64, false);
                    }
                    Ok(Event::Remap { from, to, len }) => {
                        // Pages that moved keep their contents; holes in the new range
                        // are outside our regions and get zero pages (never a hang).
                        tracing::warn!(from = ?from, to = ?to, len, "uffd remap: no longer serving the old range");
                        self.mark(
                            marks,
                            from as u64,
                            (from as u64).saturating_add(len as u64),
                            false,
                        );
                    }
                    Ok(Event::Fork { uffd }) => {
                        tracing::warn!("uffd fork event: the child's memory is not served");
                        drop(uffd);
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable uffd event"),
                }
            }
            if n < EVENT_BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Serves one fault at `addr`: the faulting page and what may be filled of its
    /// fault-around window. Returns what became of the faulting page.
    fn serve_fault(&self, marks: &mut [Marks], addr: u64, scratch: &mut FaultScratch) -> Fill {
        let page = addr & !(PAGE_SIZE - 1);
        let (fill, pages, zeros) = match self.locate(page) {
            Some((ri, p)) if !marks[ri].removed.get(p) && !marks[ri].gone.get(p) => {
                self.serve_window(marks, ri, p, scratch)
            }
            located => {
                if located.is_none() {
                    tracing::warn!(
                        addr = format_args!("{addr:#x}"),
                        "fault outside the handshake regions: zero page"
                    );
                }
                // Discarded (or no longer ours): zeros, for this page only.
                let fill = self.fill(page, None);
                let n = u64::from(fill == Fill::Done);
                (fill, n, n)
            }
        };
        // Page counts first: a reader that sees the fault counted sees them too.
        if pages > 0 {
            self.counters
                .fault_pages
                .fetch_add(pages, Ordering::Release);
        }
        if zeros > 0 {
            self.counters.zero_pages.fetch_add(zeros, Ordering::Release);
        }
        match fill {
            Fill::Done => {
                self.counters.faults_served.fetch_add(1, Ordering::Release);
            }
            Fill::Exists => {
                // Populated by someone else (prefetch, an earlier window), who may not
                // have woken it.
                self.counters.faults_served.fetch_add(1, Ordering::Release);
                let _ = self.uffd.wake(page as usize as *mut libc::c_void, PAGE);
            }
            Fill::Again => {}
            Fill::NoRange | Fill::NoProcess => {
                tracing::debug!(addr, ?fill, "fault on a range that went away")
            }
            Fill::Failed(e) => {
                self.counters.failed_pages.fetch_add(1, Ordering::Relaxed);
                self.record_error(format!(
                    "Filling the faulting page {page:#x} failed: {}",
                    Errno::from_raw(e)
                ));
            }
        }
        fill
    }

    /// Fills page `p` of region `ri` and the rest of its fault-around window (see the
    /// module docs). Returns the faulting page's outcome, the pages populated and how
    /// many of those are zero pages.
    fn serve_window(
        &self,
        marks: &mut [Marks],
        ri: usize,
        p: u64,
        scratch: &mut FaultScratch,
    ) -> (Fill, u64, u64) {
        let region = &self.regions[ri];
        // The window is aligned in guest memory (the source), clipped to the region.
        let first = region.offset / PAGE_SIZE;
        let guest = first + p;
        let start = guest - guest % self.fault_around;
        let a = start.max(first) - first;
        let b = (start + self.fault_around).min(first + region.size / PAGE_SIZE) - first;

        let m = &marks[ri];
        scratch.kinds.clear();
        for q in a..b {
            let wanted = q == p || !(m.removed.get(q) || m.gone.get(q) || m.present.get(q));
            let kind = if wanted {
                let offset = region.offset + q * PAGE_SIZE;
                let slot = &mut scratch.buf.0[(q - a) as usize * PAGE..][..PAGE];
                match self.read_source(offset, slot) {
                    Ok(c) => Some(c),
                    Err(e) if q == p => {
                        // Leaving the fault unserved blocks that vCPU, which is better
                        // than handing the guest memory it never had.
                        self.counters.failed_pages.fetch_add(1, Ordering::Relaxed);
                        self.record_error(format!(
                            "Page source failed at guest offset {offset}: {e}"
                        ));
                        return (Fill::Failed(e.raw_os_error().unwrap_or(libc::EIO)), 0, 0);
                    }
                    Err(e) => {
                        // Left to its own fault, which will try the source again.
                        tracing::debug!(offset, error = %e, "fault-around: page source failed");
                        None
                    }
                }
            } else {
                None
            };
            scratch.kinds.push(kind);
        }

        scratch.runs.clear();
        let mut q = a;
        while q < b {
            let Some(kind) = scratch.kinds[(q - a) as usize] else {
                q += 1;
                continue;
            };
            let s = q;
            while q < b && scratch.kinds[(q - a) as usize] == Some(kind) {
                q += 1;
            }
            scratch.runs.push((s, q, kind));
        }
        // The faulting page's run first: its vCPU wakes when that ioctl returns.
        if let Some(mine) = scratch
            .runs
            .iter()
            .position(|&(s, e, _)| (s..e).contains(&p))
        {
            scratch.runs[..=mine].rotate_right(1);
        }

        let (mut outcome, mut pages, mut zeros) = (Fill::Again, 0, 0);
        let base = region.base_host_virt_addr;
        for &(s, e, kind) in &scratch.runs {
            let data = (kind == PageContent::Data)
                .then(|| &scratch.buf.0[(s - a) as usize * PAGE..(e - a) as usize * PAGE]);
            let watch = (s..e).contains(&p).then(|| p - s);
            let run = self.fill_run(base + s * PAGE_SIZE, e - s, data, watch);
            marks[ri].present.set_range(s, s + run.reached);
            pages += run.filled;
            if kind == PageContent::Zero {
                zeros += run.filled;
            }
            if let Some(w) = watch {
                outcome = if w < run.reached {
                    if run.watch_existed {
                        Fill::Exists
                    } else {
                        Fill::Done
                    }
                } else if matches!(run.stop, Fill::NoRange | Fill::Failed(_)) && e - s > 1 {
                    // One copy must lie within one VMA of the VMM (ENOENT otherwise, e.g.
                    // once it split its mapping): the faulting page on its own, then.
                    let single = self.fill_run(
                        base + p * PAGE_SIZE,
                        1,
                        data.map(|d| &d[w as usize * PAGE..][..PAGE]),
                        Some(0),
                    );
                    marks[ri].present.set_range(p, p + single.reached);
                    pages += single.filled;
                    if kind == PageContent::Zero {
                        zeros += single.filled;
                    }
                    match single {
                        RunFill {
                            reached: 1,
                            filled: 1,
                            ..
                        } => Fill::Done,
                        RunFill { reached: 1, .. } => Fill::Exists,
                        RunFill { stop, .. } => stop,
                    }
                } else {
                    run.stop
                };
            }
            // Pending events or a dead VMM stop every copy; the window waits.
            if matches!(run.stop, Fill::Again | Fill::NoProcess)
                || matches!(outcome, Fill::Again | Fill::NoProcess)
            {
                break;
            }
        }
        (outcome, pages, zeros)
    }

    /// Serves queued faults; a fault still refused with EAGAIN stays queued.
    fn serve_pending(
        &self,
        marks: &mut [Marks],
        events: &mut EventBuffer,
        pending: &mut VecDeque<u64>,
        scratch: &mut FaultScratch,
    ) -> userfaultfd::Result<()> {
        while let Some(&addr) = pending.front() {
            let mut tries = 0;
            loop {
                if self.serve_fault(marks, addr, scratch) != Fill::Again {
                    pending.pop_front();
                    break;
                }
                tries += 1;
                if tries > FAULT_AGAIN_RETRIES {
                    return Ok(());
                }
                self.drain(marks, events, pending)?;
                if tries > 4 {
                    thread::yield_now();
                }
            }
        }
        Ok(())
    }
}

/// The fault-serving loop: poll the uffd and the stop eventfd, read and serve.
fn fault_loop(shared: &Shared, stop_fd: &EventFd) {
    let mut scratch = match FaultScratch::new(shared.fault_around as usize) {
        Ok(s) => s,
        Err(e) => return shared.record_error(format!("Could not map a page buffer: {e}")),
    };
    let mut events = EventBuffer::new(EVENT_BATCH);
    let mut pending = VecDeque::new();
    let mut read_errors = 0;
    loop {
        // With faults still queued (EAGAIN), come back soon even without new events.
        let timeout = if pending.is_empty() {
            PollTimeout::NONE
        } else {
            PollTimeout::from(1u8)
        };
        let mut fds = [
            PollFd::new(shared.uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop_fd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                shared.record_error(format!("poll on the uffd failed: {e}"));
                return;
            }
        }
        if shared.stop.load(Ordering::Acquire) || fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        shared.fault_waiting.store(true, Ordering::Release);
        let mut marks = lock(&shared.marks);
        shared.fault_waiting.store(false, Ordering::Release);
        let result = shared
            .drain(&mut marks, &mut events, &mut pending)
            .and_then(|()| {
                shared.serve_pending(&mut marks, &mut events, &mut pending, &mut scratch)
            });
        drop(marks);
        match result {
            Ok(()) => read_errors = 0,
            Err(e) => {
                read_errors += 1;
                tracing::warn!(error = %e, "reading the uffd failed");
                if read_errors >= MAX_READ_ERRORS {
                    return shared.record_error(format!("Reading the uffd keeps failing: {e}"));
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Copies every page of the source into the regions, skipping discarded ones and those
/// already served.
fn prefetch_loop(shared: &Shared) {
    let mut buf = match PageBuf::new(1) {
        Ok(b) => b,
        Err(e) => return shared.record_error(format!("Could not map a page buffer: {e}")),
    };
    let started = Instant::now();
    for (ri, region) in shared.regions.iter().enumerate() {
        for p in 0..region.size / PAGE_SIZE {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if lock(&shared.marks)[ri].present.get(p) {
                continue; // faulted in (with its window) already
            }
            let offset = region.offset + p * PAGE_SIZE;
            let content = match shared.read_source(offset, &mut buf.0[..]) {
                Ok(c) => c,
                Err(e) => {
                    // Not fatal: a fault on the page will try the source again.
                    tracing::warn!(offset, error = %e, "prefetch: page source failed");
                    continue;
                }
            };
            let dst = region.base_host_virt_addr + p * PAGE_SIZE;
            let mut tries = 0;
            loop {
                // Step aside while the fault thread waits for the lock: a vCPU is blocked.
                let mut spins = 0;
                while shared.fault_waiting.load(Ordering::Acquire) && spins < YIELD_SPINS {
                    thread::yield_now();
                    spins += 1;
                }
                let fill = {
                    let mut marks = lock(&shared.marks);
                    let m = &mut marks[ri];
                    if m.removed.get(p) || m.gone.get(p) || m.present.get(p) {
                        None
                    } else {
                        let fill = shared.fill(dst, (content == PageContent::Data).then_some(&buf));
                        if matches!(fill, Fill::Done | Fill::Exists) {
                            m.present.set_range(p, p + 1);
                        }
                        Some(fill)
                    }
                };
                match fill {
                    Some(Fill::Done) => {
                        shared
                            .counters
                            .pages_prefetched
                            .fetch_add(1, Ordering::Relaxed);
                        if content == PageContent::Zero {
                            shared.counters.zero_pages.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None | Some(Fill::Exists) | Some(Fill::NoRange) => {}
                    Some(Fill::Again) => {
                        tries += 1;
                        if tries <= PREFETCH_AGAIN_RETRIES && !shared.stop.load(Ordering::Acquire) {
                            thread::sleep(Duration::from_micros(50));
                            continue;
                        }
                        // Left to the fault path.
                    }
                    Some(Fill::NoProcess) => {
                        tracing::debug!("prefetch: the VMM is gone");
                        return;
                    }
                    Some(Fill::Failed(e)) => {
                        tracing::warn!(dst = format_args!("{dst:#x}"), errno = %Errno::from_raw(e), "prefetch copy failed");
                    }
                }
                break;
            }
        }
    }
    shared.prefetch_done.store(true, Ordering::Release);
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "prefetch finished"
    );
}

/// A running memory server; dropping it (or [`MemoryServerHandle::stop`]) stops and
/// joins its threads and closes the uffd and the VMM connection.
pub struct UffdServerHandle {
    shared: Arc<Shared>,
    stop_fd: Arc<EventFd>,
    fault_thread: Option<JoinHandle<()>>,
    prefetch_thread: Option<JoinHandle<()>>,
    _stream: std::os::unix::net::UnixStream,
    peer_pid: Option<i32>,
    prefetch: bool,
}

impl std::fmt::Debug for UffdServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdServerHandle")
            .field("peer_pid", &self.peer_pid)
            .field("regions", &self.shared.regions)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl UffdServerHandle {
    /// Starts the threads. The uffd must already be non-blocking.
    pub(crate) fn start(
        shared: Shared,
        stream: std::os::unix::net::UnixStream,
        peer_pid: Option<i32>,
        prefetch: bool,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(shared);
        let stop_fd = Arc::new(EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let mut handle = UffdServerHandle {
            shared: shared.clone(),
            stop_fd: stop_fd.clone(),
            fault_thread: None,
            prefetch_thread: None,
            _stream: stream,
            peer_pid,
            prefetch,
        };
        // On a spawn error `handle` drops here, which stops whatever did start.
        handle.fault_thread = Some(
            thread::Builder::new()
                .name("wrenn-uffd-fault".into())
                .spawn(move || fault_loop(&shared, &stop_fd))?,
        );
        if prefetch {
            let shared = handle.shared.clone();
            handle.prefetch_thread = Some(
                thread::Builder::new()
                    .name("wrenn-uffd-prefetch".into())
                    .spawn(move || prefetch_loop(&shared))?,
            );
        }
        Ok(handle)
    }

    /// The counters so far.
    pub fn stats(&self) -> MemoryServerStats {
        let c = &self.shared.counters;
        MemoryServerStats {
            faults_served: c.faults_served.load(Ordering::Acquire),
            pages_prefetched: c.pages_prefetched.load(Ordering::Relaxed),
            zero_pages: c.zero_pages.load(Ordering::Relaxed),
            removed_ranges: c.removed_ranges.load(Ordering::Relaxed),
        }
    }

    /// Pages populated by the fault path: faulting pages plus their fault-around windows
    /// ([`MemoryServerStats::faults_served`] counts the faults themselves).
    pub fn fault_pages(&self) -> u64 {
        self.shared.counters.fault_pages.load(Ordering::Acquire)
    }

    /// Pages that could not be served (source or copy errors); see [`Self::last_error`].
    pub fn failed_pages(&self) -> u64 {
        self.shared.counters.failed_pages.load(Ordering::Relaxed)
    }

    /// The most recent serving error, if any.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.shared.last_error).clone()
    }

    /// The VMM's pid (`SO_PEERCRED`), when the kernel reported one.
    pub fn peer_pid(&self) -> Option<i32> {
        self.peer_pid
    }

    /// The regions from the handshake, sorted by host address.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.shared.regions
    }

    /// Whether the background prefetch has copied every page (false if disabled).
    pub fn prefetch_finished(&self) -> bool {
        self.shared.prefetch_done.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for the prefetch to finish; false if disabled or not done.
    pub fn wait_prefetch(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.prefetch && !self.prefetch_finished() {
            if Instant::now() >= deadline
                || self
                    .prefetch_thread
                    .as_ref()
                    .is_none_or(|t| t.is_finished())
            {
                return self.prefetch_finished();
            }
            thread::sleep(Duration::from_millis(1));
        }
        self.prefetch_finished()
    }

    /// Stops serving and joins the threads (idempotent; also done on drop).
    pub fn shutdown(&mut self) {
        if self.fault_thread.is_none() && self.prefetch_thread.is_none() {
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        if let Err(e) = self.stop_fd.write(1) {
            tracing::error!(error = %e, "could not signal the uffd fault thread");
        }
        for t in [self.fault_thread.take(), self.prefetch_thread.take()]
            .into_iter()
            .flatten()
        {
            if t.join().is_err() {
                tracing::error!("a uffd server thread panicked");
            }
        }
        tracing::info!(peer_pid = self.peer_pid, stats = ?self.stats(), "memory server stopped");
    }
}

impl Drop for UffdServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl MemoryServerHandle for UffdServerHandle {
    fn stats(&self) -> MemoryServerStats {
        UffdServerHandle::stats(self)
    }

    fn stop(mut self: Box<Self>) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_ranges() {
        let mut b = Bitmap::new(130);
        b.set_range(63, 66);
        assert!(!b.get(62) && b.get(63) && b.get(64) && b.get(65) && !b.get(66));
        b.set_range(129, 500); // clipped
        assert!(b.get(129) && !b.get(200));
    }
}
