//! Thin wrappers over the system calls PID 1 needs.

use std::ffi::CString;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Writes one line to stderr (the console) in a single write; errors are ignored
/// because there is nowhere else to report them.
pub fn log(msg: &str) {
    let line = format!("wrenn-init[{:8.3}]: {msg}\n", uptime_secs());
    let _ = std::io::stderr().write_all(line.as_bytes());
}

pub fn errno_str() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Seconds since boot (CLOCK_BOOTTIME), 0.0 if unavailable.
pub fn uptime_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

const HANDLED_SIGNALS: [libc::c_int; 7] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGPWR,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGHUP,
];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in HANDLED_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
    }
    set
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Blocks the signals PID 1 cares about (they are consumed synchronously with
/// [`wait_signal`]) and gives them a no-op handler: the kernel discards
/// signals to PID 1 that have the default disposition, a handler guarantees
/// they are queued. Exec resets handlers in children; the mask is reset in
/// the child before exec (see `Service::start`).
/// Also routes Ctrl-Alt-Del to SIGINT instead of an immediate reboot.
pub fn block_signals() {
    let set = handled_set();
    for sig in HANDLED_SIGNALS {
        // SAFETY: sigaction is plain data, zeroed = empty mask, no flags; the handler
        // is an `extern "C" fn(c_int)` that does nothing, hence async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_handler as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                log(&format!("sigaction({sig}): {}", errno_str()));
            }
        }
    }
    // SAFETY: `set` is initialised; the old mask is not requested.
    let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        log(&format!("sigprocmask: {}", errno_str()));
    }
    // SAFETY: reboot(2) with RB_DISABLE_CAD only changes the Ctrl-Alt-Del behaviour.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
}

/// Waits for one of the blocked signals; `None` on timeout or interruption.
pub fn wait_signal(timeout: Option<Duration>) -> Option<libc::c_int> {
    let set = handled_set();
    // SAFETY: siginfo_t is plain data filled in by the kernel.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = match timeout {
        Some(t) => {
            let ts = libc::timespec {
                tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            };
            // SAFETY: all pointers refer to live, initialised locals.
            unsafe { libc::sigtimedwait(&set, &mut info, &ts) }
        }
        // SAFETY: as above.
        None => unsafe { libc::sigwaitinfo(&set, &mut info) },
    };
    (rc > 0).then_some(rc)
}

/// Reaps every child that has exited; returns their pids and wait statuses.
pub fn reap() -> Vec<(libc::pid_t, libc::c_int)> {
    let mut out = Vec::new();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
        out.push((pid, status));
    }
    out
}

/// Whether any child (exited or not) is left.
pub fn has_children() -> bool {
    // SAFETY: siginfo_t is plain data; WNOWAIT leaves any zombie in place.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0
    }
}

/// User-space processes other than PID 1, as "pid(comm)" strings (for logs).
pub fn other_processes() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if pid == 1 {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces, so split at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("?");
        let ppid = tail.split_whitespace().nth(1).unwrap_or("0");
        if pid == 2 || ppid == "2" {
            continue; // kernel thread
        }
        out.push(format!("{pid}({comm})"));
    }
    out
}

/// From a non-PID-1 invocation: ask PID 1 to power off. Returns an exit code.
pub fn signal_init_poweroff() -> i32 {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(1, libc::SIGTERM) } == 0 {
        0
    } else {
        eprintln!("wrenn-init: cannot signal PID 1: {}", errno_str());
        1
    }
}

pub fn set_hostname(name: &str) {
    // SAFETY: the pointer/length pair describes `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        log(&format!("sethostname({name}): {}", errno_str()));
    }
}

/// Raises RLIMIT_NOFILE (inherited by everything init starts): soft `soft`,
/// hard the kernel maximum (`fs.nr_open`). The soft limit stays moderate because
/// some programs loop over every possible descriptor up to it.
pub fn raise_nofile_limit(soft: u64) {
    let hard = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(soft)
        .max(soft);
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        log(&format!(
            "setrlimit(NOFILE, {soft}/{hard}): {}",
            errno_str()
        ));
    }
}

fn cstr(s: &str) -> Option<CString> {
    CString::new(s).ok()
}

/// Whether `path` is a mount point: its device differs from its parent's (or it is `/`).
fn is_mount_point(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let p = Path::new(path);
    let parent = p.parent().unwrap_or(Path::new("/"));
    match (std::fs::metadata(p), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev() || a.ino() == b.ino(),
        _ => false,
    }
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let (Some(s), Some(t), Some(f), Some(d)) = (cstr(src), cstr(target), cstr(fstype), cstr(data))
    else {
        return Err("NUL in argument".into());
    };
    // SAFETY: all four are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno_str())
    }
}

fn mkdir_mode(path: &str, mode: u32) {
    use std::os::unix::fs::DirBuilderExt;
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        log(&format!("mkdir {path}: {e}"));
    }
}

fn symlink_force(target: &str, link: &str) {
    let _ = std::fs::remove_file(link);
    if let Err(e) = std::os::unix::fs::symlink(target, link) {
        log(&format!("symlink {link} -> {target}: {e}"));
    }
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and cgroup2,
/// skipping the ones already mounted (the kernel auto-mounts devtmpfs).
pub fn mount_api_filesystems() {
    let nosuid = libc::MS_NOSUID;
    let nodev = libc::MS_NODEV;
    let noexec = libc::MS_NOEXEC;
    // (source, target, fstype, flags, data, dir mode, optional)
    let table: [(&str, &str, &str, libc::c_ulong, &str, u32, bool); 8] = [
        (
            "proc",
            "/proc",
            "proc",
            nosuid | nodev | noexec,
            "",
            0o555,
            false,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            nosuid | nodev | noexec,
            "",
            0o555,
            false,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            nosuid,
            "mode=0755",
            0o755,
            false,
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            nosuid | noexec,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
            0o755,
            false,
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            nosuid | nodev,
            "mode=1777",
            0o1777,
            false,
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            nosuid | nodev,
            "mode=0755",
            0o755,
            false,
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            nosuid | nodev,
            "mode=1777",
            0o1777,
            false,
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid | nodev | noexec,
            "",
            0o755,
            true,
        ),
    ];

    remount_root_rw();
    for (src, target, fstype, flags, data, mode, optional) in table {
        if is_mount_point(target) {
            continue;
        }
        if std::fs::metadata(target).is_err() {
            mkdir_mode(target, mode);
        }
        if let Err(e) = mount(src, target, fstype, flags, data) {
            if !optional {
                log(&format!("mount {fstype} on {target}: {e}"));
            }
        }
    }
    mkdir_mode("/run/lock", 0o1777);
    symlink_force("pts/ptmx", "/dev/ptmx");
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            symlink_force(target, link);
        }
    }
    if std::fs::symlink_metadata("/etc/mtab").is_err() {
        symlink_force("../proc/self/mounts", "/etc/mtab");
    }
}

fn remount_root_rw() {
    let Some(root) = cstr("/") else { return };
    // SAFETY: statvfs is plain data written by the kernel; `root` is NUL-terminated.
    let readonly = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(root.as_ptr(), &mut st) == 0 && (st.f_flag & libc::ST_RDONLY) != 0
    };
    if readonly {
        if let Err(e) = mount("", "/", "", libc::MS_REMOUNT, "") {
            log(&format!("remount / read-write: {e}"));
        }
    }
}
