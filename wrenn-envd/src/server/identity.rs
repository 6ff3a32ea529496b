//! File work done with the permissions of the request's user.
//!
//! envd runs as root, but every file operation a client asks for must be checked
//! against the permissions of the user the request names, and whatever it creates
//! must belong to that user from the first moment. [`as_user`] therefore runs the
//! work on a blocking-pool thread that switches only *its own* filesystem identity
//! (fsuid, fsgid, supplementary groups), does the work, and switches back before
//! the thread goes back to the pool.
//!
//! Why this is sound (credentials(7), capabilities(7), setfsuid(2), nptl(7)):
//! - Linux keeps credentials per thread. The raw `setfsuid`, `setfsgid` and
//!   `setgroups` system calls change the calling thread only. The C libraries'
//!   `setgroups()` wrappers broadcast the change to every thread of the process,
//!   so they are never used here; the syscalls are issued directly.
//! - The kernel checks file access (path walk, open, create, unlink, rename,
//!   xattrs, inotify watches) against the fsuid, fsgid and supplementary groups,
//!   and new files and directories take the fsuid/fsgid as owner and group (the
//!   directory's group when it is set-group-ID). So the kernel does the checks
//!   and there is no create-as-root-then-chown window.
//! - Changing the fsuid from 0 to non-zero clears CAP_CHOWN, CAP_DAC_OVERRIDE,
//!   CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID, CAP_LINUX_IMMUTABLE,
//!   CAP_MAC_OVERRIDE and CAP_MKNOD from the thread's effective set; changing it
//!   back to 0 raises them again from the permitted set. `SECBIT_NO_SETUID_FIXUP`
//!   would suppress that, so after switching the thread's effective set is read
//!   back with capget(2) and the switch is refused if a DAC bypass survived.
//! - setfsuid/setfsgid cannot report errors (they return the previous id either
//!   way), so every change is verified by reading the id back with an invalid
//!   argument (`-1`), as setfsuid(2) recommends.
//! - The switch is undone by a guard's `Drop`, so on every path, panics included.
//!   If undoing fails the process aborts rather than hand a pool thread with a
//!   foreign identity to the next task.
//!
//! Streams opened under the user's identity may then be read or written from any
//! thread: the permission check happened at `open`.

use super::users::User;
use crate::connect::{Code, ConnectError};
use std::future::Future;
use std::io;
use std::marker::PhantomData;

/// Why work could not run as the requested user.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The thread could not take the user's filesystem identity.
    #[error("cannot act as user '{user}': {source}")]
    Switch {
        user: String,
        #[source]
        source: io::Error,
    },
    /// The blocking worker panicked or was cancelled.
    #[error("file worker failed: {0}")]
    Worker(String),
}

impl From<IdentityError> for io::Error {
    fn from(e: IdentityError) -> Self {
        let kind = match e {
            IdentityError::Switch { .. } => io::ErrorKind::PermissionDenied,
            IdentityError::Worker(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

impl From<IdentityError> for ConnectError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Switch { .. } => {
                ConnectError::new(Code::PermissionDenied, e.to_string())
            }
            IdentityError::Worker(_) => ConnectError::internal(e.to_string()),
        }
    }
}

/// Runs `f` on a blocking-pool thread whose filesystem identity is `user`'s.
///
/// `f` must not hand work to other threads and expect it to run as the user:
/// only the thread running `f` switches. Root (or the daemon's own user) runs
/// without a switch, with the daemon's full access. The work starts right away;
/// the returned future (which borrows nothing) yields its result.
pub fn as_user<T, E, F>(user: &User, f: F) -> impl Future<Output = Result<T, E>> + Send + 'static
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<IdentityError> + Send + 'static,
{
    let user = user.clone();
    let work = tokio::task::spawn_blocking(move || {
        let _guard = FsIdentity::enter(&user)?;
        f()
    });
    async move {
        work.await
            .unwrap_or_else(|e| Err(IdentityError::Worker(e.to_string()).into()))
    }
}

// Syscall numbers of the 32-bit-id variants (the plain ones take 16-bit ids on
// these architectures).
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
mod nr {
    pub const SETFSUID: libc::c_long = libc::SYS_setfsuid32;
    pub const SETFSGID: libc::c_long = libc::SYS_setfsgid32;
    pub const SETGROUPS: libc::c_long = libc::SYS_setgroups32;
}
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
mod nr {
    pub const SETFSUID: libc::c_long = libc::SYS_setfsuid;
    pub const SETFSGID: libc::c_long = libc::SYS_setfsgid;
    pub const SETGROUPS: libc::c_long = libc::SYS_setgroups;
}

/// `(uid_t)-1`: never a valid id, so setfsuid/setfsgid change nothing and return
/// the current value.
const QUERY: libc::c_long = u32::MAX as libc::c_long;

/// Sets this thread's fsuid to `uid` (or reads it with [`QUERY`]); returns the previous value.
fn setfsuid_raw(id: libc::c_long) -> Option<u32> {
    // SAFETY: setfsuid takes one integer, reads and writes no memory of ours, and
    // changes only the calling thread's credentials.
    let prev = unsafe { libc::syscall(nr::SETFSUID, id) };
    u32::try_from(prev).ok()
}

/// Sets this thread's fsgid to `gid` (or reads it with [`QUERY`]); returns the previous value.
fn setfsgid_raw(id: libc::c_long) -> Option<u32> {
    // SAFETY: setfsgid takes one integer, reads and writes no memory of ours, and
    // changes only the calling thread's credentials.
    let prev = unsafe { libc::syscall(nr::SETFSGID, id) };
    u32::try_from(prev).ok()
}

fn current_fsuid() -> Option<u32> {
    setfsuid_raw(QUERY)
}

fn current_fsgid() -> Option<u32> {
    setfsgid_raw(QUERY)
}

/// Sets this thread's fsuid and checks that it took.
fn set_fsuid(uid: u32) -> io::Result<()> {
    setfsuid_raw(libc::c_long::from(uid));
    match current_fsuid() {
        Some(now) if now == uid => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("setfsuid({uid}) did not take effect"),
        )),
    }
}

/// Sets this thread's fsgid and checks that it took.
fn set_fsgid(gid: u32) -> io::Result<()> {
    setfsgid_raw(libc::c_long::from(gid));
    match current_fsgid() {
        Some(now) if now == gid => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("setfsgid({gid}) did not take effect"),
        )),
    }
}

/// Replaces this thread's (only this thread's) supplementary groups.
fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    let len = libc::c_long::try_from(groups.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the kernel reads `len` gid_t values from `groups`, a live slice of
    // exactly that many gid_t; it keeps no pointer. The raw syscall (unlike the C
    // library wrapper) changes the calling thread's credentials only.
    let rc = unsafe { libc::syscall(nr::SETGROUPS, len, groups.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This thread's supplementary groups.
fn current_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: with a size of 0 getgroups only returns the count and writes nothing.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let len = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut groups: Vec<libc::gid_t> = vec![0; len];
    // SAFETY: `groups` has room for `n` gid_t values and getgroups writes at most
    // `n`. Only this thread changes its own groups, so the count cannot grow
    // between the two calls (if it did, getgroups would fail with EINVAL).
    let m = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    let got = usize::try_from(m).map_err(|_| io::Error::last_os_error())?;
    groups.truncate(got);
    Ok(groups)
}

/// Capabilities that bypass discretionary access control.
const DAC_BYPASS: u64 = (1 << 0) // CAP_CHOWN
    | (1 << 1) // CAP_DAC_OVERRIDE
    | (1 << 2) // CAP_DAC_READ_SEARCH
    | (1 << 3) // CAP_FOWNER
    | (1 << 4); // CAP_FSETID

/// This thread's effective capability set.
fn effective_caps() -> io::Result<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    // pid 0 = the calling thread.
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget reads the header and, for version 3, writes two Data structs;
    // both are live, correctly laid out (#[repr(C)] like the kernel's
    // __user_cap_header_struct / __user_cap_data_struct) and exclusively borrowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            std::ptr::addr_of_mut!(header),
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// A thread's switched filesystem identity; dropping it switches back.
///
/// Not `Send`: credentials belong to the thread that switched.
struct FsIdentity {
    saved_uid: u32,
    saved_gid: u32,
    saved_groups: Vec<libc::gid_t>,
    groups_changed: bool,
    gid_changed: bool,
    uid_changed: bool,
    _thread_bound: PhantomData<*const ()>,
}

impl FsIdentity {
    /// Gives this thread `user`'s filesystem identity. `None` when it already has
    /// it (root requests in a root daemon): nothing to undo.
    fn enter(user: &User) -> Result<Option<FsIdentity>, IdentityError> {
        let fail = |source: io::Error| IdentityError::Switch {
            user: user.name.clone(),
            source,
        };
        let (Some(saved_uid), Some(saved_gid)) = (current_fsuid(), current_fsgid()) else {
            return Err(fail(io::Error::other(
                "cannot read the thread's fsuid/fsgid",
            )));
        };
        if saved_uid == user.uid && saved_gid == user.gid {
            return Ok(None);
        }
        // Read before switching: /etc/group stays readable either way, but this
        // keeps the lookup independent of the target's permissions.
        let groups: Vec<libc::gid_t> = user.groups();
        let mut id = FsIdentity {
            saved_uid,
            saved_gid,
            saved_groups: current_groups().map_err(fail)?,
            groups_changed: false,
            gid_changed: false,
            uid_changed: false,
            _thread_bound: PhantomData,
        };
        // Groups, gid, then uid, so the DAC capabilities go last. Early returns drop
        // `id`, which undoes whatever is marked changed. setgroups is all or
        // nothing, so it is marked after it succeeds; the fs ids are marked before
        // their call, since setting one back to its current value is always allowed.
        set_groups(&groups).map_err(fail)?;
        id.groups_changed = true;
        id.gid_changed = true;
        set_fsgid(user.gid).map_err(fail)?;
        id.uid_changed = true;
        set_fsuid(user.uid).map_err(fail)?;
        if user.uid != 0 {
            let caps = effective_caps().map_err(fail)?;
            if caps & DAC_BYPASS != 0 {
                return Err(fail(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "file-access capabilities survived the fsuid switch (SECBIT_NO_SETUID_FIXUP?)",
                )));
            }
        }
        Ok(Some(id))
    }

    /// Restores the saved identity: uid first (raising the capabilities back),
    /// then gid and groups.
    fn restore(&self) -> io::Result<()> {
        if self.uid_changed {
            set_fsuid(self.saved_uid)?;
        }
        if self.gid_changed {
            set_fsgid(self.saved_gid)?;
        }
        if self.groups_changed {
            set_groups(&self.saved_groups)?;
        }
        Ok(())
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            // A pool thread with a foreign identity would run later work (as root
            // believed) with the wrong permissions. Better no daemon at all.
            tracing::error!(error = %e, "cannot restore the file worker's identity; aborting");
            eprintln!("envd: cannot restore the file worker's identity ({e}); aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn nobody() -> User {
        User {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: PathBuf::from("/nonexistent"),
            shell: "/usr/sbin/nologin".into(),
        }
    }

    fn root() -> User {
        User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: PathBuf::from("/root"),
            shell: "/bin/sh".into(),
        }
    }

    /// (fsuid, fsgid, groups, DAC capabilities) of the calling thread, from the kernel.
    fn thread_identity() -> io::Result<(u32, u32, Vec<u32>, u64)> {
        let status = std::fs::read_to_string("/proc/thread-self/status")?;
        let field = |name: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|rest| {
                    rest.split_whitespace()
                        .filter_map(|v| v.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let (uids, gids) = (field("Uid:"), field("Gid:"));
        let mut groups = field("Groups:");
        groups.sort_unstable();
        Ok((uids[3], gids[3], groups, effective_caps()? & DAC_BYPASS))
    }

    /// A runtime whose blocking pool has one thread: every `as_user` call reuses it.
    fn one_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn switch_is_per_thread_and_undone_on_every_path() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let rt = one_thread_runtime();
        rt.block_on(async {
            let root_id = as_user(&root(), thread_identity).await.unwrap();
            assert_eq!((root_id.0, root_id.1), (0, 0));
            assert_ne!(root_id.3, 0, "root worker has its DAC capabilities");
            let pool_thread = as_user(&root(), || Ok::<_, io::Error>(std::thread::current().id()))
                .await
                .unwrap();
            for round in 0..20 {
                let (thread, id) = as_user(&nobody(), || {
                    Ok::<_, io::Error>((std::thread::current().id(), thread_identity()?))
                })
                .await
                .unwrap();
                assert_eq!(thread, pool_thread, "the single pool thread is reused");
                assert_eq!((id.0, id.1), (65534, 65534), "round {round}");
                assert!(id.2.contains(&65534), "{:?}", id.2);
                assert!(!id.2.contains(&0), "root's groups dropped: {:?}", id.2);
                assert_eq!(id.3, 0, "no DAC bypass capability while switched");
                // The async side never switched.
                assert_eq!(current_fsuid(), Some(0));
                // A panic inside the work still restores the thread.
                let panicked: Result<(), io::Error> = as_user(&nobody(), || -> io::Result<()> {
                    panic!("boom");
                })
                .await;
                assert!(panicked.is_err());
                let after = as_user(&root(), || {
                    Ok::<_, io::Error>((std::thread::current().id(), thread_identity()?))
                })
                .await
                .unwrap();
                assert_eq!(after.0, pool_thread);
                assert_eq!(after.1, root_id, "round {round}: identity restored");
            }
        });
    }

    #[test]
    fn other_threads_keep_root_access_while_one_is_switched() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
            let held = tokio::spawn(as_user(&nobody(), move || {
                let _ = ready_tx.send(());
                let _ = rx.recv_timeout(std::time::Duration::from_secs(10));
                Ok::<_, io::Error>(current_fsuid())
            }));
            ready_rx.await.unwrap();
            // While the other pool thread is nobody, this one is root.
            let here = as_user(&root(), thread_identity).await.unwrap();
            assert_eq!((here.0, here.1), (0, 0));
            assert_ne!(here.3, 0);
            tx.send(()).unwrap();
            assert_eq!(held.await.unwrap().unwrap(), Some(65534));
        });
    }

    #[test]
    fn unknown_switch_failures_are_permission_errors() {
        let e = IdentityError::Switch {
            user: "x".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(ConnectError::from(e).code, Code::PermissionDenied);
        let e = IdentityError::Worker("gone".into());
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::Other);
    }
}
