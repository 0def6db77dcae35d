//! The task API of `TaskerCore::FFI`: create tasks, read them, wait for them, cancel and retry
//! them, and take the task ends the EventBridge publishes.
//!
//! On the memory backend, creating, reading and waiting go straight to the engine crate's task
//! table from the calling thread (no engine round trip). The table's lock is taken with the GVL
//! held only when it is free at once; when it is not, the caller waits for it with the GVL
//! released, so a Ruby thread never stalls the VM behind the engine. On PostgreSQL each call
//! is a request to the engine thread, awaited with the GVL released.

use crate::bridge::{await_reply, current, require_worker, seconds};
use crate::convert::{self, fetch};
use crate::errors;
use crate::gvl::{check_interrupts, without_gvl, without_gvl_retrying};
use crossbeam_channel::Receiver;
use magnus::{function, prelude::*, Error, RArray, RHash, RModule, RString, Ruby, Value};
use std::time::{Duration, Instant, SystemTime};
use tasker_worker::{
    CallerThread, EngineError, LocalTasks, TaskEndTake, TaskSnapshot, TaskTable, WorkerSystemHandle,
};
use uuid::Uuid;

pub fn init(ffi: RModule) -> Result<(), Error> {
    ffi.define_singleton_method("create_task", function!(create_task, 1))?;
    ffi.define_singleton_method("create_tasks", function!(create_tasks, 1))?;
    ffi.define_singleton_method("task_status", function!(task_status, 1))?;
    ffi.define_singleton_method("wait_for_task", function!(wait_for_task, 2))?;
    ffi.define_singleton_method("wait_for_tasks", function!(wait_for_tasks, 2))?;
    ffi.define_singleton_method("cancel_task", function!(cancel_task, 1))?;
    ffi.define_singleton_method("retry_task", function!(retry_task, 1))?;
    ffi.define_singleton_method("announce_task_ends", function!(announce_task_ends, 1))?;
    ffi.define_singleton_method("next_task_end", function!(next_task_end, 1))?;
    Ok(())
}

/// A Ruby thread working on the memory backend's task table ([`LocalTasks::access_from`],
/// [`LocalTasks::wait_for_tasks`]): it waits for the table's lock, and for a group of tasks, with
/// the GVL released, interruptibly.
struct RubyCaller<'a>(&'a Ruby);

impl CallerThread for RubyCaller<'_> {
    type Error = Error;

    fn released<R: Send>(&self, work: impl FnOnce() -> R + Send) -> Result<R, Error> {
        let mut work = Some(work);
        // `work` runs once: a retry only happens when it did not run (an interrupt that raised
        // nothing was pending on entry).
        without_gvl_retrying(self.0, |_| work.take().map(|work| work()))
    }

    fn await_group(&self, done: &Receiver<()>, timeout: Option<Duration>) -> Result<bool, Error> {
        await_reply(self.0, done.clone(), timeout).map(|answered| answered.is_some())
    }

    fn engine_error(&self, error: EngineError) -> Error {
        errors::engine(self.0, error)
    }
}

/// Run `work` on the memory backend's task table: at once if its lock is free, else waiting for
/// the lock with the GVL released (another Ruby thread, or the engine, holds it for a moment).
fn with_table<R: Send>(
    ruby: &Ruby,
    local: &LocalTasks,
    work: impl FnOnce(&mut TaskTable) -> R + Send,
) -> Result<R, Error> {
    local.access_from(&RubyCaller(ruby), work)
}

/// Create one task per context; their uuids, in order. Memory backend: validated and inserted
/// on this thread (a bad template or context raises here), the engine woken to run them.
fn create(
    ruby: &Ruby,
    system: &WorkerSystemHandle,
    request: RHash,
    contexts: Vec<serde_json::Value>,
) -> Result<Vec<Uuid>, Error> {
    let (namespace, name, version) = template_of(ruby, request)?;
    let run_at = run_at_of(ruby, request)?;
    if let Some(local) = system.local_tasks() {
        let prepared = WorkerSystemHandle::check_contexts(&contexts)
            .and_then(|()| system.local_template(&namespace, &name, &version))
            .map(|template| WorkerSystemHandle::prepare_tasks(&template, contexts, run_at))
            .map_err(|e| errors::engine(ruby, e))?;
        let uuids = with_table(ruby, local, move |table| table.insert(prepared))?
            .map_err(|e| errors::engine(ruby, e))?;
        system.tasks_inserted();
        return Ok(uuids);
    }
    let reply = system
        .request_create_tasks(&namespace, &name, &version, contexts, run_at)
        .map_err(|e| errors::engine(ruby, e))?;
    match await_reply(ruby, reply, None)? {
        Some(Ok(uuids)) => Ok(uuids),
        Some(Err(e)) => Err(errors::engine(ruby, e)),
        None => unreachable!("no timeout was given"),
    }
}

/// When a `create_task(s)` request's tasks start: `run_at:` a Time (or seconds since the epoch),
/// absent or nil for now. Anything else, or a time not finite or too far off (see
/// `tasker_worker::schedule_time`), raises ArgumentError naming `run_at`.
pub(crate) fn run_at_of(ruby: &Ruby, request: RHash) -> Result<Option<SystemTime>, Error> {
    let Some(value) = fetch(ruby, request, &convert::RUN_AT) else {
        return Ok(None);
    };
    let time_class: Value = ruby.eval("::Time")?;
    let is_time = value.funcall::<_, _, bool>("is_a?", (time_class,))?;
    let is_real =
        value.is_kind_of(ruby.class_numeric()) && value.funcall::<_, _, bool>("real?", ())?;
    if !is_time && !is_real {
        let class: String = value.class().inspect();
        return Err(errors::argument(
            ruby,
            format!("run_at: must be a Time (or seconds since the epoch), got a {class}"),
        ));
    }
    // Time#to_f and a real Numeric's to_f never raise.
    let seconds: f64 = value.funcall("to_f", ())?;
    tasker_worker::schedule_time(seconds)
        .map(Some)
        .map_err(|message| errors::argument(ruby, message))
}

/// The template a `create_task(s)` request names: (namespace, name, version).
fn template_of(ruby: &Ruby, request: RHash) -> Result<(String, String, String), Error> {
    let text = |key: &convert::Key, default: Option<&str>| -> Result<String, Error> {
        let name = key.name;
        match fetch(ruby, request, key) {
            Some(v) => match RString::from_value(v).map(|s| s.to_string()) {
                Some(Ok(s)) if !s.is_empty() => Ok(s),
                _ => Err(errors::configuration(
                    ruby,
                    format!("{name}: must be a non-empty String"),
                )),
            },
            None => default.map(str::to_owned).ok_or_else(|| {
                errors::configuration(ruby, format!("{name}: required to create a task"))
            }),
        }
    };
    Ok((
        text(&convert::NAMESPACE, None)?,
        text(&convert::NAME, None)?,
        text(&convert::VERSION, Some("1.0.0"))?,
    ))
}

fn context_of(ruby: &Ruby, value: Option<Value>, what: &str) -> Result<serde_json::Value, Error> {
    match value {
        None => Ok(serde_json::Value::Object(Default::default())),
        Some(v) => {
            convert::ruby_to_json(ruby, v, what).map_err(|e| errors::as_configuration(ruby, e))
        }
    }
}

fn create_task(ruby: &Ruby, request: RHash) -> Result<RString, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        let context = context_of(ruby, fetch(ruby, request, &convert::CONTEXT), "context")?;
        let uuids = create(ruby, &system, request, vec![context])?;
        Ok(convert::uuid_str(ruby, uuids[0]))
    })
}

/// `create_tasks(namespace:, name:, version:, contexts: [...])`: one task per context, in one
/// message to the engine (one transaction on postgres); their uuids, in order.
fn create_tasks(ruby: &Ruby, request: RHash) -> Result<RArray, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        let list = fetch(ruby, request, &convert::CONTEXTS).ok_or_else(|| {
            errors::configuration(ruby, "contexts: required (an Array of Hashes)")
        })?;
        let list = RArray::from_value(list)
            .ok_or_else(|| errors::configuration(ruby, "contexts: must be an Array of Hashes"))?;
        let mut contexts = Vec::with_capacity(list.len());
        for (i, item) in list.into_iter().enumerate() {
            contexts.push(context_of(ruby, Some(item), &format!("contexts[{i}]"))?);
        }
        let uuids = create(ruby, &system, request, contexts)?;
        let array = ruby.ary_new_capa(uuids.len());
        for uuid in uuids {
            array.push(convert::uuid_str(ruby, uuid))?;
        }
        Ok(array)
    })
}

fn parse_task_uuid(ruby: &Ruby, value: Value) -> Result<Uuid, Error> {
    let text = RString::from_value(value)
        .and_then(|s| s.to_string().ok())
        .ok_or_else(|| errors::argument(ruby, "task uuid must be a String"))?;
    // No task was ever created under a name that is not a UUID: as unknown as any other.
    Uuid::parse_str(&text)
        .map_err(|_| errors::task_not_found(ruby, format!("unknown task {text:?}: not a UUID")))
}

/// `cancel_task(uuid)`: true if the task was unfinished (it is now cancelling), false if it had
/// already finished.
fn cancel_task(ruby: &Ruby, task_uuid: Value) -> Result<bool, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        let uuid = parse_task_uuid(ruby, task_uuid)?;
        let reply = system
            .request_cancel_task(uuid)
            .map_err(|e| errors::engine(ruby, e))?;
        match await_reply(ruby, reply, None)? {
            Some(result) => result.map_err(|e| errors::engine(ruby, e)),
            None => unreachable!("no timeout was given"),
        }
    })
}

/// `retry_task(uuid)`: runs an `error` or `cancelled` task again from its unfinished steps.
fn retry_task(ruby: &Ruby, task_uuid: Value) -> Result<bool, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        let uuid = parse_task_uuid(ruby, task_uuid)?;
        let reply = system
            .request_retry_task(uuid)
            .map_err(|e| errors::engine(ruby, e))?;
        match await_reply(ruby, reply, None)? {
            Some(result) => result.map(|()| true).map_err(|e| errors::engine(ruby, e)),
            None => unreachable!("no timeout was given"),
        }
    })
}

fn task_status(ruby: &Ruby, task_uuid: Value) -> Result<RHash, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        let snapshot = snapshot(ruby, &system, task_uuid)?;
        convert::snapshot_to_ruby(ruby, &snapshot)
    })
}

/// A task and its steps, as `task_status` reports them (`TaskNotFoundError` for an unknown uuid).
pub(crate) fn snapshot(
    ruby: &Ruby,
    system: &WorkerSystemHandle,
    task_uuid: Value,
) -> Result<TaskSnapshot, Error> {
    let uuid = parse_task_uuid(ruby, task_uuid)?;
    let snapshot = match system.local_tasks() {
        Some(local) => with_table(ruby, local, |table| table.snapshot(uuid))?,
        None => {
            let reply = system
                .request_task_status(uuid)
                .map_err(|e| errors::engine(ruby, e))?;
            match await_reply(ruby, reply, None)? {
                Some(result) => result,
                None => unreachable!("no timeout was given"),
            }
        }
    };
    snapshot.map_err(|e| errors::engine(ruby, e))
}

fn timeout_arg(ruby: &Ruby, timeout: Value) -> Result<Option<Duration>, Error> {
    if timeout.is_nil() {
        Ok(None)
    } else {
        seconds(ruby, timeout, "timeout").map(Some)
    }
}

/// `wait_for_task(uuid, timeout_seconds_or_nil)`: the final task status Hash, or nil on timeout.
fn wait_for_task(ruby: &Ruby, task_uuid: Value, timeout: Value) -> Result<Option<RHash>, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        let uuid = parse_task_uuid(ruby, task_uuid)?;
        let timeout = timeout_arg(ruby, timeout)?;
        let answer = match system.local_tasks() {
            Some(local) => wait_local(ruby, local, &[uuid], timeout)?.map(|mut all| all.remove(0)),
            None => wait_remote(ruby, &system, &[uuid], timeout)?.map(|mut all| all.remove(0)),
        };
        answer
            .map(|snapshot| convert::snapshot_to_ruby(ruby, &snapshot))
            .transpose()
    })
}

/// `wait_for_tasks(uuids, timeout_seconds_or_nil)`: the final task status Hashes, in the order of
/// `uuids`, once all have finished; nil on timeout. A uuid never created raises
/// `TaskNotFoundError` before anything is waited for.
fn wait_for_tasks(ruby: &Ruby, task_uuids: Value, timeout: Value) -> Result<Option<RArray>, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        let list = RArray::from_value(task_uuids)
            .ok_or_else(|| errors::argument(ruby, "task uuids must be an Array of Strings"))?;
        let uuids = list
            .into_iter()
            .map(|value| parse_task_uuid(ruby, value))
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = timeout_arg(ruby, timeout)?;
        let answers = match system.local_tasks() {
            Some(local) => wait_local(ruby, local, &uuids, timeout)?,
            None => wait_remote(ruby, &system, &uuids, timeout)?,
        };
        let Some(snapshots) = answers else {
            return Ok(None);
        };
        let array = ruby.ary_new_capa(snapshots.len());
        for snapshot in &snapshots {
            array.push(convert::snapshot_to_ruby(ruby, snapshot)?)?;
        }
        Ok(Some(array))
    })
}

/// Memory backend: the final statuses of `uuids`, in order, or `None` past `timeout` (see
/// [`LocalTasks::wait_for_tasks`]; no engine round trip).
fn wait_local(
    ruby: &Ruby,
    local: &LocalTasks,
    uuids: &[Uuid],
    timeout: Option<Duration>,
) -> Result<Option<Vec<TaskSnapshot>>, Error> {
    local.wait_for_tasks(&RubyCaller(ruby), uuids, timeout)
}

/// PostgreSQL: one engine request per task, all sent before any is awaited.
fn wait_remote(
    ruby: &Ruby,
    system: &WorkerSystemHandle,
    uuids: &[Uuid],
    timeout: Option<Duration>,
) -> Result<Option<Vec<TaskSnapshot>>, Error> {
    let mut tickets = Vec::with_capacity(uuids.len());
    for &uuid in uuids {
        match system.request_wait_for_task(uuid) {
            Ok(ticket) => tickets.push(ticket),
            Err(e) => {
                tickets.into_iter().for_each(|t| system.abandon_wait(t));
                return Err(errors::engine(ruby, e));
            }
        }
    }
    let deadline = deadline_after(timeout);
    let mut snapshots = Vec::with_capacity(uuids.len());
    let mut tickets = tickets.into_iter();
    while let Some(ticket) = tickets.next() {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let outcome = match await_reply(ruby, ticket.answer.clone(), remaining) {
            Ok(Some(Ok(snapshot))) => {
                snapshots.push(snapshot);
                continue;
            }
            Ok(Some(Err(e))) => Err(errors::engine(ruby, e)),
            Ok(None) => Ok(None),
            Err(interrupt) => Err(interrupt),
        };
        // Timed out, interrupted or refused: the engine must not keep replies for a waiter gone.
        system.abandon_wait(ticket);
        tickets.for_each(|t| system.abandon_wait(t));
        return outcome;
    }
    Ok(Some(snapshots))
}

fn deadline_after(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| {
        let now = Instant::now();
        now.checked_add(t).unwrap_or(now + crate::bridge::MAX_WAIT)
    })
}

/// `announce_task_ends(on)`: whether finished tasks are handed to `next_task_end` (the
/// EventBridge turns them on while someone subscribes to a task event). True if the worker's
/// backend announces task ends; false without a worker, or on a backend that has none to give.
fn announce_task_ends(ruby: &Ruby, on: bool) -> Result<bool, Error> {
    errors::guard(ruby, || {
        Ok(current().is_some_and(|system| system.announce_task_ends(on)))
    })
}

/// `next_task_end(timeout_or_nil)`: the final status Hash of the next task announced as
/// finished; `false` when the wait timed out or was cut short; `nil` once the worker stopped (or
/// none runs) and every announced end was handed out.
fn next_task_end(ruby: &Ruby, timeout: Value) -> Result<Value, Error> {
    errors::guard(ruby, || {
        let timeout = timeout_arg(ruby, timeout)?;
        let Some(system) = current() else {
            return Ok(ruby.qnil().as_value());
        };
        match without_gvl(ruby, |cancel| system.next_task_end(cancel, timeout))? {
            Some(TaskEndTake::End(snapshot)) => {
                Ok(convert::snapshot_to_ruby(ruby, &snapshot)?.as_value())
            }
            Some(TaskEndTake::Closed) => Ok(ruby.qnil().as_value()),
            Some(TaskEndTake::Nothing) | None => {
                check_interrupts(ruby)?;
                Ok(ruby.qfalse().as_value())
            }
        }
    })
}
