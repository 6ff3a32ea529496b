//! Named network namespaces, done the way `ip netns add/del` does them, and a
//! helper that runs work on a dedicated thread inside a namespace.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, so namespace work never
//! runs on a tokio worker: each job gets a fresh std thread that enters the
//! namespace, does its work (with its own current-thread runtime if it needs
//! netlink) and exits. The thread dies inside the namespace, so nothing has to be
//! restored.

use crate::error::SlotError;
use crate::slot::{parse_index, NETNS_DIR, NETNS_PREFIX};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use wrenn_core::net::SlotIndex;

/// Serializes making `/run/netns` a shared mount point (a race would stack bind mounts).
static RUN_DIR_LOCK: Mutex<()> = Mutex::new(());

fn nix_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Runs `f` on a new thread; if `netns` is given the thread first enters it.
/// The caller awaits without blocking its runtime.
pub(crate) async fn run<T, F>(netns: Option<PathBuf>, f: F) -> Result<T, SlotError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SlotError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wrenn-netns".into())
        .spawn(move || {
            let result = match netns {
                Some(path) => enter(&path).and_then(|()| f()),
                None => f(),
            };
            let _ = tx.send(result);
        })
        .map_err(|e| SlotError::Worker {
            what: format!("spawn: {e}"),
        })?;
    rx.await.map_err(|_| SlotError::Worker {
        what: "thread panicked".into(),
    })?
}

/// Moves the calling thread into the namespace mounted at `path`.
fn enter(path: &Path) -> Result<(), SlotError> {
    let err = |source| SlotError::EnterNetns {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| err(nix_io(e)))
}

/// True when an enter error means "the namespace is not there" (gone, or its
/// mount point is an empty file left by a crash).
pub(crate) fn is_gone(e: &SlotError) -> bool {
    match e {
        SlotError::EnterNetns { source, .. } => {
            matches!(
                source.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::EINVAL)
            )
        }
        _ => false,
    }
}

/// Makes `/run/netns` exist and be a shared mount point, like iproute2, so
/// namespace mounts propagate to other mount namespaces.
fn prepare_run_dir(name: &str) -> Result<(), SlotError> {
    let err = |step, source| SlotError::Netns {
        name: name.to_owned(),
        step,
        source,
    };
    let _guard = RUN_DIR_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(NETNS_DIR).map_err(|e| err("mkdir /run/netns", e))?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself, then share it.
        Err(Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| err("bind /run/netns", nix_io(e)))?;
            shared().map_err(|e| err("share /run/netns", nix_io(e)))
        }
        Err(e) => Err(err("share /run/netns", nix_io(e))),
    }
}

/// Creates the named namespace `name` at `path`. Fails with
/// [`SlotError::NetnsExists`] if the name is taken (the O_EXCL create of the
/// mount point is the claim, also across processes). On any other error nothing
/// is left behind.
pub(crate) async fn create(name: String, path: PathBuf) -> Result<(), SlotError> {
    run(None, move || {
        prepare_run_dir(&name)?;
        let err = |step, source| SlotError::Netns {
            name: name.clone(),
            step,
            source,
        };
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SlotError::NetnsExists { name: name.clone() })
            }
            Err(e) => return Err(err("create mount point", e)),
        }
        let made = unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| err("unshare", nix_io(e)))
            .and_then(|()| {
                let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
                mount(
                    Some(own.as_str()),
                    &path,
                    Some("none"),
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| err("bind mount", nix_io(e)))
            });
        if made.is_err() {
            let _ = fs::remove_file(&path);
        }
        made
    })
    .await
}

/// Unmounts and removes a named namespace. Missing counts as removed.
pub(crate) async fn delete(name: String, path: PathBuf) -> Result<(), SlotError> {
    run(None, move || {
        let err = |step, source| SlotError::Netns {
            name: name.clone(),
            step,
            source,
        };
        match umount2(&path, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (a crash between create and bind).
            Ok(()) | Err(Errno::ENOENT) | Err(Errno::EINVAL) => {}
            Err(e) => return Err(err("umount", nix_io(e))),
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err("unlink", e)),
        }
    })
    .await
}

/// Indexes of every `/run/netns/wrenn-ns-<n>`.
pub(crate) fn list_slots() -> Result<Vec<SlotIndex>, SlotError> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(SlotError::Netns {
                name: NETNS_DIR.into(),
                step: "list",
                source: e,
            })
        }
    };
    let mut out: Vec<SlotIndex> = entries
        .filter_map(Result::ok)
        .filter_map(|e| parse_index(e.file_name().to_str()?, NETNS_PREFIX))
        .collect();
    out.sort();
    Ok(out)
}
