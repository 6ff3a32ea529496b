//! Who holds a slot, across processes and across instances in one process.
//!
//! Claiming slot `n` first writes `/run/wrenn/net/slot-<n>`, holding the owner's pid
//! and process start time, under a lock that makes the check for a live owner and the
//! write one step; the namespace is created only after.
//! A sweep removes a slot only when its owner is gone: another live process's
//! slot is never touched, even in the instant between its claim and its namespace.
//! Within one process, a registry of the slots held by live [`crate::NetnsNetwork`]
//! instances tells a slot in use from one leaked by a dropped instance.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Directory of the slot owner files.
pub const OWNER_DIR: &str = "/run/wrenn/net";

fn owner_file(index: u32) -> PathBuf {
    PathBuf::from(OWNER_DIR).join(format!("slot-{index}"))
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/<pid>/stat`);
/// with the pid it identifies a process even after its pid is reused.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn me() -> (u32, u64) {
    let pid = std::process::id();
    (pid, process_start_time(pid).unwrap_or(0))
}

/// Slots held by live instances of this process.
fn registry() -> MutexGuard<'static, HashSet<u32>> {
    static LIVE: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

pub fn register(index: u32) {
    registry().insert(index);
}

/// Registers slot `index` for a live instance of this process unless one already
/// holds it; `false` then. Check and registration are one step, so two instances
/// (an allocation and another's sweep) never both act on a slot.
pub fn try_register(index: u32) -> bool {
    registry().insert(index)
}

pub fn unregister(index: u32) {
    registry().remove(&index);
}

pub fn registered(index: u32) -> bool {
    registry().contains(&index)
}

/// Who holds slot `index` according to its owner file.
#[derive(Debug, PartialEq, Eq)]
pub enum Holder {
    /// No owner file.
    Nobody,
    /// This process.
    Me,
    /// Another process that is still running.
    OtherLive,
    /// A process that has exited (or an unreadable file).
    Dead,
}

pub fn holder(index: u32) -> Holder {
    let Ok(text) = std::fs::read_to_string(owner_file(index)) else {
        return Holder::Nobody;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<u64>().ok());
    let (Some(pid), Some(start)) = (it.next(), it.next()) else {
        return Holder::Dead;
    };
    let Ok(pid) = u32::try_from(pid) else {
        return Holder::Dead;
    };
    if (pid, start) == me() {
        Holder::Me
    } else if process_start_time(pid) == Some(start) {
        Holder::OtherLive
    } else {
        Holder::Dead
    }
}

/// Claims slot `index` for this process; `false` if a live process holds it.
/// A file left by a dead owner is taken over.
///
/// Reading the holder and writing the new one are one step across processes (under
/// an exclusive lock on the directory's lock file): two processes that both find a
/// dead owner never both take the slot, as they could if one removed the file the
/// other had just written.
pub fn claim(index: u32) -> std::io::Result<bool> {
    std::fs::create_dir_all(OWNER_DIR)?;
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(PathBuf::from(OWNER_DIR).join(".lock"))?;
    // Released when `lock` is closed, on every return below (and by the kernel if
    // this process dies holding it).
    lock.lock()?;
    match holder(index) {
        Holder::Me | Holder::OtherLive => Ok(false),
        Holder::Dead | Holder::Nobody => {
            let (pid, start) = me();
            // Written whole, then renamed: a reader never sees half a file.
            wrenn_core::fsutil::write_atomic(
                &owner_file(index),
                format!("{pid} {start}\n").as_bytes(),
            )?;
            Ok(true)
        }
    }
}

/// Drops the owner file of slot `index`.
pub fn release(index: u32) {
    let _ = std::fs::remove_file(owner_file(index));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable() {
        let me = std::process::id();
        assert!(process_start_time(me).is_some());
        assert_eq!(process_start_time(me), process_start_time(me));
        assert_eq!(process_start_time(u32::MAX), None);
    }

    /// Set in the processes `a_dead_owners_slot_goes_to_exactly_one_claimer` starts.
    const CHILD_ENV: &str = "WRENN_TEST_CLAIM_SLOT";

    /// In a child process: claims the slot, says whether it got it, and stays alive
    /// (holding it) until its stdin closes.
    #[test]
    fn claim_child() {
        let Some(index) = std::env::var(CHILD_ENV).ok().and_then(|v| v.parse().ok()) else {
            return;
        };
        let got = claim(index).expect("claim");
        println!("CLAIMED={got}");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }

    #[test]
    fn a_dead_owners_slot_goes_to_exactly_one_claimer() {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to write {OWNER_DIR}");
            return;
        }
        // Far above any slot a host uses.
        let index = 4_000_000 + std::process::id() % 1000;
        let exe = std::env::current_exe().expect("test binary");
        for round in 0..40 {
            // A file left by a process that has exited.
            let mut gone = Command::new("true").spawn().expect("spawn true");
            let dead = gone.id();
            gone.wait().expect("wait");
            std::fs::create_dir_all(OWNER_DIR).expect("owner dir");
            std::fs::write(owner_file(index), format!("{dead} 1\n")).expect("dead owner");
            assert_eq!(holder(index), Holder::Dead);

            let mut children: Vec<_> = (0..6)
                .map(|_| {
                    Command::new(&exe)
                        .args([
                            "--exact",
                            "owner::tests::claim_child",
                            "--nocapture",
                            "--test-threads=1",
                        ])
                        .env(CHILD_ENV, index.to_string())
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawn claimer")
                })
                .collect();
            let mut claimed = 0;
            for c in &mut children {
                let out = c.stdout.take().expect("stdout");
                let line = BufReader::new(out)
                    .lines()
                    .map_while(Result::ok)
                    .find(|l| l.contains("CLAIMED="))
                    .expect("the claimer's answer");
                if line.contains("CLAIMED=true") {
                    claimed += 1;
                }
            }
            for mut c in children {
                drop(c.stdin.take());
                let _ = c.wait();
            }
            release(index);
            assert_eq!(
                claimed, 1,
                "round {round}: {claimed} processes claimed one slot"
            );
        }
    }
}
