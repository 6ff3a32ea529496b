//! Serving a VM's memory from a snapshot over userfaultfd
//! ([`wrenn_core::memory::MemoryServer`]).
//!
//! [`UffdMemoryServer`] speaks Firecracker's handshake (spec A5): it listens on a Unix
//! socket, the VMM connects and sends one JSON list of [`GuestRegion`]s with its
//! userfaultfd attached (`SCM_RIGHTS`), and from then on every missing-page fault in
//! those regions is answered from a [`PageSource`] with `UFFDIO_COPY` (or
//! `UFFDIO_ZEROPAGE` for zero pages), together with the pages around it (fault-around,
//! [`ServerOptions::fault_around_pages`]). A second thread prefetches every page in the
//! background so the guest stops faulting soon after restore. Pages the VMM discards
//! (balloon `MADV_DONTNEED`, seen as `UFFD_EVENT_REMOVE`) are served as zeros from then
//! on and never prefetched; unmapped ranges are no longer served.
//!
//! Both threads are dedicated OS threads (a blocked fault stalls a vCPU; it must never
//! wait behind async tasks). The handle stops and joins them and closes the uffd.
//!
//! Deliberately not here: hugetlbfs (2 MiB) pages, minor-fault (shmem) mode, dirty
//! tracking, several VMMs per server, and choosing prefetch order by access pattern.
//! [`testing`] plays the VMM's side of the handshake for tests and benchmarks.

mod handshake;
mod serve;
pub mod testing;

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use userfaultfd::Uffd;
use wrenn_core::memory::{MemoryServer, MemoryServerError, MemoryServerHandle, PageSource};

pub use handshake::{GuestRegion, UffdListener, PAGE_SIZE};
pub use serve::UffdServerHandle;

/// How a [`UffdMemoryServer`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Copy every page into guest memory in the background (otherwise pages arrive
    /// only when faulted, which benchmarks use to time the fault path alone).
    pub prefetch: bool,
    /// How long to wait for the VMM to connect and send its regions.
    pub handshake_timeout: Duration,
    /// Fault-around: a fault is served with the aligned window of this many pages that
    /// holds the faulting page (clipped to its region, less pages discarded by the VMM
    /// or already present), in as few ioctls as possible. 1 (or 0) serves the faulting
    /// page alone. The default 64 (256 KiB) makes a sequential touch of unserved memory
    /// cost one fault per 256 KiB instead of one per page, at the price of more memory
    /// populated per fault and a later wake-up of the faulting vCPU (its page arrives
    /// with the window).
    pub fault_around_pages: usize,
}

/// Default [`ServerOptions::fault_around_pages`]: 256 KiB.
pub const DEFAULT_FAULT_AROUND_PAGES: usize = 64;

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            prefetch: true,
            handshake_timeout: Duration::from_secs(10),
            fault_around_pages: DEFAULT_FAULT_AROUND_PAGES,
        }
    }
}

/// The userfaultfd memory server (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct UffdMemoryServer {
    options: ServerOptions,
}

impl UffdMemoryServer {
    pub fn new(options: ServerOptions) -> Self {
        UffdMemoryServer { options }
    }

    pub fn options(&self) -> ServerOptions {
        self.options
    }

    /// Binds and listens on `socket` (mode 0600). The path appears only once the socket
    /// listens, so "the path exists" means the VMM may connect. Fails if the path exists.
    pub fn listen(&self, socket: &Path) -> Result<UffdListener, MemoryServerError> {
        handshake::listen(socket, self.options)
    }

    /// [`Self::listen`] then [`UffdListener::accept`], blocking the calling thread.
    pub fn serve_blocking(
        &self,
        source: Arc<dyn PageSource>,
        socket: &Path,
    ) -> Result<UffdServerHandle, MemoryServerError> {
        self.listen(socket)?.accept(source)
    }
}

impl UffdListener {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (blocking, at most the handshake timeout) for the VMM's handshake, then
    /// starts serving `source`. The socket file is removed either way.
    pub fn accept(
        self,
        source: Arc<dyn PageSource>,
    ) -> Result<UffdServerHandle, MemoryServerError> {
        if source.page_size() != PAGE_SIZE || !source.size().is_multiple_of(PAGE_SIZE) {
            return Err(MemoryServerError::Backend(
                format!(
                    "Page source has page size {} and size {}; 4 KiB pages only",
                    source.page_size(),
                    source.size()
                )
                .into(),
            ));
        }
        let prefetch = self.options.prefetch;
        let fault_around = self.options.fault_around_pages.max(1);
        let accepted = handshake::accept(&self, source.size())?;
        drop(self); // nobody else may connect
                    // The fault thread must never block in read(2): a pending fault can be resolved
                    // (and dequeued) by a prefetch copy between poll and read. The VMM never reads
                    // its uffd, so the shared O_NONBLOCK flag changes nothing for it.
        let backend = |what: &str, e: nix::Error| {
            MemoryServerError::Backend(Box::new(std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("{what}: {e}"),
            )))
        };
        let fd = accepted.uffd.as_raw_fd();
        let flags =
            fcntl(fd, FcntlArg::F_GETFL).map_err(|e| backend("fcntl(F_GETFL) on the uffd", e))?;
        fcntl(
            fd,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(|e| backend("fcntl(F_SETFL) on the uffd", e))?;
        // SAFETY: `into_raw_fd` gives up the OwnedFd's ownership of a descriptor we
        // checked is a userfaultfd; `Uffd` becomes its only owner and closes it on drop.
        let uffd = unsafe { Uffd::from_raw_fd(accepted.uffd.into_raw_fd()) };
        let bytes: u64 = accepted.regions.iter().map(|r| r.size).sum();
        tracing::info!(
            peer_pid = accepted.peer_pid,
            regions = accepted.regions.len(),
            mib = bytes >> 20,
            prefetch,
            fault_around,
            "memory server serving"
        );
        let shared = serve::Shared::new(uffd, accepted.regions, source, fault_around);
        UffdServerHandle::start(shared, accepted.stream, accepted.peer_pid, prefetch)
            .map_err(|e| MemoryServerError::Backend(Box::new(e)))
    }
}

#[async_trait]
impl MemoryServer for UffdMemoryServer {
    async fn serve(
        &self,
        source: Arc<dyn PageSource>,
        socket: &Path,
    ) -> Result<Box<dyn MemoryServerHandle>, MemoryServerError> {
        let listener = self.listen(socket)?;
        let handle = tokio::task::spawn_blocking(move || listener.accept(source))
            .await
            .map_err(|e| MemoryServerError::Backend(Box::new(e)))??;
        Ok(Box::new(handle))
    }
}
