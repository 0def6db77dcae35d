//! `TaskerCore::FFI`: the global worker handle and the functions Ruby calls.
//!
//! Invariant for `WORKER_SYSTEM`: the mutex is only locked by Ruby threads holding the GVL,
//! for a clone or a swap, with no Ruby call and no GVL release inside. Since the GVL
//! serialises those sections, the lock is never contended and never waits.

use crate::convert;
use crate::definitions;
use crate::errors;
use crate::gvl::{check_interrupts, log_without_gvl, without_gvl, without_gvl_retrying};
use magnus::{function, prelude::*, Error, RHash, RModule, RString, Ruby, Value};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tasker_worker::dispatch::{wait_reply, InterruptTake};
use tasker_worker::{
    CompletionVerdict, EngineError, Reply, Take, WorkerBootstrap, WorkerConfig, WorkerState,
    WorkerSystemHandle, WorkerSystemStatus,
};
use tracing::{debug, warn};
use uuid::Uuid;

/// The running worker, as the bridge holds it.
pub struct RubyBridgeHandle {
    pub handle_id: String,
    pub system: Arc<WorkerSystemHandle>,
}

static WORKER_SYSTEM: Mutex<Option<RubyBridgeHandle>> = Mutex::new(None);
/// Set while a bootstrap runs without the GVL, so that a second one fails instead of racing.
static BOOTSTRAPPING: AtomicBool = AtomicBool::new(false);

/// The final status of the last worker stopped in this process (its counters after the last
/// step was recorded), for the worker command's exit line.
static LAST_STOPPED: Mutex<Option<WorkerSystemStatus>> = Mutex::new(None);

fn slot() -> MutexGuard<'static, Option<RubyBridgeHandle>> {
    // A poisoned lock only means a panic elsewhere; the Option inside is still consistent.
    WORKER_SYSTEM.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set in a forked child by a `pthread_atfork` handler, so that the hot path need not ask the
/// kernel for the pid on every call; cleared by the first `current()` after the fork.
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_fork_child() {
    FORKED.store(true, Ordering::Release);
    // A bootstrap running on another thread of the parent does not exist in the child.
    BOOTSTRAPPING.store(false, Ordering::Release);
}

/// The current worker, if one was started by this process. After a fork, the parent's worker
/// is dropped from the child's slot without touching its threads, which do not exist here.
pub(crate) fn current() -> Option<Arc<WorkerSystemHandle>> {
    let mut slot = slot();
    if FORKED.swap(false, Ordering::AcqRel)
        && slot
            .as_ref()
            .is_some_and(|bridge| bridge.system.pid() != std::process::id())
    {
        if let Some(stale) = slot.take() {
            std::mem::forget(stale);
        }
    }
    slot.as_ref().map(|bridge| Arc::clone(&bridge.system))
}

pub(crate) fn require_worker(ruby: &Ruby) -> Result<Arc<WorkerSystemHandle>, Error> {
    current().ok_or_else(|| errors::engine(ruby, EngineError::NotInitialized))
}

pub fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    // SAFETY: registers a handler that only stores to an atomic (async-signal-safe).
    unsafe {
        libc::pthread_atfork(None, None, Some(on_fork_child));
    }
    crate::gvl::init(ruby)?;
    let ffi = module.define_module("FFI")?;
    ffi.define_singleton_method("bootstrap_worker", function!(bootstrap_worker, -1))?;
    ffi.define_singleton_method("stop_worker", function!(stop_worker, 0))?;
    ffi.define_singleton_method("worker_status", function!(worker_status, 0))?;
    ffi.define_singleton_method(
        "transition_to_graceful_shutdown",
        function!(transition_to_graceful_shutdown, 0),
    )?;
    ffi.define_singleton_method(
        "send_step_completion_event",
        function!(send_step_completion_event, 1),
    )?;
    ffi.define_singleton_method("next_step_event", function!(next_step_event, -1))?;
    crate::tasks::init(ffi)?;
    ffi.define_singleton_method("next_step_interrupt", function!(next_step_interrupt, -1))?;
    ffi.define_singleton_method("quiet_worker", function!(quiet_worker, 0))?;
    ffi.define_singleton_method("resume_worker", function!(resume_worker, 0))?;
    ffi.define_singleton_method("hand_back_step", function!(hand_back_step, 1))?;
    ffi.define_singleton_method("last_stopped_status", function!(last_stopped_status, 0))?;
    #[cfg(feature = "test-hooks")]
    crate::test_hooks::init(ffi)?;
    crate::logging::init(ruby, ffi)?;
    Ok(())
}

fn bootstrap_worker(ruby: &Ruby, args: &[Value]) -> Result<RHash, Error> {
    errors::guard(ruby, || {
        let config = convert::config_from_args(ruby, args)?;
        if let Some(previous) = current() {
            // An engine that already ended (it failed, or stopped without stop_worker) is
            // cleared away, not reported as running.
            if matches!(previous.state(), WorkerState::Stopped | WorkerState::Error) {
                discard(ruby, &previous)?;
            }
        }
        if let Some(running) = current() {
            return Err(errors::bootstrap(
                ruby,
                format!(
                    "worker already running (worker_id {}, state {}): call TaskerCore::FFI.stop_worker first",
                    running.status().worker_id,
                    running.state().as_str()
                ),
            ));
        }
        if BOOTSTRAPPING.swap(true, Ordering::AcqRel) {
            return Err(errors::bootstrap(
                ruby,
                "worker already running (another bootstrap is in progress)",
            ));
        }
        let result = definitions::clear(ruby).and_then(|()| start(ruby, config));
        BOOTSTRAPPING.store(false, Ordering::Release);
        result
    })
}

fn start(ruby: &Ruby, config: WorkerConfig) -> Result<RHash, Error> {
    // Retried when Ruby merely had an interrupt flag set (a timer tick, SIGCHLD): only an
    // interrupt that raises may end a bootstrap. `start` never ran in that case: nothing to undo.
    let system = match without_gvl_retrying(ruby, |_| Some(WorkerBootstrap::start(config.clone())))?
    {
        Ok(system) => Arc::new(system),
        Err(e) => return Err(bootstrap_failure(ruby, e)),
    };
    let handle_id = Uuid::new_v4().to_string();
    *slot() = Some(RubyBridgeHandle {
        handle_id: handle_id.clone(),
        system: Arc::clone(&system),
    });

    // Wait for the engine to report running (backends may connect and migrate first).
    let started = without_gvl_retrying(ruby, |cancel| {
        match wait_reply(system.started(), cancel, None) {
            Reply::Interrupted | Reply::TimedOut => None,
            reply => Some(reply),
        }
    });
    let failure = match started {
        Ok(Reply::Value(Ok(()))) => None,
        Ok(Reply::Value(Err(e))) => Some(bootstrap_failure(ruby, e)),
        Ok(Reply::EngineGone) => Some(errors::bootstrap(
            ruby,
            "the engine thread ended during bootstrap",
        )),
        Ok(Reply::Interrupted | Reply::TimedOut) => unreachable!("retried above"),
        // Thread#kill, Ctrl-C...: undo the half-started worker, then let it propagate.
        Err(interrupt) => Some(interrupt),
    };
    if let Some(error) = failure {
        discard(ruby, &system)?;
        return Err(error);
    }

    let status = system.status();
    let hash = ruby.hash_new();
    hash.aset(ruby.to_symbol("success"), true)?;
    hash.aset(ruby.to_symbol("handle_id"), handle_id)?;
    hash.aset(ruby.to_symbol("worker_id"), status.worker_id)?;
    hash.aset(ruby.to_symbol("status"), status.state.as_str())?;
    hash.aset(ruby.to_symbol("concurrency"), status.concurrency)?;
    Ok(hash)
}

fn bootstrap_failure(ruby: &Ruby, e: EngineError) -> Error {
    match e {
        EngineError::Configuration(_) => errors::engine(ruby, e),
        other => errors::bootstrap(ruby, format!("worker bootstrap failed: {other}")),
    }
}

/// Stop the engine, wait for it with the GVL released, and forget it.
fn discard(ruby: &Ruby, system: &Arc<WorkerSystemHandle>) -> Result<(), Error> {
    system.request_stop();
    // An interrupt that raises (Ctrl-C) leaves the worker in place, still stopping: calling
    // stop_worker again waits for the rest. Interrupts that raise nothing do not end the wait.
    without_gvl_retrying(ruby, |cancel| {
        match wait_reply(system.stopped(), cancel, None) {
            Reply::EngineGone | Reply::Value(_) => {
                system.join();
                // The Rack app's routes for this worker: its runtime thread and its database
                // connections go with the worker.
                crate::web::unmount(system);
                Some(())
            }
            Reply::Interrupted | Reply::TimedOut => None,
        }
    })?;
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

/// `last_stopped_status`: the final `worker_status` of the last worker stopped by this process
/// (`running: false`), or nil if none was.
fn last_stopped_status(ruby: &Ruby) -> Result<Option<RHash>, Error> {
    errors::guard(ruby, || {
        let last = LAST_STOPPED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        last.map(|status| convert::status_to_ruby(ruby, &status))
            .transpose()
    })
}

/// Wait (GVL released, interruptible) until the engine reports `quiet` as asked.
fn await_quiet(ruby: &Ruby, system: &WorkerSystemHandle, quiet: bool) -> Result<(), Error> {
    without_gvl_retrying(ruby, |cancel| loop {
        if system.is_quiet() == quiet || system.state() != WorkerState::Running {
            return Some(());
        }
        if cancel.recv_timeout(Duration::from_micros(100)).is_ok() {
            return None;
        }
    })
}

/// `quiet_worker`: start no step until `resume_worker` (TSTP in the worker command). Running
/// steps finish; queued ones go back to the backend. True once the engine is quiet.
fn quiet_worker(ruby: &Ruby) -> Result<bool, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        system.quiet().map_err(|e| errors::engine(ruby, e))?;
        await_quiet(ruby, &system, true)?;
        Ok(true)
    })
}

/// `resume_worker`: start steps again after `quiet_worker`.
fn resume_worker(ruby: &Ruby) -> Result<bool, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        system.resume().map_err(|e| errors::engine(ruby, e))?;
        await_quiet(ruby, &system, false)?;
        Ok(true)
    })
}

/// `hand_back_step(event_id)`: give back the attempt of a handler the worker is about to stop (a
/// shutdown past its deadline): it does not count, and the step is ready again. False if the
/// attempt had already ended (or no worker runs).
fn hand_back_step(ruby: &Ruby, event_id: Value) -> Result<bool, Error> {
    errors::guard(ruby, || {
        let text = RString::from_value(event_id)
            .and_then(|s| s.to_string().ok())
            .ok_or_else(|| errors::argument(ruby, "event_id must be a String"))?;
        let event_id = Uuid::parse_str(&text)
            .map_err(|_| errors::argument(ruby, format!("event_id {text:?} is not a UUID")))?;
        Ok(current().is_some_and(|system| system.hand_back(event_id)))
    })
}

fn stop_worker(ruby: &Ruby) -> Result<bool, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        discard(ruby, &system)?;
        Ok(true)
    })
}

fn worker_status(ruby: &Ruby) -> Result<RHash, Error> {
    errors::guard(ruby, || match current() {
        Some(system) => {
            let hash = convert::status_to_ruby(ruby, &system.status())?;
            let handle_id = slot().as_ref().map(|bridge| bridge.handle_id.clone());
            hash.aset(ruby.to_symbol("handle_id"), handle_id)?;
            Ok(hash)
        }
        None => convert::stopped_status(ruby),
    })
}

fn transition_to_graceful_shutdown(ruby: &Ruby) -> Result<bool, Error> {
    errors::guard(ruby, || {
        let system = require_worker(ruby)?;
        system
            .transition_to_graceful_shutdown()
            .map_err(|e| errors::engine(ruby, e))?;
        // The engine reads shutting_down once it has recalled the steps still queued for Ruby, one
        // pass of its loop from now: return after that, so that `worker_status` already says so.
        without_gvl_retrying(ruby, |cancel| loop {
            if system.state() != WorkerState::Running {
                return Some(());
            }
            if cancel.recv_timeout(Duration::from_micros(100)).is_ok() {
                return None;
            }
        })?;
        Ok(true)
    })
}

fn send_step_completion_event(ruby: &Ruby, completion: Value) -> Result<bool, Error> {
    errors::guard(ruby, || {
        let completion = convert::completion_from_ruby(ruby, completion)?;
        let verdict = match current() {
            Some(system) => system.complete(completion),
            None => CompletionVerdict::Refused(format!(
                "completion for event {} arrived with no worker running",
                completion.event_id
            )),
        };
        match verdict {
            CompletionVerdict::Accepted => Ok(true),
            CompletionVerdict::Refused(why) => {
                if tracing::enabled!(tracing::Level::WARN) {
                    log_without_gvl(ruby, move || warn!("{why}; ignored"));
                }
                Ok(false)
            }
            // The engine already logged the timeout; this is the expected end of that attempt.
            CompletionVerdict::TimedOut(why) => {
                debug!("{why}");
                Ok(false)
            }
        }
    })
}

thread_local! {
    /// Events this Ruby thread took in a row without releasing the GVL.
    static FAST_STREAK: Cell<u32> = const { Cell::new(0) };
}

/// After this many events taken with the GVL held, release it once so other threads run.
const FAST_STREAK_LIMIT: u32 = 16;

/// `next_step_event(timeout = nil)`: the next step execution event Hash; `false` when the wait
/// timed out or was interrupted without an exception, or when the caller defers an interrupt
/// that is pending (`Thread.handle_interrupt`; a step taken meanwhile went back to the queue);
/// `nil` once a shutdown was requested or the worker has stopped (the calling thread should
/// leave its loop). An interrupt that raises is raised with any step taken handed back: a step
/// is returned to the caller or back in the queue, never lost on the way.
fn next_step_event(ruby: &Ruby, args: &[Value]) -> Result<Value, Error> {
    errors::guard(ruby, || {
        let timeout = optional_timeout(ruby, args)?;
        let Some(system) = current() else {
            return Ok(ruby.qnil().as_value());
        };
        // Once a shutdown is requested no new step starts, even before the engine has
        // recalled what it queued: an event taken after that point is handed back.
        if system.is_draining() {
            return Ok(ruby.qnil().as_value());
        }
        let port = system.port();
        let hand_out = |event: Box<tasker_worker::StepExecutionEvent>| -> Result<Value, Error> {
            if system.is_draining() {
                system.release_untaken(event.event_id);
                return Ok(ruby.qnil().as_value());
            }
            // Timed out while it waited to be taken: already recorded as a failed attempt.
            if !system.begin_running(event.event_id) {
                return Ok(ruby.qfalse().as_value());
            }
            let converted = definitions::step_definition(ruby, &event.definition)
                .and_then(|definition| convert::event_to_ruby(ruby, &event, definition));
            // An interrupt that came while the event was on its way (`Thread#raise`, `Thread#kill`,
            // Ctrl-C) is raised here, last, with the event handed back at once: raised after we
            // return, it would hit the caller before it stored the event, and the attempt would
            // sit in flight until its timeout. No check point lies between this one and the
            // caller's assignment, so an event returned is an event received.
            // An interrupt the caller defers (`Thread.handle_interrupt`) cannot be raised here; it
            // would be raised at the caller's next safe point, maybe before it runs the step:
            // hand the event back and answer `false`, so the caller meets its interrupt first.
            let handed = converted.and_then(|hash| {
                check_interrupts(ruby)?;
                Ok((!deferred_interrupt_pending(ruby)?).then_some(hash))
            });
            match handed {
                Ok(Some(hash)) => Ok(hash.as_value()),
                Ok(None) => {
                    system.release_untaken(event.event_id);
                    Ok(ruby.qfalse().as_value())
                }
                Err(error) => {
                    system.release_untaken(event.event_id);
                    Err(error)
                }
            }
        };

        // Fast path: an event is already waiting; take it without the GVL round trip.
        if FAST_STREAK.get() < FAST_STREAK_LIMIT {
            if let Take::Event(event) = port.try_take() {
                FAST_STREAK.set(FAST_STREAK.get() + 1);
                return hand_out(event);
            }
        }
        FAST_STREAK.set(0);
        let taken = without_gvl(ruby, |cancel| port.take(cancel, timeout))?;
        match taken {
            Some(Take::Event(event)) => hand_out(event),
            Some(Take::Closed) => Ok(ruby.qnil().as_value()),
            Some(Take::Nothing) | None => {
                check_interrupts(ruby)?;
                Ok(ruby.qfalse().as_value())
            }
        }
    })
}

/// `Thread.pending_interrupt?`: an interrupt is queued for this thread that it defers.
fn deferred_interrupt_pending(ruby: &Ruby) -> Result<bool, Error> {
    ruby.class_thread().funcall("pending_interrupt?", ())
}

/// The longest wait a timeout from Ruby asks for: longer ones (up to `Float::INFINITY`) wait this
/// long. Beyond it, `Instant + Duration` could overflow.
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A timeout in seconds from Ruby: a non-negative number (NaN and negatives raise
/// `ArgumentError`), at most [`MAX_WAIT`].
pub(crate) fn seconds(ruby: &Ruby, value: Value, what: &str) -> Result<Duration, Error> {
    convert::seconds_at_most(ruby, value, what, MAX_WAIT)
}

/// The optional `timeout` argument of the blocking calls: absent or nil waits without a limit.
fn optional_timeout(ruby: &Ruby, args: &[Value]) -> Result<Option<Duration>, Error> {
    match args {
        [] => Ok(None),
        [t] if t.is_nil() => Ok(None),
        [t] => seconds(ruby, *t, "timeout").map(Some),
        _ => Err(errors::argument(
            ruby,
            format!(
                "wrong number of arguments (given {}, expected 0..1)",
                args.len()
            ),
        )),
    }
}

/// How often a wait on the main thread looks for a signal Ruby flagged (see `await_reply`).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

fn is_main_thread(ruby: &Ruby) -> bool {
    ruby.thread_current()
        .as_value()
        .eql(ruby.thread_main().as_value())
        .unwrap_or(false)
}

/// Wait for an engine reply with the GVL released; interrupts raise (or resume the wait).
pub(crate) fn await_reply<T: Send>(
    ruby: &Ruby,
    reply: crossbeam_channel::Receiver<T>,
    timeout: Option<Duration>,
) -> Result<Option<T>, Error> {
    let deadline = timeout.map(|t| {
        let now = Instant::now();
        now.checked_add(t).unwrap_or(now + MAX_WAIT)
    });
    // Ruby 3.1 wakes a main thread blocked in a custom unblocking function for a signal only
    // if no other thread runs; with handler threads in `sleep` a Ctrl-C reached it only when
    // they woke. Ruby does flag the trap on the main thread at once: the main thread's waits
    // look at that flag every SIGNAL_CHECK (replies still wake them at once).
    let slice = is_main_thread(ruby).then_some(SIGNAL_CHECK);
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let wait = match (remaining, slice) {
            (Some(r), Some(s)) => Some(r.min(s)),
            (r, s) => r.or(s),
        };
        match without_gvl(ruby, |cancel| wait_reply(&reply, cancel, wait))? {
            Some(Reply::Value(value)) => return Ok(Some(value)),
            Some(Reply::TimedOut) if remaining.is_none_or(|r| r > wait.unwrap_or(r)) => {
                check_interrupts(ruby)?
            }
            Some(Reply::TimedOut) => return Ok(None),
            Some(Reply::EngineGone) => {
                // A Ctrl-C that stopped the worker is what the caller must see, not the stop.
                check_interrupts(ruby)?;
                return Err(errors::not_initialized(
                    ruby,
                    "the worker stopped before answering",
                ));
            }
            Some(Reply::Interrupted) | None => check_interrupts(ruby)?,
        }
    }
}

/// `next_step_interrupt(timeout = nil)`: the next handler to interrupt (its attempt timed out
/// or its task was cancelled) as `{event_id:, task_uuid:, step_uuid:, step_name:, attempt:,
/// timeout_seconds:, reason: :timeout | :cancelled}`; `false` when the wait timed out or was
/// cut short; `nil` once the worker has stopped. `Worker::Bootstrap` runs one thread on this.
fn next_step_interrupt(ruby: &Ruby, args: &[Value]) -> Result<Value, Error> {
    errors::guard(ruby, || {
        let timeout = optional_timeout(ruby, args)?;
        let Some(system) = current() else {
            return Ok(ruby.qnil().as_value());
        };
        let port = system.interrupt_port().clone();
        match without_gvl(ruby, |cancel| port.take(cancel, timeout))? {
            Some(InterruptTake::Interrupt(interrupt)) => {
                Ok(convert::interrupt_to_ruby(ruby, &interrupt)?.as_value())
            }
            Some(InterruptTake::Closed) => Ok(ruby.qnil().as_value()),
            Some(InterruptTake::Nothing) | None => {
                check_interrupts(ruby)?;
                Ok(ruby.qfalse().as_value())
            }
        }
    })
}
