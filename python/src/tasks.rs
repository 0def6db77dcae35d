//! The task API: create tasks, read them, wait for them, cancel and retry them. Every wait runs
//! with the GIL released (see `wait`); the same calls serve both backends. On the memory backend
//! the calling thread works on the task table itself, never blocking on its lock while it holds the
//! GIL (see [`with_table`]).

use crate::convert;
use crate::errors::{self, guard};
use crate::wait;
use crate::worker::require_worker;
use crossbeam_channel::Receiver;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::time::{Duration, Instant};
use tasker_worker::{
    CallerThread, EngineError, EngineResult, LocalTasks, TaskSnapshot, TaskTable, WaitTicket,
    WorkerSystemHandle,
};
use uuid::Uuid;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_create_tasks, m)?)?;
    m.add_function(wrap_pyfunction!(_task_status, m)?)?;
    m.add_function(wrap_pyfunction!(_wait_for_tasks, m)?)?;
    m.add_function(wrap_pyfunction!(_cancel_task, m)?)?;
    m.add_function(wrap_pyfunction!(_retry_task, m)?)?;
    Ok(())
}

/// A Python thread working on the memory backend's task table ([`LocalTasks::access_from`],
/// [`LocalTasks::wait_for_tasks`]): it waits for the table's lock, and for a group of tasks, with
/// the GIL released (a group wait on the main thread checks for signals, see `wait`).
struct PyCaller<'py>(Python<'py>);

impl CallerThread for PyCaller<'_> {
    type Error = PyErr;

    fn released<R: Send>(&self, work: impl FnOnce() -> R + Send) -> PyResult<R> {
        Ok(self.0.allow_threads(work))
    }

    fn await_group(&self, done: &Receiver<()>, timeout: Option<Duration>) -> PyResult<bool> {
        match wait::reply(self.0, done, timeout)? {
            Some(Ok(())) => Ok(true),
            // As in Ruby: the engine stopped before every task answered.
            Some(Err(())) => Err(errors::WorkerNotInitializedError::new_err(
                "the worker stopped before answering",
            )),
            None => Ok(false),
        }
    }

    fn engine_error(&self, error: EngineError) -> PyErr {
        errors::engine(error)
    }
}

/// Run `work` on the memory backend's task table: at once if its lock is free, else waiting for the
/// lock with the GIL released (a handler thread or the engine holds it for a moment; blocking on it
/// with the GIL held would stall every Python thread behind it). Never fails: the `Err` is only
/// [`CallerThread`]'s shape.
fn with_table<R: Send>(
    py: Python<'_>,
    local: &LocalTasks,
    work: impl FnOnce(&mut TaskTable) -> R + Send,
) -> PyResult<R> {
    local.access_from(&PyCaller(py), work)
}

/// Wait for an engine answer that always comes (no timeout).
fn answer<T: Send>(
    py: Python<'_>,
    receiver: crossbeam_channel::Receiver<EngineResult<T>>,
) -> PyResult<T> {
    match wait::reply(py, &receiver, None)? {
        Some(Ok(result)) => result.map_err(errors::engine),
        Some(Err(())) => Err(errors::WorkerNotInitializedError::new_err(
            "the worker stopped before answering",
        )),
        None => unreachable!("no timeout was given"),
    }
}

fn task_uuid(text: &str) -> PyResult<Uuid> {
    // No task was ever created under a name that is not a UUID: as unknown as any other.
    Uuid::parse_str(text).map_err(|_| {
        errors::TaskNotFoundError::new_err(format!("unknown task {text:?}: not a UUID"))
    })
}

fn non_empty(value: &str, what: &str) -> PyResult<()> {
    if value.is_empty() {
        Err(errors::ConfigurationError::new_err(format!(
            "{what}: must be a non-empty str"
        )))
    } else {
        Ok(())
    }
}

/// `_create_tasks(namespace, name, version, contexts: list[dict], run_at=None) -> list[str]`: one
/// task per context, in one message to the engine (one transaction on PostgreSQL); their uuids, in
/// order. `run_at` (seconds since the epoch; the Python client converts a datetime) schedules them:
/// their first steps become ready then, not before. NaN, infinities and times more than ten years
/// ahead or a year behind raise ValueError naming `run_at` (`tasker_worker::schedule_time`, the
/// Ruby bridge's rule).
#[pyfunction]
#[pyo3(signature = (namespace, name, version, contexts, run_at=None))]
fn _create_tasks(
    py: Python<'_>,
    namespace: &str,
    name: &str,
    version: &str,
    contexts: &Bound<'_, PyList>,
    run_at: Option<f64>,
) -> PyResult<Vec<String>> {
    guard(|| {
        let system = require_worker()?;
        non_empty(namespace, "namespace")?;
        non_empty(name, "name")?;
        non_empty(version, "version")?;
        let run_at = run_at
            .map(tasker_worker::schedule_time)
            .transpose()
            .map_err(errors::value_error)?;
        let mut list = Vec::with_capacity(contexts.len());
        for (i, item) in contexts.iter().enumerate() {
            let what = format!("contexts[{i}]");
            let context = convert::object_from_py(&item, &what)
                .map_err(|e| errors::ConfigurationError::new_err(e.to_string()))?;
            list.push(serde_json::Value::Object(context));
        }
        let uuids = match system.local_tasks() {
            Some(local) => {
                let prepared = WorkerSystemHandle::check_contexts(&list)
                    .and_then(|()| system.local_template(namespace, name, version))
                    .map(|template| WorkerSystemHandle::prepare_tasks(&template, list, run_at))
                    .map_err(errors::engine)?;
                let uuids = with_table(py, local, move |table| table.insert(prepared))?
                    .map_err(errors::engine)?;
                system.tasks_inserted();
                uuids
            }
            None => {
                let receiver = system
                    .request_create_tasks(namespace, name, version, list, run_at)
                    .map_err(errors::engine)?;
                answer(py, receiver)?
            }
        };
        Ok(uuids.into_iter().map(convert::uuid_str).collect())
    })
}

#[pyfunction]
fn _task_status<'py>(py: Python<'py>, task_uuid_text: &str) -> PyResult<Bound<'py, PyDict>> {
    guard(|| {
        let system = require_worker()?;
        let uuid = task_uuid(task_uuid_text)?;
        let snapshot = match system.local_tasks() {
            Some(local) => {
                with_table(py, local, |table| table.snapshot(uuid))?.map_err(errors::engine)?
            }
            None => answer(
                py,
                system.request_task_status(uuid).map_err(errors::engine)?,
            )?,
        };
        convert::snapshot_to_py(py, &snapshot)
    })
}

/// Tickets not answered yet are handed back to the engine (it forgets the waiters).
fn abandon(system: &WorkerSystemHandle, tickets: Vec<WaitTicket>) {
    for ticket in tickets {
        system.abandon_wait(ticket);
    }
}

/// `_wait_for_tasks(uuids, timeout=None) -> list[dict] | None`: the final statuses, in the order
/// of `uuids`, once all have finished; None past `timeout`. A uuid never created raises
/// `TaskNotFoundError` before anything is waited for.
#[pyfunction]
#[pyo3(signature = (uuids, timeout=None))]
fn _wait_for_tasks<'py>(
    py: Python<'py>,
    uuids: Vec<String>,
    timeout: Option<f64>,
) -> PyResult<Option<Bound<'py, PyList>>> {
    guard(|| {
        let system = require_worker()?;
        let timeout = wait::timeout(timeout, "timeout")?;
        let parsed = uuids
            .iter()
            .map(|text| task_uuid(text))
            .collect::<PyResult<Vec<_>>>()?;
        let done = match system.local_tasks() {
            Some(local) => wait_local(py, local, &parsed, timeout)?,
            None => wait_remote(py, &system, &parsed, timeout)?,
        };
        let Some(done) = done else {
            return Ok(None);
        };
        let list = PyList::empty(py);
        for snapshot in &done {
            list.append(convert::snapshot_to_py(py, snapshot)?)?;
        }
        Ok(Some(list))
    })
}

/// Memory backend: the final statuses of `uuids`, in order, or `None` past `timeout` (see
/// [`LocalTasks::wait_for_tasks`]; no engine round trip).
fn wait_local(
    py: Python<'_>,
    local: &LocalTasks,
    uuids: &[Uuid],
    timeout: Option<Duration>,
) -> PyResult<Option<Vec<TaskSnapshot>>> {
    local.wait_for_tasks(&PyCaller(py), uuids, timeout)
}

/// PostgreSQL: one engine request per task, all sent before any is awaited.
fn wait_remote(
    py: Python<'_>,
    system: &WorkerSystemHandle,
    parsed: &[Uuid],
    timeout: Option<Duration>,
) -> PyResult<Option<Vec<TaskSnapshot>>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut tickets = Vec::with_capacity(parsed.len());
    for uuid in parsed {
        match system.request_wait_for_task(*uuid) {
            Ok(ticket) => tickets.push(ticket),
            Err(e) => {
                abandon(system, tickets);
                return Err(errors::engine(e));
            }
        }
    }
    let mut done: Vec<TaskSnapshot> = Vec::with_capacity(tickets.len());
    let mut pending = tickets.into_iter();
    while let Some(ticket) = pending.next() {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let outcome = wait::reply(py, &ticket.answer, left);
        let result = match outcome {
            Ok(Some(Ok(result))) => result,
            Ok(Some(Err(()))) => Err(tasker_worker::EngineError::NotInitialized),
            Ok(None) => {
                abandon(system, std::iter::once(ticket).chain(pending).collect());
                return Ok(None);
            }
            Err(interrupt) => {
                abandon(system, std::iter::once(ticket).chain(pending).collect());
                return Err(interrupt);
            }
        };
        match result {
            Ok(snapshot) => done.push(snapshot),
            Err(e) => {
                abandon(system, pending.collect());
                return Err(errors::engine(e));
            }
        }
    }
    Ok(Some(done))
}

/// `_cancel_task(uuid) -> bool`: True if the task was unfinished (it is now cancelling).
#[pyfunction]
fn _cancel_task(py: Python<'_>, task_uuid_text: &str) -> PyResult<bool> {
    guard(|| {
        let system = require_worker()?;
        let uuid = task_uuid(task_uuid_text)?;
        let receiver = system.request_cancel_task(uuid).map_err(errors::engine)?;
        answer(py, receiver)
    })
}

/// `_retry_task(uuid) -> True`: runs an `error` or `cancelled` task again from its unfinished steps.
#[pyfunction]
fn _retry_task(py: Python<'_>, task_uuid_text: &str) -> PyResult<bool> {
    guard(|| {
        let system = require_worker()?;
        let uuid = task_uuid(task_uuid_text)?;
        let receiver = system.request_retry_task(uuid).map_err(errors::engine)?;
        answer(py, receiver).map(|()| true)
    })
}
