//! Starting, watching and stopping QEMU processes.
//!
//! QEMU children are started from one long-lived spawner thread with a
//! parent-death signal (so they die with the process that owns them, and the
//! thread that spawned them never exits early), in their own process group, inside
//! the capsule's network namespace, tagged `-name wrenn-<id>` so a sweep can find
//! orphans. Each child is reaped by a waiter thread that publishes its exit.

use super::argv::{build_argv, QMP_SOCKET};
use super::qmp::{Qmp, QmpCommand};
use super::QemuError;
use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::{oneshot, watch, Mutex};
use wrenn_core::vmm::{Accel, VmSpec, Vmm, VmmError, VmmHandle};

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
}

impl QemuConfig {
    pub fn new(accel: Accel) -> Self {
        QemuConfig {
            binary: default_binary(),
            accel,
            tb_size_mb: Some(64),
        }
    }
}

/// `WRENN_QEMU` or `qemu-system-x86_64` on PATH.
pub fn default_binary() -> PathBuf {
    std::env::var_os("WRENN_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
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

#[async_trait]
impl Vmm for QemuVmm {
    fn accel(&self) -> Accel {
        self.config.accel
    }

    async fn spawn(&self, spec: &VmSpec) -> Result<Box<dyn VmmHandle>, VmmError> {
        Ok(Box::new(QemuHandle::start(&self.config, spec).await?))
    }
}

/// One running QEMU.
#[derive(Debug)]
pub struct QemuHandle {
    pid: u32,
    exit: watch::Receiver<Option<String>>,
    qmp: Mutex<Option<Qmp>>,
    qmp_path: PathBuf,
}

impl QemuHandle {
    pub async fn start(config: &QemuConfig, spec: &VmSpec) -> Result<Self, QemuError> {
        std::fs::create_dir_all(&spec.run_dir).map_err(|source| QemuError::RunDir {
            path: spec.run_dir.clone(),
            source,
        })?;
        let qmp_path = spec.run_dir.join(QMP_SOCKET);
        let _ = std::fs::remove_file(&qmp_path);
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
        if config.accel == Accel::Tcg {
            if let Some(khz) = crate::accel::host_tsc_khz() {
                spec.boot.cmdline.push_str(&format!(" tsc_early_khz={khz}"));
            }
        }
        let spec = &spec;
        let mut cmd = Command::new(&config.binary);
        cmd.args(build_argv(spec, config.accel, config.tb_size_mb))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let parent = std::process::id();
        // SAFETY: runs in the forked child before exec and only makes async-signal-safe
        // syscalls (setpgid, prctl, getppid, setns) on values prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
                    .map_err(std::io::Error::from)?;
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The owner may have died between fork and prctl.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    return Err(std::io::Error::other("owner exited"));
                }
                if let Some(fd) = &netns {
                    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = spawn_on_spawner(cmd)
            .await
            .map_err(|source| QemuError::Spawn {
                binary: config.binary.clone(),
                source,
            })?;
        let pid = child.id();
        let (tx, rx) = watch::channel(None);
        let waiter = std::thread::Builder::new()
            .name(format!("wrenn-vmm-wait-{pid}"))
            .spawn(move || {
                let status = child.wait();
                let _ = tx.send(Some(describe_exit(status)));
            });
        if let Err(e) = waiter {
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            return Err(QemuError::Spawn {
                binary: config.binary.clone(),
                source: e,
            });
        }
        let mut handle = QemuHandle {
            pid,
            exit: rx,
            qmp: Mutex::new(None),
            qmp_path: qmp_path.clone(),
        };
        tracing::debug!(pid, name = %spec.name, accel = %config.accel, "qemu started");

        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = handle.exit.borrow().clone() {
                let mut log_tail = tail(&log_path, 1500);
                if log_tail.is_empty() {
                    log_tail = tail(&spec.run_dir.join(super::argv::CONSOLE_LOG), 1500);
                }
                return Err(QemuError::EarlyExit { status, log_tail });
            }
            if qmp_path.exists() {
                if let Ok(q) = Qmp::connect(&qmp_path).await {
                    handle.qmp = Mutex::new(Some(q));
                    return Ok(handle);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                handle.kill_group();
                return Err(QemuError::QmpTimeout {
                    path: qmp_path,
                    secs: START_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
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
        res
    }
}

#[async_trait]
impl VmmHandle for QemuHandle {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
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
        self.qmp(&QmpCommand::Cont).await?;
        Ok(())
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
    // SAFETY: setpgid and prctl are async-signal-safe and use no prepared state.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
                .map_err(std::io::Error::from)?;
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
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
