//! Starting, watching and stopping QEMU processes.
//!
//! QEMU children are started from one long-lived spawner thread with a
//! parent-death signal (so they die with the process that owns them, and the
//! thread that spawned them never exits early), in their own process group, inside
//! the capsule's network namespace, tagged `-name wrenn-<id>` so a sweep can find
//! orphans. Each child is reaped by a waiter thread that publishes its exit.

use super::argv::{build_argv, StartMode, MEM_FD, QMP_FD, QMP_SOCKET, RAM_BLOCK, TAP_FD};
use super::guestmem::{self, FileId};
use super::migstream;
use super::qmp::{Qmp, QmpCommand};
use super::QemuError;
use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{oneshot, watch, Mutex};
use wrenn_core::vmm::{
    Accel, ChangedPages, MemoryBase, PageOverlay, SavedState, VmSpec, Vmm, VmmError, VmmHandle,
};

/// How long QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Bounded waits of the stop sequence.
const QUIT_WAIT: Duration = Duration::from_secs(3);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Backend settings.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub accel: Accel,
    /// TCG translation cache size; small keeps per-VM memory low.
    pub tb_size_mb: Option<u32>,
    /// Size of each of the two serial console log files (`console.log`, `console.log.1`).
    pub console_log_cap: u64,
    /// Confine every VMM in a cgroup of its own (`None`: no limits, for tests of
    /// the VMM alone).
    pub cgroups: Option<std::sync::Arc<crate::cgroup::Pool>>,
    /// Run every VMM jailed (own uid, mount namespace; see [`crate::jail`]).
    pub jail: Option<std::sync::Arc<crate::jail::Jail>>,
    /// VMMs keep running when the process that started them dies (a host agent that
    /// takes them over when it restarts, [`Vmm::attach`]); otherwise they die with it.
    pub outlive_owner: bool,
}

/// Memory a VMM may use beyond its guest's RAM: QEMU's own heap, thread stacks,
/// device state and page tables, measured at 40-60 MiB for an idle microvm
/// (`cargo bench --bench isolation` prints the current figure), with headroom.
pub const VMM_OVERHEAD_MB: u64 = 96;
/// Threads one VMM may run (vCPUs, I/O and RCU threads, the migration helper).
pub const VMM_PIDS_MAX: u64 = 128;
/// I/O weight of every VMM (the default; equal shares).
pub const VMM_IO_WEIGHT: u16 = 100;

/// The cgroup limits of a VMM running `spec` (TCG also holds its translation cache).
pub fn vmm_limits(spec: &VmSpec, tb_size_mb: Option<u32>, accel: Accel) -> crate::cgroup::Limits {
    let tb = match accel {
        Accel::Tcg => u64::from(tb_size_mb.unwrap_or(1024)),
        Accel::Kvm => 0,
    };
    crate::cgroup::Limits {
        memory_bytes: (u64::from(spec.machine.memory_mb) + VMM_OVERHEAD_MB + tb) << 20,
        cpu_quota_us: u64::from(spec.machine.vcpus.max(1)) * crate::cgroup::CPU_PERIOD_US,
        pids: VMM_PIDS_MAX,
        io_weight: VMM_IO_WEIGHT,
    }
}

impl QemuConfig {
    pub fn new(accel: Accel) -> Self {
        QemuConfig {
            binary: default_binary(),
            accel,
            // 32 MiB of translated code is plenty for a capsule and keeps idle clones small.
            tb_size_mb: Some(32),
            console_log_cap: super::console::DEFAULT_CONSOLE_CAP,
            cgroups: None,
            jail: None,
            outlive_owner: false,
        }
    }
}

/// `WRENN_QEMU`, or `qemu-system-x86_64` on PATH (as an absolute path when found).
pub fn default_binary() -> PathBuf {
    std::env::var_os("WRENN_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| resolve_binary(Path::new("qemu-system-x86_64")))
}

/// The QEMU [`Vmm`].
#[derive(Debug)]
pub struct QemuVmm {
    config: QemuConfig,
}

impl QemuVmm {
    pub fn new(config: QemuConfig) -> Self {
        QemuVmm { config }
    }
}

type SpawnJob = (Command, std_mpsc::Sender<std::io::Result<Child>>);

/// The one thread every QEMU child is spawned from; it lives as long as the
/// process, so the children's parent-death signal fires only when the process dies.
fn spawner() -> &'static std_mpsc::Sender<SpawnJob> {
    static SPAWNER: OnceLock<std_mpsc::Sender<SpawnJob>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnJob>();
        let spawned = std::thread::Builder::new()
            .name("wrenn-vmm-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the VMM spawner thread");
        }
        tx
    })
}

async fn spawn_on_spawner(cmd: Command) -> std::io::Result<Child> {
    let (tx, rx) = std_mpsc::channel();
    spawner()
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("VMM spawner thread is gone"))?;
    tokio::task::spawn_blocking(move || {
        rx.recv()
            .map_err(|_| std::io::Error::other("VMM spawner thread is gone"))?
    })
    .await
    .map_err(std::io::Error::other)?
}

fn describe_exit(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "exited".to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].trim().to_string()
}

/// The binary as an absolute path (a jailed VMM cannot search the host's PATH);
/// a path already is one, and is returned at once.
fn resolve_binary(binary: &Path) -> PathBuf {
    if binary.is_absolute() || binary.components().count() > 1 {
        return binary.to_path_buf();
    }
    binary
        .to_str()
        .and_then(wrenn_storage::find_on_path)
        .and_then(|p| p.canonicalize().ok())
        .unwrap_or_else(|| binary.to_path_buf())
}

/// What a jailed VMM holds until it exits, and its plan.
struct Jailed {
    lease: crate::jail::UidLease,
    image: Option<std::sync::Arc<crate::jail::SealedImage>>,
    plan: std::sync::Arc<crate::jail::Plan>,
}

/// Leases a uid, gives the VMM's own files to it, makes shared inputs readable
/// by the jail group, seals a shared memory image and lays out the mount plan.
/// Blocking (file metadata, a memory copy on first use of an image).
fn prepare_jail(
    jail: &std::sync::Arc<crate::jail::Jail>,
    spec: &VmSpec,
    mem_path: &Path,
    binary: &Path,
    accel: Accel,
) -> Result<Jailed, crate::jail::JailError> {
    use crate::jail::{disk_chain, prepare as io, PlanBuilder};
    let lease = jail.lease()?;
    let uid = lease.uid();
    let root = spec.run_dir.join("jail");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let roots = jail.roots();
    let mut plan = PlanBuilder::new(&root, &lease);
    plan.system(binary, accel == Accel::Kvm)?;
    jail.share_read_only(&spec.boot.kernel, &roots)?;
    plan.read_only(&spec.boot.kernel)?;
    for d in &spec.drives {
        let chain = disk_chain(&d.path).map_err(io(&d.path))?;
        for (i, file) in chain.iter().enumerate() {
            if i == 0 && !d.read_only {
                jail.own(file, uid)?;
                plan.read_write(file)?;
            } else {
                jail.share_read_only(file, &roots)?;
                plan.read_only(file)?;
            }
        }
    }
    let image = match &spec.memory {
        MemoryBase::File(p) => {
            plan.own_proc()?;
            Some(jail.images().get(p).map_err(io(p))?)
        }
        MemoryBase::Zero => {
            jail.own(mem_path, uid)?;
            plan.read_write(mem_path)?;
            None
        }
    };
    let console = spec.run_dir.join(super::console::CONSOLE_PIPE);
    jail.own(&console, uid)?;
    plan.read_write(&console)?;
    Ok(Jailed {
        lease,
        image,
        plan: std::sync::Arc::new(plan.build()?),
    })
}

#[async_trait]
impl Vmm for QemuVmm {
    fn accel(&self) -> Accel {
        self.config.accel
    }

    async fn spawn(&self, spec: &VmSpec) -> Result<Box<dyn VmmHandle>, VmmError> {
        Ok(Box::new(
            QemuHandle::start(&self.config, spec, StartMode::Boot).await?,
        ))
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        device_state: &Path,
        overlay: Arc<dyn PageOverlay>,
    ) -> Result<Box<dyn VmmHandle>, VmmError> {
        let handle = QemuHandle::start(&self.config, spec, StartMode::Incoming).await?;
        match handle.load(device_state, overlay).await {
            Ok(()) => Ok(Box::new(handle)),
            Err(e) => {
                let _ = handle.shutdown().await;
                Err(e.into())
            }
        }
    }

    async fn attach(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn VmmHandle>, VmmError> {
        Ok(Box::new(QemuHandle::attach(&self.config, spec, pid).await?))
    }
}

/// Blocks until process `pid`, which is not a child of this process, has exited.
fn wait_foreign_exit(pid: u32) -> std::io::Result<()> {
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(()),
            _ => Err(e),
        };
    }
    let Ok(fd) = i32::try_from(fd) else {
        return Err(std::io::Error::other(
            "pidfd_open returned an invalid descriptor",
        ));
    };
    // SAFETY: `fd` was just returned by pidfd_open; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `poll` is one valid pollfd that lives across the call.
        if unsafe { libc::poll(&mut poll, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The real uid process `pid` runs as.
fn uid_of(pid: u32) -> std::io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other("no Uid in /proc/<pid>/status"))
}

/// One running QEMU.
#[derive(Debug)]
pub struct QemuHandle {
    pid: u32,
    exit: watch::Receiver<Option<String>>,
    qmp: Mutex<Option<Qmp>>,
    qmp_path: PathBuf,
    run_dir: PathBuf,
    /// The file guest RAM is a private mapping of, as QEMU names it, and its
    /// identity in the process's maps (a sealed copy's when jailed).
    mem_path: PathBuf,
    mem_id: FileId,
    mem_bytes: u64,
    /// Drains the serial console into its capped log.
    console: super::console::ConsoleLog,
    /// The VMM's cgroup (removed by the waiter once QEMU has exited).
    cgroup: Option<std::sync::Arc<crate::cgroup::Cgroup>>,
}

/// How long loading or saving device state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

impl QemuHandle {
    pub async fn start(
        config: &QemuConfig,
        spec: &VmSpec,
        mode: StartMode,
    ) -> Result<Self, QemuError> {
        std::fs::create_dir_all(&spec.run_dir).map_err(|source| QemuError::RunDir {
            path: spec.run_dir.clone(),
            source,
        })?;
        let mem_bytes = u64::from(spec.machine.memory_mb) * 1024 * 1024;
        let mem_path = match &spec.memory {
            MemoryBase::File(p) => p.clone(),
            MemoryBase::Zero => {
                // A sparse file of zeros: mapped privately, it reads as zeros and
                // costs nothing until the guest writes.
                let p = spec.run_dir.join("memory.zero");
                let f = std::fs::File::create(&p).map_err(|source| QemuError::RunDir {
                    path: p.clone(),
                    source,
                })?;
                f.set_len(mem_bytes).map_err(|source| QemuError::RunDir {
                    path: p.clone(),
                    source,
                })?;
                p
            }
        };
        let qmp_path = spec.run_dir.join(QMP_SOCKET);
        let _ = std::fs::remove_file(&qmp_path);
        // The host makes QMP's listening socket and hands it over: QEMU needs no
        // right to create files.
        let qmp_listener: OwnedFd = std::os::unix::net::UnixListener::bind(&qmp_path)
            .map_err(|source| QemuError::RunDir {
                path: qmp_path.clone(),
                source,
            })?
            .into();
        let log_path = spec.run_dir.join("qemu.log");
        let log = std::fs::File::create(&log_path).map_err(|source| QemuError::RunDir {
            path: log_path.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| QemuError::RunDir {
            path: log_path.clone(),
            source,
        })?;
        let netns: Option<OwnedFd> = match spec.nets.first() {
            Some(n) => Some(
                std::fs::File::open(&n.netns_path)
                    .map_err(|source| QemuError::OpenNetns {
                        path: n.netns_path.clone(),
                        source,
                    })?
                    .into(),
            ),
            None => None,
        };

        let mut spec = spec.clone();
        // Only a boot calibrates the TSC; a restored guest keeps its calibration.
        if config.accel == Accel::Tcg && mode == StartMode::Boot {
            if let Some(khz) = crate::accel::host_tsc_khz() {
                spec.boot.cmdline.push_str(&format!(" tsc_early_khz={khz}"));
            }
        }
        let spec = &spec;
        let (console, _fifo) =
            super::console::ConsoleLog::start(&spec.run_dir, config.console_log_cap).map_err(
                |source| QemuError::RunDir {
                    path: spec.run_dir.join(super::console::CONSOLE_PIPE),
                    source,
                },
            )?;
        let binary = resolve_binary(&config.binary);
        if spec.nets.len() > MAX_TAPS {
            return Err(QemuError::Spawn {
                binary,
                source: std::io::Error::other(format!("at most {MAX_TAPS} network interfaces")),
            });
        }
        let jailed = match &config.jail {
            Some(jail) => {
                let (jail, spec, mem_path, binary) =
                    (jail.clone(), spec.clone(), mem_path.clone(), binary.clone());
                let accel = config.accel;
                Some(
                    tokio::task::spawn_blocking(move || {
                        prepare_jail(&jail, &spec, &mem_path, &binary, accel)
                    })
                    .await
                    .map_err(|e| {
                        QemuError::Jail(crate::jail::JailError::Prepare {
                            path: PathBuf::from("(jail)"),
                            source: std::io::Error::other(e),
                        })
                    })?
                    .map_err(QemuError::Jail)?,
                )
            }
            None => None,
        };
        let mem_id = match &jailed {
            Some(Jailed {
                image: Some(image), ..
            }) => image.id(),
            _ => FileId::of_path(&mem_path).map_err(|source| QemuError::RunDir {
                path: mem_path.clone(),
                source,
            })?,
        };
        let cgroup = match &config.cgroups {
            Some(pool) => Some(std::sync::Arc::new(
                pool.take(
                    &spec.name,
                    &vmm_limits(spec, config.tb_size_mb, config.accel),
                )
                .map_err(QemuError::Cgroup)?,
            )),
            None => None,
        };
        // Taps are attached here, in the capsule's namespace, and handed to QEMU as
        // descriptors: QEMU runs without the capability to attach them by name.
        let taps: Vec<TapName> = spec.nets.iter().map(|n| tap_name(&n.tap)).collect();
        // A sealed image is inherited as a descriptor and named through /proc.
        let image_fd = jailed
            .as_ref()
            .and_then(|j| j.image.as_ref())
            .map(|i| i.fd().as_raw_fd());
        let qemu_mem_path = match image_fd {
            Some(_) => PathBuf::from(format!("/proc/self/fd/{MEM_FD}")),
            None => mem_path.clone(),
        };
        let mut cmd = Command::new(&binary);
        cmd.args(build_argv(
            spec,
            config.accel,
            config.tb_size_mb,
            &qemu_mem_path,
            mode,
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
        let parent = std::process::id();
        let outlive = config.outlive_owner;
        let plan = jailed.as_ref().map(|j| j.plan.clone());
        // SAFETY: runs in the forked child before exec and only makes system calls
        // (setpgid, prctl, setns, open, ioctl, fcntl, dup2, mount, mknod, pivot_root,
        // set*id) on values prepared before the fork, without allocating.
        unsafe {
            cmd.pre_exec(move || {
                own_group(parent, outlive)?;
                if let Some(fd) = &netns {
                    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                }
                let mut tap_fds = [-1; MAX_TAPS];
                attach_taps(&taps, &mut tap_fds)?;
                if let Some(plan) = &plan {
                    plan.enter_mounts()?;
                }
                let mut wanted = [(-1, -1); MAX_FDS];
                wanted[0] = (qmp_listener.as_raw_fd(), QMP_FD);
                let mut n = 1;
                if let Some(fd) = image_fd {
                    wanted[n] = (fd, MEM_FD);
                    n += 1;
                }
                for (i, fd) in tap_fds[..taps.len()].iter().enumerate() {
                    wanted[n] = (*fd, TAP_FD + i as i32);
                    n += 1;
                }
                place_fds(&wanted[..n])?;
                drop_capabilities()?;
                if let Some(plan) = &plan {
                    plan.enter_user()?;
                    // A change of user clears the parent-death signal: arm it again.
                    own_group(parent, outlive)?;
                }
                Ok(())
            });
        }
        let spawned = spawn_on_spawner(cmd).await;
        let mut child = match spawned {
            Ok(c) => c,
            Err(source) => {
                if let Some(g) = &cgroup {
                    let _ = g.remove();
                }
                return Err(QemuError::Spawn { binary, source });
            }
        };
        let pid = child.id();
        // The VMM joins its cgroup while it initialises; its vCPUs run only once
        // it is in (start waits for both, and a VM starts stopped).
        let joining = cgroup
            .clone()
            .map(|g| tokio::task::spawn_blocking(move || g.attach(pid)));
        let (tx, rx) = watch::channel(None);
        let group = cgroup.clone();
        let held = jailed.map(|j| (j.lease, j.image));
        let waiter = std::thread::Builder::new()
            .name(format!("wrenn-vmm-wait-{pid}"))
            .spawn(move || {
                let status = child.wait();
                if let Some(g) = group {
                    if let Err(e) = g.remove() {
                        tracing::warn!(pid, error = %e, "cannot remove the VMM's cgroup");
                    }
                }
                // The uid and the memory image are free once the VMM is gone.
                drop(held);
                let _ = tx.send(Some(describe_exit(status)));
            });
        if let Err(e) = waiter {
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            return Err(QemuError::Spawn { binary, source: e });
        }
        let mut handle = QemuHandle {
            pid,
            exit: rx,
            qmp: Mutex::new(None),
            qmp_path: qmp_path.clone(),
            run_dir: spec.run_dir.clone(),
            mem_path: mem_path.clone(),
            mem_id,
            mem_bytes,
            console,
            cgroup,
        };
        tracing::debug!(pid, name = %spec.name, accel = %config.accel, jailed = config.jail.is_some(), "qemu started");

        let connected = tokio::select! {
            q = tokio::time::timeout(START_TIMEOUT, Qmp::connect(&qmp_path)) => match q {
                Ok(Ok(q)) => Ok(q),
                Ok(Err(e)) => Err(Some(e)),
                Err(_) => Err(None),
            },
            _ = handle.wait_exited(START_TIMEOUT) => Err(None),
        };
        let qmp = match connected {
            Ok(q) => q,
            Err(e) => {
                // A connection reset usually means QEMU is exiting: report its exit.
                if e.is_some() {
                    handle.wait_exited(Duration::from_secs(2)).await;
                }
                if let Some(status) = handle.exit.borrow().clone() {
                    let mut log_tail = tail(&log_path, 1500);
                    if log_tail.is_empty() {
                        log_tail = tail(&spec.run_dir.join(super::console::CONSOLE_LOG), 1500);
                    }
                    return Err(QemuError::EarlyExit { status, log_tail });
                }
                handle.kill_group();
                return Err(e.unwrap_or(QemuError::QmpTimeout {
                    path: qmp_path,
                    secs: START_TIMEOUT.as_secs(),
                }));
            }
        };
        tracing::debug!(pid, "qmp connected");
        // QEMU opens its chardevs before it serves QMP.
        handle.console.writer_attached();
        handle.qmp = Mutex::new(Some(qmp));
        if let Some(joining) = joining {
            let joined = joining
                .await
                .map_err(|e| {
                    QemuError::Cgroup(crate::cgroup::CgroupError::Io {
                        path: PathBuf::from("cgroup.procs"),
                        step: "attach",
                        source: std::io::Error::other(e),
                    })
                })
                .and_then(|r| r.map_err(QemuError::Cgroup));
            if let Err(e) = joined {
                handle.kill_group();
                return Err(e);
            }
        }
        if mode == StartMode::Boot {
            handle.qmp(&QmpCommand::Cont).await?;
        }
        Ok(handle)
    }

    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Takes over QEMU `pid`, running `spec`, that an earlier process of this host
    /// started (with [`QemuConfig::outlive_owner`]): its uid lease, cgroup, console
    /// drain and QMP connection are this process's from now on.
    pub async fn attach(config: &QemuConfig, spec: &VmSpec, pid: u32) -> Result<Self, QemuError> {
        let io = |path: PathBuf| move |source| QemuError::RunDir { path, source };
        // Ours: the process's command line names this VM's run directory.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(io(PathBuf::from(format!("/proc/{pid}/cmdline"))))?;
        let dir = spec.run_dir.as_os_str().as_encoded_bytes();
        if !cmdline.windows(dir.len()).any(|w| w == dir) {
            return Err(QemuError::RunDir {
                path: spec.run_dir.clone(),
                source: std::io::Error::other(format!("process {pid} is not this VM's QEMU")),
            });
        }
        let lease = match &config.jail {
            Some(jail) => {
                let uid = uid_of(pid).map_err(io(PathBuf::from(format!("/proc/{pid}/status"))))?;
                Some(jail.lease_uid(uid).map_err(QemuError::Jail)?)
            }
            None => None,
        };
        let cgroup = match &config.cgroups {
            Some(pool) => Some(std::sync::Arc::new(
                pool.adopt(&spec.name).map_err(QemuError::Cgroup)?,
            )),
            None => None,
        };
        let mem_bytes = u64::from(spec.machine.memory_mb) * 1024 * 1024;
        let mem_path = match &spec.memory {
            MemoryBase::File(p) => p.clone(),
            MemoryBase::Zero => spec.run_dir.join("memory.zero"),
        };
        // A jailed VMM maps a sealed copy it holds as a descriptor.
        let sealed = PathBuf::from(format!("/proc/{pid}/fd/{MEM_FD}"));
        let mem_id = match FileId::of_path(&sealed) {
            Ok(id) if config.jail.is_some() => id,
            _ => FileId::of_path(&mem_path).map_err(io(mem_path.clone()))?,
        };
        let console = super::console::ConsoleLog::reattach(&spec.run_dir, config.console_log_cap)
            .map_err(io(spec.run_dir.join(super::console::CONSOLE_PIPE)))?;
        let (tx, rx) = watch::channel(None);
        let group = cgroup.clone();
        std::thread::Builder::new()
            .name(format!("wrenn-vmm-wait-{pid}"))
            .spawn(move || {
                let how = match wait_foreign_exit(pid) {
                    Ok(()) => "exited".to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                if let Some(g) = group {
                    if let Err(e) = g.remove() {
                        tracing::warn!(pid, error = %e, "cannot remove the VMM's cgroup");
                    }
                }
                drop(lease);
                let _ = tx.send(Some(how));
            })
            .map_err(io(spec.run_dir.clone()))?;
        let qmp_path = spec.run_dir.join(QMP_SOCKET);
        let qmp = tokio::time::timeout(START_TIMEOUT, Qmp::connect(&qmp_path))
            .await
            .map_err(|_| QemuError::QmpTimeout {
                path: qmp_path.clone(),
                secs: START_TIMEOUT.as_secs(),
            })??;
        tracing::info!(pid, name = %spec.name, "took over a running VMM");
        Ok(QemuHandle {
            pid,
            exit: rx,
            qmp: Mutex::new(Some(qmp)),
            qmp_path,
            run_dir: spec.run_dir.clone(),
            mem_path,
            mem_id,
            mem_bytes,
            console,
            cgroup,
        })
    }

    fn kill_group(&self) {
        if !self.exited() {
            let _ = kill(Pid::from_raw(-(self.pid as i32)), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }

    async fn wait_exited(&self, limit: Duration) -> bool {
        let mut rx = self.exit.clone();
        let done = tokio::time::timeout(limit, rx.wait_for(|v| v.is_some()))
            .await
            .is_ok();
        done
    }

    /// Runs `work(pid, start, len, mem_path)` over the guest RAM mapping in QEMU's
    /// address space (found in its maps, capped at the guest's size) on a blocking
    /// thread: page work through /proc stays off the async workers.
    async fn on_guest_ram<T: Send + 'static>(
        &self,
        work: impl FnOnce(u32, u64, u64, PathBuf) -> Result<T, QemuError> + Send + 'static,
    ) -> Result<T, QemuError> {
        let (pid, id, mem_bytes) = (self.pid, self.mem_id, self.mem_bytes);
        let mem_path = self.mem_path.clone();
        tokio::task::spawn_blocking(move || {
            let (start, len) =
                guestmem::find_mapping(pid, id).map_err(|source| QemuError::QmpIo {
                    path: mem_path.clone(),
                    source,
                })?;
            work(pid, start, len.min(mem_bytes), mem_path)
        })
        .await
        .map_err(|e| QemuError::QmpIo {
            path: self.mem_path.clone(),
            source: std::io::Error::other(e),
        })?
    }

    /// Writes the overlay pages into the RAM of a VM started with
    /// `StartMode::Incoming`, loads its device state, then lets it run.
    async fn load(
        &self,
        device_state: &Path,
        overlay: Arc<dyn PageOverlay>,
    ) -> Result<(), QemuError> {
        // Guest RAM first: loading virtio devices reads their rings from it. Page by
        // page through /proc/PID/mem.
        self.on_guest_ram(move |pid, start, len, mem_path| {
            let writer =
                guestmem::MemWriter::open(pid, start, len).map_err(|source| QemuError::QmpIo {
                    path: PathBuf::from(format!("/proc/{pid}/mem")),
                    source,
                })?;
            overlay
                .for_each(&mut |page, data| writer.write_page(page, data))
                .map_err(|source| QemuError::QmpIo {
                    path: mem_path,
                    source,
                })
        })
        .await?;
        // The device state goes through a socket pair whose far end QEMU receives
        // over QMP (it opens no files and may not start a helper process).
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|source| QemuError::QmpIo {
                path: self.run_dir.clone(),
                source,
            })?;
        self.pass_fd("incoming", theirs.as_fd()).await?;
        drop(theirs);
        self.qmp(&QmpCommand::MigrateIncoming {
            uri: "fd:incoming".into(),
        })
        .await?;
        let feed = feed_device_state(ours, device_state.to_path_buf());
        let fed = tokio::time::timeout(MIGRATION_TIMEOUT, feed)
            .await
            .map_err(|_| QemuError::Timeout {
                op: "restore",
                secs: MIGRATION_TIMEOUT.as_secs(),
            })?;
        fed?;
        let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let st = self.qmp(&QmpCommand::QueryStatus).await?;
            let status = st
                .get("status")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            match status.as_str() {
                "inmigrate" => {}
                "paused" | "prelaunch" | "postmigrate" => break,
                other => {
                    return Err(QemuError::UnexpectedRunState {
                        op: "loading its device state",
                        state: other.to_string(),
                    })
                }
            }
            if let Some(exit) = self.exit.borrow().clone() {
                return Err(QemuError::EarlyExit {
                    status: exit,
                    log_tail: tail(&self.run_dir.join("qemu.log"), 1500),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    op: "restore",
                    secs: MIGRATION_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tracing::debug!(pid = self.pid, "restore: device state loaded");
        self.qmp(&QmpCommand::Cont).await?;
        tracing::debug!(pid = self.pid, "restore: running");
        Ok(())
    }

    /// Saves the device state of the stopped VM and collects its changed pages.
    async fn save_state(&self, device_state: &Path) -> Result<ChangedPages, QemuError> {
        // A page map scan of all guest RAM.
        let dirty = self
            .on_guest_ram(|pid, start, len, _| {
                guestmem::private_pages(pid, start, len).map_err(|source| QemuError::QmpIo {
                    path: PathBuf::from(format!("/proc/{pid}/pagemap")),
                    source,
                })
            })
            .await?;
        let dirty_count = dirty.len();
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|source| QemuError::QmpIo {
                path: self.run_dir.clone(),
                source,
            })?;
        let tmp = device_state.with_extension("tmp");
        let out_path = tmp.clone();
        let reader =
            tokio::task::spawn_blocking(move || -> Result<migstream::Captured, QemuError> {
                let stream = ours;
                let _ = stream.set_read_timeout(Some(MIGRATION_TIMEOUT));
                let mut input = std::io::BufReader::with_capacity(1 << 20, stream);
                let written = |source: std::io::Error| QemuError::DeviceState {
                    path: out_path.clone(),
                    source: source.into(),
                };
                let file = std::fs::File::create(&out_path).map_err(written)?;
                let mut output = std::io::BufWriter::new(file);
                let captured = migstream::filter(&mut input, &mut output, RAM_BLOCK, &dirty)
                    .map_err(|source| QemuError::DeviceState {
                        path: out_path.clone(),
                        source,
                    })?;
                let file = output.into_inner().map_err(|e| written(e.into_error()))?;
                file.sync_all().map_err(written)?;
                Ok(captured)
            });
        // A stopped VM: no reason to throttle the copy.
        self.qmp(&QmpCommand::MigrateSetMaxBandwidth(1 << 40))
            .await?;
        let handed = self.pass_fd("migration", theirs.as_fd()).await;
        // QEMU holds its own copy now: the reader sees the end of the stream
        // when QEMU closes it.
        drop(theirs);
        let started = match handed {
            Ok(()) => {
                self.qmp(&QmpCommand::Migrate {
                    uri: "fd:migration".into(),
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            // Without a stream the reader sees its end at once (or QEMU's close).
            let _ = reader.await;
            return Err(e);
        }
        let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
        let outcome = loop {
            let st = self.qmp(&QmpCommand::QueryMigrate).await?;
            match st.get("status").and_then(|v| v.as_str()).unwrap_or("") {
                "completed" => break Ok(()),
                "failed" | "cancelled" => {
                    break Err(QemuError::MigrationFailed {
                        op: "save",
                        reason: st
                            .get("error-desc")
                            .and_then(|v| v.as_str())
                            .unwrap_or("unknown")
                            .to_string(),
                    })
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(QemuError::Timeout {
                    op: "save",
                    secs: MIGRATION_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let captured = reader.await.map_err(|e| QemuError::DeviceState {
            path: tmp.clone(),
            source: std::io::Error::other(e).into(),
        })?;
        outcome?;
        let mut captured = captured?;
        if captured.len() != dirty_count {
            return Err(QemuError::MissingPages {
                carried: captured.len(),
                expected: dirty_count,
            });
        }
        std::fs::rename(&tmp, device_state).map_err(|source| QemuError::QmpIo {
            path: device_state.to_path_buf(),
            source,
        })?;
        captured.sort_by_key(|(p, _)| *p);
        let mut changed = ChangedPages {
            page_size: migstream::PAGE_SIZE as u64,
            pages: Vec::new(),
            data: Vec::new(),
        };
        changed.data.reserve(captured.len() * migstream::PAGE_SIZE);
        let zero = vec![0u8; migstream::PAGE_SIZE];
        for (page, data) in captured {
            changed.pages.push(page);
            changed
                .data
                .extend_from_slice(data.as_deref().unwrap_or(&zero));
        }
        Ok(changed)
    }

    /// Hands a descriptor to QEMU under `name` (QMP `getfd`).
    async fn pass_fd(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QemuError> {
        let mut guard = self.qmp.lock().await;
        let q = match guard.as_mut() {
            Some(q) => q,
            None => guard.insert(Qmp::connect(&self.qmp_path).await?),
        };
        let res = q.pass_fd(name, fd).await;
        if res.is_err() {
            *guard = None;
        }
        res
    }

    /// Runs a QMP command on this VM.
    pub async fn qmp(&self, cmd: &QmpCommand) -> Result<serde_json::Value, QemuError> {
        let mut guard = self.qmp.lock().await;
        let q = match guard.as_mut() {
            Some(q) => q,
            None => guard.insert(Qmp::connect(&self.qmp_path).await?),
        };
        let res = q.execute(cmd).await;
        if res.is_err() {
            // A broken connection is re-opened on the next call.
            *guard = None;
        }
        match res {
            // The connection broke because QEMU is gone: say that.
            Err(QemuError::QmpIo { .. } | QemuError::QmpClosed { .. })
                if self.wait_exited(Duration::from_millis(500)).await =>
            {
                Err(QemuError::Exited {
                    status: self.exit.borrow().clone().unwrap_or_default(),
                })
            }
            other => other,
        }
    }
}

#[async_trait]
impl VmmHandle for QemuHandle {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn usage(&self) -> Option<wrenn_core::vmm::VmmUsage> {
        let g = self.cgroup.as_ref()?;
        Some(wrenn_core::vmm::VmmUsage {
            memory_bytes: g.memory_bytes()?,
            cpu_usage_us: g.cpu_usage_us(),
        })
    }

    async fn wait_exit(&self) -> String {
        let mut rx = self.exit.clone();
        let detail = match rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "waiter gone".to_string(),
        };
        detail
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.qmp(&QmpCommand::Stop).await?;
        Ok(())
    }

    async fn resume(&self) -> Result<(), VmmError> {
        tracing::debug!(pid = self.pid, "restore: device state loaded");
        self.qmp(&QmpCommand::Cont).await?;
        tracing::debug!(pid = self.pid, "restore: running");
        Ok(())
    }

    async fn save(&self, dir: &Path) -> Result<SavedState, VmmError> {
        let device_state = dir.join(super::argv::DEVICE_STATE);
        let changed = self.save_state(&device_state).await?;
        Ok(SavedState {
            device_state,
            changed: Arc::new(changed),
        })
    }

    async fn shutdown(&self) -> Result<(), VmmError> {
        if !self.exited() {
            // `quit` ends QEMU at once; the guest's disk is discarded or already flushed by the caller.
            let quit = tokio::time::timeout(QUIT_WAIT, self.qmp(&QmpCommand::Quit)).await;
            if !matches!(quit, Ok(Ok(_))) || !self.wait_exited(QUIT_WAIT).await {
                self.kill_group();
                if !self.wait_exited(KILL_WAIT).await {
                    return Err(QemuError::StopTimeout {
                        secs: (QUIT_WAIT + KILL_WAIT).as_secs(),
                    }
                    .into());
                }
            }
        }
        let _ = std::fs::remove_file(&self.qmp_path);
        Ok(())
    }
}

impl Drop for QemuHandle {
    fn drop(&mut self) {
        // Backstop only: normal paths call `shutdown`.
        self.kill_group();
    }
}

/// Streams `device_state` into QEMU's end of the incoming migration pair.
async fn feed_device_state(
    ours: std::os::unix::net::UnixStream,
    device_state: PathBuf,
) -> Result<(), QemuError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| QemuError::QmpIo { path, source }
    };
    let mut file = tokio::fs::File::open(&device_state)
        .await
        .map_err(io(&device_state))?;
    ours.set_nonblocking(true).map_err(io(&device_state))?;
    let mut stream = tokio::net::UnixStream::from_std(ours).map_err(io(&device_state))?;
    tokio::io::copy(&mut file, &mut stream)
        .await
        .map_err(io(&device_state))?;
    tokio::io::AsyncWriteExt::shutdown(&mut stream)
        .await
        .map_err(io(&device_state))?;
    Ok(())
}

/// A tap's name as `ifreq` carries it (NUL-padded).
type TapName = [libc::c_char; libc::IFNAMSIZ];

fn tap_name(name: &str) -> TapName {
    let mut out: TapName = [0; libc::IFNAMSIZ];
    for (d, s) in out.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    out
}

/// At most this many network interfaces per VM (descriptors are prepared in fixed arrays).
const MAX_TAPS: usize = 8;
/// Descriptors handed to QEMU: QMP's socket, a sealed memory image, the taps.
const MAX_FDS: usize = MAX_TAPS + 2;

/// For a forked child before exec, inside the capsule's namespace: attaches to
/// persistent tap `names[i]` (virtio-net headers, no packet info) and stores its
/// descriptor (close-on-exec until placed) in `out[i]`. Only open, ioctl, close.
fn attach_taps(names: &[TapName], out: &mut [i32; MAX_TAPS]) -> std::io::Result<()> {
    for (i, name) in names.iter().enumerate() {
        // SAFETY: a static NUL-terminated path.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: all-zero is a valid `ifreq` (plain C data), built on the stack.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = *name;
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: `fd` is an open tun fd; TUNSETIFF reads and writes one `ifreq`.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closes the fd opened above, once.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        out[i] = fd;
    }
    Ok(())
}

/// For a forked child before exec: puts each `(fd, target)` descriptor at its
/// fixed number, inherited by QEMU. Every source is first copied above all
/// targets, so placing one never overwrites another still to be placed, whatever
/// numbers the sources had. Only fcntl and dup2.
fn place_fds(wanted: &[(i32, i32)]) -> std::io::Result<()> {
    const MAX: usize = MAX_FDS;
    let above = wanted.iter().map(|(_, t)| *t).max().unwrap_or(0) + 1;
    let mut temp = [-1; MAX];
    for (i, (fd, _)) in wanted.iter().enumerate().take(MAX) {
        // SAFETY: duplicates an fd of ours to the lowest free number >= `above`,
        // close-on-exec; no memory is touched.
        let t = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if t < 0 {
            return Err(std::io::Error::last_os_error());
        }
        temp[i] = t;
    }
    for (i, (_, target)) in wanted.iter().enumerate().take(MAX) {
        // SAFETY: `temp[i]` is ours; dup2 onto the target (whatever the parent had
        // there was close-on-exec) yields a descriptor QEMU inherits.
        if unsafe { libc::dup2(temp[i], *target) } != *target {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// For a forked child before exec: QEMU starts with no capabilities at all. The
/// bounding and ambient sets are emptied, so what exec would grant root is
/// nothing; QEMU's own seccomp filter then forbids regaining privileges.
fn drop_capabilities() -> std::io::Result<()> {
    // Linux numbers capabilities from 0; unknown numbers fail with EINVAL.
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes plain integers and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: plain integers; clears the ambient set.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain integers; no process started from QEMU may gain privileges.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// For a forked VMM before exec: its own process group, and unless it is to
/// `outlive` its owner, SIGKILL when `parent` dies. Makes only async-signal-safe
/// syscalls and does not allocate.
fn own_group(parent: u32, outlive: bool) -> std::io::Result<()> {
    if outlive {
        nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)).map_err(std::io::Error::from)?;
        return Ok(());
    }
    own_group_dying_with(parent)
}

/// For a forked child before exec: its own process group (so it is killed as a
/// group), and SIGKILL when `parent` dies — checked after arming, since the parent
/// may already be gone. Makes only async-signal-safe syscalls and does not allocate.
fn own_group_dying_with(parent: u32) -> std::io::Result<()> {
    nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)).map_err(std::io::Error::from)?;
    // SAFETY: PR_SET_PDEATHSIG takes plain integers and touches no memory of ours.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    if nix::unistd::getppid().as_raw() as u32 != parent {
        return Err(std::io::Error::other("owner exited"));
    }
    Ok(())
}

/// Used by the accel probe: runs a QEMU command line to completion or a deadline.
pub(crate) async fn run_to_exit(
    binary: &Path,
    args: Vec<String>,
    limit: Duration,
) -> Option<(Duration, String)> {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let parent = std::process::id();
    // SAFETY: runs in the forked child before exec and only makes the async-signal-safe
    // syscalls of `own_group_dying_with`, on a value prepared before the fork.
    unsafe {
        cmd.pre_exec(move || own_group_dying_with(parent));
    }
    let start = tokio::time::Instant::now();
    let mut child = spawn_on_spawner(cmd).await.ok()?;
    let pid = child.id();
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(describe_exit(child.wait()));
    });
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(status)) => Some((start.elapsed(), status)),
        _ => {
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            None
        }
    }
}
