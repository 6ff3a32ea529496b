//! The capsule lifecycle state machine.

use serde::{Deserialize, Serialize};

/// Where a capsule is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapsuleStatus {
    /// Resources are being created and the guest is booting or restoring.
    Starting,
    /// envd is healthy and initialised.
    Running,
    Pausing,
    /// Memory, devices and disk are on disk; no VMM runs.
    Paused,
    Resuming,
    Stopping,
    /// Destroyed; nothing of it is left.
    Stopped,
    /// Failed (e.g. its VMM died); its resources were released.
    Error,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid capsule state transition from {from:?} to {to:?}")]
pub struct InvalidTransition {
    pub from: CapsuleStatus,
    pub to: CapsuleStatus,
}

impl CapsuleStatus {
    pub const ALL: [CapsuleStatus; 8] = [
        CapsuleStatus::Starting,
        CapsuleStatus::Running,
        CapsuleStatus::Pausing,
        CapsuleStatus::Paused,
        CapsuleStatus::Resuming,
        CapsuleStatus::Stopping,
        CapsuleStatus::Stopped,
        CapsuleStatus::Error,
    ];

    /// Whether `self → to` is a legal step. Every pair is decided explicitly.
    pub fn can_become(self, to: CapsuleStatus) -> bool {
        use CapsuleStatus::*;
        match self {
            Starting => matches!(to, Running | Stopping | Error),
            Running => matches!(to, Pausing | Stopping | Error),
            Pausing => matches!(to, Paused | Running | Stopping | Error),
            Paused => matches!(to, Resuming | Stopping | Error),
            Resuming => matches!(to, Running | Paused | Stopping | Error),
            Stopping => matches!(to, Stopped | Error),
            Stopped => false,
            Error => matches!(to, Stopping | Stopped),
        }
    }

    pub fn transition(self, to: CapsuleStatus) -> Result<CapsuleStatus, InvalidTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CapsuleStatus::Starting => "starting",
            CapsuleStatus::Running => "running",
            CapsuleStatus::Pausing => "pausing",
            CapsuleStatus::Paused => "paused",
            CapsuleStatus::Resuming => "resuming",
            CapsuleStatus::Stopping => "stopping",
            CapsuleStatus::Stopped => "stopped",
            CapsuleStatus::Error => "error",
        }
    }
}

impl std::fmt::Display for CapsuleStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::CapsuleStatus::{self, *};

    #[test]
    fn every_pair_is_decided() {
        let allowed = [
            (Starting, Running),
            (Starting, Stopping),
            (Starting, Error),
            (Running, Pausing),
            (Running, Stopping),
            (Running, Error),
            (Pausing, Paused),
            (Pausing, Running),
            (Pausing, Stopping),
            (Pausing, Error),
            (Paused, Resuming),
            (Paused, Stopping),
            (Paused, Error),
            (Resuming, Running),
            (Resuming, Paused),
            (Resuming, Stopping),
            (Resuming, Error),
            (Stopping, Stopped),
            (Stopping, Error),
            (Error, Stopping),
            (Error, Stopped),
        ];
        for from in CapsuleStatus::ALL {
            for to in CapsuleStatus::ALL {
                let expect = allowed.contains(&(from, to));
                assert_eq!(from.can_become(to), expect, "{from:?} -> {to:?}");
                assert_eq!(from.transition(to).is_ok(), expect);
            }
        }
    }
}
