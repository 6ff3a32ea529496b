//! Crash-consistency hooks for tests. Not part of the supported API.
//!
//! Writers call `step` at each point where a crash leaves a distinct on-disk state. A
//! test installs a per-thread hook that inspects the directory at that moment (the
//! previous header must still load before [`CommitStep::HeaderRenamed`], the new one
//! after) or aborts the process to simulate a crash.

use std::cell::RefCell;

/// A point inside a snapshot write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CommitStep {
    /// A new data file is written and fsynced under its temp name.
    DataSynced,
    /// The new data file has its final name (not yet referenced by any header).
    DataRenamed,
    /// The new header is written and fsynced under its temp name.
    HeaderSynced,
    /// The new header has its final name: the commit point.
    HeaderRenamed,
    /// The header is committed and the directory fsynced; obsolete files still exist.
    Committed,
    /// Obsolete data files are removed.
    CleanedUp,
    /// A raw image or copied file is fsynced under its temp name.
    FileSynced,
    /// A raw image or copied file has its final name.
    FileRenamed,
}

type Hook = Box<dyn FnMut(CommitStep)>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Installs (or with `None` removes) this thread's hook, returning the previous one.
pub fn set_commit_hook(hook: Option<Hook>) -> Option<Hook> {
    HOOK.with(|h| std::mem::replace(&mut *h.borrow_mut(), hook))
}

/// Runs this thread's hook, if any. The hook is taken out while it runs, so it may
/// itself use the snapshot API.
pub(crate) fn step(s: CommitStep) {
    let Some(mut hook) = HOOK.with(|h| h.borrow_mut().take()) else {
        return;
    };
    hook(s);
    HOOK.with(|h| {
        let mut slot = h.borrow_mut();
        if slot.is_none() {
            *slot = Some(hook);
        }
    });
}
