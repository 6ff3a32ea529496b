//! Talking to the agent (envd) inside a capsule.

use async_trait::async_trait;
use bytes::Bytes;
use futures_core::Stream;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// A stream of file bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, AgentError>> + Send>>;

/// What `/init` sets after every boot or restore.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestInit {
    pub access_token: Option<String>,
    pub env_vars: HashMap<String, String>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
    /// Host time, so the guest clock is corrected (after a restore especially).
    pub timestamp: Option<SystemTime>,
    /// Random bytes the guest mixes into its kernel RNG and reseeds from, so
    /// guests restored from one memory image do not share random state.
    pub entropy: Option<Vec<u8>>,
}

/// Size of a pseudo-terminal, in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// A command to run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub envs: HashMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Guest user; `None` = envd's default user.
    #[serde(default)]
    pub user: Option<String>,
    /// Keep a stdin pipe open for [`GuestAgent::send_stdin`].
    #[serde(default)]
    pub stdin: bool,
    /// Process lifetime limit (the process is killed when it elapses).
    #[serde(default)]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub tag: Option<String>,
    /// Run on a pseudo-terminal of this size: stdin, stdout and stderr are the
    /// terminal, output arrives as [`ExecEvent::Stdout`], input goes through
    /// [`GuestAgent::send_pty_input`] (`stdin` is then irrelevant).
    #[serde(default)]
    pub pty: Option<PtySize>,
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code; -1 when killed by a signal.
    pub code: i32,
    /// Terminated normally (not by a signal).
    pub exited: bool,
    /// Human-readable, e.g. `exit status 1`, `signal: killed`.
    pub status: String,
}

/// Events of a running command, in order: `Started`, output, `Exited`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    Started { pid: u32 },
    Stdout(Bytes),
    Stderr(Bytes),
    Exited(ExitStatus),
}

/// A started command: its pid and its event stream.
#[derive(Debug)]
pub struct ExecStream {
    pub pid: u32,
    pub events: mpsc::Receiver<Result<ExecEvent, AgentError>>,
}

/// Kind of a guest filesystem entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// A guest filesystem entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    /// Unix seconds.
    pub modified: i64,
    pub symlink_target: Option<String>,
}

/// A process the agent runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub pid: u32,
    pub tag: Option<String>,
    pub cmd: String,
    pub args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("Guest agent unreachable: {0}")]
    Unreachable(String),
    #[error("Guest agent did not become ready within {secs} s")]
    NotReady { secs: u64 },
    #[error("Not found in the guest: {0}")]
    NotFound(String),
    #[error("Rejected by the guest agent: {0}")]
    InvalidArgument(String),
    #[error("Guest agent refused the credentials: {0}")]
    Unauthenticated(String),
    #[error("Permission denied in the guest: {0}")]
    PermissionDenied(String),
    #[error("Timed out: {0}")]
    Timeout(String),
    #[error("Guest agent error {code}: {message}")]
    Remote { code: String, message: String },
    #[error("Guest agent protocol error: {0}")]
    Protocol(String),
}

/// The agent inside one capsule.
#[async_trait]
pub trait GuestAgent: Send + Sync + Debug {
    /// One health probe.
    async fn health(&self) -> Result<(), AgentError>;

    /// Polls health until it answers or `timeout` elapses.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt = tokio::time::timeout(Duration::from_millis(500), self.health()).await;
            if let Ok(Ok(())) = attempt {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AgentError::NotReady {
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn init(&self, init: &GuestInit) -> Result<(), AgentError>;

    async fn exec(&self, req: &ExecRequest) -> Result<ExecStream, AgentError>;

    /// Re-attaches to a running process's output.
    async fn connect(&self, pid: u32) -> Result<ExecStream, AgentError>;

    async fn list_processes(&self) -> Result<Vec<ProcessEntry>, AgentError>;

    async fn send_stdin(&self, pid: u32, data: Bytes) -> Result<(), AgentError>;

    async fn close_stdin(&self, pid: u32) -> Result<(), AgentError>;

    /// Writes to the terminal of a process started with [`ExecRequest::pty`]
    /// (keystrokes: `\x03` is Ctrl-C, `\x04` Ctrl-D).
    async fn send_pty_input(&self, pid: u32, data: Bytes) -> Result<(), AgentError>;

    /// Resizes the terminal of a process started with [`ExecRequest::pty`] (the
    /// process gets `SIGWINCH`).
    async fn resize_pty(&self, pid: u32, size: PtySize) -> Result<(), AgentError>;

    /// SIGKILL (`kill = true`) or SIGTERM.
    async fn signal(&self, pid: u32, kill: bool) -> Result<(), AgentError>;

    async fn read_file(&self, path: &str) -> Result<ByteStream, AgentError>;

    async fn write_file(&self, path: &str, data: ByteStream) -> Result<(), AgentError>;

    async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<FileEntry>, AgentError>;

    async fn stat(&self, path: &str) -> Result<FileEntry, AgentError>;

    async fn make_dir(&self, path: &str) -> Result<FileEntry, AgentError>;

    async fn remove(&self, path: &str) -> Result<(), AgentError>;
}

/// Makes agent clients for a capsule's address and token.
pub trait GuestConnector: Send + Sync + Debug {
    fn connect(&self, addr: SocketAddr, access_token: Option<String>) -> Arc<dyn GuestAgent>;
}
