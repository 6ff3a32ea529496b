use std::path::PathBuf;
use wrenn_core::vmm::VmmError;

/// What went wrong in the QEMU backend, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("Cannot open network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create run directory {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited during start-up ({status}): {log_tail}")]
    EarlyExit { status: String, log_tail: String },
    #[error("QMP socket {path} did not appear within {secs} s")]
    QmpTimeout { path: PathBuf, secs: u64 },
    #[error("QMP I/O on {path}")]
    QmpIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command {command} failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },
    /// QEMU's QMP answers did not follow the protocol (a bad greeting or message).
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),
    #[error("QMP connection {path} closed")]
    QmpClosed { path: PathBuf },
    /// The VMM process exited while it was being driven (killed, crashed).
    #[error("QEMU exited ({status})")]
    Exited { status: String },
    #[error("{op} of the VM's state failed in QEMU: {reason}")]
    MigrationFailed { op: &'static str, reason: String },
    #[error("the VM is {state:?} after {op}")]
    UnexpectedRunState { op: &'static str, state: String },
    #[error("writing the device state file {path}")]
    DeviceState {
        path: PathBuf,
        #[source]
        source: crate::qemu::migstream::StreamError,
    },
    #[error("the migration stream carried {carried} of the {expected} changed guest pages")]
    MissingPages { carried: usize, expected: usize },
    #[error("{op} of the VM's state did not finish within {secs} s")]
    Timeout { op: &'static str, secs: u64 },
    #[error("QEMU did not stop within {secs} s even after SIGKILL")]
    StopTimeout { secs: u64 },
    #[error("Cannot confine the VMM in its cgroup")]
    Cgroup(#[source] crate::cgroup::CgroupError),
    #[error("Cannot jail the VMM")]
    Jail(#[source] crate::jail::JailError),
}

impl From<QemuError> for VmmError {
    fn from(e: QemuError) -> Self {
        match e {
            QemuError::EarlyExit { status, log_tail } => VmmError::Exited {
                detail: format!("{status}: {log_tail}"),
            },
            QemuError::Exited { status } => VmmError::Exited { detail: status },
            QemuError::QmpTimeout { secs, .. } => VmmError::Timeout { op: "start", secs },
            QemuError::Timeout { op, secs } => VmmError::Timeout { op, secs },
            QemuError::StopTimeout { secs } => VmmError::Timeout {
                op: "shutdown",
                secs,
            },
            other => VmmError::Backend(Box::new(other)),
        }
    }
}
