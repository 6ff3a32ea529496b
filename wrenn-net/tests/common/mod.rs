//! Helpers shared by the network integration tests.

// Each test crate uses a part of these.
#![allow(dead_code)]

use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::thread::JoinHandle;

/// True as root; otherwise prints a loud SKIPPED line (the caller returns).
pub fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("\n********** SKIPPED: needs root **********\n");
    false
}

pub fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("run ip")
}

/// Runs `ip ARGS`, which must succeed; its standard output.
pub fn ip_ok(args: &[&str]) -> String {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread inside the namespace at `path`.
pub fn in_ns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(path, f)
        .join()
        .expect("namespace thread panicked")
}

/// Starts `f` on a thread inside the namespace at `path`.
pub fn spawn_in_ns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = File::open(path).expect("open netns");
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}
