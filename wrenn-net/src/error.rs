//! The crate's detailed error, converted to [`NetError`] at the trait boundary.

use std::io;
use std::path::PathBuf;
use wrenn_core::net::{NetError, SlotIndex};

/// What went wrong while creating, removing or sweeping slots. Each variant names the step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    #[error("No free network slot (all {capacity} in use)")]
    Exhausted { capacity: u32 },
    /// Another process already holds this namespace name; the allocator skips the index.
    #[error("Slot index {index} is outside 1..={max}")]
    InvalidIndex { index: SlotIndex, max: u32 },
    #[error("Namespace {name} already exists")]
    NetnsExists { name: String },
    #[error("Claiming slot {index} through its owner file failed")]
    OwnerFile {
        index: u32,
        #[source]
        source: io::Error,
    },
    #[error("Namespace {name}: {step} failed")]
    Netns {
        name: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Entering namespace {path:?} failed")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Netlink: {step} {link} failed")]
    Netlink {
        step: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Opening a netlink connection failed")]
    NetlinkConnect(#[source] io::Error),
    #[error("Tap {name}: {step} failed")]
    Tap {
        name: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Writing {path} failed")]
    Sysctl {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Running {nft:?} for table {table} failed")]
    NftSpawn {
        nft: PathBuf,
        table: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("nft rejected table {table} (exit {status}): {stderr}")]
    NftRejected {
        table: &'static str,
        status: i32,
        stderr: String,
    },
    #[error("DNS filter: {step} failed")]
    Dns {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Namespace worker thread failed: {what}")]
    Worker { what: String },
    #[error("Teardown of slot {index} left {} error(s): {}", .errors.len(), join(.errors))]
    Teardown {
        index: SlotIndex,
        errors: Vec<SlotError>,
    },
    #[error("Sweep left {} error(s): {}", .errors.len(), join(.errors))]
    Sweep { errors: Vec<SlotError> },
}

fn join(errors: &[SlotError]) -> String {
    errors
        .iter()
        .map(|e| error_chain(e))
        .collect::<Vec<_>>()
        .join("; ")
}

pub use wrenn_core::manager::error_chain;

/// errno carried by a netlink error, if any.
pub(crate) fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn is_perm_errno(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EPERM) | Some(libc::EACCES))
}

impl SlotError {
    /// True when the failure is a missing privilege (EPERM/EACCES anywhere in it).
    pub fn is_permission(&self) -> bool {
        match self {
            Self::Netns { source, .. }
            | Self::EnterNetns { source, .. }
            | Self::Tap { source, .. }
            | Self::Sysctl { source, .. }
            | Self::OwnerFile { source, .. }
            | Self::NetlinkConnect(source)
            | Self::Dns { source, .. }
            | Self::NftSpawn { source, .. } => is_perm_errno(source.raw_os_error()),
            Self::Netlink { source, .. } => is_perm_errno(netlink_errno(source)),
            Self::NftRejected { stderr, .. } => stderr.contains("Operation not permitted"),
            Self::Teardown { errors, .. } | Self::Sweep { errors } => {
                errors.iter().any(Self::is_permission)
            }
            Self::Exhausted { .. }
            | Self::InvalidIndex { .. }
            | Self::NetnsExists { .. }
            | Self::Worker { .. } => false,
        }
    }
}

impl From<SlotError> for NetError {
    fn from(e: SlotError) -> Self {
        match e {
            SlotError::Exhausted { capacity } => NetError::Exhausted { capacity },
            e if e.is_permission() => NetError::Permission {
                what: error_chain(&e),
            },
            e => NetError::Backend(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eperm_maps_to_permission() {
        let e = SlotError::Netns {
            name: "wrenn-ns-1".into(),
            step: "bind mount",
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(matches!(NetError::from(e), NetError::Permission { .. }));
    }

    #[test]
    fn nested_eperm_maps_to_permission() {
        let e = SlotError::Teardown {
            index: SlotIndex(3),
            errors: vec![SlotError::Sysctl {
                path: "/proc/sys/net/ipv4/ip_forward",
                source: io::Error::from_raw_os_error(libc::EACCES),
            }],
        };
        assert!(matches!(NetError::from(e), NetError::Permission { .. }));
    }

    #[test]
    fn exhausted_and_backend() {
        assert!(matches!(
            NetError::from(SlotError::Exhausted { capacity: 4 }),
            NetError::Exhausted { capacity: 4 }
        ));
        let e = SlotError::NftRejected {
            table: "ip wrenn",
            status: 1,
            stderr: "syntax error".into(),
        };
        assert!(matches!(NetError::from(e), NetError::Backend(_)));
    }
}
