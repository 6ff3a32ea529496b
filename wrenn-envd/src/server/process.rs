//! `process.Process`: spawning commands (pipes or a real pseudo-terminal), the
//! process table, output fan-out to every attached client, input, signals.
//!
//! A process belongs to the table, not to the request that started it: a client
//! that disconnects leaves it running, and any client may re-attach by pid or tag.
//! Output is delivered with backpressure (no client ever misses a chunk it was
//! attached for); a process nobody listens to has its output discarded.

use super::rpc::{open_stream, stream_error_response, Rpc, RpcError, StreamSender};
use super::users::User;
use super::AppState;
use crate::connect::{parse_timeout_ms, Codec, ConnectError, EnvelopeDecoder};
use crate::proto::process::process_event::{
    data_event::Output, DataEvent, EndEvent, Event, KeepAlive, StartEvent,
};
use crate::proto::process::process_input::Input;
use crate::proto::process::process_selector::Selector;
use crate::proto::process::pty::Size as PtySize;
use crate::proto::process::stream_input_request::Event as StreamInputEvent;
use crate::proto::process::*;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal as NixSignal};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{unix::AsyncFd, AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch};

/// Output read size for pipes.
const PIPE_CHUNK: usize = 32 * 1024;
/// Output read size for PTYs.
const PTY_CHUNK: usize = 16 * 1024;
/// Events buffered per attached client before the process output waits for it.
const SUBSCRIBER_QUEUE: usize = 64;
/// After the process exits, output still arriving (from children holding the
/// pipe) is read until the pipe stays quiet this long.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// All processes started through envd that have not finished yet.
#[derive(Debug, Default)]
pub struct ProcessTable {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl ProcessTable {
    fn insert(&self, p: Arc<Proc>) {
        if let Ok(mut m) = self.procs.lock() {
            m.insert(p.pid, p);
        }
    }

    fn remove(&self, pid: u32) {
        if let Ok(mut m) = self.procs.lock() {
            m.remove(&pid);
        }
    }

    /// Finds a process by pid or tag.
    pub fn get(&self, sel: Option<&ProcessSelector>) -> Result<Arc<Proc>, ConnectError> {
        let sel = sel
            .and_then(|s| s.selector.as_ref())
            .ok_or_else(|| ConnectError::invalid_argument("process selector is required"))?;
        let m = self
            .procs
            .lock()
            .map_err(|_| ConnectError::internal("process table poisoned"))?;
        let found = match sel {
            Selector::Pid(pid) => m.get(pid).cloned(),
            Selector::Tag(tag) => m
                .values()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
        };
        found.ok_or_else(|| match sel {
            Selector::Pid(pid) => {
                ConnectError::not_found(format!("process with pid {pid} not found"))
            }
            Selector::Tag(tag) => {
                ConnectError::not_found(format!("process with tag {tag} not found"))
            }
        })
    }

    /// Running processes, in pid order.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let m = match self.procs.lock() {
            Ok(m) => m,
            Err(_) => return Vec::new(),
        };
        let mut out: Vec<ProcessInfo> = m
            .values()
            .map(|p| ProcessInfo {
                config: Some(p.config.clone()),
                pid: p.pid,
                tag: p.tag.clone(),
            })
            .collect();
        out.sort_by_key(|p| p.pid);
        out
    }

    /// Number of live processes.
    pub fn len(&self) -> usize {
        self.procs.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Kills every process group (daemon shutdown).
    pub fn kill_all(&self) {
        if let Ok(m) = self.procs.lock() {
            for p in m.values() {
                p.signal(NixSignal::SIGKILL);
            }
        }
    }
}

/// Where input for a process goes.
#[derive(Debug)]
enum InputSink {
    Pipe(Option<ChildStdin>),
    Pty,
    Closed,
}

#[derive(Debug, Default)]
struct Subscribers {
    list: Vec<mpsc::Sender<Event>>,
    ended: bool,
}

/// One process started through envd.
#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    tag: Option<String>,
    config: ProcessConfig,
    input: tokio::sync::Mutex<InputSink>,
    pty: Option<Arc<PtyMaster>>,
    subs: Mutex<Subscribers>,
}

impl Proc {
    /// Attaches a new listener; `None` once the process has ended.
    fn subscribe(&self) -> Option<mpsc::Receiver<Event>> {
        let mut g = self.subs.lock().ok()?;
        if g.ended {
            return None;
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        g.list.push(tx);
        Some(rx)
    }

    /// Delivers an event to every listener, waiting for slow ones; drops the gone.
    async fn broadcast(&self, ev: Event) {
        let subs = match self.subs.lock() {
            Ok(g) => g.list.clone(),
            Err(_) => return,
        };
        let mut gone = false;
        for s in &subs {
            if s.send(ev.clone()).await.is_err() {
                gone = true;
            }
        }
        if gone {
            if let Ok(mut g) = self.subs.lock() {
                g.list.retain(|s| !s.is_closed());
            }
        }
    }

    /// Delivers the end event and closes every listener's stream.
    async fn finish(&self, end: EndEvent) {
        let subs = match self.subs.lock() {
            Ok(mut g) => {
                g.ended = true;
                std::mem::take(&mut g.list)
            }
            Err(_) => return,
        };
        for s in subs {
            let _ = s.send(Event::End(end.clone())).await;
        }
    }

    /// Signals the process group (the process leads its own session), else the process.
    fn signal(&self, sig: NixSignal) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        kill(Pid::from_raw(-pid), sig).is_ok() || kill(Pid::from_raw(pid), sig).is_ok()
    }

    async fn write_input(&self, data: &[u8]) -> Result<(), ConnectError> {
        let mut sink = self.input.lock().await;
        match &mut *sink {
            InputSink::Pipe(Some(stdin)) => {
                let res = async {
                    stdin.write_all(data).await?;
                    stdin.flush().await
                }
                .await;
                res.map_err(|e| ConnectError::from_io(&e, "writing to stdin"))
            }
            InputSink::Pty => match &self.pty {
                Some(pty) => pty
                    .write_all(data)
                    .await
                    .map_err(|e| ConnectError::from_io(&e, "writing to pty")),
                None => Err(ConnectError::internal("pty missing")),
            },
            InputSink::Pipe(None) | InputSink::Closed => Err(ConnectError::new(
                crate::connect::Code::FailedPrecondition,
                format!(
                    "stdin of process {} is closed or was not requested",
                    self.pid
                ),
            )),
        }
    }
}

/// The master side of a pseudo-terminal, non-blocking under the tokio reactor.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    fn new(fd: OwnedFd) -> std::io::Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
        // SAFETY: `fd` is an open pty master owned by the AsyncFd from here on; an
        // OwnedFd always reports the same raw fd and closes it only when dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(PtyMaster { fd })
    }

    async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| {
                nix::unistd::write(inner.get_ref(), data).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    fn resize(&self, cols: u16, rows: u16) -> std::io::Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points to a
        // live stack value for the duration of the call; the fd is an open pty master.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/process.Process/List", post(list))
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect))
        .route("/process.Process/Update", post(update))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/CloseStdin", post(close_stdin))
}

async fn list(State(st): State<Arc<AppState>>, rpc: Rpc<ListRequest>) -> Response {
    rpc.reply(&ListResponse {
        processes: st.processes.list(),
    })
}

fn exit_status_text(status: &std::process::ExitStatus) -> (i32, bool, String) {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return (code, true, format!("exit status {code}"));
    }
    let sig = status.signal().unwrap_or(0);
    let name = match sig {
        1 => "hangup".to_string(),
        2 => "interrupt".to_string(),
        3 => "quit".to_string(),
        6 => "aborted".to_string(),
        9 => "killed".to_string(),
        11 => "segmentation fault".to_string(),
        13 => "broken pipe".to_string(),
        15 => "terminated".to_string(),
        n => format!("signal {n}"),
    };
    (-1, false, format!("signal: {name}"))
}

/// Everything needed to spawn, validated before anything is created.
struct SpawnPlan {
    user: User,
    cmd: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    pty: Option<PtySize>,
    stdin: bool,
}

fn plan(st: &AppState, req: &StartRequest, headers: &HeaderMap) -> Result<SpawnPlan, ConnectError> {
    let user = st.rpc_user(headers)?;
    let cfg = req
        .process
        .as_ref()
        .ok_or_else(|| ConnectError::invalid_argument("process config is required"))?;
    if cfg.cmd.is_empty() {
        return Err(ConnectError::invalid_argument("process cmd is required"));
    }
    let cwd = match cfg.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => st.resolve_path(c, &user),
        None => match st.default_workdir() {
            Some(w) => st.resolve_path(&w, &user),
            None => user.home.clone(),
        },
    };
    let cwd = if cfg.cwd.is_none() && !cwd.is_dir() {
        PathBuf::from("/")
    } else {
        cwd
    };
    if !cwd.is_dir() {
        return Err(ConnectError::invalid_argument(format!(
            "cwd '{}' does not exist or is not a directory",
            cwd.display()
        )));
    }
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), path),
        ("HOME".into(), user.home.display().to_string()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
    ];
    let mut merged: Vec<(String, String)> = st.default_env().into_iter().collect();
    merged.sort();
    let mut request_envs: Vec<(String, String)> = cfg.envs.clone().into_iter().collect();
    request_envs.sort();
    merged.extend(request_envs);
    for (k, v) in merged {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ConnectError::invalid_argument(format!(
                "invalid environment variable {k:?}"
            )));
        }
        env.retain(|(ek, _)| ek != &k);
        env.push((k, v));
    }
    let pty = req
        .pty
        .as_ref()
        .map(|p| p.size.unwrap_or(PtySize { cols: 80, rows: 24 }));
    Ok(SpawnPlan {
        user,
        cmd: cfg.cmd.clone(),
        args: cfg.args.clone(),
        env,
        cwd,
        stdin: req.stdin.unwrap_or(true),
        pty,
    })
}

/// What `spawn` hands to the supervisor.
struct Spawned {
    child: Child,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    stdin: Option<ChildStdin>,
    pty: Option<Arc<PtyMaster>>,
}

fn spawn(plan: &SpawnPlan) -> Result<Spawned, ConnectError> {
    let mut cmd = Command::new(&plan.cmd);
    cmd.args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().cloned())
        .current_dir(&plan.cwd);

    let mut pty_master = None;
    if let Some(size) = &plan.pty {
        let ws = nix::pty::Winsize {
            ws_row: u16::try_from(size.rows).unwrap_or(24).max(1),
            ws_col: u16::try_from(size.cols).unwrap_or(80).max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pair = nix::pty::openpty(Some(&ws), None)
            .map_err(|e| ConnectError::internal(format!("openpty: {e}")))?;
        let slave = pair.slave;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| ConnectError::from_io(&e, "dup pty"))
        };
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        pty_master = Some(Arc::new(
            PtyMaster::new(pair.master).map_err(|e| ConnectError::from_io(&e, "pty master"))?,
        ));
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if plan.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    }

    let is_pty = plan.pty.is_some();
    let switch_user = nix::unistd::geteuid().is_root();
    let uid = nix::unistd::Uid::from_raw(plan.user.uid);
    let gid = nix::unistd::Gid::from_raw(plan.user.gid);
    let groups: Vec<nix::unistd::Gid> = plan
        .user
        .groups()
        .into_iter()
        .map(nix::unistd::Gid::from_raw)
        .collect();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (setsid, ioctl, open/write/close, setgroups,
    // setgid, setuid) on values prepared before the fork; it does not allocate or
    // take locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // User commands are the first the OOM killer should pick, not envd.
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"100".as_ptr().cast(), 3);
                libc::close(fd);
            }
            if is_pty {
                // fd 0 is the pty slave installed by the spawner; TIOCSCTTY takes an int arg.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if switch_user {
                nix::unistd::setgroups(&groups).map_err(std::io::Error::from)?;
                nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
                nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }

    let mut child = cmd.spawn().map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            crate::connect::Code::NotFound
        } else {
            crate::connect::Code::InvalidArgument
        };
        ConnectError::new(code, format!("failed to start process '{}': {e}", plan.cmd))
    })?;
    Ok(Spawned {
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        stdin: child.stdin.take(),
        pty: pty_master,
        child,
    })
}

async fn start(State(st): State<Arc<AppState>>, rpc: Rpc<StartRequest>) -> Response {
    let codec = rpc.codec;
    let keepalive = rpc.keepalive_interval();
    let deadline = match rpc
        .headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
    {
        Some(v) => match parse_timeout_ms(v) {
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(e) => return stream_error_response(codec, e),
        },
        None => None,
    };
    let plan = match plan(&st, &rpc.msg, &rpc.headers) {
        Ok(p) => p,
        Err(e) => return stream_error_response(codec, e),
    };
    let spawned = match spawn(&plan) {
        Ok(s) => s,
        Err(e) => return stream_error_response(codec, e),
    };
    let mut config = rpc.msg.process.clone().unwrap_or_default();
    config.cwd = Some(plan.cwd.display().to_string());
    tracing::debug!(cmd = %plan.cmd, user = %plan.user.name, pty = plan.pty.is_some(), "starting process");
    let Some((proc, rx, timed_out_rx)) =
        register(&st, spawned, rpc.msg.tag.clone(), config, deadline)
    else {
        return stream_error_response(
            codec,
            ConnectError::internal("process exited before it was registered"),
        );
    };
    let pid = proc.pid;
    let (sender, resp) = open_stream(codec);
    match rx {
        Some(rx) => {
            tokio::spawn(forward::<StartResponse>(
                sender,
                rx,
                pid,
                keepalive,
                Some(timed_out_rx),
            ));
        }
        None => sender.finish(None).await,
    }
    resp
}

/// A registered process, its first listener, and whether its lifetime ran out.
type Registered = (
    Arc<Proc>,
    Option<mpsc::Receiver<Event>>,
    watch::Receiver<bool>,
);

/// Puts a spawned process in the table, attaches its first listener (before any
/// output can be produced) and starts its supervisor.
fn register(
    st: &Arc<AppState>,
    spawned: Spawned,
    tag: Option<String>,
    config: ProcessConfig,
    deadline: Option<Duration>,
) -> Option<Registered> {
    let pid = spawned.child.id()?;
    let input = match (&spawned.pty, spawned.stdin) {
        (Some(_), _) => InputSink::Pty,
        (None, Some(stdin)) => InputSink::Pipe(Some(stdin)),
        (None, None) => InputSink::Closed,
    };
    let proc = Arc::new(Proc {
        pid,
        tag,
        config,
        input: tokio::sync::Mutex::new(input),
        pty: spawned.pty.clone(),
        subs: Mutex::new(Subscribers::default()),
    });
    let rx = proc.subscribe();
    st.processes.insert(proc.clone());
    let (timed_out_tx, timed_out_rx) = watch::channel(false);
    tokio::spawn(supervise(
        st.clone(),
        proc.clone(),
        spawned.child,
        spawned.stdout,
        spawned.stderr,
        spawned.pty,
        deadline,
        timed_out_tx,
    ));
    Some((proc, rx, timed_out_rx))
}

/// Reads one output source until EOF (or until quiet after the process exited)
/// and broadcasts it in chunks of up to `chunk` bytes.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    chunk: usize,
    wrap: fn(Bytes) -> Output,
    proc: Arc<Proc>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; chunk];
    let mut draining = false;
    loop {
        let n = if draining {
            match tokio::time::timeout(DRAIN_QUIET, r.read(&mut buf)).await {
                Ok(res) => res,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                res = r.read(&mut buf) => res,
                _ = exited.changed() => { draining = true; continue; }
            }
        };
        match n {
            // EOF, or EIO from a pty whose every slave fd is closed.
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let data = Bytes::copy_from_slice(&buf[..n]);
                proc.broadcast(Event::Data(DataEvent {
                    output: Some(wrap(data)),
                }))
                .await;
            }
        }
    }
}

/// The read side of a pty master as an `AsyncRead`.
struct PtyReader(Arc<PtyMaster>);

impl AsyncRead for PtyReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            let mut guard = match self.0.fd.poll_read_ready(cx) {
                std::task::Poll::Ready(Ok(g)) => g,
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| {
                nix::unistd::read(inner.as_raw_fd(), unfilled).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return std::task::Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    st: Arc<AppState>,
    proc: Arc<Proc>,
    mut child: Child,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    pty: Option<Arc<PtyMaster>>,
    deadline: Option<Duration>,
    timed_out: watch::Sender<bool>,
) {
    let (exit_tx, exit_rx) = watch::channel(false);
    let mut pumps = Vec::new();
    if let Some(out) = stdout {
        pumps.push(tokio::spawn(pump(
            out,
            PIPE_CHUNK,
            Output::Stdout,
            proc.clone(),
            exit_rx.clone(),
        )));
    }
    if let Some(err) = stderr {
        pumps.push(tokio::spawn(pump(
            err,
            PIPE_CHUNK,
            Output::Stderr,
            proc.clone(),
            exit_rx.clone(),
        )));
    }
    if let Some(pty) = pty {
        pumps.push(tokio::spawn(pump(
            PtyReader(pty),
            PTY_CHUNK,
            Output::Pty,
            proc.clone(),
            exit_rx.clone(),
        )));
    }

    let status = match deadline {
        None => child.wait().await,
        Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
            Ok(res) => res,
            Err(_) => {
                tracing::debug!(pid = proc.pid, "process lifetime elapsed; killing");
                let _ = timed_out.send(true);
                proc.signal(NixSignal::SIGKILL);
                child.wait().await
            }
        },
    };
    let _ = exit_tx.send(true);
    for p in pumps {
        let _ = p.await;
    }
    // Nothing can write to it any more.
    *proc.input.lock().await = InputSink::Closed;

    let end = match status {
        Ok(s) => {
            let (exit_code, exited, status) = exit_status_text(&s);
            EndEvent {
                exit_code,
                exited,
                status,
                error: None,
            }
        }
        Err(e) => EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some(e.to_string()),
        },
    };
    tracing::debug!(pid = proc.pid, status = %end.status, "process ended");
    st.processes.remove(proc.pid);
    proc.finish(end).await;
}

/// Streams one listener's events to its client, with keepalives while quiet.
async fn forward<R: From<Event> + prost::Message + serde::Serialize>(
    sender: StreamSender,
    mut rx: mpsc::Receiver<Event>,
    pid: u32,
    keepalive: Duration,
    timed_out: Option<watch::Receiver<bool>>,
) {
    if sender
        .send(&R::from(Event::Start(StartEvent { pid })))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let next = tokio::select! {
            ev = tokio::time::timeout(keepalive, rx.recv()) => ev,
            _ = sender.closed() => return,
        };
        match next {
            Ok(Some(ev)) => {
                if sender.send(&R::from(ev)).await.is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(_idle) => {
                if sender
                    .send(&R::from(Event::Keepalive(KeepAlive {})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let err = match timed_out {
        Some(t) if *t.borrow() => Some(ConnectError::new(
            crate::connect::Code::DeadlineExceeded,
            "the process was killed because its timeout elapsed",
        )),
        _ => None,
    };
    sender.finish(err).await;
}

async fn connect(State(st): State<Arc<AppState>>, rpc: Rpc<ConnectRequest>) -> Response {
    let codec = rpc.codec;
    let proc = match st.processes.get(rpc.msg.process.as_ref()) {
        Ok(p) => p,
        Err(e) => return stream_error_response(codec, e),
    };
    let Some(rx) = proc.subscribe() else {
        return stream_error_response(
            codec,
            ConnectError::not_found(format!("process with pid {} not found", proc.pid)),
        );
    };
    let (sender, resp) = open_stream(codec);
    tokio::spawn(forward::<ConnectResponse>(
        sender,
        rx,
        proc.pid,
        rpc.keepalive_interval(),
        None,
    ));
    resp
}

async fn update(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<UpdateRequest>,
) -> Result<Response, RpcError> {
    let proc = st.processes.get(rpc.msg.process.as_ref())?;
    if let Some(size) = rpc.msg.pty.as_ref().and_then(|p| p.size.as_ref()) {
        let pty = proc.pty.as_ref().ok_or_else(|| {
            ConnectError::new(
                crate::connect::Code::FailedPrecondition,
                format!("process {} has no pty", proc.pid),
            )
        })?;
        let cols = u16::try_from(size.cols)
            .map_err(|_| ConnectError::invalid_argument("pty cols out of range"))?;
        let rows = u16::try_from(size.rows)
            .map_err(|_| ConnectError::invalid_argument("pty rows out of range"))?;
        pty.resize(cols, rows)
            .map_err(|e| ConnectError::from_io(&e, "resizing pty"))?;
    }
    Ok(rpc.reply(&UpdateResponse {}))
}

fn input_bytes(input: Option<&ProcessInput>) -> Result<&Bytes, ConnectError> {
    match input.and_then(|i| i.input.as_ref()) {
        Some(Input::Stdin(b)) | Some(Input::Pty(b)) => Ok(b),
        None => Err(ConnectError::invalid_argument("input is required")),
    }
}

async fn send_input(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<SendInputRequest>,
) -> Result<Response, RpcError> {
    let proc = st.processes.get(rpc.msg.process.as_ref())?;
    let data = input_bytes(rpc.msg.input.as_ref())?;
    proc.write_input(data).await?;
    Ok(rpc.reply(&SendInputResponse {}))
}

async fn send_signal(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<SendSignalRequest>,
) -> Result<Response, RpcError> {
    let proc = st.processes.get(rpc.msg.process.as_ref())?;
    let sig = match Signal::try_from(rpc.msg.signal) {
        Ok(Signal::Sigkill) => NixSignal::SIGKILL,
        Ok(Signal::Sigterm) => NixSignal::SIGTERM,
        _ => {
            return Err(ConnectError::invalid_argument(format!(
                "unsupported signal {}",
                rpc.msg.signal
            ))
            .into())
        }
    };
    if !proc.signal(sig) {
        return Err(
            ConnectError::not_found(format!("process with pid {} not found", proc.pid)).into(),
        );
    }
    Ok(rpc.reply(&SendSignalResponse {}))
}

async fn close_stdin(
    State(st): State<Arc<AppState>>,
    rpc: Rpc<CloseStdinRequest>,
) -> Result<Response, RpcError> {
    let proc = st.processes.get(rpc.msg.process.as_ref())?;
    let mut sink = proc.input.lock().await;
    match &mut *sink {
        InputSink::Pty => {
            return Err(ConnectError::new(
                crate::connect::Code::FailedPrecondition,
                "cannot close stdin of a PTY process; send Ctrl+D (0x04) instead",
            )
            .into())
        }
        InputSink::Pipe(stdin) => {
            if let Some(mut s) = stdin.take() {
                let _ = s.shutdown().await;
            }
        }
        InputSink::Closed => {}
    }
    *sink = InputSink::Closed;
    drop(sink);
    Ok(rpc.reply(&CloseStdinResponse {}))
}

/// Client stream: `start{process}` then `data{input}`…, ending at body EOF.
async fn stream_input(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let codec = match Codec::from_content_type(ct) {
        Some((c, crate::connect::CallKind::Stream)) => c,
        _ => {
            return (
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content type {ct:?}"),
            )
                .into_response()
        }
    };
    let result = consume_input_stream(&st, codec, body).await;
    let (sender, resp) = open_stream(codec);
    match result {
        Ok(()) => {
            if sender.send(&StreamInputResponse {}).await.is_ok() {
                sender.finish(None).await;
            }
        }
        Err(e) => sender.finish(Some(e)).await,
    }
    resp
}

async fn consume_input_stream(st: &AppState, codec: Codec, body: Body) -> Result<(), ConnectError> {
    let mut stream = body.into_data_stream();
    let mut dec = EnvelopeDecoder::new();
    let mut target: Option<Arc<Proc>> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ConnectError::invalid_argument(format!("reading request body: {e}")))?;
        dec.push(&chunk);
        while let Some(env) = dec.next_envelope()? {
            if env.is_end_stream() {
                continue;
            }
            let msg: StreamInputRequest = codec.decode(&env.data)?;
            match msg.event {
                Some(StreamInputEvent::Start(s)) => {
                    target = Some(st.processes.get(s.process.as_ref())?)
                }
                Some(StreamInputEvent::Data(d)) => {
                    let proc = target.as_ref().ok_or_else(|| {
                        ConnectError::invalid_argument("first message must be start")
                    })?;
                    proc.write_input(input_bytes(d.input.as_ref())?).await?;
                }
                Some(StreamInputEvent::Keepalive(_)) | None => {}
            }
        }
    }
    dec.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_status_text_matches_go() {
        let ok = std::process::ExitStatus::from_raw(0);
        assert_eq!(exit_status_text(&ok), (0, true, "exit status 0".into()));
        let seven = std::process::ExitStatus::from_raw(7 << 8);
        assert_eq!(exit_status_text(&seven), (7, true, "exit status 7".into()));
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(
            exit_status_text(&killed),
            (-1, false, "signal: killed".into())
        );
    }

    fn state() -> Arc<AppState> {
        AppState::new(super::super::Config {
            default_user: "root".into(),
            sync_clock: false,
            env_file: None,
        })
    }

    fn start_req(cmd: &str, args: &[&str], stdin: bool) -> StartRequest {
        StartRequest {
            process: Some(ProcessConfig {
                cmd: cmd.into(),
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            stdin: Some(stdin),
            ..Default::default()
        }
    }

    /// Spawns through the same path as the RPC and returns the first listener.
    async fn launch(st: &Arc<AppState>, req: StartRequest) -> (Arc<Proc>, mpsc::Receiver<Event>) {
        let plan = plan(st, &req, &HeaderMap::new()).unwrap();
        let sp = spawn(&plan).unwrap();
        let config = req.process.clone().unwrap_or_default();
        let (proc, rx, _) = register(st, sp, req.tag.clone(), config, None).unwrap();
        (proc, rx.unwrap())
    }

    async fn collect(mut rx: mpsc::Receiver<Event>) -> (Vec<u8>, Vec<u8>, EndEvent) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Data(DataEvent {
                    output: Some(Output::Stdout(b)),
                }) => out.extend_from_slice(&b),
                Event::Data(DataEvent {
                    output: Some(Output::Stderr(b)),
                }) => err.extend_from_slice(&b),
                Event::End(e) => return (out, err, e),
                _ => {}
            }
        }
        panic!("stream closed without an end event");
    }

    #[tokio::test]
    async fn table_tracks_process_until_it_ends() {
        let st = state();
        let (proc, rx) = launch(
            &st,
            start_req("/bin/sh", &["-c", "echo out; echo err >&2; exit 3"], false),
        )
        .await;
        assert!(st
            .processes
            .get(Some(&ProcessSelector::pid(proc.pid)))
            .is_ok());
        let (out, err, end) = collect(rx).await;
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!((end.exit_code, end.exited), (3, true));
        let gone = st
            .processes
            .get(Some(&ProcessSelector::pid(proc.pid)))
            .unwrap_err();
        assert_eq!(gone.code, crate::connect::Code::NotFound);
        assert!(st.processes.is_empty());
    }

    #[tokio::test]
    async fn output_fans_out_to_every_listener_and_stdin_works() {
        let st = state();
        let mut req = start_req("/bin/cat", &[], true);
        req.tag = Some("cat-1".into());
        let (proc, rx1) = launch(&st, req).await;
        let again = st
            .processes
            .get(Some(&ProcessSelector::tag("cat-1")))
            .unwrap();
        let rx2 = again.subscribe().unwrap();
        assert_eq!(st.processes.list().len(), 1);
        proc.write_input(b"hello\n").await.unwrap();
        *proc.input.lock().await = InputSink::Closed; // close stdin: cat exits
        let (a, b) = tokio::join!(collect(rx1), collect(rx2));
        assert_eq!(a.0, b"hello\n");
        assert_eq!(b.0, b"hello\n");
        assert_eq!(a.2.exit_code, 0);
    }

    #[tokio::test]
    async fn kill_reports_signal_and_reaps() {
        let st = state();
        let (proc, rx) = launch(&st, start_req("/bin/sleep", &["30"], false)).await;
        assert!(proc.signal(NixSignal::SIGKILL));
        let (_, _, end) = collect(rx).await;
        assert_eq!(
            (end.exit_code, end.exited, end.status.as_str()),
            (-1, false, "signal: killed")
        );
        // Reaped: no zombie left under this pid.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", proc.pid)).unwrap_or_default();
        assert!(
            stat.is_empty() || !stat.contains(") Z "),
            "zombie left: {stat}"
        );
    }

    #[tokio::test]
    async fn background_child_holding_the_pipe_does_not_hang_the_end() {
        let st = state();
        let (_proc, rx) = launch(
            &st,
            start_req("/bin/sh", &["-c", "sleep 5 & echo started"], false),
        )
        .await;
        let res = tokio::time::timeout(Duration::from_secs(3), collect(rx)).await;
        let (out, _, end) = res.expect("end event must not wait for the background child");
        assert_eq!(out, b"started\n");
        assert_eq!(end.exit_code, 0);
    }

    #[tokio::test]
    async fn missing_command_and_cwd_are_errors() {
        let st = state();
        let plan_ok = plan(
            &st,
            &start_req("/nonexistent/cmd", &[], false),
            &HeaderMap::new(),
        )
        .unwrap();
        let err = spawn(&plan_ok).map(|_| ()).unwrap_err();
        assert_eq!(err.code, crate::connect::Code::NotFound);
        let mut req = start_req("/bin/true", &[], false);
        req.process.as_mut().unwrap().cwd = Some("/definitely/not/here".into());
        let err = plan(&st, &req, &HeaderMap::new()).map(|_| ()).unwrap_err();
        assert_eq!(err.code, crate::connect::Code::InvalidArgument);
    }
}
