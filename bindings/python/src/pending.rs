//! [`Pending`]: the result of a task on the binding's runtime, waited for by the
//! sync API (GIL released, Ctrl-C checked every 50 ms) or awaited by asyncio
//! (through a done-callback).

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// How often a blocking wait wakes up to let Python handle signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Set at interpreter exit: no more Python callbacks from runtime threads.
pub static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// The binding's runtime. Never dropped: it lives as long as the process.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("wrenn-embed")
            .enable_all()
            .build()
            .expect("cannot start the wrenn_embed tokio runtime")
    })
}

/// An error on its way to Python: a stable kind and a message.
#[derive(Debug, Clone)]
pub struct Fail {
    pub kind: String,
    pub message: String,
}

impl Fail {
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Fail {
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// The Python exception (the kind → class map lives in `wrenn_embed._errors`).
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let made = py
            .import("wrenn_embed._errors")
            .and_then(|m| m.getattr("from_kind"))
            .and_then(|f| f.call1((self.kind.as_str(), self.message.as_str())));
        match made {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        }
    }
}

impl From<wrenn::CapsuleError> for Fail {
    fn from(e: wrenn::CapsuleError) -> Self {
        Fail::new(e.kind(), wrenn::manager::error_chain(&e))
    }
}

impl From<wrenn::guest::AgentError> for Fail {
    fn from(e: wrenn::guest::AgentError) -> Self {
        wrenn::CapsuleError::Agent(e).into()
    }
}

impl From<wrenn::HostError> for Fail {
    fn from(e: wrenn::HostError) -> Self {
        Fail::new("host_error", wrenn::manager::error_chain(&e))
    }
}

/// A finished task's value, converted to Python when it is taken (with the GIL).
/// Dropping it unconverted drops what it holds (e.g. the ownership of a capsule).
pub type Out = Box<dyn FnOnce(Python<'_>) -> PyResult<PyObject> + Send>;

pub fn out<F>(f: F) -> Out
where
    F: FnOnce(Python<'_>) -> PyResult<PyObject> + Send + 'static,
{
    Box::new(f)
}

/// `None` as an [`Out`].
pub fn none() -> Out {
    out(|py| Ok(py.None()))
}

#[derive(Default)]
struct State {
    done: bool,
    result: Option<Result<Out, Fail>>,
    callbacks: Vec<PyObject>,
    abort: Option<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<State>,
    cv: Condvar,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores the result (first one wins) and wakes every waiter.
    fn finish(&self, result: Result<Out, Fail>) {
        let callbacks = {
            let mut st = self.lock();
            if st.done {
                return;
            }
            st.done = true;
            st.result = Some(result);
            st.abort = None;
            std::mem::take(&mut st.callbacks)
        };
        self.cv.notify_all();
        if !callbacks.is_empty() {
            call_back(callbacks);
        }
    }
}

/// Runs done-callbacks on a blocking thread (never on a runtime worker: taking the
/// GIL may wait).
fn call_back(callbacks: Vec<PyObject>) {
    if SHUTTING_DOWN.load(Ordering::SeqCst) {
        // Interpreter exit: nobody awaits any more, and a thread must not take the
        // GIL of a finalizing interpreter. The callbacks are leaked on purpose.
        std::mem::forget(callbacks);
        return;
    }
    runtime().spawn_blocking(move || {
        Python::with_gil(|py| {
            for cb in callbacks {
                if let Err(e) = cb.call0(py) {
                    e.write_unraisable(py, None);
                }
            }
        })
    });
}

/// A task running on the binding's runtime.
#[pyclass(module = "wrenn_embed._native", frozen)]
pub struct Pending {
    slot: Arc<Slot>,
    what: &'static str,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("what", &self.what).finish()
    }
}

/// Starts `fut` on the runtime. `abortable`: whether cancelling (Ctrl-C, asyncio
/// cancellation) may drop the future midway. Operations that change capsules
/// (create, pause, …) are not: they finish, and what they produce is released if
/// nobody takes it.
pub fn spawn<F>(what: &'static str, abortable: bool, fut: F) -> Pending
where
    F: Future<Output = Result<Out, Fail>> + Send + 'static,
{
    let slot = Arc::new(Slot::default());
    let task_slot = slot.clone();
    let handle = runtime().spawn(async move {
        let r = fut.await;
        task_slot.finish(r);
    });
    if abortable {
        let mut st = slot.lock();
        if !st.done {
            st.abort = Some(handle.abort_handle());
        }
    }
    Pending { slot, what }
}

/// An already finished [`Pending`].
pub fn ready(what: &'static str, r: Result<Out, Fail>) -> Pending {
    let slot = Arc::new(Slot::default());
    slot.finish(r);
    Pending { slot, what }
}

impl Pending {
    fn take(&self, py: Python<'_>) -> PyResult<PyObject> {
        let r = {
            let mut st = self.slot.lock();
            if !st.done {
                return Err(PyRuntimeError::new_err(format!(
                    "{} has not finished",
                    self.what
                )));
            }
            st.result.take()
        };
        match r {
            Some(Ok(f)) => f(py),
            Some(Err(e)) => Err(e.into_pyerr(py)),
            None => Err(PyRuntimeError::new_err(format!(
                "the result of {} was already taken",
                self.what
            ))),
        }
    }

    fn cancel_inner(&self) -> bool {
        let abort = self.slot.lock().abort.take();
        match abort {
            Some(a) => {
                a.abort();
                self.slot.finish(Err(Fail::new(
                    "cancelled",
                    format!("{} was cancelled", self.what),
                )));
                true
            }
            None => false,
        }
    }
}

#[pymethods]
impl Pending {
    /// Whether the task has finished.
    fn done(&self) -> bool {
        self.slot.lock().done
    }

    /// Takes the result (raises the task's error). Only once.
    fn result(&self, py: Python<'_>) -> PyResult<PyObject> {
        self.take(py)
    }

    /// Blocks until the task finishes (GIL released), then returns its result.
    /// Signals are checked every 50 ms: Ctrl-C raises `KeyboardInterrupt` (an
    /// abortable task is cancelled; others finish in the background and release
    /// what they made). `timeout` (seconds) raises the `timeout` kind.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
        let deadline = match timeout {
            Some(t) if t.is_finite() && t >= 0.0 => {
                Some(Instant::now() + Duration::from_secs_f64(t))
            }
            Some(_) => None,
            None => None,
        };
        loop {
            let slot = self.slot.clone();
            let done = py.allow_threads(move || {
                let st = slot.lock();
                let (st, _) = slot
                    .cv
                    .wait_timeout_while(st, SIGNAL_POLL, |s| !s.done)
                    .unwrap_or_else(|e| e.into_inner());
                st.done
            });
            if done {
                return self.take(py);
            }
            if let Err(e) = py.check_signals() {
                self.cancel_inner();
                return Err(e);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.cancel_inner();
                return Err(Fail::new(
                    "timeout",
                    format!(
                        "{} did not finish within {:.1} s",
                        self.what,
                        timeout.unwrap_or(0.0)
                    ),
                )
                .into_pyerr(py));
            }
        }
    }

    /// Calls `cb()` (no arguments) once the task has finished: right away if it
    /// has, else from a runtime thread (use `loop.call_soon_threadsafe`).
    fn add_done_callback(&self, py: Python<'_>, cb: PyObject) -> PyResult<()> {
        {
            let mut st = self.slot.lock();
            if !st.done {
                st.callbacks.push(cb);
                return Ok(());
            }
        }
        cb.call0(py)?;
        Ok(())
    }

    /// Cancels an abortable task; returns whether it did.
    fn cancel(&self) -> bool {
        self.cancel_inner()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Pending {} {}>",
            self.what,
            if self.slot.lock().done {
                "done"
            } else {
                "running"
            }
        )
    }
}
