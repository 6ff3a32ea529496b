//! Firecracker's userfaultfd handshake, server side.
//!
//! The server binds and listens on a Unix stream socket; the VMM connects and sends
//! exactly one message: a JSON array of [`GuestRegion`]s with the userfaultfd attached
//! as `SCM_RIGHTS`. No further messages are ever exchanged.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use wrenn_core::memory::MemoryServerError;

/// Largest handshake message accepted. Firecracker's reference handler reads 1 KiB; a
/// region is about 120 bytes of JSON, so this leaves room for hundreds of regions.
pub(crate) const HANDSHAKE_BUF: usize = 64 * 1024;

/// How many descriptors one handshake may carry before the control buffer truncates.
/// Firecracker sends one; the rest are closed and the handshake refused.
const MAX_FDS: usize = 8;

/// The only guest page size served (no hugetlbfs-backed memory).
pub const PAGE_SIZE: u64 = 4096;

/// One guest memory region as the VMM describes it in the handshake (Firecracker's
/// `GuestRegionUffdMapping`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegion {
    /// Where the region starts in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Region length in bytes.
    pub size: u64,
    /// Offset of the region's first byte in guest memory (the memory file).
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Deprecated duplicate of `page_size` (also in bytes, despite the name); optional.
    #[serde(default)]
    pub page_size_kib: u64,
}

impl GuestRegion {
    /// Whether host address `addr` lies in this region.
    pub(crate) fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr - self.base_host_virt_addr < self.size
    }
}

/// A bound, listening socket waiting for the VMM (see [`super::UffdMemoryServer::listen`]).
///
/// The socket file appears at its path only once the socket listens, so a caller may
/// treat "the path exists" as "the VMM may connect now". Dropping it removes the file.
#[derive(Debug)]
pub struct UffdListener {
    pub(crate) listener: UnixListener,
    pub(crate) path: PathBuf,
    pub(crate) options: super::ServerOptions,
}

impl Drop for UffdListener {
    fn drop(&mut self) {
        // Only remove what we bound: a socket still at our path.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// What a successful handshake yields.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) stream: UnixStream,
    pub(crate) uffd: OwnedFd,
    pub(crate) regions: Vec<GuestRegion>,
    pub(crate) peer_pid: Option<i32>,
}

fn backend(context: &str, err: io::Error) -> MemoryServerError {
    MemoryServerError::Backend(Box::new(io::Error::new(
        err.kind(),
        format!("{context}: {err}"),
    )))
}

fn bad(msg: impl Into<String>) -> MemoryServerError {
    MemoryServerError::Handshake(msg.into())
}

/// Binds `path` (under a temp name, then linked into place so that the path exists
/// only once the socket listens; an existing file is never replaced), mode 0600.
pub(crate) fn listen(
    path: &Path,
    options: super::ServerOptions,
) -> Result<UffdListener, MemoryServerError> {
    if path.exists() {
        return Err(backend(
            "Socket path is taken",
            io::Error::new(io::ErrorKind::AlreadyExists, path.display().to_string()),
        ));
    }
    let file_name = path.file_name().ok_or_else(|| {
        backend(
            "Socket path has no file name",
            io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".bind-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).map_err(|e| backend("Could not bind the uffd socket", e))?;
    let finish = || -> io::Result<()> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        // link(2) never replaces an existing file, unlike rename(2).
        std::fs::hard_link(&tmp, path)
    };
    let published = finish();
    let _ = std::fs::remove_file(&tmp);
    if let Err(e) = published {
        return Err(backend("Could not publish the uffd socket", e));
    }
    Ok(UffdListener {
        listener,
        path: path.to_path_buf(),
        options,
    })
}

/// Waits for `fd` to become readable until `deadline`; false on timeout.
fn wait_readable(fd: &impl AsFd, deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        // Round up so a sub-millisecond remainder still waits instead of spinning.
        let ms = u32::try_from(left.as_millis().saturating_add(1)).unwrap_or(u32::MAX);
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Accepts one VMM and reads its single handshake message.
pub(crate) fn accept(
    listener: &UffdListener,
    source_size: u64,
) -> Result<Accepted, MemoryServerError> {
    let timeout = listener.options.handshake_timeout;
    let deadline = Instant::now() + timeout;
    let timed_out = || MemoryServerError::HandshakeTimeout {
        socket: listener.path.display().to_string(),
        // Rounded up: a sub-second timeout does not read "within 0 s".
        secs: timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0),
    };
    let stream = loop {
        if !wait_readable(&listener.listener, deadline)
            .map_err(|e| backend("poll on the uffd socket", e))?
        {
            return Err(timed_out());
        }
        match listener.listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                continue
            }
            Err(e) => return Err(backend("accept on the uffd socket", e)),
        }
    };
    let peer_pid =
        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|c| c.pid());
    // The VMM sends right after connecting; give it what is left of the deadline, at
    // least a moment, so a connect at the very end still gets its message read.
    let read_deadline = deadline.max(Instant::now() + Duration::from_millis(100));
    if !wait_readable(&stream, read_deadline)
        .map_err(|e| backend("poll on the VMM connection", e))?
    {
        return Err(timed_out());
    }

    let mut buf = vec![0u8; HANDSHAKE_BUF];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = loop {
            match recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Err(Errno::EINTR) => continue,
                other => break other,
            }
        }
        .map_err(|e| backend("recvmsg of the handshake", e.into()))?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
        match msg.cmsgs() {
            Ok(iter) => {
                for c in iter {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in our table for this
                            // message (SCM_RIGHTS); nothing else owns it, so wrapping it
                            // makes it closed exactly once.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            }
            // MSG_CTRUNC: more descriptors than MAX_FDS. Those that fit were installed
            // but cannot be enumerated safely through nix; a VMM never does this.
            Err(_) => truncated = true,
        }
        (msg.bytes, fds, truncated)
    };
    if truncated {
        return Err(bad("Handshake message or its control data was truncated"));
    }
    if len == 0 {
        return Err(bad(
            "The VMM closed the connection without sending its regions",
        ));
    }
    let regions = parse_regions(&buf[..len], source_size)?;
    let mut fds = fds.into_iter();
    let uffd = fds
        .next()
        .ok_or_else(|| bad("No userfaultfd attached to the handshake (SCM_RIGHTS)"))?;
    if fds.next().is_some() {
        return Err(bad("More than one descriptor attached to the handshake"));
    }
    check_is_userfaultfd(&uffd)?;
    tracing::debug!(peer_pid, regions = regions.len(), "uffd handshake accepted");
    Ok(Accepted {
        stream,
        uffd,
        regions,
        peer_pid,
    })
}

fn check_is_userfaultfd(fd: &OwnedFd) -> Result<(), MemoryServerError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| backend("Could not inspect the received descriptor", e))?;
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        return Err(bad(format!(
            "The received descriptor is not a userfaultfd ({})",
            link.display()
        )));
    }
    Ok(())
}

/// Parses and validates the region list against a source of `source_size` bytes.
pub(crate) fn parse_regions(
    json: &[u8],
    source_size: u64,
) -> Result<Vec<GuestRegion>, MemoryServerError> {
    let mut regions: Vec<GuestRegion> = serde_json::from_slice(json)
        .map_err(|e| bad(format!("Region list is not valid JSON: {e}")))?;
    if regions.is_empty() {
        return Err(bad("Region list is empty"));
    }
    for (i, r) in regions.iter().enumerate() {
        if r.page_size != PAGE_SIZE {
            return Err(bad(format!(
                "Region {i}: page size {} is not {PAGE_SIZE}",
                r.page_size
            )));
        }
        if r.size == 0 {
            return Err(bad(format!("Region {i} is empty")));
        }
        if r.base_host_virt_addr % PAGE_SIZE != 0
            || r.size % PAGE_SIZE != 0
            || r.offset % PAGE_SIZE != 0
        {
            return Err(bad(format!("Region {i} is not page aligned: {r:?}")));
        }
        if r.base_host_virt_addr.checked_add(r.size).is_none() {
            return Err(bad(format!("Region {i} wraps the address space")));
        }
        match r.offset.checked_add(r.size) {
            Some(end) if end <= source_size => {}
            _ => {
                return Err(bad(format!(
                    "Region {i} (offset {} + size {}) exceeds guest memory of {source_size} bytes",
                    r.offset, r.size
                )))
            }
        }
    }
    regions.sort_by_key(|r| r.base_host_virt_addr);
    for w in regions.windows(2) {
        if w[0].base_host_virt_addr + w[0].size > w[1].base_host_virt_addr {
            return Err(bad("Regions overlap in the VMM's address space"));
        }
    }
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(base: u64, size: u64, offset: u64) -> serde_json::Value {
        serde_json::json!({"base_host_virt_addr": base, "size": size, "offset": offset,
                           "page_size": 4096, "page_size_kib": 4096})
    }

    #[test]
    fn parses_firecracker_regions() {
        let json = serde_json::to_vec(&vec![
            region(0x20_0000, 0x1000, 0x1000),
            region(0x10_0000, 0x1000, 0),
        ])
        .unwrap();
        let r = parse_regions(&json, 0x2000).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].base_host_virt_addr, 0x10_0000, "sorted by address");
    }

    #[test]
    fn page_size_kib_is_optional() {
        let json = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#;
        assert_eq!(parse_regions(json, 4096).unwrap()[0].page_size_kib, 0);
    }

    #[test]
    fn rejects_bad_regions() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (serde_json::json!([]), "empty"),
            (serde_json::json!([region(0x1000, 0x2000, 0)]), "exceeds"),
            (serde_json::json!([region(0x1001, 0x1000, 0)]), "aligned"),
            (serde_json::json!([region(0x1000, 0x1000, 0x10)]), "aligned"),
            (serde_json::json!([region(0x1000, 0, 0)]), "empty"),
            (
                serde_json::json!([region(0x1000, 0x1000, u64::MAX - 0xfff)]),
                "exceeds",
            ),
            (
                serde_json::json!([region(0x1000, 0x1000, 0), region(0x1000, 0x1000, 0)]),
                "overlap",
            ),
            (
                serde_json::json!([{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":2097152}]),
                "page size",
            ),
            (serde_json::json!({"regions": []}), "JSON"),
        ];
        for (json, want) in cases {
            let err = parse_regions(&serde_json::to_vec(&json).unwrap(), 0x1000).unwrap_err();
            assert!(
                matches!(err, MemoryServerError::Handshake(ref m) if m.contains(want)),
                "{json}: {err}"
            );
        }
    }
}
