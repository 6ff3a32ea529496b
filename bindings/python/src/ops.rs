//! The operations: one lazily started `wrenn::Host`, capsule ownership
//! ([`Owned`], [`Handle`]), commands ([`Process`]) and files.

use crate::pending::{none, out, ready, runtime, spawn, Fail, Out, Pending, SHUTTING_DOWN};
use bytes::Bytes;
use futures_util::StreamExt;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};
use wrenn::guest::{AgentError, EntryKind, ExecEvent, ExecRequest, FileEntry};
use wrenn::{CapsuleId, CapsuleInfo, CreateOptions, DiskOvercommit, Host, HostOptions};

static HOST: OnceCell<Host> = OnceCell::const_new();

/// Operations that may bring capsules into being (create, fork, connect) still
/// running: interpreter exit waits for them, so their capsules are destroyed too.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The process's host, started on first use (the startup sweep removes what
/// crashed processes left behind), configured from the environment as `wrenn
/// serve` is: `WRENN_DATA_DIR`, `WRENN_DISK_RESERVE_MB`, `WRENN_DISK_OVERCOMMIT`.
async fn host() -> Result<&'static Host, Fail> {
    HOST.get_or_try_init(|| async { Host::local(host_options()?).await.map_err(Fail::from) })
        .await
}

fn host_options() -> Result<HostOptions, Fail> {
    fn var<T: std::str::FromStr>(name: &str) -> Result<Option<T>, Fail>
    where
        T::Err: std::fmt::Display,
    {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .map(Some)
                .map_err(|e| Fail::new("invalid_argument", format!("{name}={v:?}: {e}"))),
            Err(_) => Ok(None),
        }
    }
    let mut opts = HostOptions::default();
    if let Some(mb) = var::<u64>("WRENN_DISK_RESERVE_MB")? {
        opts.disk_reserve_mb = mb;
    }
    if let Some(ratio) = var::<DiskOvercommit>("WRENN_DISK_OVERCOMMIT")? {
        opts.disk_overcommit = ratio;
    }
    Ok(opts)
}

fn parse_id(id: &str) -> Result<CapsuleId, Fail> {
    CapsuleId::parse(id).map_err(|e| Fail::new("invalid_argument", e.to_string()))
}

// ---------------------------------------------------------------------------
// Ownership

/// This process's claim on a capsule: when the last Python object bound to it
/// goes away without an explicit destroy, the capsule is destroyed.
#[derive(Debug)]
pub struct Owned {
    id: CapsuleId,
    /// Destroyed explicitly (or deliberately kept): nothing to do on drop.
    released: AtomicBool,
}

static OWNED: LazyLock<Mutex<HashMap<CapsuleId, Weak<Owned>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn owned_map() -> std::sync::MutexGuard<'static, HashMap<CapsuleId, Weak<Owned>>> {
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The live claim on `id`, or a new one.
fn own(id: &CapsuleId) -> Arc<Owned> {
    let mut map = owned_map();
    if let Some(live) = map.get(id).and_then(Weak::upgrade) {
        return live;
    }
    let fresh = Arc::new(Owned {
        id: id.clone(),
        released: AtomicBool::new(false),
    });
    map.insert(id.clone(), Arc::downgrade(&fresh));
    fresh
}

/// Marks the claim on `id` (if any) released: an explicit destroy is under way.
fn release(id: &CapsuleId) {
    let live = owned_map().get(id).and_then(Weak::upgrade);
    if let Some(o) = live {
        o.released.store(true, Ordering::SeqCst);
    }
    // `live` is dropped here, outside the map's lock.
}

impl Drop for Owned {
    fn drop(&mut self) {
        {
            let mut map = owned_map();
            if map.get(&self.id).is_some_and(|w| w.strong_count() == 0) {
                map.remove(&self.id);
            }
        }
        if self.released.load(Ordering::SeqCst) || SHUTTING_DOWN.load(Ordering::SeqCst) {
            return;
        }
        // Never block here: this runs wherever Python frees the object (the GC
        // holds the GIL). The destroy runs on the runtime.
        let id = self.id.clone();
        runtime().spawn(async move {
            if let Some(h) = HOST.get() {
                match h.capsules().destroy(&id).await {
                    Ok(()) | Err(wrenn::CapsuleError::NotFound { .. }) => {}
                    Err(e) => eprintln!(
                        "wrenn_embed: destroying unreferenced capsule {id}: {}",
                        wrenn::manager::error_chain(&e)
                    ),
                }
            }
        });
    }
}

/// A Python object's share of the ownership of a capsule.
#[pyclass(module = "wrenn_embed._native", frozen)]
#[derive(Debug)]
pub struct Handle {
    owned: Arc<Owned>,
}

#[pymethods]
impl Handle {
    #[getter]
    fn id(&self) -> String {
        self.owned.id.to_string()
    }

    /// Gives up the claim: the capsule is no longer destroyed when this handle
    /// is garbage-collected (it still is at interpreter exit).
    fn release(&self) {
        self.owned.released.store(true, Ordering::SeqCst);
    }

    #[getter]
    fn released(&self) -> bool {
        self.owned.released.load(Ordering::SeqCst)
    }

    fn __repr__(&self) -> String {
        format!("<Handle {}>", self.owned.id)
    }
}

// ---------------------------------------------------------------------------
// Conversions

fn info_dict<'py>(py: Python<'py>, c: &CapsuleInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", c.id.as_str())?;
    d.set_item("status", c.status.as_str())?;
    d.set_item("template", &c.template)?;
    d.set_item("vcpus", c.vcpus)?;
    d.set_item("memory_mb", c.memory_mb)?;
    d.set_item("disk_mb", c.disk_mb)?;
    d.set_item("accel", c.accel.to_string())?;
    d.set_item("created_at", c.created_at)?;
    d.set_item("host_addr", c.host_addr.clone())?;
    d.set_item("metadata", c.metadata.clone())?;
    d.set_item("error", c.error.clone())?;
    Ok(d)
}

fn info_out(c: CapsuleInfo) -> Out {
    out(move |py| Ok(info_dict(py, &c)?.into_any().unbind()))
}

/// `(info, Handle)`: the handle holds the claim until Python takes it.
fn owned_out(c: CapsuleInfo, owned: Arc<Owned>) -> Out {
    out(move |py| {
        let h = Py::new(py, Handle { owned })?;
        Ok((info_dict(py, &c)?, h)
            .into_pyobject(py)?
            .into_any()
            .unbind())
    })
}

fn entry_dict<'py>(py: Python<'py>, e: &FileEntry) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &e.name)?;
    d.set_item("path", &e.path)?;
    d.set_item(
        "type",
        match e.kind {
            EntryKind::File => "file",
            EntryKind::Dir => "directory",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        },
    )?;
    d.set_item("size", e.size)?;
    d.set_item("mode", e.mode)?;
    d.set_item("permissions", &e.permissions)?;
    d.set_item("owner", &e.owner)?;
    d.set_item("group", &e.group)?;
    d.set_item("modified_at", e.modified)?;
    d.set_item("symlink_target", e.symlink_target.clone())?;
    Ok(d)
}

fn u32_arg(name: &str, v: Option<i64>) -> Result<Option<u32>, Fail> {
    match v {
        None => Ok(None),
        Some(v) => u32::try_from(v).map(Some).map_err(|_| {
            Fail::new(
                "invalid_argument",
                format!("{name} must be a positive integer, got {v}"),
            )
        }),
    }
}

fn secs_arg(name: &str, v: Option<f64>) -> Result<Option<Duration>, Fail> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
        Some(0.0) => Ok(None),
        Some(s) => Err(Fail::new(
            "invalid_argument",
            format!("{name} must be a positive number of seconds, got {s}"),
        )),
    }
}

/// Runs `f` on the runtime with the host; validation failures finish at once.
fn with_host<F, Fut>(what: &'static str, abortable: bool, f: F) -> Pending
where
    F: FnOnce(&'static Host) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Out, Fail>> + Send + 'static,
{
    spawn(what, abortable, async move {
        let h = host().await?;
        f(h).await
    })
}

fn with_id<F, Fut>(what: &'static str, abortable: bool, id: &str, f: F) -> Pending
where
    F: FnOnce(&'static Host, CapsuleId) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Out, Fail>> + Send + 'static,
{
    match parse_id(id) {
        Err(e) => ready(what, Err(e)),
        Ok(id) => with_host(what, abortable, move |h| f(h, id)),
    }
}

// ---------------------------------------------------------------------------
// Capsules

/// An egress policy from the Python lists (`None`: open).
fn egress_arg(
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    dns_servers: Option<Vec<String>>,
) -> Result<wrenn::egress::EgressPolicy, Fail> {
    wrenn::egress::EgressPolicy::new(
        &allow_out.unwrap_or_default(),
        &deny_out.unwrap_or_default(),
        dns_servers.as_deref(),
    )
    .map_err(|e| Fail::new("invalid_argument", format!("network: {e}")))
}

#[pyfunction]
#[pyo3(signature = (template=None, vcpus=None, memory_mb=None, disk_mb=None, envs=None, metadata=None, cold_boot=false, allow_out=None, deny_out=None, dns_servers=None))]
#[allow(clippy::too_many_arguments)]
fn create(
    template: Option<String>,
    vcpus: Option<i64>,
    memory_mb: Option<i64>,
    disk_mb: Option<i64>,
    envs: Option<HashMap<String, String>>,
    metadata: Option<HashMap<String, String>>,
    cold_boot: bool,
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    dns_servers: Option<Vec<String>>,
) -> Pending {
    let opts = (|| -> Result<CreateOptions, Fail> {
        Ok(CreateOptions {
            template,
            vcpus: u32_arg("vcpus", vcpus)?,
            memory_mb: u32_arg("memory_mb", memory_mb)?,
            disk_mb: u32_arg("disk_mb", disk_mb)?.map(u64::from),
            envs: envs.unwrap_or_default(),
            metadata: metadata.unwrap_or_default(),
            cold_boot,
            network: egress_arg(allow_out, deny_out, dns_servers)?,
        })
    })();
    let opts = match opts {
        Ok(o) => o,
        Err(e) => return ready("create", Err(e)),
    };
    // Not abortable: an interrupted create finishes, and the capsule is destroyed
    // when its unclaimed result is dropped.
    let guard = InFlight::enter();
    with_host("create", false, move |h| async move {
        let _guard = guard;
        let info = h.capsules().create(opts).await?;
        let owned = own(&info.id);
        Ok(owned_out(info, owned))
    })
}

/// Binds to a capsule of this process, or adopts a paused one whose process is gone.
#[pyfunction]
fn connect(id: &str) -> Pending {
    let guard = InFlight::enter();
    with_id("connect", false, id, |h, id| async move {
        let _guard = guard;
        let caps = h.capsules();
        let info = match caps.get(&id) {
            Ok(info) => info,
            Err(_) => caps.adopt(&id).await?,
        };
        let owned = own(&info.id);
        Ok(owned_out(info, owned))
    })
}

#[pyfunction]
fn get(id: &str) -> Pending {
    with_id("get", true, id, |h, id| async move {
        Ok(info_out(h.capsules().get(&id)?))
    })
}

#[pyfunction]
fn list() -> Pending {
    with_host("list", true, |h| async move {
        let all = h.capsules().list();
        Ok(out(move |py| {
            let l = PyList::empty(py);
            for c in &all {
                l.append(info_dict(py, c)?)?;
            }
            Ok(l.into_any().unbind())
        }))
    })
}

#[pyfunction]
fn destroy(id: &str) -> Pending {
    with_id("destroy", false, id, |h, id| async move {
        release(&id);
        h.capsules().destroy(&id).await?;
        Ok(none())
    })
}

#[pyfunction]
fn pause(id: &str) -> Pending {
    with_id("pause", false, id, |h, id| async move {
        h.capsules().pause(&id).await?;
        Ok(info_out(h.capsules().get(&id)?))
    })
}

#[pyfunction]
#[pyo3(signature = (id, allow_out=None, deny_out=None, dns_servers=None))]
fn set_network(
    id: &str,
    allow_out: Option<Vec<String>>,
    deny_out: Option<Vec<String>>,
    dns_servers: Option<Vec<String>>,
) -> Pending {
    match egress_arg(allow_out, deny_out, dns_servers) {
        Err(e) => ready("set_network", Err(e)),
        Ok(policy) => with_id("set_network", false, id, |h, id| async move {
            Ok(info_out(h.capsules().set_network(&id, policy).await?))
        }),
    }
}

#[pyfunction]
fn resume(id: &str) -> Pending {
    with_id("resume", false, id, |h, id| async move {
        Ok(info_out(h.capsules().resume(&id).await?))
    })
}

#[pyfunction]
#[pyo3(signature = (id, name, overwrite=false))]
fn snapshot(id: &str, name: String, overwrite: bool) -> Pending {
    with_id("snapshot", false, id, move |h, id| async move {
        h.capsules().snapshot(&id, &name, overwrite).await?;
        Ok(none())
    })
}

#[pyfunction]
fn fork(id: &str, n: i64) -> Pending {
    let n = match usize::try_from(n) {
        Ok(n) if (1..=64).contains(&n) => n,
        _ => {
            return ready(
                "fork",
                Err(Fail::new(
                    "invalid_argument",
                    format!("fork count must be 1..=64, got {n}"),
                )),
            )
        }
    };
    let guard = InFlight::enter();
    with_id("fork", false, id, move |h, id| async move {
        let _guard = guard;
        let kids = h.capsules().fork(&id, n).await?;
        let owned: Vec<(CapsuleInfo, Arc<Owned>)> = kids
            .into_iter()
            .map(|c| {
                let o = own(&c.id);
                (c, o)
            })
            .collect();
        Ok(out(move |py| {
            let l = PyList::empty(py);
            for (c, o) in owned {
                let h = Py::new(py, Handle { owned: o })?;
                l.append((info_dict(py, &c)?, h))?;
            }
            Ok(l.into_any().unbind())
        }))
    })
}

/// Acceleration, data directory and what the startup sweep removed.
#[pyfunction]
fn host_info() -> Pending {
    with_host("host_info", true, |h| async move {
        let accel = h.accel_probe().accel.to_string();
        let reason = h.accel_probe().reason.to_string();
        let data_dir = h.data_dir().root().display().to_string();
        let s = h.sweep_report().clone();
        Ok(out(move |py| {
            let d = PyDict::new(py);
            d.set_item("accel", accel)?;
            d.set_item("accel_reason", reason)?;
            d.set_item("data_dir", data_dir)?;
            let sw = PyDict::new(py);
            sw.set_item("kept", s.kept)?;
            sw.set_item("paused", s.paused)?;
            sw.set_item("removed_capsules", s.removed_capsules)?;
            sw.set_item("killed_vmms", s.killed_vmms)?;
            sw.set_item("removed_slots", s.removed_slots)?;
            d.set_item("sweep", sw)?;
            Ok(d.into_any().unbind())
        }))
    })
}

/// Destroys every capsule of this process (interpreter exit). Blocks with the GIL
/// released, up to `timeout` seconds; returns how many could not be destroyed.
#[pyfunction]
#[pyo3(signature = (timeout=60.0))]
fn shutdown(py: Python<'_>, timeout: f64) -> usize {
    let Some(h) = HOST.get() else {
        SHUTTING_DOWN.store(true, Ordering::SeqCst);
        return 0;
    };
    let limit = Duration::from_secs_f64(if timeout.is_finite() && timeout > 0.0 {
        timeout
    } else {
        60.0
    });
    let failed = py.allow_threads(|| {
        runtime().block_on(async {
            let all = async {
                loop {
                    // Read before destroying: a create that ends during the pass
                    // below (its capsule still being made when the pass reached
                    // it) gets another pass.
                    let in_flight = IN_FLIGHT.load(Ordering::SeqCst);
                    let failed: Vec<_> = h
                        .capsules()
                        .destroy_all()
                        .await
                        .into_iter()
                        .filter(|(_, e)| !matches!(e, wrenn::CapsuleError::NotFound { .. }))
                        .collect();
                    // A create interrupted (Ctrl-C) just before exit: wait for it,
                    // then destroy what it made.
                    if in_flight == 0 {
                        return failed;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            match tokio::time::timeout(limit, all).await {
                Ok(failed) => {
                    for (id, e) in &failed {
                        eprintln!(
                            "wrenn_embed: destroying capsule {id} at exit: {}",
                            wrenn::manager::error_chain(e)
                        );
                    }
                    failed.len()
                }
                Err(_) => {
                    eprintln!("wrenn_embed: destroying capsules at exit timed out");
                    h.capsules().list().len()
                }
            }
        })
    });
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    failed
}

// ---------------------------------------------------------------------------
// Commands

type Events = mpsc::UnboundedReceiver<Result<ExecEvent, AgentError>>;

/// A started guest process: its pid and its events (buffered on the host, so a
/// process whose output is not read is never blocked by it).
#[pyclass(module = "wrenn_embed._native", frozen)]
#[derive(Debug)]
pub struct Process {
    #[pyo3(get)]
    pid: u32,
    events: Arc<tokio::sync::Mutex<Events>>,
}

impl Process {
    fn start(mut stream: wrenn::guest::ExecStream) -> Process {
        let (tx, rx) = mpsc::unbounded_channel();
        runtime().spawn(async move {
            while let Some(ev) = stream.events.recv().await {
                if tx.send(ev).is_err() {
                    break; // nobody reads any more
                }
            }
        });
        Process {
            pid: stream.pid,
            events: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }
}

#[pymethods]
impl Process {
    /// The next event: `("start", pid)`, `("stdout", bytes)`, `("stderr", bytes)`,
    /// `("exit", code, exited, status)`, or `None` once the stream has ended.
    /// A stream that ends with an error (e.g. the timeout killed the process)
    /// raises it.
    fn next_event(&self) -> Pending {
        let events = self.events.clone();
        spawn("next_event", true, async move {
            let ev = events.lock().await.recv().await;
            match ev {
                None => Ok(none()),
                Some(Err(e)) => Err(e.into()),
                Some(Ok(ev)) => Ok(out(move |py| {
                    let t = match ev {
                        ExecEvent::Started { pid } => ("start", pid).into_pyobject(py)?.into_any(),
                        ExecEvent::Stdout(b) => ("stdout", PyBytes::new(py, &b))
                            .into_pyobject(py)?
                            .into_any(),
                        ExecEvent::Stderr(b) => ("stderr", PyBytes::new(py, &b))
                            .into_pyobject(py)?
                            .into_any(),
                        ExecEvent::Exited(x) => ("exit", x.code, x.exited, x.status)
                            .into_pyobject(py)?
                            .into_any(),
                    };
                    Ok(t.unbind())
                })),
            }
        })
    }

    fn __repr__(&self) -> String {
        format!("<Process pid={}>", self.pid)
    }
}

#[pyfunction]
#[pyo3(signature = (id, cmd, args=None, envs=None, cwd=None, user=None, timeout=None, stdin=false, tag=None))]
#[allow(clippy::too_many_arguments)]
fn exec(
    id: &str,
    cmd: String,
    args: Option<Vec<String>>,
    envs: Option<HashMap<String, String>>,
    cwd: Option<String>,
    user: Option<String>,
    timeout: Option<f64>,
    stdin: bool,
    tag: Option<String>,
) -> Pending {
    let timeout = match secs_arg("timeout", timeout) {
        Ok(t) => t,
        Err(e) => return ready("exec", Err(e)),
    };
    let req = ExecRequest {
        cmd,
        args: args.unwrap_or_default(),
        envs: envs.unwrap_or_default(),
        cwd,
        user,
        stdin,
        timeout,
        tag,
        pty: None,
    };
    with_id("exec", true, id, move |h, id| async move {
        let stream = h.capsules().exec(&id, &req).await?;
        let p = Process::start(stream);
        Ok(out(move |py| Ok(Py::new(py, p)?.into_any())))
    })
}

fn agent_of(h: &Host, id: &CapsuleId) -> Result<Arc<dyn wrenn::guest::GuestAgent>, Fail> {
    Ok(h.capsules().agent(id)?)
}

/// Re-attaches to a running process's output.
#[pyfunction]
fn connect_process(id: &str, pid: u32) -> Pending {
    with_id("connect_process", true, id, move |h, id| async move {
        let stream = agent_of(h, &id)?.connect(pid).await?;
        let p = Process::start(stream);
        Ok(out(move |py| Ok(Py::new(py, p)?.into_any())))
    })
}

#[pyfunction]
fn list_processes(id: &str) -> Pending {
    with_id("list_processes", true, id, |h, id| async move {
        let procs = agent_of(h, &id)?.list_processes().await?;
        Ok(out(move |py| {
            let l = PyList::empty(py);
            for p in &procs {
                let d = PyDict::new(py);
                d.set_item("pid", p.pid)?;
                d.set_item("tag", p.tag.clone())?;
                d.set_item("cmd", &p.cmd)?;
                d.set_item("args", p.args.clone())?;
                l.append(d)?;
            }
            Ok(l.into_any().unbind())
        }))
    })
}

#[pyfunction]
fn send_stdin(id: &str, pid: u32, data: &[u8]) -> Pending {
    let data = Bytes::copy_from_slice(data);
    with_id("send_stdin", true, id, move |h, id| async move {
        agent_of(h, &id)?.send_stdin(pid, data).await?;
        Ok(none())
    })
}

#[pyfunction]
fn close_stdin(id: &str, pid: u32) -> Pending {
    with_id("close_stdin", true, id, move |h, id| async move {
        agent_of(h, &id)?.close_stdin(pid).await?;
        Ok(none())
    })
}

/// SIGKILL (`kill=True`) or SIGTERM.
#[pyfunction]
#[pyo3(signature = (id, pid, kill=true))]
fn signal(id: &str, pid: u32, kill: bool) -> Pending {
    with_id("signal", false, id, move |h, id| async move {
        agent_of(h, &id)?.signal(pid, kill).await?;
        Ok(none())
    })
}

// ---------------------------------------------------------------------------
// Files

#[pyfunction]
fn read_file(id: &str, path: String) -> Pending {
    with_id("read_file", true, id, move |h, id| async move {
        let mut stream = agent_of(h, &id)?.read_file(&path).await?;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?);
        }
        Ok(out(move |py| {
            Ok(PyBytes::new(py, &data).into_any().unbind())
        }))
    })
}

#[pyfunction]
fn write_file(id: &str, path: String, data: &[u8]) -> Pending {
    let data = Bytes::copy_from_slice(data);
    with_id("write_file", true, id, move |h, id| async move {
        const CHUNK: usize = 1 << 20;
        let chunks: Vec<Result<Bytes, AgentError>> = if data.is_empty() {
            vec![Ok(Bytes::new())]
        } else {
            (0..data.len())
                .step_by(CHUNK)
                .map(|i| Ok(data.slice(i..(i + CHUNK).min(data.len()))))
                .collect()
        };
        agent_of(h, &id)?
            .write_file(&path, Box::pin(futures_util::stream::iter(chunks)))
            .await?;
        Ok(none())
    })
}

#[pyfunction]
#[pyo3(signature = (id, path, depth=1))]
fn list_dir(id: &str, path: String, depth: u32) -> Pending {
    with_id("list_dir", true, id, move |h, id| async move {
        let entries = agent_of(h, &id)?.list_dir(&path, depth).await?;
        Ok(out(move |py| {
            let l = PyList::empty(py);
            for e in &entries {
                l.append(entry_dict(py, e)?)?;
            }
            Ok(l.into_any().unbind())
        }))
    })
}

#[pyfunction]
fn stat(id: &str, path: String) -> Pending {
    with_id("stat", true, id, move |h, id| async move {
        let e = agent_of(h, &id)?.stat(&path).await?;
        Ok(out(move |py| Ok(entry_dict(py, &e)?.into_any().unbind())))
    })
}

#[pyfunction]
fn make_dir(id: &str, path: String) -> Pending {
    with_id("make_dir", true, id, move |h, id| async move {
        let e = agent_of(h, &id)?.make_dir(&path).await?;
        Ok(out(move |py| Ok(entry_dict(py, &e)?.into_any().unbind())))
    })
}

#[pyfunction]
fn remove(id: &str, path: String) -> Pending {
    with_id("remove", true, id, move |h, id| async move {
        agent_of(h, &id)?.remove(&path).await?;
        Ok(none())
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for f in [
        wrap_pyfunction!(create, m)?,
        wrap_pyfunction!(connect, m)?,
        wrap_pyfunction!(get, m)?,
        wrap_pyfunction!(list, m)?,
        wrap_pyfunction!(destroy, m)?,
        wrap_pyfunction!(pause, m)?,
        wrap_pyfunction!(resume, m)?,
        wrap_pyfunction!(set_network, m)?,
        wrap_pyfunction!(snapshot, m)?,
        wrap_pyfunction!(fork, m)?,
        wrap_pyfunction!(host_info, m)?,
        wrap_pyfunction!(shutdown, m)?,
        wrap_pyfunction!(exec, m)?,
        wrap_pyfunction!(connect_process, m)?,
        wrap_pyfunction!(list_processes, m)?,
        wrap_pyfunction!(send_stdin, m)?,
        wrap_pyfunction!(close_stdin, m)?,
        wrap_pyfunction!(signal, m)?,
        wrap_pyfunction!(read_file, m)?,
        wrap_pyfunction!(write_file, m)?,
        wrap_pyfunction!(list_dir, m)?,
        wrap_pyfunction!(stat, m)?,
        wrap_pyfunction!(make_dir, m)?,
        wrap_pyfunction!(remove, m)?,
    ] {
        m.add_function(f)?;
    }
    Ok(())
}
