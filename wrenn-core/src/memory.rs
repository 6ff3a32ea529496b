//! Serving guest memory from snapshots.
//!
//! A [`PageSource`] answers "what is in guest page N" (usually a snapshot's
//! generation files seen through its header). A [`MemoryServer`] serves a VMM's
//! page faults from a source, on demand and by background prefetch, over
//! userfaultfd; the handshake is Firecracker's (Unix socket, the uffd by
//! `SCM_RIGHTS` plus a JSON list of regions), so a Firecracker backend uses it as is.

use async_trait::async_trait;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

/// What a guest page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageContent {
    /// The bytes were written into the caller's buffer.
    Data,
    /// The page is all zeros (nothing was written).
    Zero,
}

/// Read access to a guest memory image, one page at a time.
pub trait PageSource: Send + Sync + Debug {
    /// Guest memory size in bytes (a multiple of the page size).
    fn size(&self) -> u64;
    /// Page size in bytes (4096).
    fn page_size(&self) -> u64;
    /// Fills `buf` (one page) with the page at guest offset `offset` (page aligned),
    /// or reports it is zero.
    fn read_page(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<PageContent>;
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryServerError {
    #[error("The VMM did not connect to {socket} within {secs} s")]
    HandshakeTimeout { socket: String, secs: u64 },
    #[error("Invalid handshake from the VMM: {0}")]
    Handshake(String),
    #[error("userfaultfd is not available: {0}")]
    Unavailable(String),
    #[error("Memory server failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Counters of a running server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryServerStats {
    pub faults_served: u64,
    pub pages_prefetched: u64,
    pub zero_pages: u64,
    pub removed_ranges: u64,
}

/// A server serving one VM's memory; dropping it stops the server threads.
pub trait MemoryServerHandle: Send + Sync + Debug {
    fn stats(&self) -> MemoryServerStats;
    /// Stops serving and joins the threads.
    fn stop(self: Box<Self>);
}

/// Serves page faults of VMs from page sources.
#[async_trait]
pub trait MemoryServer: Send + Sync + Debug {
    /// Listens on `socket`, accepts the VMM's handshake and serves its faults from
    /// `source` until stopped (prefetching every page in the background).
    async fn serve(
        &self,
        source: Arc<dyn PageSource>,
        socket: &Path,
    ) -> Result<Box<dyn MemoryServerHandle>, MemoryServerError>;
}
