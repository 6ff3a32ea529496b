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

/// Per-region page marks, changed only by the fault thread (while reading events).
#[derive(Debug)]
struct Marks {
    /// Discarded by the VMM (balloon): served as zeros, never prefetched.
    removed: Bitmap,
    /// Unmapped or moved away by the VMM: not served any more.
    gone: Bitmap,
}

#[derive(Debug, Default)]
struct Counters {
    faults_served: AtomicU64,
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

/// A page-aligned one-page buffer (UFFDIO_COPY's source).
struct PageBuf(memmap2::MmapMut);

impl PageBuf {
    fn new() -> std::io::Result<Self> {
        Ok(PageBuf(memmap2::MmapOptions::new().len(PAGE).map_anon()?))
    }
}

/// State shared by the handle and both threads.
pub(crate) struct Shared {
    uffd: Uffd,
    regions: Vec<GuestRegion>,
    source: Arc<dyn PageSource>,
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
    pub(crate) fn new(uffd: Uffd, regions: Vec<GuestRegion>, source: Arc<dyn PageSource>) -> Self {
        let marks = regions
            .iter()
            .map(|r| Marks {
                removed: Bitmap::new(r.size / PAGE_SIZE),
                gone: Bitmap::new(r.size / PAGE_SIZE),
            })
            .collect();
        Shared {
            uffd,
            regions,
            source,
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
        debug_assert_eq!(dst % PAGE_SIZE, 0);
        let dst_ptr = dst as usize as *mut libc::c_void;
        let result = match data {
            Some(buf) => {
                // SAFETY: UFFDIO_COPY writes only into the address space of the process
                // that registered the range with this uffd (the VMM), and only into a
                // page that is currently missing in a range registered with this uffd:
                // the kernel refuses anything else (ENOENT/EINVAL) and never overwrites a
                // populated page (EEXIST). Filling those holes is exactly the job the VMM
                // handed us with the uffd, and no Rust object of this process lives in
                // them (when the "VMM" is this very process, as in tests, that memory is
                // only accessed through raw pointers). The source is our own page-aligned
                // buffer, valid for reads of PAGE bytes for the whole call.
                unsafe { self.uffd.copy(buf.0.as_ptr().cast(), dst_ptr, PAGE, true) }
            }
            // SAFETY: as for UFFDIO_COPY above: UFFDIO_ZEROPAGE only maps the zero page
            // into a missing page of a range the VMM registered with this uffd; it reads
            // no memory of ours and never replaces a populated page.
            None => unsafe { self.uffd.zeropage(dst_ptr, PAGE, true) },
        };
        match result {
            Ok(_) => Fill::Done,
            Err(userfaultfd::Error::PartiallyCopied(_)) => Fill::Again,
            Err(userfaultfd::Error::CopyFailed(e)) | Err(userfaultfd::Error::ZeropageFailed(e)) => {
                Fill::from_errno(e as i32)
            }
            Err(userfaultfd::Error::SystemError(e)) => Fill::from_errno(e as i32),
            Err(_) => Fill::Failed(libc::EIO),
        }
    }

    /// Reads the page at guest offset `offset`, retrying transient errors.
    fn read_source(&self, offset: u64, buf: &mut PageBuf) -> std::io::Result<PageContent> {
        let mut attempt = 0;
        loop {
            match self.source.read_page(offset, &mut buf.0[..]) {
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

    /// Serves one fault at `addr`.
    fn serve_fault(&self, marks: &[Marks], addr: u64, buf: &mut PageBuf) -> Fill {
        let page = addr & !(PAGE_SIZE - 1);
        let content = match self.locate(page) {
            Some((ri, p)) if !marks[ri].removed.get(p) && !marks[ri].gone.get(p) => {
                let offset = self.regions[ri].offset + p * PAGE_SIZE;
                match self.read_source(offset, buf) {
                    Ok(c) => c,
                    Err(e) => {
                        // Leaving the fault unserved blocks that vCPU, which is better
                        // than handing the guest memory it never had.
                        self.counters.failed_pages.fetch_add(1, Ordering::Relaxed);
                        self.record_error(format!(
                            "Page source failed at guest offset {offset}: {e}"
                        ));
                        return Fill::Failed(e.raw_os_error().unwrap_or(libc::EIO));
                    }
                }
            }
            Some(_) => PageContent::Zero,
            None => {
                tracing::warn!(
                    addr = format_args!("{addr:#x}"),
                    "fault outside the handshake regions: zero page"
                );
                PageContent::Zero
            }
        };
        let fill = match content {
            PageContent::Data => self.fill(page, Some(buf)),
            PageContent::Zero => self.fill(page, None),
        };
        match fill {
            Fill::Done => {
                // Zero count first: a reader that sees the fault counted sees both.
                if content == PageContent::Zero {
                    self.counters.zero_pages.fetch_add(1, Ordering::Release);
                }
                self.counters.faults_served.fetch_add(1, Ordering::Release);
            }
            Fill::Exists => {
                // Populated by prefetch, which woke the range; wake again in case the
                // page came from somewhere that did not.
                self.counters.faults_served.fetch_add(1, Ordering::Relaxed);
                let _ = self.uffd.wake(page as usize as *mut libc::c_void, PAGE);
            }
            Fill::Again => {}
            Fill::NoRange | Fill::NoProcess => {
                tracing::debug!(addr, ?fill, "fault on a range that went away")
            }
            Fill::Failed(e) => {
                self.counters.failed_pages.fetch_add(1, Ordering::Relaxed);
                self.record_error(format!(
                    "UFFDIO_COPY at {page:#x} failed: {}",
                    Errno::from_raw(e)
                ));
            }
        }
        fill
    }

    /// Serves queued faults; a fault still refused with EAGAIN stays queued.
    fn serve_pending(
        &self,
        marks: &mut [Marks],
        events: &mut EventBuffer,
        pending: &mut VecDeque<u64>,
        buf: &mut PageBuf,
    ) -> userfaultfd::Result<()> {
        while let Some(&addr) = pending.front() {
            let mut tries = 0;
            loop {
                if self.serve_fault(marks, addr, buf) != Fill::Again {
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
    let mut buf = match PageBuf::new() {
        Ok(b) => b,
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
            .and_then(|()| shared.serve_pending(&mut marks, &mut events, &mut pending, &mut buf));
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

/// Copies every page of the source into the regions, skipping discarded ones.
fn prefetch_loop(shared: &Shared) {
    let mut buf = match PageBuf::new() {
        Ok(b) => b,
        Err(e) => return shared.record_error(format!("Could not map a page buffer: {e}")),
    };
    let started = Instant::now();
    for (ri, region) in shared.regions.iter().enumerate() {
        for p in 0..region.size / PAGE_SIZE {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let offset = region.offset + p * PAGE_SIZE;
            let content = match shared.read_source(offset, &mut buf) {
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
                    let marks = lock(&shared.marks);
                    if marks[ri].removed.get(p) || marks[ri].gone.get(p) {
                        None
                    } else {
                        Some(shared.fill(dst, (content == PageContent::Data).then_some(&buf)))
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
