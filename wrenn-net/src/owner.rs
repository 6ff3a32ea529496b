//! Who holds a slot, across processes and across instances in one process.
//!
//! Claiming slot `n` first creates `/run/wrenn/net/slot-<n>` exclusively, holding
//! the owner's pid and process start time; the namespace is created only after.
//! A sweep removes a slot only when its owner is gone: another live process's
//! slot is never touched, even in the instant between its claim and its namespace.
//! Within one process, a registry of the slots held by live [`crate::NetnsNetwork`]
//! instances tells a slot in use from one leaked by a dropped instance.

use std::collections::HashSet;
use std::io::Write;
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
pub fn claim(index: u32) -> std::io::Result<bool> {
    std::fs::create_dir_all(OWNER_DIR)?;
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(owner_file(index))
        {
            Ok(mut f) => {
                let (pid, start) = me();
                f.write_all(format!("{pid} {start}\n").as_bytes())?;
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match holder(index) {
                Holder::Dead | Holder::Nobody => release(index),
                Holder::Me | Holder::OtherLive => return Ok(false),
            },
            Err(e) => return Err(e),
        }
    }
    Ok(false)
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
}
