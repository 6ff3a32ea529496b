//! `wrenn-init`: PID 1 inside a Wrenn capsule.
//!
//! Boot: mount the API filesystems, set the hostname, bring up `lo` and `eth0`
//! (the kernel's `ip=` parameter normally configured `eth0` already; otherwise
//! the fixed capsule identity is applied with ioctls), write `/etc/resolv.conf`
//! if absent, then start `/usr/local/bin/envd --port 49983 --sync-clock --env-file
//! /run/wrenn/env` and keep it running
//! (respawn with backoff). Afterwards PID 1 only reaps zombies and waits for a
//! power-off request: SIGTERM, SIGINT (also Ctrl-Alt-Del), SIGPWR, SIGUSR1,
//! SIGUSR2, the ACPI power button (QMP `system_powerdown`), or running this
//! binary as `poweroff`/`reboot`/`halt` or `wrenn-init poweroff` (which signals
//! PID 1). Power-off = SIGTERM to everything, grace period, SIGKILL, sync,
//! `reboot(RB_POWER_OFF)`.
//!
//! Everything is logged to stderr, which the kernel connected to /dev/console
//! (the serial port `ttyS0` with `console=ttyS0`). Setup steps that fail are
//! logged and skipped: a half-configured capsule whose envd answers is more
//! useful than a kernel panic caused by PID 1 exiting.

mod button;
mod net;
mod sys;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sys::{errno_str, log};

const ENVD_PATH: &str = "/usr/local/bin/envd";
const ENVD_PORT: &str = "49983";
/// Where envd keeps the environment of the last /init.
const ENVD_ENV_FILE: &str = "/run/wrenn/env";
const HOSTNAME: &str = "capsule";
const RESOLV_CONF: &str = "nameserver 8.8.8.8\nnameserver 8.8.4.4\n";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Grace period between SIGTERM and SIGKILL to all processes at power-off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// An envd that ran at least this long resets the respawn backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let first_arg = args.get(1).map(|a| a.to_string_lossy().into_owned());

    // Multi-call: `poweroff`, `reboot`, `halt` (symlinks) or `wrenn-init poweroff`.
    let wants_poweroff = matches!(argv0.as_str(), "poweroff" | "reboot" | "halt")
        || matches!(first_arg.as_deref(), Some("poweroff" | "reboot" | "halt"));
    if std::process::id() != 1 {
        if wants_poweroff {
            std::process::exit(sys::signal_init_poweroff());
        }
        eprintln!("wrenn-init: must run as PID 1 (the kernel's init=); `wrenn-init poweroff` asks PID 1 to power off");
        std::process::exit(2);
    }

    log(&format!(
        "starting (kernel uptime {:.3} s)",
        sys::uptime_secs()
    ));
    sys::block_signals();
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o022) };
    setup_environment();
    sys::mount_api_filesystems();
    sys::set_hostname(HOSTNAME);
    sys::raise_nofile_limit(1 << 16);
    net::configure();
    write_resolv_conf();
    button::watch();
    log(&format!("setup done (uptime {:.3} s)", sys::uptime_secs()));

    supervise();
}

/// Replaces the environment the kernel handed over (leftover `key=value`
/// command-line parameters) with a clean one that children inherit.
fn setup_environment() {
    let keep_term = std::env::var_os("TERM");
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    std::env::set_var("PATH", PATH);
    std::env::set_var("HOME", "/root");
    std::env::set_var("USER", "root");
    std::env::set_var("LANG", "C.UTF-8");
    std::env::set_var("TERM", keep_term.unwrap_or_else(|| "linux".into()));
}

fn write_resolv_conf() {
    let path = std::path::Path::new("/etc/resolv.conf");
    // symlink_metadata: a (dangling) symlink counts as present, leave it alone.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.len() > 0 || meta.file_type().is_symlink() => return,
        _ => {}
    }
    match std::fs::write(path, RESOLV_CONF) {
        Ok(()) => log("wrote /etc/resolv.conf"),
        Err(e) => log(&format!("cannot write /etc/resolv.conf: {e}")),
    }
}

/// The supervised envd process.
struct Service {
    pid: Option<libc::pid_t>,
    started: Instant,
    /// When to (re)start it if it is not running.
    next_start: Instant,
    failures: u32,
    start_count: u64,
}

impl Service {
    fn start(&mut self) {
        self.next_start = Instant::now() + BACKOFF_MAX;
        if std::fs::metadata(ENVD_PATH).is_err() {
            if self.failures == 0 {
                log(&format!(
                    "{ENVD_PATH} not found; retrying every {} s",
                    BACKOFF_MAX.as_secs()
                ));
            }
            self.failures = self.failures.saturating_add(1);
            return;
        }
        let mut cmd = Command::new(ENVD_PATH);
        // Inside a capsule envd owns the clock: /init carries host time after every boot and restore.
        // It keeps /init's environment in ENVD_ENV_FILE for services started before it.
        cmd.args([
            "--port",
            ENVD_PORT,
            "--sync-clock",
            "--env-file",
            ENVD_ENV_FILE,
        ])
        .current_dir("/")
        .stdin(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and calls
        // only sigemptyset/sigprocmask/setsid, which are async-signal-safe, on
        // a local sigset. std does not reset the signal mask: without this the
        // signals PID 1 blocks (SIGTERM, SIGCHLD, ...) stay blocked in envd and
        // everything it starts. Handlers are reset to default by exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                libc::setsid();
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id() as libc::pid_t;
                // The child is reaped by the waitpid(-1) loop, not through `child`.
                drop(child);
                self.start_count += 1;
                log(&format!(
                    "started envd pid {pid} (start #{}, uptime {:.3} s)",
                    self.start_count,
                    sys::uptime_secs()
                ));
                self.pid = Some(pid);
                self.started = Instant::now();
            }
            Err(e) => {
                log(&format!("cannot start {ENVD_PATH}: {e}"));
                self.schedule_restart();
            }
        }
    }

    fn exited(&mut self, status: libc::c_int) {
        self.pid = None;
        log(&format!(
            "envd exited ({}) after {:.1} s",
            describe_status(status),
            self.started.elapsed().as_secs_f64()
        ));
        if self.started.elapsed() >= BACKOFF_RESET_AFTER {
            self.failures = 0;
        }
        self.schedule_restart();
    }

    fn schedule_restart(&mut self) {
        let shift = self.failures.min(16);
        let delay = BACKOFF_MIN.saturating_mul(1u32 << shift).min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        self.next_start = Instant::now() + delay;
        log(&format!("restarting envd in {} ms", delay.as_millis()));
    }
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

fn supervise() -> ! {
    let mut envd = Service {
        pid: None,
        started: Instant::now(),
        next_start: Instant::now(),
        failures: 0,
        start_count: 0,
    };
    loop {
        if envd.pid.is_none() && Instant::now() >= envd.next_start {
            envd.start();
        }
        let timeout = if envd.pid.is_none() {
            Some(envd.next_start.saturating_duration_since(Instant::now()))
        } else {
            None
        };
        match sys::wait_signal(timeout) {
            Some(libc::SIGCHLD) | None => {}
            Some(
                sig @ (libc::SIGTERM | libc::SIGINT | libc::SIGPWR | libc::SIGUSR1 | libc::SIGUSR2),
            ) => {
                log(&format!("signal {sig}: powering off"));
                power_off();
            }
            Some(sig) => log(&format!("ignoring signal {sig}")),
        }
        // Reap every exited child (orphans are re-parented to PID 1).
        for (pid, status) in sys::reap() {
            if envd.pid == Some(pid) {
                envd.exited(status);
            }
        }
    }
}

fn power_off() -> ! {
    // SAFETY: kill(-1, ..) signals every process except PID 1 itself; no memory is involved.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    loop {
        let _ = sys::reap();
        if !sys::has_children() {
            break;
        }
        if Instant::now() >= deadline {
            log(&format!(
                "still running after {} s: {}; SIGKILL",
                SHUTDOWN_GRACE.as_secs(),
                sys::other_processes().join(" ")
            ));
            // SAFETY: as above.
            unsafe { libc::kill(-1, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(100));
            let _ = sys::reap();
            break;
        }
        let _ = sys::wait_signal(Some(Duration::from_millis(50)));
    }
    log("sync; power off");
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with RB_POWER_OFF; we are PID 1 with CAP_SYS_BOOT.
    let rc = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    log(&format!(
        "reboot(RB_POWER_OFF) returned {rc}: {}",
        errno_str()
    ));
    // Nothing sensible is left to do; keep reaping so the guest stays sane.
    loop {
        let _ = sys::wait_signal(Some(Duration::from_secs(1)));
        let _ = sys::reap();
    }
}
