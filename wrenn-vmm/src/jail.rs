//! The VMM jail, after Firecracker's jailer: every QEMU runs
//!
//! - as a user of its own (a uid leased from a configured range, the jail group,
//!   no supplementary groups), so a VMM cannot signal, trace or read another;
//! - in a mount namespace of its own whose root is an empty read-only tmpfs
//!   holding only what this VMM needs, at the paths the host uses: `/usr` (its
//!   binary and libraries, read-only), its kernel and disk chain (read-only), its
//!   writable disk layer and memory file, its console pipe, and `null`, `zero`,
//!   `urandom` (plus `kvm`, owned by its uid, when it uses KVM) under `/dev`, and
//!   a `/proc` showing its own process only;
//! - with no capabilities and `no_new_privs` (see `qemu::process`).
//!
//! The data directory of other capsules, templates and snapshots is not visible.
//! Files shared by many VMMs (kernel, template and snapshot disk layers) are
//! made readable by the jail group; files of one VMM are owned by its uid. A
//! shared memory image is never a file the VMM could write: see [`SealedImages`].
//!
//! Everything that runs between fork and exec ([`Plan::enter`]) is prepared
//! beforehand, so the child only makes system calls on ready-made C strings.

use crate::qemu::guestmem::FileId;
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The default uid range and group of jailed VMMs (far above login and
/// container sub-uid ranges).
pub const DEFAULT_FIRST_UID: u32 = 990_000;
pub const DEFAULT_UIDS: u32 = 10_000;
pub const DEFAULT_GID: u32 = 990_000;

/// Pages of memory images.
const PAGE: usize = 4096;
/// Where uid leases are locked, machine-wide (per boot).
pub const LOCK_DIR: &str = "/run/wrenn/jail-uids";
/// How long a sealed memory image no VMM uses is kept.
const IMAGE_IDLE: Duration = Duration::from_secs(600);
/// How long sealing a memory image's copy waits out page references.
const SEAL_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "The VMM jail needs root (it changes users and mounts); run as root or disable the jail"
    )]
    NotRoot,
    #[error("Bad jail uid range {0:?}: expected FIRST-LAST, e.g. 990000-999999, not including 0")]
    BadRange(String),
    #[error("All {count} jail uids from {first} are in use")]
    Exhausted { first: u32, count: u32 },
    #[error("Cannot prepare {path} for the jail")]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is outside the directories a VMM may be given ({allowed})")]
    Outside { path: PathBuf, allowed: String },
}

/// Maps an I/O error on `path` to [`JailError::Prepare`].
pub(crate) fn prepare(path: &Path) -> impl FnOnce(io::Error) -> JailError + '_ {
    move |source| JailError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}

/// Which uids and group jailed VMMs run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    pub first_uid: u32,
    pub uids: u32,
    pub gid: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            first_uid: DEFAULT_FIRST_UID,
            uids: DEFAULT_UIDS,
            gid: DEFAULT_GID,
        }
    }
}

impl JailConfig {
    /// `FIRST-LAST` (inclusive); the group is `FIRST`.
    pub fn parse_range(s: &str) -> Result<Self, JailError> {
        let bad = || JailError::BadRange(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first || last == u32::MAX {
            return Err(bad());
        }
        Ok(JailConfig {
            first_uid: first,
            uids: last - first + 1,
            gid: first,
        })
    }
}

/// The jail of a host: its uid leases and sealed memory images.
#[derive(Debug)]
pub struct Jail {
    config: JailConfig,
    /// Where shared VMM inputs may live (the data directory).
    roots: Vec<PathBuf>,
    used: Mutex<BTreeSet<u32>>,
    images: SealedImages,
}

impl Jail {
    /// `roots`: the directories files shared by VMMs (kernels, template and
    /// snapshot disks) may live in; a disk chain leading elsewhere is refused.
    pub fn new(config: JailConfig, roots: &[PathBuf]) -> Result<Arc<Self>, JailError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(JailError::NotRoot);
        }
        let roots = roots
            .iter()
            .map(|r| r.canonicalize().map_err(prepare(r)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Jail {
            config,
            roots,
            used: Mutex::new(BTreeSet::new()),
            images: SealedImages::default(),
        }))
    }

    pub fn roots(&self) -> Vec<&Path> {
        self.roots.iter().map(PathBuf::as_path).collect()
    }

    pub fn config(&self) -> &JailConfig {
        &self.config
    }

    pub fn describe(&self) -> String {
        format!(
            "uids {}-{}, group {}, own mount namespace, no capabilities",
            self.config.first_uid,
            self.config.first_uid + (self.config.uids - 1),
            self.config.gid
        )
    }

    /// A uid no other live VMM of this machine runs as: besides this jail's own
    /// leases, each uid is locked (`flock`) in [`LOCK_DIR`] for as long as its VMM
    /// lives, so several Wrenn processes on one machine never share one.
    pub fn lease(self: &Arc<Self>) -> Result<UidLease, JailError> {
        let first = self.config.first_uid;
        // A VMM that outlived the process that leased its uid (a host agent killed
        // and not restarted yet) holds no lock any more, but still runs as that uid.
        let running = uids_running();
        for uid in first..first + self.config.uids {
            if running.contains(&uid) {
                continue;
            }
            if let Some(lease) = self.try_lease(uid)? {
                return Ok(lease);
            }
        }
        Err(JailError::Exhausted {
            first,
            count: self.config.uids,
        })
    }

    /// Leases `uid` itself: the uid a running VMM taken over from an earlier process
    /// of this host runs as (that process's lock went with it; [`Jail::lease`] skips
    /// uids that processes run as, so no other VMM got it meanwhile).
    pub fn lease_uid(self: &Arc<Self>, uid: u32) -> Result<UidLease, JailError> {
        let first = self.config.first_uid;
        let held = |why: &str| JailError::Prepare {
            path: Path::new(LOCK_DIR).join(uid.to_string()),
            source: std::io::Error::other(format!("uid {uid} {why}")),
        };
        if !(first..first + self.config.uids).contains(&uid) {
            return Err(held("is not one of this jail's"));
        }
        self.try_lease(uid)?
            .ok_or_else(|| held("is held by another VMM"))
    }

    /// Locks `uid` for a VMM; `None` when it is taken.
    fn try_lease(self: &Arc<Self>, uid: u32) -> Result<Option<UidLease>, JailError> {
        let dir = Path::new(LOCK_DIR);
        std::fs::create_dir_all(dir).map_err(prepare(dir))?;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.contains(&uid) {
            return Ok(None);
        }
        let path = dir.join(uid.to_string());
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(prepare(&path))?;
        match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                used.insert(uid);
                Ok(Some(UidLease {
                    jail: self.clone(),
                    uid,
                    _lock: lock,
                }))
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(JailError::Prepare {
                path,
                source: e.into(),
            }),
        }
    }

    pub fn images(&self) -> &SealedImages {
        &self.images
    }

    /// Makes `path` (a file shared by VMMs, read-only to them) readable by the
    /// jail group. Only files under `allowed` are touched.
    pub fn share_read_only(&self, path: &Path, allowed: &[&Path]) -> Result<(), JailError> {
        let real = path.canonicalize().map_err(prepare(path))?;
        if !allowed.iter().any(|a| real.starts_with(a)) {
            return Err(JailError::Outside {
                path: real,
                allowed: allowed
                    .iter()
                    .map(|a| a.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let meta = std::fs::metadata(&real).map_err(prepare(&real))?;
        let mode = meta.mode() & 0o7777;
        let readable = meta.gid() == self.config.gid && mode & 0o040 != 0;
        let world = mode & 0o004 != 0;
        // A layer a VMM once wrote (its uid's) becomes root's when it is shared:
        // a later VMM leasing that uid owns nothing it did not get for itself.
        if meta.uid() != 0 || (!readable && !world) {
            std::os::unix::fs::chown(&real, Some(0), Some(self.config.gid))
                .map_err(prepare(&real))?;
            std::fs::set_permissions(
                &real,
                std::fs::Permissions::from_mode((mode | 0o040) & !0o022),
            )
            .map_err(prepare(&real))?;
        }
        Ok(())
    }

    /// Gives `path` (a file of one VMM) to its uid, readable and writable by it alone.
    pub fn own(&self, path: &Path, uid: u32) -> Result<(), JailError> {
        std::os::unix::fs::chown(path, Some(uid), Some(self.config.gid)).map_err(prepare(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(prepare(path))
    }
}

/// The real uids of the processes running on this machine.
fn uids_running() -> BTreeSet<u32> {
    let mut uids = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return uids;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if let Some(uid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
        {
            uids.insert(uid);
        }
    }
    uids
}

/// A uid held by one VMM until it exits.
#[derive(Debug)]
pub struct UidLease {
    jail: Arc<Jail>,
    uid: u32,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.jail.config.gid
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let mut used = self.jail.used.lock().unwrap_or_else(|p| p.into_inner());
        used.remove(&self.uid);
    }
}

/// The files of a disk image and its backing chain (from the qcow2 headers; the
/// writable layer's header is Wrenn's own: every start makes a new one).
pub use wrenn_storage::qcow2::disk_chain;

/// Memory images shared by many VMMs (a template's or fork parent's RAM), held
/// in sealed memfds: QEMU 7.2 opens its memory file read-write even for a
/// private mapping, so a shared image must be something no VMM can write. A
/// sealed memfd opens read-write, maps privately (copy-on-write, like the
/// file), and refuses every write, resize and new seal. Holes stay holes. The
/// VMM inherits the memfd and opens it as `/proc/self/fd/N`.
#[derive(Debug, Default)]
pub struct SealedImages {
    cache: Mutex<HashMap<(u64, u64, i64, u64), CachedImage>>,
}

#[derive(Debug)]
struct CachedImage {
    image: Arc<SealedImage>,
    used: Instant,
}

/// One sealed copy of a memory image.
#[derive(Debug)]
pub struct SealedImage {
    fd: OwnedFd,
    id: FileId,
}

impl SealedImage {
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// How its mapping shows in `/proc/<pid>/maps`.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// Copies the data extents of `path` into a new memfd and seals it.
    fn load(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::FileExt;
        let src = std::fs::File::open(path)?;
        let len = src.metadata()?.len();
        let dst = sealable_memfd(c"wrenn-memory")?;
        dst.set_len(len)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos: u64 = 0;
        while pos < len {
            let Some(data) = seek(&src, pos, libc::SEEK_DATA)? else {
                break;
            };
            let hole = seek(&src, data, libc::SEEK_HOLE)?.unwrap_or(len);
            let mut at = data;
            while at < hole {
                let n = (buf.len() as u64).min(hole - at) as usize;
                src.read_exact_at(&mut buf[..n], at)?;
                // Runs of non-zero pages only: zero pages stay holes.
                let mut run: Option<usize> = None;
                for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                    let zero = page.iter().all(|b| *b == 0);
                    match (zero, run) {
                        (false, None) => run = Some(i * PAGE),
                        (true, Some(from)) => {
                            dst.write_all_at(&buf[from..i * PAGE], at + from as u64)?;
                            run = None;
                        }
                        _ => {}
                    }
                }
                if let Some(from) = run {
                    dst.write_all_at(&buf[from..n], at + from as u64)?;
                }
                at += n as u64;
            }
            pos = hole;
        }
        seal(&dst, SEAL_PATIENCE)?;
        let id = FileId::of(&dst.metadata()?);
        Ok(SealedImage { fd: dst.into(), id })
    }
}

/// A new, empty memfd that can be sealed.
fn sealable_memfd(name: &std::ffi::CStr) -> io::Result<std::fs::File> {
    // SAFETY: a NUL-terminated name that outlives the call; the returned fd is
    // owned below.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
}

/// Seals a memfd against writes, resizes and further seals.
///
/// The kernel grants the write seal only when no page of the file carries a
/// reference besides its mappings: one being migrated or compacted, or one
/// spliced into a pipe. It waits about 150 ms for such references to go, then
/// fails with `EBUSY`. They are transient, and nothing else holds this new
/// memfd, so sealing is tried again, backing off, until `patience` has passed.
fn seal(file: &std::fs::File, patience: Duration) -> io::Result<()> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        // SAFETY: F_ADD_SEALS takes an integer argument on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } == 0 {
            if attempt > 1 {
                tracing::info!(attempt, "memory image sealed once its pages were released");
            }
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
        if start.elapsed() >= patience {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "the memory image's copy could not be sealed: its pages stayed \
                     referenced for {:.1} s ({attempt} attempts)",
                    start.elapsed().as_secs_f64()
                ),
            ));
        }
        tracing::debug!(
            attempt,
            "memory image pages still referenced; sealing again"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// `lseek` for SEEK_DATA/SEEK_HOLE: `None` when there is no more data.
fn seek(f: &std::fs::File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an fd we own, plain integers.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

impl SealedImages {
    /// The sealed copy of `path`, loaded on first use (blocking: call off the
    /// async workers). Copies no VMM has used for a while are dropped.
    pub fn get(&self, path: &Path) -> io::Result<Arc<SealedImage>> {
        let meta = std::fs::metadata(path)?;
        let key = (meta.dev(), meta.ino(), meta.mtime(), meta.len());
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            cache.retain(|_, c| {
                Arc::strong_count(&c.image) > 1 || now.duration_since(c.used) < IMAGE_IDLE
            });
            if let Some(c) = cache.get_mut(&key) {
                c.used = now;
                return Ok(c.image.clone());
            }
        }
        let image = Arc::new(SealedImage::load(path)?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.entry(key).or_insert_with(|| CachedImage {
            image: image.clone(),
            used: Instant::now(),
        });
        Ok(entry.image.clone())
    }

    /// How many images are held (for diagnostics and tests).
    pub fn len(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One step of building the jail's root, on paths already joined to the root.
#[derive(Debug)]
enum Op {
    Dir(CString),
    /// An empty file to bind a file onto.
    FilePoint(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        recursive: bool,
        /// Flags of the read-only/nosuid remount that follows the bind.
        remount: libc::c_ulong,
    },
    Device {
        path: CString,
        mode: libc::mode_t,
        dev: libc::dev_t,
        owner: Option<(u32, u32)>,
    },
    Proc(CString),
}

/// What a jailed VMM sees, built in the parent.
#[derive(Debug)]
pub struct PlanBuilder {
    root: PathBuf,
    dirs: BTreeSet<PathBuf>,
    /// Paths already bound (a file shared by two drives is bound once).
    bound: BTreeSet<PathBuf>,
    ops: Vec<Op>,
    uid: u32,
    gid: u32,
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Prepare {
        path: p.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"),
    })
}

/// Read-only bind of guest data: no devices, no set-uid, no execution.
const DATA_RO: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
const DATA_RW: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

impl PlanBuilder {
    /// `root`: an empty directory the jail's tmpfs is mounted on (in the VMM's
    /// namespace only).
    pub fn new(root: &Path, lease: &UidLease) -> Self {
        PlanBuilder {
            root: root.to_path_buf(),
            dirs: BTreeSet::new(),
            bound: BTreeSet::new(),
            ops: Vec::new(),
            uid: lease.uid(),
            gid: lease.gid(),
        }
    }

    fn inside(&self, at: &Path) -> PathBuf {
        self.root.join(at.strip_prefix("/").unwrap_or(at))
    }

    fn parents(&mut self, at: &Path) -> Result<(), JailError> {
        let mut chain: Vec<&Path> = at.ancestors().skip(1).collect();
        chain.reverse();
        for dir in chain {
            if dir == Path::new("/") || dir.as_os_str().is_empty() {
                continue;
            }
            if self.dirs.insert(dir.to_path_buf()) {
                let p = cstr(&self.inside(dir))?;
                self.ops.push(Op::Dir(p));
            }
        }
        Ok(())
    }

    fn bind(&mut self, src: &Path, at: &Path, remount: libc::c_ulong) -> Result<(), JailError> {
        if !self.bound.insert(at.to_path_buf()) {
            return Ok(());
        }
        let meta = std::fs::metadata(src).map_err(prepare(src))?;
        self.parents(at)?;
        let dst = cstr(&self.inside(at))?;
        if meta.is_dir() {
            if self.dirs.insert(at.to_path_buf()) {
                self.ops.push(Op::Dir(dst.clone()));
            }
        } else {
            self.ops.push(Op::FilePoint(dst.clone()));
        }
        self.ops.push(Op::Bind {
            src: cstr(src)?,
            dst,
            recursive: meta.is_dir(),
            remount,
        });
        Ok(())
    }

    /// A file the VMM reads, at the same path.
    pub fn read_only(&mut self, path: &Path) -> Result<(), JailError> {
        self.bind(path, path, DATA_RO)
    }

    /// A file the VMM writes (owned by its uid), at the same path.
    pub fn read_write(&mut self, path: &Path) -> Result<(), JailError> {
        self.bind(path, path, DATA_RW)
    }

    /// `/proc` showing this VMM's own processes only (`hidepid=invisible`; each
    /// VMM has a uid of its own) and no system entries (`subset=pid`): QEMU
    /// opens a sealed memory image it inherited as `/proc/self/fd/N`.
    pub fn own_proc(&mut self) -> Result<(), JailError> {
        let at = cstr(&self.inside(Path::new("/proc")))?;
        if self.dirs.insert(PathBuf::from("/proc")) {
            self.ops.push(Op::Dir(at.clone()));
        }
        self.ops.push(Op::Proc(at));
        Ok(())
    }

    /// The system: `/usr` read-only (binaries, libraries, firmware), the
    /// top-level links into it (`/lib64` → `usr/lib64`, ...), the loader cache,
    /// the VMM binary if it lives elsewhere, and the devices a VMM needs.
    pub fn system(&mut self, binary: &Path, kvm: bool) -> Result<(), JailError> {
        self.bind(
            Path::new("/usr"),
            Path::new("/usr"),
            libc::MS_RDONLY | libc::MS_NOSUID,
        )?;
        if let Ok(rd) = std::fs::read_dir("/") {
            for e in rd.flatten() {
                let p = e.path();
                if let Ok(target) = std::fs::read_link(&p) {
                    if target.starts_with("usr") || target.starts_with("/usr") {
                        self.ops.push(Op::Symlink {
                            target: cstr(&target)?,
                            link: cstr(&self.inside(&p))?,
                        });
                    }
                }
            }
        }
        let cache = Path::new("/etc/ld.so.cache");
        if cache.is_file() {
            self.bind(cache, cache, DATA_RO)?;
        }
        if !binary.starts_with("/usr") {
            self.bind(
                binary,
                binary,
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            )?;
        }
        self.parents(Path::new("/dev/null"))?;
        for (name, major, minor) in [("null", 1, 3), ("zero", 1, 5), ("urandom", 1, 9)] {
            self.ops.push(Op::Device {
                path: cstr(&self.inside(&Path::new("/dev").join(name)))?,
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(major, minor),
                owner: None,
            });
        }
        if kvm {
            let meta = std::fs::metadata("/dev/kvm").map_err(prepare(Path::new("/dev/kvm")))?;
            self.ops.push(Op::Device {
                path: cstr(&self.inside(Path::new("/dev/kvm")))?,
                mode: libc::S_IFCHR | 0o600,
                dev: meta.rdev(),
                owner: Some((self.uid, self.gid)),
            });
        }
        Ok(())
    }

    pub fn build(self) -> Result<Plan, JailError> {
        Ok(Plan {
            root: cstr(&self.root)?,
            ops: self.ops,
            uid: self.uid,
            gid: self.gid,
        })
    }
}

/// A jail ready to enter between fork and exec.
#[derive(Debug)]
pub struct Plan {
    root: CString,
    ops: Vec<Op>,
    uid: u32,
    gid: u32,
}

/// `-1` → the last OS error.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Plan {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Mount namespace and root: for a forked child before exec, as root. Only
    /// system calls on strings prepared before the fork; no allocation.
    pub fn enter_mounts(&self) -> io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string owned by `self` (alive
        // across the calls) or null where the call allows null; the calls only
        // change this process's mount namespace and root.
        unsafe {
            // The modes below are meant as written (the server runs with umask 077).
            libc::umask(0);
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"wrenn-jail".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755,size=1m,nr_inodes=4096".as_ptr().cast(),
            ))?;
            for op in &self.ops {
                match op {
                    Op::Dir(p) => {
                        if libc::mkdir(p.as_ptr(), 0o755) != 0
                            && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                        {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Op::FilePoint(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        );
                        check(fd)?;
                        libc::close(fd);
                    }
                    Op::Symlink { target, link } => {
                        check(libc::symlink(target.as_ptr(), link.as_ptr()))?;
                    }
                    Op::Bind {
                        src,
                        dst,
                        recursive,
                        remount,
                    } => {
                        let rec = if *recursive { libc::MS_REC } else { 0 };
                        check(libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            none,
                            libc::MS_BIND | rec,
                            std::ptr::null(),
                        ))?;
                        check(libc::mount(
                            none,
                            dst.as_ptr(),
                            none,
                            libc::MS_BIND | libc::MS_REMOUNT | remount,
                            std::ptr::null(),
                        ))?;
                    }
                    Op::Proc(at) => {
                        check(libc::mount(
                            c"proc".as_ptr(),
                            at.as_ptr(),
                            c"proc".as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            c"hidepid=invisible,subset=pid".as_ptr().cast(),
                        ))?;
                    }
                    Op::Device {
                        path,
                        mode,
                        dev,
                        owner,
                    } => {
                        check(libc::mknod(path.as_ptr(), *mode, *dev))?;
                        if let Some((uid, gid)) = owner {
                            check(libc::chown(path.as_ptr(), *uid, *gid))?;
                        }
                    }
                }
            }
            // The tmpfs becomes `/`; the host's tree is detached from this namespace.
            check(libc::chdir(self.root.as_ptr()))?;
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ))?;
            libc::umask(0o077);
        }
        Ok(())
    }

    /// Becomes the jail user: no supplementary groups, the jail group, the
    /// leased uid (which also empties the permitted and effective capabilities).
    pub fn enter_user(&self) -> io::Result<()> {
        // SAFETY: plain integer arguments; a null list with length 0.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memfd of one written page, and a pipe holding a reference to that
    /// page (spliced, not copied), as a page under migration would.
    fn memfd_with_a_referenced_page() -> (std::fs::File, OwnedFd, OwnedFd) {
        use std::os::unix::fs::FileExt;
        let file = sealable_memfd(c"seal-test").expect("memfd_create");
        file.write_all_at(&[7u8; PAGE], 0).expect("write");
        let (rx, tx) = nix::unistd::pipe().expect("pipe");
        let mut off: libc::loff_t = 0;
        // SAFETY: valid fds we own, a valid offset pointer, a null output offset
        // (pipes have none).
        let n = unsafe {
            libc::splice(
                file.as_raw_fd(),
                &mut off,
                tx.as_raw_fd(),
                std::ptr::null_mut(),
                PAGE,
                0,
            )
        };
        assert_eq!(n, PAGE as isize, "splice: {}", io::Error::last_os_error());
        (file, rx, tx)
    }

    #[test]
    fn sealing_waits_until_a_page_reference_is_released() {
        let (file, rx, _tx) = memfd_with_a_referenced_page();
        // One attempt is refused: the kernel gives up after ~150 ms.
        let e = seal(&file, Duration::ZERO).expect_err("refused while referenced");
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
        // The pipe lets go 500 ms after the patient attempt starts.
        let (go, started) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            started.recv().expect("started");
            std::thread::sleep(Duration::from_millis(500));
            let mut buf = [0u8; PAGE];
            nix::unistd::read(rx.as_raw_fd(), &mut buf).expect("drain")
        });
        go.send(()).expect("go");
        seal(&file, Duration::from_secs(20)).expect("sealed once released");
        assert_eq!(reader.join().expect("reader"), PAGE);
        // SAFETY: F_GET_SEALS on an fd we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & libc::F_SEAL_WRITE, libc::F_SEAL_WRITE);
        use std::os::unix::fs::FileExt;
        let e = file.write_at(b"x", 0).expect_err("sealed against writes");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn sealing_gives_up_on_a_reference_that_stays() {
        let (file, _rx, _tx) = memfd_with_a_referenced_page();
        let e = seal(&file, Duration::from_millis(300)).expect_err("still referenced");
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
        assert!(e.to_string().contains("could not be sealed"), "{e}");
    }

    #[test]
    fn ranges_parse() {
        let c = JailConfig::parse_range("990000-990009").expect("range");
        assert_eq!((c.first_uid, c.uids, c.gid), (990_000, 10, 990_000));
        for bad in ["", "5", "0-10", "10-5", "a-b", "1-4294967295"] {
            assert!(JailConfig::parse_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn leases_are_unique_and_returned() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED leases_are_unique_and_returned: needs root");
            return;
        }
        // A range of its own, apart from capsules other tests run.
        let jail = Jail::new(
            JailConfig {
                first_uid: 980_000 + std::process::id() % 10_000 * 2,
                uids: 2,
                gid: 980_000,
            },
            &[],
        )
        .expect("jail");
        let a = jail.lease().expect("a");
        let b = jail.lease().expect("b");
        assert_ne!(a.uid(), b.uid());
        assert!(matches!(jail.lease(), Err(JailError::Exhausted { .. })));
        // Another jail (another process, as far as the lock goes) gets none of them.
        let other = Jail::new(jail.config().clone(), &[]).expect("jail");
        assert!(matches!(other.lease(), Err(JailError::Exhausted { .. })));
        let freed = a.uid();
        drop(a);
        assert_eq!(other.lease().expect("freed").uid(), freed);
    }

    #[test]
    fn a_uid_a_process_runs_as_is_not_leased_without_its_lock() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED a_uid_a_process_runs_as_is_not_leased_without_its_lock: needs root");
            return;
        }
        let first = 970_000 + std::process::id() % 10_000 * 2;
        let jail = Jail::new(
            JailConfig {
                first_uid: first,
                uids: 2,
                gid: 970_000,
            },
            &[],
        )
        .expect("jail");
        // A process runs as the first uid with no lock held (a VMM whose agent died).
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep");
        child.arg("30").uid(first);
        let mut child = child.spawn().expect("sleep as the uid");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !uids_running().contains(&first) {
            assert!(
                std::time::Instant::now() < deadline,
                "the process never ran as {first}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let lease = jail.lease().expect("lease");
        assert_eq!(lease.uid(), first + 1, "the running uid is skipped");
        assert!(matches!(jail.lease(), Err(JailError::Exhausted { .. })));
        // Taking the VMM over leases that very uid.
        let taken = jail.lease_uid(first).expect("taken over");
        assert_eq!(taken.uid(), first);
        assert!(jail.lease_uid(first).is_err(), "held now");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn sealed_images_keep_content_and_refuse_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("memory");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(64 << 20).expect("size");
        std::os::unix::fs::FileExt::write_all_at(&f, b"wrenn", 5 << 20).expect("write");
        let images = SealedImages::default();
        let img = images.get(&path).expect("sealed");
        let again = images.get(&path).expect("cached");
        assert!(Arc::ptr_eq(&img, &again));
        let copy = std::fs::File::from(img.fd().try_clone().expect("dup"));
        assert_eq!(copy.metadata().expect("stat").len(), 64 << 20);
        let mut buf = [0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(&copy, &mut buf, 5 << 20).expect("read");
        assert_eq!(&buf, b"wrenn");
        let e = std::os::unix::fs::FileExt::write_all_at(&copy, b"x", 0).expect_err("sealed");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(copy.set_len(1).is_err());
        // Sparse: only the one written page is held.
        let blocks = copy.metadata().expect("stat").blocks();
        assert!(blocks * 512 <= 1 << 20, "{blocks} blocks");
    }
}
