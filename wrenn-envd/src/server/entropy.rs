//! Fresh randomness for a guest restored from a shared memory image.
//!
//! Guests restored from one snapshot (template restores, forks, pool claims)
//! start with identical kernel RNG state. `/init` carries bytes from the host's
//! CSPRNG; they are credited to the input pool (`RNDADDENTROPY`) and the CRNG is
//! reseeded at once (`RNDRESEEDCRNG`), so every `/dev/urandom` and
//! `getrandom(2)` read after `/init` differs between clones.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// Most bytes mixed in per `/init` (the kernel's own limit is far higher).
pub const MAX_ENTROPY_BYTES: usize = 512;

const RNDADDENTROPY: libc::c_ulong =
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()) as libc::c_ulong;
const RNDRESEEDCRNG: libc::c_ulong = nix::request_code_none!(b'R', 0x07) as libc::c_ulong;

/// Mixes `bytes` into the kernel's input pool, credits them, and reseeds the CRNG.
pub fn inject(bytes: &[u8]) -> io::Result<()> {
    let bytes = &bytes[..bytes.len().min(MAX_ENTROPY_BYTES)];
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let len = libc::c_int::try_from(bytes.len()).map_err(io::Error::other)?;
    let mut info = Vec::with_capacity(8 + bytes.len().next_multiple_of(4));
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a valid rand_pool_info: the two ints then `buf_size`
    // bytes (padded to whole u32s), alive for the call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open for the call.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
