//! Waiting in Rust with the GIL released, woken by Ctrl-C and by a shutdown.
//!
//! Python runs signal handlers on its main thread only, between bytecodes: a main thread blocked
//! in Rust would never see its Ctrl-C. So the main thread waits in slices of [`SIGNAL_CHECK`]
//! and, between them, lets Python run its handlers (`check_signals`; a `KeyboardInterrupt`
//! comes back as the error). Other threads wait in one piece: a signal is not theirs.
//!
//! Every wait also selects on the current *wake* channel: [`wake_all`] disconnects it, which wakes
//! every thread waiting on it at once (the Python worker wakes its idle handler threads that way
//! when it stops, the way the Ruby pool uses `Thread#wakeup`).

use crossbeam_channel::{Receiver, Sender};
use pyo3::prelude::*;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a wait on the main thread lets Python look at its signals.
pub const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// The longest wait a timeout asks for: longer ones wait this long (no `Instant` overflow).
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

static WAKE: Mutex<Option<(Sender<()>, Receiver<()>)>> = Mutex::new(None);

/// The receiver every wait selects on until the next [`wake_all`]. Locked only for a clone or a
/// swap, never across a wait.
pub fn wake_receiver() -> Receiver<()> {
    let mut wake = WAKE.lock().unwrap_or_else(|e| e.into_inner());
    wake.get_or_insert_with(|| crossbeam_channel::bounded(0))
        .1
        .clone()
}

/// Wake every thread waiting now (their waits answer "cut short"); later waits are not affected.
pub fn wake_all() {
    let old = WAKE.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(old);
}

/// Whether the wake channel a wait selected on has fired (it fires by disconnecting).
pub fn woken(wake: &Receiver<()>) -> bool {
    matches!(
        wake.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

/// Whether this is the process's main thread (where Python runs signal handlers).
fn on_main_thread() -> bool {
    // SAFETY: plain system calls without arguments.
    unsafe { libc::gettid() == libc::getpid() }
}

/// What one slice of a wait ended with.
pub enum Slice<T> {
    Done(T),
    /// The slice's time ran out.
    TimedOut,
    /// The wake channel fired (a shutdown woke every waiter).
    Woken,
}

/// How a wait ended.
pub enum Waited<T> {
    Done(T),
    TimedOut,
    Woken,
}

/// A timeout in seconds from Python: `None` waits without a limit; NaN and negatives are a
/// `ValueError` naming `what`; beyond [`MAX_WAIT`] waits that long.
pub fn timeout(seconds: Option<f64>, what: &str) -> PyResult<Option<Duration>> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_nan() || s < 0.0 => Err(crate::errors::value_error(format!(
            "{what} must be a non-negative number of seconds (not NaN)"
        ))),
        Some(s) => Ok(Some(
            Duration::try_from_secs_f64(s)
                .unwrap_or(MAX_WAIT)
                .min(MAX_WAIT),
        )),
    }
}

/// Run `slice` with the GIL released until it is done, `timeout` passes, or (when `wakeable`)
/// the wake channel fires. `slice` gets the wake receiver to select on and how long it may wait.
/// A signal handler that raises (Ctrl-C) ends the wait with its exception.
pub fn wait<T, F>(
    py: Python<'_>,
    timeout: Option<Duration>,
    wakeable: bool,
    mut slice: F,
) -> PyResult<Waited<T>>
where
    T: Send,
    F: FnMut(&Receiver<()>, Option<Duration>) -> Slice<T> + Send,
{
    let deadline = timeout.map(|t| Instant::now() + t);
    let step = on_main_thread().then_some(SIGNAL_CHECK);
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let this = match (remaining, step) {
            (Some(r), Some(s)) => Some(r.min(s)),
            (r, s) => r.or(s),
        };
        let wake = wake_receiver();
        let outcome = py.allow_threads(|| slice(&wake, this));
        match outcome {
            Slice::Done(value) => return Ok(Waited::Done(value)),
            Slice::Woken => {
                py.check_signals()?;
                if wakeable {
                    return Ok(Waited::Woken);
                }
            }
            Slice::TimedOut => {
                py.check_signals()?;
                if remaining.is_some_and(|r| this.is_some_and(|t| t >= r)) {
                    return Ok(Waited::TimedOut);
                }
            }
        }
    }
}

/// Wait for one reply from the engine (see [`wait`]); `None` on timeout.
pub fn reply<T: Send>(
    py: Python<'_>,
    answer: &Receiver<T>,
    timeout: Option<Duration>,
) -> PyResult<Option<Result<T, ()>>> {
    // Answered already (the memory backend answers creations, statuses and waits for finished
    // tasks on the calling thread): no GIL release, which would let a handler thread take the GIL
    // and make this caller wait for it back.
    if let Ok(value) = answer.try_recv() {
        return Ok(Some(Ok(value)));
    }
    let waited = wait(
        py,
        timeout,
        false,
        |wake, limit| match tasker_worker::dispatch::wait_reply(answer, wake, limit) {
            tasker_worker::Reply::Value(v) => Slice::Done(Ok(v)),
            tasker_worker::Reply::EngineGone => Slice::Done(Err(())),
            tasker_worker::Reply::TimedOut => Slice::TimedOut,
            tasker_worker::Reply::Interrupted => Slice::Woken,
        },
    )?;
    Ok(match waited {
        Waited::Done(v) => Some(v),
        Waited::TimedOut | Waited::Woken => None,
    })
}
