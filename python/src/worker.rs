//! The worker's lifecycle and the hand-off of steps to Python handler threads.
//!
//! Invariant for `WORKER`: locked only for a clone or a swap, with no Python call and no wait
//! inside, so it never blocks for long whoever holds the GIL.
//!
//! No step taken is lost to an interrupt. A step is handed to Python only after Python's pending
//! signal handlers ran (a `KeyboardInterrupt` there hands the step back and raises), and the step
//! stays *held* by the taking thread until that thread completes it: a thread that takes another
//! step, calls `release_held` (the Python loop does, in a `finally`), or ends, hands back what it
//! still holds. Handing back ends the attempt without counting it; the step is ready again.

use crate::convert;
use crate::errors::{self, guard};
use crate::wait::{self, Slice, Waited};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tasker_worker::dispatch::InterruptTake;
use tasker_worker::{
    CompletionVerdict, EngineError, Take, WorkerBootstrap, WorkerConfig, WorkerState,
    WorkerSystemHandle, WorkerSystemStatus,
};
use uuid::Uuid;

struct Bridge {
    handle_id: String,
    system: Arc<WorkerSystemHandle>,
}

static WORKER: Mutex<Option<Bridge>> = Mutex::new(None);
/// Set while a bootstrap runs with the GIL released, so that a second one fails instead of racing.
static BOOTSTRAPPING: AtomicBool = AtomicBool::new(false);
/// The final status of the last worker stopped in this process.
static LAST_STOPPED: Mutex<Option<WorkerSystemStatus>> = Mutex::new(None);

fn slot() -> MutexGuard<'static, Option<Bridge>> {
    // A poisoned lock only means a panic elsewhere; the Option inside is still consistent.
    WORKER.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running worker, if this process started one. A worker inherited through `fork` is not
/// this process's (its threads did not come along): it is forgotten, never used.
pub fn current() -> Option<Arc<WorkerSystemHandle>> {
    let mut slot = slot();
    if slot
        .as_ref()
        .is_some_and(|bridge| bridge.system.pid() != std::process::id())
    {
        if let Some(stale) = slot.take() {
            std::mem::forget(stale);
        }
    }
    slot.as_ref().map(|bridge| Arc::clone(&bridge.system))
}

pub fn require_worker() -> PyResult<Arc<WorkerSystemHandle>> {
    current().ok_or_else(errors::not_initialized)
}

/// The step a thread took and has not completed yet.
struct Held {
    system: Weak<WorkerSystemHandle>,
    event_id: Uuid,
}

impl Held {
    fn hand_back(self) -> bool {
        self.system
            .upgrade()
            .is_some_and(|system| system.hand_back(self.event_id))
    }
}

/// Hands back, when the thread ends, a step it still held (a thread killed by an exception
/// between taking a step and completing it).
struct HeldSlot(RefCell<Option<Held>>);

impl Drop for HeldSlot {
    fn drop(&mut self) {
        if let Some(held) = self.0.borrow_mut().take() {
            held.hand_back();
        }
    }
}

thread_local! {
    static HELD: HeldSlot = const { HeldSlot(RefCell::new(None)) };
}

fn hold(system: &Arc<WorkerSystemHandle>, event_id: Uuid) {
    let previous = HELD.with(|slot| {
        slot.0.borrow_mut().replace(Held {
            system: Arc::downgrade(system),
            event_id,
        })
    });
    if let Some(previous) = previous {
        previous.hand_back();
    }
}

fn unhold(event_id: Uuid) {
    HELD.with(|slot| {
        let mut held = slot.0.borrow_mut();
        if held.as_ref().is_some_and(|h| h.event_id == event_id) {
            *held = None;
        }
    });
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_bootstrap_worker, m)?)?;
    m.add_function(wrap_pyfunction!(_stop_worker, m)?)?;
    m.add_function(wrap_pyfunction!(_worker_status, m)?)?;
    m.add_function(wrap_pyfunction!(_last_stopped_status, m)?)?;
    m.add_function(wrap_pyfunction!(_transition_to_graceful_shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(_next_step_event, m)?)?;
    m.add_function(wrap_pyfunction!(_send_step_completion_event, m)?)?;
    m.add_function(wrap_pyfunction!(_release_held, m)?)?;
    m.add_function(wrap_pyfunction!(_hand_back_step, m)?)?;
    m.add_function(wrap_pyfunction!(_next_step_interrupt, m)?)?;
    m.add_function(wrap_pyfunction!(_wake_waiters, m)?)?;
    m.add_function(wrap_pyfunction!(_load_config_file, m)?)?;
    Ok(())
}

/// The worker config from a dict with the keys of the Ruby config; handler callables must be
/// Python class paths.
fn config_from_py(config: &Bound<'_, PyAny>) -> PyResult<WorkerConfig> {
    let map = convert::object_from_py(config, "config")
        .map_err(|e| errors::ConfigurationError::new_err(e.to_string()))?;
    let mut config =
        WorkerConfig::from_map(&map, |key| std::env::var(key).ok()).map_err(errors::engine)?;
    config.callable_rule = convert::python_dotted_path;
    Ok(config)
}

/// `_bootstrap_worker(config: dict) -> dict`: start the worker (one per process).
#[pyfunction]
fn _bootstrap_worker<'py>(
    py: Python<'py>,
    config: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    guard(|| {
        let config = config_from_py(config)?;
        if let Some(previous) = current() {
            // An engine that already ended (it failed, or stopped by itself) is cleared away.
            if matches!(previous.state(), WorkerState::Stopped | WorkerState::Error) {
                discard(py, &previous)?;
            }
        }
        if let Some(running) = current() {
            return Err(errors::WorkerBootstrapError::new_err(format!(
                "worker already running (worker_id {}, state {}): call stop_worker first",
                running.status().worker_id,
                running.state().as_str()
            )));
        }
        if BOOTSTRAPPING.swap(true, Ordering::AcqRel) {
            return Err(errors::WorkerBootstrapError::new_err(
                "worker already running (another bootstrap is in progress)",
            ));
        }
        let result = start(py, config);
        BOOTSTRAPPING.store(false, Ordering::Release);
        result
    })
}

fn bootstrap_failure(e: EngineError) -> PyErr {
    match e {
        EngineError::Configuration(_) => errors::engine(e),
        other => errors::WorkerBootstrapError::new_err(format!("worker bootstrap failed: {other}")),
    }
}

fn start(py: Python<'_>, config: WorkerConfig) -> PyResult<Bound<'_, PyDict>> {
    if let Some(level) = config.log_level {
        crate::logging::set_level(level);
    }
    let system = match py.allow_threads(|| WorkerBootstrap::start(config)) {
        Ok(system) => Arc::new(system),
        Err(e) => return Err(bootstrap_failure(e)),
    };
    let handle_id = Uuid::new_v4().to_string();
    *slot() = Some(Bridge {
        handle_id: handle_id.clone(),
        system: Arc::clone(&system),
    });
    // Wait for the engine to report running (a backend may connect and migrate first).
    let failure = match wait::reply(py, system.started(), None) {
        Ok(Some(Ok(Ok(())))) => None,
        Ok(Some(Ok(Err(e)))) => Some(bootstrap_failure(e)),
        Ok(Some(Err(()))) => Some(errors::WorkerBootstrapError::new_err(
            "the engine thread ended during bootstrap",
        )),
        Ok(None) => unreachable!("no timeout was given"),
        // Ctrl-C: undo the half-started worker, then let it propagate.
        Err(interrupt) => Some(interrupt),
    };
    if let Some(error) = failure {
        discard(py, &system)?;
        return Err(error);
    }
    let status = system.status();
    let dict = PyDict::new(py);
    dict.set_item("success", true)?;
    dict.set_item("handle_id", handle_id)?;
    dict.set_item("worker_id", &status.worker_id)?;
    dict.set_item("status", status.state.as_str())?;
    dict.set_item("concurrency", status.concurrency)?;
    dict.set_item("error_message", py.None())?;
    Ok(dict)
}

/// Stop the engine, wait for it with the GIL released, and forget it. A Ctrl-C during the wait
/// leaves the worker stopping: calling `stop_worker` again waits for the rest.
fn discard(py: Python<'_>, system: &Arc<WorkerSystemHandle>) -> PyResult<()> {
    system.request_stop();
    // Idle handler threads see the drain at once.
    wait::wake_all();
    wait::reply(py, system.stopped(), None)?;
    py.allow_threads(|| system.join());
    *LAST_STOPPED.lock().unwrap_or_else(|e| e.into_inner()) = Some(system.status());
    let mut slot = slot();
    if slot
        .as_ref()
        .is_some_and(|b| Arc::ptr_eq(&b.system, system))
    {
        *slot = None;
    }
    Ok(())
}

/// `_stop_worker() -> True`: stop the worker, waiting for its steps to finish (up to its
/// `shutdown_timeout`). Raises `WorkerNotInitializedError` if none runs.
#[pyfunction]
fn _stop_worker(py: Python<'_>) -> PyResult<bool> {
    guard(|| {
        let system = require_worker()?;
        discard(py, &system)?;
        Ok(true)
    })
}

#[pyfunction]
fn _worker_status(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    guard(|| match current() {
        Some(system) => {
            let dict = convert::status_to_py(py, &system.status())?;
            let handle_id = slot().as_ref().map(|bridge| bridge.handle_id.clone());
            dict.set_item("handle_id", handle_id)?;
            Ok(dict)
        }
        None => {
            let dict = PyDict::new(py);
            dict.set_item("running", false)?;
            dict.set_item("state", "stopped")?;
            Ok(dict)
        }
    })
}

/// The final status of the last worker this process stopped, or None.
#[pyfunction]
fn _last_stopped_status(py: Python<'_>) -> PyResult<Option<Bound<'_, PyDict>>> {
    guard(|| {
        let last = LAST_STOPPED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        last.map(|status| convert::status_to_py(py, &status))
            .transpose()
    })
}

#[pyfunction]
fn _transition_to_graceful_shutdown(py: Python<'_>) -> PyResult<bool> {
    guard(|| {
        let system = require_worker()?;
        system
            .transition_to_graceful_shutdown()
            .map_err(errors::engine)?;
        wait::wake_all();
        // The engine reads shutting_down once it has recalled the steps still queued: return
        // after that, so that worker_status already says so.
        wait::wait(py, None, false, |wake, limit| {
            let until = limit.map(|l| std::time::Instant::now() + l);
            loop {
                if system.state() != WorkerState::Running {
                    return Slice::Done(());
                }
                if until.is_some_and(|u| std::time::Instant::now() >= u) {
                    return Slice::TimedOut;
                }
                match wake.recv_timeout(Duration::from_micros(100)) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => return Slice::Woken,
                }
            }
        })?;
        Ok(true)
    })
}

/// `_next_step_event(timeout=None)`: the next step event dict; `False` when the wait timed out or
/// was woken with nothing; `None` once a shutdown was requested or the worker stopped (the
/// thread should leave its loop). A `KeyboardInterrupt` (or another exception a signal handler
/// raises) is raised with any step taken handed back.
#[pyfunction]
#[pyo3(signature = (timeout=None))]
fn _next_step_event(py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
    guard(|| {
        let timeout = wait::timeout(timeout, "timeout")?;
        let Some(system) = current() else {
            return Ok(py.None());
        };
        // Whatever this thread still holds was abandoned: it takes a new step now.
        if let Some(held) = HELD.with(|slot| slot.0.borrow_mut().take()) {
            held.hand_back();
        }
        if system.is_draining() {
            return Ok(py.None());
        }
        let port = system.port().clone();
        let taken = match port.try_take() {
            Take::Event(event) => Waited::Done(Take::Event(event)),
            _ => wait::wait(py, timeout, true, |wake, limit| {
                match port.take(wake, limit) {
                    Take::Nothing if wait::woken(wake) => Slice::Woken,
                    Take::Nothing => Slice::TimedOut,
                    other => Slice::Done(other),
                }
            })?,
        };
        let event = match taken {
            Waited::Done(Take::Event(event)) => event,
            Waited::Done(Take::Closed) => return Ok(py.None()),
            Waited::Done(Take::Nothing) | Waited::TimedOut | Waited::Woken => {
                return Ok(if system.is_draining() {
                    py.None()
                } else {
                    PyBool::new(py, false).to_owned().into_any().unbind()
                });
            }
        };
        if system.is_draining() {
            system.release_untaken(event.event_id);
            return Ok(py.None());
        }
        // Timed out while it waited to be taken: already recorded as a failed attempt.
        if !system.begin_running(event.event_id) {
            return Ok(PyBool::new(py, false).to_owned().into_any().unbind());
        }
        // Python's signal handlers run here, last, with the step handed back if one raises: run
        // after we return, a KeyboardInterrupt would hit the caller before it stored the step.
        let handed = convert::event_to_py(py, &event).and_then(|dict| {
            py.check_signals()?;
            Ok(dict)
        });
        match handed {
            Ok(dict) => {
                hold(&system, event.event_id);
                Ok(dict.into_any().unbind())
            }
            Err(error) => {
                system.release_untaken(event.event_id);
                Err(error)
            }
        }
    })
}

/// `_send_step_completion_event(completion: dict) -> bool`: True if accepted; False if refused
/// (the attempt had already ended: timed out, handed back, or no worker runs). A malformed
/// completion raises `ValueError`/`TypeError` naming the field; the step stays held.
#[pyfunction]
fn _send_step_completion_event(completion: &Bound<'_, PyDict>) -> PyResult<bool> {
    guard(|| {
        let completion = convert::completion_from_py(completion)?;
        let event_id = completion.event_id;
        let verdict = match current() {
            Some(system) => system.complete(completion),
            None => CompletionVerdict::Refused(format!(
                "completion for event {event_id} arrived with no worker running"
            )),
        };
        unhold(event_id);
        match verdict {
            CompletionVerdict::Accepted => Ok(true),
            CompletionVerdict::Refused(why) => {
                tracing::warn!("{why}; ignored");
                Ok(false)
            }
            // The engine already logged the timeout; this is the expected end of that attempt.
            CompletionVerdict::TimedOut(why) => {
                tracing::debug!("{why}");
                Ok(false)
            }
        }
    })
}

/// `_release_held() -> bool`: hand back the step this thread took and did not complete (the
/// Python loop calls it in a `finally`). False if it held none, or its attempt had ended.
#[pyfunction]
fn _release_held() -> PyResult<bool> {
    guard(|| {
        Ok(HELD
            .with(|slot| slot.0.borrow_mut().take())
            .is_some_and(Held::hand_back))
    })
}

/// `_hand_back_step(event_id) -> bool`: give back the attempt of a handler the worker stops (a
/// shutdown past its deadline): it does not count, the step is ready again.
#[pyfunction]
fn _hand_back_step(event_id: &str) -> PyResult<bool> {
    guard(|| {
        let event_id = convert::parse_uuid(event_id, "event_id")?;
        Ok(current().is_some_and(|system| system.hand_back(event_id)))
    })
}

/// `_next_step_interrupt(timeout=None)`: the next handler to interrupt (its attempt timed out
/// or its task was cancelled) as a dict; False when the wait timed out or was woken; None once
/// the worker stopped.
#[pyfunction]
#[pyo3(signature = (timeout=None))]
fn _next_step_interrupt(py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
    guard(|| {
        let timeout = wait::timeout(timeout, "timeout")?;
        let Some(system) = current() else {
            return Ok(py.None());
        };
        let port = system.interrupt_port().clone();
        let taken = wait::wait(py, timeout, true, |wake, limit| {
            match port.take(wake, limit) {
                InterruptTake::Nothing if wait::woken(wake) => Slice::Woken,
                InterruptTake::Nothing => Slice::TimedOut,
                other => Slice::Done(other),
            }
        })?;
        Ok(match taken {
            Waited::Done(InterruptTake::Interrupt(interrupt)) => {
                convert::interrupt_to_py(py, &interrupt)?
                    .into_any()
                    .unbind()
            }
            Waited::Done(InterruptTake::Closed) => py.None(),
            _ if !system.is_running() => py.None(),
            _ => PyBool::new(py, false).to_owned().into_any().unbind(),
        })
    })
}

/// `_wake_waiters()`: wake every thread waiting in this module now (their waits answer False).
#[pyfunction]
fn _wake_waiters() {
    wait::wake_all();
}

/// `_load_config_file(path) -> dict`: a YAML config file's mapping (the keys of the config).
#[pyfunction]
fn _load_config_file<'py>(py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyAny>> {
    guard(|| {
        let text = std::fs::read_to_string(path).map_err(|e| {
            errors::ConfigurationError::new_err(format!("config_path: cannot read {path}: {e}"))
        })?;
        let value: serde_json::Value = serde_norway::from_str(&text).map_err(|e| {
            errors::ConfigurationError::new_err(format!("config_path: {path}: {e}"))
        })?;
        if !value.is_object() && !value.is_null() {
            return Err(errors::ConfigurationError::new_err(format!(
                "config_path: {path} must hold a mapping of config keys"
            )));
        }
        let value = if value.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            value
        };
        convert::to_py(py, &value)
    })
}
