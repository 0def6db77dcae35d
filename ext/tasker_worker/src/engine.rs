//! The engine loop: one task on the engine thread's tokio runtime. It owns the backend,
//! feeds the dispatch channel, records completions and timeouts, and drives shutdown.

use crate::backend::{Backend, Notification, SnapshotReply};
use crate::dispatch::InFlightRegistry;
use crate::error::{EngineError, EngineResult};
use crate::events::{AttemptOutcome, InFlight, StepExecutionCompletionEvent, StepExecutionEvent};
use crate::status::{Shared, WorkerState};
use crate::template::{TaskTemplate, TemplateKey};
use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tracing::{error, info, warn};
use uuid::Uuid;

/// Where the new tasks' uuids go, in the order of their contexts.
pub type CreatedReply = Sender<EngineResult<Vec<Uuid>>>;

/// Everything that reaches the engine thread, in the order it was sent.
pub enum EngineMessage {
    Completion(InFlight, Box<StepExecutionCompletionEvent>),
    /// One task per context, all of one template.
    CreateTasks {
        key: TemplateKey,
        template: Option<Arc<TaskTemplate>>,
        contexts: Vec<Value>,
        reply: CreatedReply,
    },
    Notify(Notification),
    TaskStatus {
        task_uuid: Uuid,
        reply: SnapshotReply,
    },
    WaitForTask {
        task_uuid: Uuid,
        reply: SnapshotReply,
    },
    GracefulShutdown,
    /// An event taken by a handler thread after the shutdown began, handed back unrun.
    Release(InFlight),
    Stop,
}

/// The most messages handled before the dispatch channel is refilled.
const BATCH: usize = 256;

/// Polls the inbox for a short while before the engine sleeps, while steps are out with Ruby.
///
/// Waking a sleeping engine costs the sender a futex syscall, and the sender is a Ruby thread
/// holding the GVL: with fast handlers that wake was the largest single cost of a round trip.
/// A spin that keeps finding nothing (slow handlers) turns itself off for a while, so an engine
/// waiting on slow handlers stays asleep.
pub(crate) struct Spinner {
    enabled: bool,
    misses: u32,
    /// Parks to skip spinning for, after `MAX_MISSES` fruitless spins in a row.
    cooldown: u32,
}

impl Spinner {
    /// The longest poll; the dispatch-latency floor (`dispatch::WakeShape::Engine`) polls as long.
    pub(crate) const BUDGET: Duration = Duration::from_micros(50);
    const MAX_MISSES: u32 = 3;
    const COOLDOWN_PARKS: u32 = 64;

    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            misses: 0,
            cooldown: 0,
        }
    }

    fn poll(&mut self, inbox: &mut UnboundedReceiver<EngineMessage>) -> Option<EngineMessage> {
        if !self.enabled {
            return None;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return None;
        }
        let until = Instant::now() + Self::BUDGET;
        loop {
            if let Ok(message) = inbox.try_recv() {
                self.misses = 0;
                return Some(message);
            }
            if Instant::now() >= until {
                break;
            }
            // Gives the core to a runnable thread (a Ruby thread) if one is waiting for it.
            std::thread::yield_now();
        }
        self.misses += 1;
        if self.misses >= Self::MAX_MISSES {
            self.misses = 0;
            self.cooldown = Self::COOLDOWN_PARKS;
        }
        None
    }
}

pub(crate) struct Engine<B: Backend> {
    pub backend: B,
    pub shared: Arc<Shared>,
    pub registry: Arc<InFlightRegistry>,
    pub inbox: UnboundedReceiver<EngineMessage>,
    /// Handed to the backend so its listeners can wake the loop.
    pub inbox_sender: UnboundedSender<EngineMessage>,
    pub dispatch: Sender<StepExecutionEvent>,
    /// The engine's own handle on the dispatch channel: recalls untaken events at shutdown.
    pub recall: Receiver<StepExecutionEvent>,
    pub dispatch_capacity: usize,
    pub shutdown_timeout: Duration,
    /// Dropped when the loop ends: wakes every Ruby thread waiting for work.
    pub closed: Option<Sender<()>>,
}

struct LoopState {
    accepting: bool,
    stop_by: Option<Instant>,
    next_sweep: Option<Instant>,
    outcomes: Vec<(InFlight, AttemptOutcome)>,
    /// `create_task` answers held until the new task's first steps are dispatched (in-process
    /// backends): the handler thread is woken before the caller, and does not wait for the
    /// GVL while the caller, woken first, holds it.
    created: Vec<(CreatedReply, EngineResult<Vec<Uuid>>)>,
}

impl<B: Backend> Engine<B> {
    pub async fn run(mut self, started: Sender<EngineResult<()>>) {
        if let Err(e) = self.backend.start(self.inbox_sender.clone()).await {
            self.shared.set_state(WorkerState::Error);
            let _ = started.send(Err(e));
            return;
        }
        self.shared.set_state(WorkerState::Running);
        self.shared.set_pool_stats(self.backend.pool_stats());
        // Logged before the bootstrap returns, so that no line of the caller's comes before it.
        info!(
            worker_id = %self.shared.worker_id,
            backend = self.shared.backend.as_str(),
            "worker running"
        );
        let _ = started.send(Ok(()));

        let mut st = LoopState {
            accepting: true,
            stop_by: None,
            next_sweep: None,
            outcomes: Vec::new(),
            created: Vec::new(),
        };
        let mut spinner = Spinner::new(self.backend.in_process());

        loop {
            let wake = [self.backend.next_wakeup(), st.next_sweep, st.stop_by]
                .into_iter()
                .flatten()
                .min();
            // Spin only while steps are out: otherwise no completion is coming.
            let spun = if self.shared.in_flight.load(Ordering::Acquire) > 0 {
                spinner.poll(&mut self.inbox)
            } else {
                None
            };
            let first = match (spun, wake) {
                (Some(message), _) => Some(message),
                (None, Some(at)) => tokio::select! {
                    m = self.inbox.recv() => m,
                    _ = tokio::time::sleep_until(at.into()) => None,
                },
                (None, None) => self.inbox.recv().await,
            };
            if let Some(message) = first {
                self.handle(message, &mut st).await;
                for _ in 1..BATCH {
                    match self.inbox.try_recv() {
                        Ok(message) => self.handle(message, &mut st).await,
                        Err(_) => break,
                    }
                }
            }
            self.backend.tick(Instant::now()).await;
            self.shared.set_pool_stats(self.backend.pool_stats());
            self.sweep_timeouts(&mut st);
            self.flush(&mut st).await;
            if st.accepting {
                self.fill(&mut st).await;
            }
            for (reply, result) in st.created.drain(..) {
                let _ = reply.try_send(result);
            }
            if let Some(stop_by) = st.stop_by {
                let in_flight = self.shared.in_flight.load(Ordering::Acquire);
                if in_flight == 0 {
                    break;
                }
                if Instant::now() >= stop_by {
                    warn!(
                        in_flight,
                        "shutdown timeout reached with steps still running; they are abandoned"
                    );
                    break;
                }
            }
        }
        self.shared.set_state(WorkerState::Stopped);
        self.closed.take();
        info!(worker_id = %self.shared.worker_id, "worker stopped");
    }

    async fn handle(&mut self, message: EngineMessage, st: &mut LoopState) {
        match message {
            EngineMessage::Completion(flight, completion) => {
                st.outcomes
                    .push((flight, AttemptOutcome::Completed(completion)));
                return;
            }
            // Only sets flags (work may be ready somewhere): no reason to cut the batch of
            // outcomes short, which would cost a transaction per notification on the postgres backend.
            EngineMessage::Notify(notification) => {
                self.backend.notify(notification);
                return;
            }
            _ => self.flush(st).await,
        }
        match message {
            EngineMessage::Completion(..) => unreachable!("handled above"),
            EngineMessage::Notify(..) => unreachable!("handled above"),
            EngineMessage::CreateTasks {
                key,
                template,
                contexts,
                reply,
            } => {
                let result = if st.accepting {
                    self.backend.create_tasks(key, template, contexts).await
                } else {
                    Err(EngineError::ShuttingDown)
                };
                if self.backend.in_process() {
                    st.created.push((reply, result));
                } else {
                    let _ = reply.try_send(result);
                }
            }
            EngineMessage::TaskStatus { task_uuid, reply } => {
                let _ = reply.try_send(self.backend.task_status(task_uuid).await);
            }
            EngineMessage::WaitForTask { task_uuid, reply } => {
                self.backend.wait_for_task(task_uuid, reply).await
            }
            EngineMessage::GracefulShutdown => self.begin_shutdown(st).await,
            EngineMessage::Release(flight) => {
                self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                self.backend.release(vec![flight]).await;
            }
            EngineMessage::Stop => {
                self.begin_shutdown(st).await;
                st.stop_by
                    .get_or_insert(Instant::now() + self.shutdown_timeout);
            }
        }
    }

    /// Record the outcomes gathered so far, in one backend call.
    async fn flush(&mut self, st: &mut LoopState) {
        if st.outcomes.is_empty() {
            return;
        }
        let outcomes = std::mem::take(&mut st.outcomes);
        let ended = outcomes.len() as u64;
        let failed = outcomes
            .iter()
            .filter(|(_, o)| !matches!(o, AttemptOutcome::Completed(c) if c.success))
            .count() as u64;
        // Counters first: recording wakes wait_for_task callers, who may read worker_status at once.
        self.shared
            .steps_processed
            .fetch_add(ended, Ordering::AcqRel);
        self.shared.steps_failed.fetch_add(failed, Ordering::AcqRel);
        self.shared.in_flight.fetch_sub(ended, Ordering::AcqRel);
        if let Err(e) = self.backend.record(outcomes, Instant::now()).await {
            error!(error = %e, "recording step outcomes failed");
        }
    }

    fn sweep_timeouts(&mut self, st: &mut LoopState) {
        let now = Instant::now();
        if st.next_sweep.is_none_or(|at| at > now) {
            return;
        }
        let (expired, next) = self.registry.expired(now);
        st.next_sweep = next;
        for event_id in expired {
            if let Some(flight) = self.registry.take(event_id) {
                warn!(%event_id, task_uuid = %flight.task_uuid, attempt = flight.attempt, "step attempt timed out");
                st.outcomes.push((flight, AttemptOutcome::TimedOut));
            }
        }
    }

    /// Claim as many ready attempts as the dispatch channel has room for.
    async fn fill(&mut self, st: &mut LoopState) {
        let room = self.dispatch_capacity.saturating_sub(self.dispatch.len());
        if room == 0 {
            return;
        }
        let claimed = match self.backend.claim(room, Instant::now()).await {
            Ok(claimed) => claimed,
            Err(e) => {
                // Recoverable (e.g. the database restarting): the next pass claims again.
                warn!(error = %e, "claiming ready steps failed; will retry");
                return;
            }
        };
        for (event, flight) in claimed {
            st.next_sweep = Some(
                st.next_sweep
                    .map_or(flight.deadline, |at| at.min(flight.deadline)),
            );
            self.registry.insert(event.event_id, flight);
            self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = self.dispatch.try_send(event) {
                // Only the engine sends, and it sent no more than the room it saw.
                error!("dispatch channel refused an event: {e}");
            }
        }
    }

    /// Stop taking new work; attempts still queued for Ruby go back to the backend.
    async fn begin_shutdown(&mut self, st: &mut LoopState) {
        if !st.accepting {
            return;
        }
        st.accepting = false;
        let mut unstarted = Vec::new();
        while let Ok(event) = self.recall.try_recv() {
            if let Some(flight) = self.registry.take(event.event_id) {
                unstarted.push(flight);
            }
        }
        if !unstarted.is_empty() {
            self.shared
                .in_flight
                .fetch_sub(unstarted.len() as u64, Ordering::AcqRel);
            self.backend.release(unstarted).await;
        }
        self.backend.stop_claiming().await;
        // Only now: `transition_to_graceful_shutdown` returns once this reads shutting_down, and
        // by then no queued step is left to start.
        self.shared.set_state(WorkerState::ShuttingDown);
        info!(
            in_flight = self.shared.in_flight.load(Ordering::Acquire),
            "graceful shutdown: no new steps start, in-flight steps finish"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinner_takes_a_message_that_arrives_while_it_polls() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut spinner = Spinner::new(true);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(10));
            let _ = tx.send(EngineMessage::GracefulShutdown);
            tx
        });
        // On a slow machine the message may come after a budget or a cool-down: poll until it does.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = None;
        while got.is_none() && Instant::now() < deadline {
            got = spinner.poll(&mut rx);
        }
        let _tx = sender.join().unwrap();
        assert!(matches!(got, Some(EngineMessage::GracefulShutdown)));
        assert_eq!(spinner.misses, 0);
    }

    #[test]
    fn spinner_backs_off_after_fruitless_polls_and_never_spins_when_disabled() {
        let (_tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<EngineMessage>();
        let mut spinner = Spinner::new(true);
        for _ in 0..Spinner::MAX_MISSES {
            assert!(spinner.poll(&mut rx).is_none());
        }
        assert_eq!(spinner.cooldown, Spinner::COOLDOWN_PARKS);
        for _ in 0..Spinner::COOLDOWN_PARKS {
            assert!(spinner.poll(&mut rx).is_none());
        }
        assert_eq!(spinner.cooldown, 0, "spins again after the cool-down");

        let mut disabled = Spinner::new(false);
        let started = Instant::now();
        for _ in 0..1000 {
            assert!(disabled.poll(&mut rx).is_none());
        }
        assert!(
            started.elapsed() < Spinner::BUDGET * 100,
            "a disabled spinner returns at once"
        );
    }
}
