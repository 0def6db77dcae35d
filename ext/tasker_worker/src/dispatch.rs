//! The hand-off between the engine and the Ruby handler threads.
//!
//! The engine pushes ready attempts into a small bounded channel; Ruby threads take them
//! (the bridge waits with the GVL released). Every dispatched attempt is recorded in the
//! [`InFlightRegistry`], a lock-free map, so that a completion can be accepted or refused
//! on the Ruby thread without a lock and without a round trip to the engine.

use crate::attempt::{InFlight, Phase};
use crate::events::{StepExecutionEvent, StepInterrupt};
use crossbeam_channel::{Receiver, Select, Sender, TryRecvError};
use crossbeam_skiplist::SkipMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long the engine polls its inbox before it sleeps while steps are out with Ruby (see
/// `engine::Spinner`); the dispatch-latency floor ([`WakeShape::Engine`]) polls as long.
pub(crate) const ENGINE_SPIN: Duration = Duration::from_micros(50);

/// Attempts handed out and not yet completed or timed out, keyed by event id.
#[derive(Default)]
pub struct InFlightRegistry {
    entries: SkipMap<u128, InFlight>,
}

impl InFlightRegistry {
    pub fn insert(&self, event_id: Uuid, entry: InFlight) {
        self.entries.insert(event_id.as_u128(), entry);
    }

    pub fn get(&self, event_id: Uuid) -> Option<InFlight> {
        self.entries
            .get(&event_id.as_u128())
            .map(|e| e.value().clone())
    }

    /// Look at an entry without copying it out.
    pub fn with<R>(&self, event_id: Uuid, look: impl FnOnce(&InFlight) -> R) -> Option<R> {
        self.entries
            .get(&event_id.as_u128())
            .map(|e| look(e.value()))
    }

    pub fn contains(&self, event_id: Uuid) -> bool {
        self.entries.contains_key(&event_id.as_u128())
    }

    /// Exactly one caller wins the removal of an entry (completion vs timeout vs recall).
    pub fn take(&self, event_id: Uuid) -> Option<InFlight> {
        self.entries
            .remove(&event_id.as_u128())
            .map(|e| e.value().clone())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Attempts still queued or running whose deadline has passed, and the earliest deadline
    /// still pending. Attempts already timed out or cancelled (waiting for their handler to
    /// return) are not timed again.
    pub fn expired(&self, now: Instant) -> (Vec<(Uuid, InFlight)>, Option<Instant>) {
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for entry in self.entries.iter() {
            let flight = entry.value();
            if !matches!(flight.phase.get(), Phase::Queued | Phase::Running) {
                continue;
            }
            let deadline = flight.deadline();
            if deadline <= now {
                expired.push((Uuid::from_u128(*entry.key()), flight.clone()));
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        (expired, next)
    }

    /// The phase of every attempt out (for the metrics of busy handler threads).
    pub fn phases(&self) -> Vec<Phase> {
        self.entries.iter().map(|e| e.value().phase.get()).collect()
    }

    /// The attempts out for any of `tasks`.
    pub fn of_tasks(&self, tasks: &[Uuid]) -> Vec<(Uuid, InFlight)> {
        self.entries
            .iter()
            .filter(|e| tasks.contains(&e.value().task_uuid))
            .map(|e| (Uuid::from_u128(*e.key()), e.value().clone()))
            .collect()
    }
}

/// What a waiting Ruby thread gets back.
#[derive(Debug)]
pub enum Take {
    Event(Box<StepExecutionEvent>),
    /// The wait was cut short (interrupt, `Thread#wakeup`, signal) or timed out: nothing taken.
    Nothing,
    /// The worker is stopping: the thread should leave its loop.
    Closed,
}

/// The receiving side, cloned into the bridge. `closed` disconnects when the worker stops.
#[derive(Clone)]
pub struct DispatchPort {
    events: Receiver<StepExecutionEvent>,
    closed: Receiver<()>,
}

impl DispatchPort {
    pub(crate) fn new(events: Receiver<StepExecutionEvent>, closed: Receiver<()>) -> Self {
        Self { events, closed }
    }

    /// Take an event already queued, without blocking.
    pub fn try_take(&self) -> Take {
        match self.events.try_recv() {
            Ok(event) => Take::Event(Box::new(event)),
            Err(TryRecvError::Empty) if self.is_closed() => Take::Closed,
            Err(TryRecvError::Empty) => Take::Nothing,
            Err(TryRecvError::Disconnected) => Take::Closed,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.closed.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Block until an event arrives, the worker closes, `cancel` receives (an unblocking
    /// function fired), or `timeout` passes.
    pub fn take(&self, cancel: &Receiver<()>, timeout: Option<Duration>) -> Take {
        let mut select = Select::new();
        let events = select.recv(&self.events);
        let closed = select.recv(&self.closed);
        let cancelled = select.recv(cancel);
        let op = match timeout {
            Some(t) => match select.select_timeout(t) {
                Ok(op) => op,
                Err(_) => return Take::Nothing,
            },
            None => select.select(),
        };
        match op.index() {
            i if i == events => match op.recv(&self.events) {
                Ok(event) => Take::Event(Box::new(event)),
                Err(_) => Take::Closed,
            },
            i if i == closed => {
                let _ = op.recv(&self.closed);
                // Closing is a disconnect; anything still queued was recalled by the engine.
                Take::Closed
            }
            i if i == cancelled => {
                let _ = op.recv(cancel);
                Take::Nothing
            }
            _ => unreachable!("select returned an operation that was not registered"),
        }
    }
}

/// What a thread waiting for handler interrupts gets back.
#[derive(Debug)]
pub enum InterruptTake {
    Interrupt(StepInterrupt),
    /// The wait was cut short or timed out.
    Nothing,
    /// The worker stopped.
    Closed,
}

/// The receiving side of the engine's handler interrupts (timeouts, cancels).
#[derive(Clone)]
pub struct InterruptPort {
    interrupts: Receiver<StepInterrupt>,
    closed: Receiver<()>,
}

impl InterruptPort {
    pub(crate) fn new(interrupts: Receiver<StepInterrupt>, closed: Receiver<()>) -> Self {
        Self { interrupts, closed }
    }

    /// Block until an interrupt is due, the worker closes, `cancel` receives, or `timeout` passes.
    pub fn take(&self, cancel: &Receiver<()>, timeout: Option<Duration>) -> InterruptTake {
        if let Ok(interrupt) = self.interrupts.try_recv() {
            return InterruptTake::Interrupt(interrupt);
        }
        let mut select = Select::new();
        let interrupts = select.recv(&self.interrupts);
        let closed = select.recv(&self.closed);
        select.recv(cancel);
        let op = match timeout {
            Some(t) => match select.select_timeout(t) {
                Ok(op) => op,
                Err(_) => return InterruptTake::Nothing,
            },
            None => select.select(),
        };
        match op.index() {
            i if i == interrupts => match op.recv(&self.interrupts) {
                Ok(interrupt) => InterruptTake::Interrupt(interrupt),
                Err(_) => InterruptTake::Closed,
            },
            i if i == closed => {
                let _ = op.recv(&self.closed);
                InterruptTake::Closed
            }
            _ => {
                let _ = op.recv(cancel);
                InterruptTake::Nothing
            }
        }
    }
}

/// Wait for a reply from the engine, interruptibly (used by the bridge with the GVL released).
pub fn wait_reply<T>(
    reply: &Receiver<T>,
    cancel: &Receiver<()>,
    timeout: Option<Duration>,
) -> Reply<T> {
    let mut select = Select::new();
    let answer = select.recv(reply);
    select.recv(cancel);
    let op = match timeout {
        Some(t) => match select.select_timeout(t) {
            Ok(op) => op,
            Err(_) => return Reply::TimedOut,
        },
        None => select.select(),
    };
    if op.index() == answer {
        match op.recv(reply) {
            Ok(value) => Reply::Value(value),
            Err(_) => Reply::EngineGone,
        }
    } else {
        let _ = op.recv(cancel);
        Reply::Interrupted
    }
}

#[derive(Debug)]
pub enum Reply<T> {
    Value(T),
    Interrupted,
    TimedOut,
    /// The engine stopped before answering.
    EngineGone,
}

pub(crate) fn channel(
    capacity: usize,
) -> (Sender<StepExecutionEvent>, Receiver<StepExecutionEvent>) {
    crossbeam_channel::bounded(capacity)
}

/// How the floor's waiting thread is woken (see [`measure_thread_wake`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeShape {
    /// A sender wakes the waiter, then sleeps: nothing else wants a core.
    Pair,
    /// The shape of the benchmark's dispatch: a creator thread asks an engine thread for a task
    /// and blocks for the answer; the engine wakes the waiter, then answers the creator (so two
    /// threads wake at once on a 2-core machine), then polls as long as the engine's spinner
    /// does.
    Engine,
}

/// The floor for dispatch latency on this machine: a plain Rust thread parked in the same kind of
/// `select` a handler thread waits in (events, closed, cancel), woken by a send. Returns each
/// wake-up's latency in ns. `gap` between rounds lets the threads park fully each time, as on an
/// idle worker.
pub fn measure_thread_wake(samples: usize, gap: Duration, shape: WakeShape) -> Vec<u64> {
    let (tx, rx) = crossbeam_channel::bounded::<Instant>(1);
    let (_closed_tx, closed) = crossbeam_channel::bounded::<()>(1);
    let (_cancel_tx, cancel) = crossbeam_channel::bounded::<()>(1);
    let waiter = std::thread::spawn(move || {
        let mut latencies = Vec::with_capacity(samples);
        loop {
            let mut select = Select::new();
            let events = select.recv(&rx);
            select.recv(&closed);
            select.recv(&cancel);
            let op = select.select();
            if op.index() != events {
                break;
            }
            match op.recv(&rx) {
                Ok(ready) => latencies.push(ready.elapsed().as_nanos() as u64),
                Err(_) => break,
            }
        }
        latencies
    });
    match shape {
        WakeShape::Pair => {
            for _ in 0..samples {
                std::thread::sleep(gap);
                if tx.send(Instant::now()).is_err() {
                    break;
                }
            }
            drop(tx);
        }
        WakeShape::Engine => {
            let (requests, inbox) = crossbeam_channel::bounded::<Sender<()>>(1);
            let engine = std::thread::spawn(move || {
                while let Ok(reply) = inbox.recv() {
                    if tx.send(Instant::now()).is_err() {
                        break;
                    }
                    let _ = reply.send(());
                    let until = Instant::now() + ENGINE_SPIN;
                    while Instant::now() < until && inbox.is_empty() {
                        std::thread::yield_now();
                    }
                }
            });
            for _ in 0..samples {
                std::thread::sleep(gap);
                let (reply, answer) = crossbeam_channel::bounded(1);
                if requests.send(reply).is_err() || answer.recv().is_err() {
                    break;
                }
            }
            drop(requests);
            let _ = engine.join();
        }
    }
    waiter.join().unwrap_or_default()
}
