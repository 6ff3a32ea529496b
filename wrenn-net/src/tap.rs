//! Persistent tap devices through `/dev/net/tun`.
//!
//! The tap is created in the namespace of the thread that opens `/dev/net/tun`,
//! and made persistent so that the VMM's launcher, inside the same namespace,
//! attaches to it by name and hands QEMU the descriptor (`-netdev tap,fd=N`; QEMU
//! itself runs without the capability to attach). The flags (tap, no packet
//! info, virtio-net headers) match what the launcher asks for, or its
//! `TUNSETIFF` would be refused.

use crate::error::SlotError;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUN_DEVICE: &str = "/dev/net/tun";

fn tap_err(name: &str, step: &'static str) -> impl FnOnce(io::Error) -> SlotError {
    let name = name.to_owned();
    move |source| SlotError::Tap { name, step, source }
}

/// Opens `/dev/net/tun` and attaches to tap `name` (creating it if absent).
fn attach(name: &str) -> Result<File, SlotError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(tap_err(name, "validate name")(io::Error::from(
            io::ErrorKind::InvalidInput,
        )));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(tap_err(name, "open /dev/net/tun"))?;
    // SAFETY: `ifreq` is a plain C struct of integers, arrays and a union of such;
    // all-zero bytes are a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // The name stays NUL-terminated: it is shorter than IFNAMSIZ and the rest is zero.
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `file` is an open /dev/net/tun descriptor for the whole call, and
    // TUNSETIFF reads and writes exactly one `struct ifreq`, which `req` is and
    // which outlives the call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return Err(tap_err(name, "TUNSETIFF")(io::Error::last_os_error()));
    }
    Ok(file)
}

fn set_persist(file: &File, name: &str, on: bool) -> Result<(), SlotError> {
    // SAFETY: `file` is a tun descriptor attached to a device; TUNSETPERSIST takes
    // its argument by value and touches no user memory.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(on),
        )
    };
    if rc < 0 {
        return Err(tap_err(name, "TUNSETPERSIST")(io::Error::last_os_error()));
    }
    Ok(())
}

/// Creates persistent tap `name` in the calling thread's namespace.
pub(crate) fn create_persistent(name: &str) -> Result<(), SlotError> {
    let file = attach(name)?;
    set_persist(&file, name, true)
    // Closing `file` detaches; the device stays because it is persistent.
}

/// Removes persistent tap `name` by clearing its persist flag (the device goes
/// when the last descriptor closes). Used where netlink deletion is refused.
pub(crate) fn remove_persistent(name: &str) -> Result<(), SlotError> {
    let file = attach(name)?;
    set_persist(&file, name, false)
}
