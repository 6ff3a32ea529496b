//! The VMM's side of the uffd handshake, and an in-memory page source, so tests and
//! benchmarks drive a real userfaultfd without a VM (needs root, or
//! `vm.unprivileged_userfaultfd=1`).
//!
//! [`FakeVmm`] does what Firecracker does on `snapshot/load` with a `Uffd` backend:
//! creates a userfaultfd (with `UFFD_FEATURE_EVENT_REMOVE`), maps anonymous memory,
//! registers it in missing mode, connects to the server's socket and sends the region
//! list with the uffd attached. Its memory is then read and written through atomics
//! (never through references), since the server fills it behind the compiler's back.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use wrenn_core::memory::{PageContent, PageSource};

use super::handshake::{GuestRegion, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;

/// Guest memory held in a `Vec`, with zero pages reported as [`PageContent::Zero`].
pub struct MemPageSource {
    data: Vec<u8>,
    zero: Vec<bool>,
}

impl std::fmt::Debug for MemPageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemPageSource")
            .field("size", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl MemPageSource {
    /// Wraps `data` (its length rounded up to whole pages with zeros).
    pub fn new(mut data: Vec<u8>) -> Self {
        data.resize(data.len().div_ceil(PAGE) * PAGE, 0);
        let zero = data
            .chunks(PAGE)
            .map(|p| p.iter().all(|&b| b == 0))
            .collect();
        MemPageSource { data, zero }
    }

    /// `size` bytes of [`pattern_page`] content where every `zero_every`-th page
    /// (counting from page `zero_every - 1`; 0 = none) is all zeros.
    pub fn pattern(size: usize, zero_every: u64) -> Self {
        let mut data = vec![0u8; size.div_ceil(PAGE) * PAGE];
        for (i, page) in data.chunks_mut(PAGE).enumerate() {
            let i = i as u64;
            if zero_every == 0 || i % zero_every != zero_every - 1 {
                pattern_page(i, page);
            }
        }
        Self::new(data)
    }

    /// All of guest memory.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Guest page `index`.
    pub fn page(&self, index: u64) -> &[u8] {
        let start = index as usize * PAGE;
        &self.data[start..start + PAGE]
    }
}

/// Fills `page` with content unique to page `index` (never all zeros).
pub fn pattern_page(index: u64, page: &mut [u8]) {
    for (w, chunk) in page.chunks_mut(8).enumerate() {
        let v = index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (w as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

impl PageSource for MemPageSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn page_size(&self) -> u64 {
        PAGE_SIZE
    }

    fn read_page(&self, offset: u64, buf: &mut [u8]) -> io::Result<PageContent> {
        let index = usize::try_from(offset / PAGE_SIZE).map_err(|_| io::ErrorKind::InvalidInput)?;
        if !offset.is_multiple_of(PAGE_SIZE) || buf.len() < PAGE || index >= self.zero.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad page read at {offset}"),
            ));
        }
        if self.zero[index] {
            return Ok(PageContent::Zero);
        }
        buf[..PAGE].copy_from_slice(&self.data[index * PAGE..(index + 1) * PAGE]);
        Ok(PageContent::Data)
    }
}

/// The VMM's half: registered anonymous memory plus the handshake (see module docs).
#[derive(Debug)]
pub struct FakeVmm {
    uffd: Uffd,
    base: usize,
    len: usize,
    stream: Option<UnixStream>,
    // Last: unmapped after the uffd is closed.
    _mem: memmap2::MmapMut,
}

impl FakeVmm {
    /// Maps `len` bytes (rounded up to pages; `MAP_PRIVATE | MAP_ANONYMOUS |
    /// MAP_NORESERVE`) and registers them in missing mode with a new userfaultfd that
    /// reports discards.
    pub fn new(len: usize) -> io::Result<Self> {
        let len = len.div_ceil(PAGE) * PAGE;
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(true)
            .require_features(FeatureFlags::EVENT_REMOVE)
            .create()
            .map_err(uffd_err)?;
        let mut mem = memmap2::MmapOptions::new()
            .len(len)
            .no_reserve_swap()
            .map_anon()?;
        let base = mem.as_mut_ptr() as usize;
        uffd.register(base as *mut libc::c_void, len)
            .map_err(uffd_err)?;
        Ok(FakeVmm {
            uffd,
            base,
            len,
            stream: None,
            _mem: mem,
        })
    }

    /// Host address of the mapping.
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: the mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole mapping as one region backed by guest memory from `offset`.
    pub fn region(&self, offset: u64) -> GuestRegion {
        GuestRegion {
            base_host_virt_addr: self.base(),
            size: self.len as u64,
            offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        }
    }

    /// The handshake with the whole mapping as guest memory from offset 0.
    pub fn connect(&mut self, socket: &Path) -> io::Result<()> {
        self.connect_with(socket, &[self.region(0)])
    }

    /// The handshake with explicit regions.
    pub fn connect_with(&mut self, socket: &Path, regions: &[GuestRegion]) -> io::Result<()> {
        let json = serde_json::to_vec(regions).map_err(io::Error::other)?;
        self.stream = Some(self.send_raw(socket, &json, true)?);
        Ok(())
    }

    /// Connects and sends `payload` as the one handshake message, with the uffd
    /// attached or not. For malformed handshakes.
    pub fn send_raw(
        &self,
        socket: &Path,
        payload: &[u8],
        attach_uffd: bool,
    ) -> io::Result<UnixStream> {
        let stream = UnixStream::connect(socket)?;
        let fds = [self.uffd.as_raw_fd()];
        let cmsgs = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if attach_uffd { &cmsgs } else { &[] };
        let sent = sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(payload)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )?;
        if sent != payload.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short handshake send",
            ));
        }
        Ok(stream)
    }

    /// The VMM's uffd (e.g. to send it over another socket).
    pub fn uffd_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.uffd`, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.uffd.as_raw_fd()) }
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "access at {offset}+{len} out of bounds"
        );
    }

    /// Reads one byte (faulting the page in if missing).
    pub fn read_u8(&self, offset: usize) -> u8 {
        self.check(offset, 1);
        // SAFETY: in bounds of our live mapping (checked), `AtomicU8` has the layout and
        // alignment of `u8`, and the mapping is only ever accessed atomically or by the
        // kernel, so no non-atomic access races with this one.
        unsafe { AtomicU8::from_ptr((self.base + offset) as *mut u8) }.load(Ordering::Relaxed)
    }

    /// Writes one byte (a write fault if the page is missing).
    pub fn write_u8(&self, offset: usize, value: u8) {
        self.check(offset, 1);
        // SAFETY: as in `read_u8`.
        unsafe { AtomicU8::from_ptr((self.base + offset) as *mut u8) }
            .store(value, Ordering::Relaxed)
    }

    /// Copies page `index` into `buf` (at least one page long).
    pub fn read_page(&self, index: u64, buf: &mut [u8]) {
        let start = index as usize * PAGE;
        self.check(start, PAGE);
        for (w, out) in buf[..PAGE].chunks_exact_mut(8).enumerate() {
            let addr = self.base + start + w * 8;
            // SAFETY: in bounds (checked), 8-byte aligned (the base is page aligned),
            // and the memory is only accessed atomically or by the kernel (see read_u8).
            let v = unsafe { AtomicU64::from_ptr(addr as *mut u64) }.load(Ordering::Relaxed);
            out.copy_from_slice(&v.to_ne_bytes());
        }
    }

    /// `madvise(MADV_DONTNEED)` on a page-aligned range, as a balloon does: the server
    /// sees `UFFD_EVENT_REMOVE` and the range reads back as zeros. Blocks until the
    /// server has read the event.
    pub fn discard(&self, offset: usize, len: usize) -> io::Result<()> {
        self.check(offset, len);
        if !offset.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: the range is inside our mapping (checked); dropping its pages only
        // affects memory no Rust reference points into (it is accessed through atomics
        // created per access), and anonymous private pages read back as zeros.
        let rc = unsafe {
            libc::madvise(
                (self.base + offset) as *mut libc::c_void,
                len,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn uffd_err(e: userfaultfd::Error) -> io::Error {
    match e {
        userfaultfd::Error::SystemError(errno) => io::Error::from_raw_os_error(errno as i32),
        userfaultfd::Error::OpenDevUserfaultfd(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Whether this process may create a userfaultfd for kernel-mode faults too (root).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// What [`measure_fault_rate`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultRate {
    /// Bytes faulted in (and copied).
    pub bytes: u64,
    /// Time to fault them in, touching every page once in order.
    pub fault_secs: f64,
    /// Time to `memcpy` the same bytes into a pre-faulted buffer.
    pub memcpy_secs: f64,
}

impl FaultRate {
    /// Fault service rate relative to memcpy: `memcpy_secs / fault_secs` (1.0 = faults
    /// bring memory in as fast as a memcpy of it).
    pub fn ratio(&self) -> f64 {
        self.memcpy_secs / self.fault_secs
    }

    /// Pages faulted in.
    pub fn pages(&self) -> u64 {
        self.bytes / PAGE_SIZE
    }

    /// Fault-in throughput in MiB/s.
    pub fn fault_mib_per_sec(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 20) / self.fault_secs
    }

    /// memcpy throughput in MiB/s.
    pub fn memcpy_mib_per_sec(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 20) / self.memcpy_secs
    }
}

/// A temp directory removed on drop.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "wrenn-faultrate-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Measures the 4 KiB fault service rate against a plain memcpy of the same bytes.
///
/// Serves `size` bytes (rounded up to pages) of [`MemPageSource::pattern`] content with
/// `options` (whose `prefetch` must be off: only faults may bring pages in), plays the
/// VMM with a [`FakeVmm`], touches the first byte of every page once in order and times
/// that; checks a sample of pages against the source; then times copying the same
/// bytes from the source into a pre-faulted buffer. The server, its socket and threads,
/// the mapping and the temp directory are all gone when it returns. Needs root.
pub fn measure_fault_rate(size: usize, options: super::ServerOptions) -> io::Result<FaultRate> {
    use std::time::{Duration, Instant};

    if !is_root() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "measuring the fault rate needs root (userfaultfd)",
        ));
    }
    if options.prefetch {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "measure_fault_rate times faults alone: turn prefetch off",
        ));
    }
    if size == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "size is 0"));
    }
    let source = std::sync::Arc::new(MemPageSource::pattern(size, 0));
    let bytes = source.bytes().len();
    let pages = (bytes / PAGE) as u64;
    let dir = ScratchDir::new()?;
    let sock = dir.0.join("mem.sock");
    let mut vmm = FakeVmm::new(bytes)?;
    let listener = super::UffdMemoryServer::new(options)
        .listen(&sock)
        .map_err(io::Error::other)?;
    vmm.connect(&sock)?;
    let handle = listener.accept(source.clone()).map_err(io::Error::other)?;

    let start = Instant::now();
    let mut sum = 0u64;
    for p in 0..bytes / PAGE {
        sum = sum.wrapping_add(u64::from(vmm.read_u8(p * PAGE)));
    }
    let fault_secs = start.elapsed().as_secs_f64();
    std::hint::black_box(sum);

    // Every page came from the source, through faults only.
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.fault_pages() < pages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if handle.fault_pages() != pages || handle.failed_pages() != 0 {
        return Err(io::Error::other(format!(
            "{} of {pages} pages faulted in, {} failed ({:?})",
            handle.fault_pages(),
            handle.failed_pages(),
            handle.last_error()
        )));
    }
    let mut got = vec![0u8; PAGE];
    let step = (pages / 257).max(1);
    for p in (0..pages).step_by(step as usize).chain([pages - 1]) {
        vmm.read_page(p, &mut got);
        if got != source.page(p) {
            return Err(io::Error::other(format!(
                "page {p} differs from the source"
            )));
        }
    }
    drop(handle);
    drop(vmm);

    let mut dst = vec![0u8; bytes];
    for b in dst.iter_mut().step_by(PAGE) {
        *b = 1; // pre-fault
    }
    std::hint::black_box(&mut dst);
    let start = Instant::now();
    dst.copy_from_slice(std::hint::black_box(source.bytes()));
    std::hint::black_box(&dst);
    let memcpy_secs = start.elapsed().as_secs_f64();

    Ok(FaultRate {
        bytes: bytes as u64,
        fault_secs,
        memcpy_secs,
    })
}
