//! The engine loop: one task on the engine thread's tokio runtime. It owns the backend,
//! feeds the dispatch channel, records completions and timeouts, and drives shutdown.

use crate::attempt::{fmt_secs, AttemptOutcome, InFlight, Phase};
use crate::backend::{
    Backend, BackendGauges, EngineGone, Notification, NotificationSender, SnapshotReply,
};
use crate::dispatch::{InFlightRegistry, ENGINE_SPIN};
use crate::error::{EngineError, EngineResult};
use crate::events::{InterruptReason, StepExecutionEvent, StepInterrupt};
use crate::status::{Shared, WorkerState};
use crate::task_list::{TaskPage, TaskQuery};
use crate::template::{OnTimeout, TaskTemplate, TemplateKey};
use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

pub use crate::backend::CreatedReply;

/// Everything that reaches the engine thread, in the order it was sent.
pub enum EngineMessage {
    /// An attempt ended: its handler returned (or returned late, or after a cancel).
    Outcome(InFlight, AttemptOutcome),
    /// One task per context, all of one template.
    CreateTasks {
        key: TemplateKey,
        template: Option<Arc<TaskTemplate>>,
        contexts: Vec<Value>,
        /// When the tasks' root steps become ready (`None`: now).
        run_at: Option<std::time::SystemTime>,
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
        /// Set when the caller gave up before the engine got here: nothing to look up then.
        abandoned: Arc<AtomicBool>,
    },
    /// The caller of a `WaitForTask` stopped waiting.
    ForgetWaiter {
        task_uuid: Uuid,
        reply: SnapshotReply,
    },
    CancelTask {
        task_uuid: Uuid,
        reply: Sender<EngineResult<bool>>,
    },
    RetryTask {
        task_uuid: Uuid,
        reply: Sender<EngineResult<()>>,
    },
    ListTasks {
        query: TaskQuery,
        reply: Sender<EngineResult<TaskPage>>,
    },
    /// Counts for the metrics endpoint (see [`Backend::gauges`]).
    Gauges(tokio::sync::oneshot::Sender<Option<BackendGauges>>),
    GracefulShutdown,
    /// Stop starting steps until `Resume` ("quiet", Sidekiq's TSTP): steps queued for Ruby go back
    /// to the backend, running ones finish; tasks can still be created.
    Quiet,
    /// Start steps again after `Quiet`.
    Resume,
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
    /// The longest poll.
    const BUDGET: Duration = ENGINE_SPIN;
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
    /// Handlers to interrupt (timeouts, cancels), for the Ruby thread that raises into them.
    pub interrupts: Sender<StepInterrupt>,
    pub dispatch_capacity: usize,
    pub shutdown_timeout: Duration,
    /// Dropped when the loop ends: wakes every Ruby thread waiting for work.
    pub closed: Option<Sender<()>>,
}

struct LoopState {
    accepting: bool,
    /// Quiet: nothing is claimed, but the worker is not stopping.
    quiet: bool,
    stop_by: Option<Instant>,
    next_sweep: Option<Instant>,
    outcomes: Vec<(InFlight, AttemptOutcome)>,
}

impl<B: Backend> Engine<B> {
    pub async fn run(mut self, started: Sender<EngineResult<()>>) {
        let inbox = self.inbox_sender.clone();
        let notifications = NotificationSender::new(move |notification| {
            inbox
                .send(EngineMessage::Notify(notification))
                .map_err(|_| EngineGone)
        });
        if let Err(e) = self.backend.start(notifications).await {
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
            quiet: false,
            stop_by: None,
            next_sweep: None,
            outcomes: Vec::new(),
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
            self.sweep_timeouts(&mut st).await;
            self.flush(&mut st).await;
            if st.accepting && !st.quiet {
                self.fill(&mut st).await;
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
        self.backend.finish_creating().await;
        self.shared.set_state(WorkerState::Stopped);
        self.closed.take();
        info!(worker_id = %self.shared.worker_id, "worker stopped");
    }

    async fn handle(&mut self, message: EngineMessage, st: &mut LoopState) {
        match message {
            EngineMessage::Outcome(flight, outcome) => {
                st.outcomes.push((flight, outcome));
                return;
            }
            // Only sets flags (work may be ready somewhere): no reason to cut the batch of
            // outcomes short, which would cost a transaction per notification on the postgres backend.
            EngineMessage::Notify(Notification::TasksHalted { tasks, cancelled }) => {
                self.withdraw(&tasks, cancelled).await;
                self.backend
                    .notify(Notification::TasksHalted { tasks, cancelled });
                return;
            }
            EngineMessage::Notify(notification) => {
                self.backend.notify(notification);
                return;
            }
            // Stored off this loop (PostgreSQL commits the calls of many threads together), so
            // no reason to cut the batch of outcomes short either. (The memory backend's tasks
            // are created by the caller, without this message.)
            EngineMessage::CreateTasks {
                key,
                template,
                contexts,
                run_at,
                reply,
            } => {
                if st.accepting {
                    self.backend
                        .create_tasks(key, template, contexts, run_at, reply)
                        .await
                } else {
                    let _ = reply.try_send(Err(EngineError::ShuttingDown));
                }
                return;
            }
            _ => self.flush(st).await,
        }
        match message {
            EngineMessage::Outcome(..) => unreachable!("handled above"),
            EngineMessage::Notify(..) => unreachable!("handled above"),
            EngineMessage::CreateTasks { .. } => unreachable!("handled above"),
            EngineMessage::TaskStatus { task_uuid, reply } => {
                let _ = reply.try_send(self.backend.task_status(task_uuid).await);
            }
            EngineMessage::WaitForTask {
                task_uuid,
                reply,
                abandoned,
            } => {
                // A caller that timed out at once (`wait_for_task(uuid, 0)` in a loop) must not
                // cost a lookup (a query on postgres) per call.
                if !abandoned.load(Ordering::Acquire) {
                    self.backend.wait_for_task(task_uuid, reply).await
                }
            }
            EngineMessage::ForgetWaiter { task_uuid, reply } => {
                self.backend.forget_waiter(task_uuid, &reply)
            }
            EngineMessage::CancelTask { task_uuid, reply } => {
                let result = self.backend.cancel_task(task_uuid).await;
                if let Ok(true) = result {
                    info!(%task_uuid, "task cancelled: no step starts any more; running handlers are interrupted");
                    self.withdraw(&[task_uuid], true).await;
                }
                let _ = reply.try_send(result);
            }
            EngineMessage::RetryTask { task_uuid, reply } => {
                let result = self.backend.retry_task(task_uuid).await;
                if result.is_ok() {
                    info!(%task_uuid, "task retried from its unfinished steps");
                }
                let _ = reply.try_send(result);
            }
            EngineMessage::ListTasks { query, reply } => {
                let _ = reply.try_send(self.backend.list_tasks(query).await);
            }
            EngineMessage::Gauges(reply) => {
                let _ = reply.send(self.backend.gauges());
            }
            EngineMessage::GracefulShutdown => self.begin_shutdown(st).await,
            EngineMessage::Quiet => {
                if st.accepting && !st.quiet {
                    st.quiet = true;
                    self.recall_queued().await;
                    self.backend.stop_claiming().await;
                    self.shared.set_quiet(true);
                    info!(
                        in_flight = self.shared.in_flight.load(Ordering::Acquire),
                        "quiet: no new steps start until resumed, in-flight steps finish"
                    );
                }
            }
            EngineMessage::Resume => {
                if st.accepting && st.quiet {
                    st.quiet = false;
                    self.backend.resume_claiming().await;
                    self.shared.set_quiet(false);
                    info!("resumed: steps start again");
                }
            }
            EngineMessage::Release(flight) => self.release_unstarted(vec![flight]).await,
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
        for (flight, outcome) in &outcomes {
            observe_outcome(flight, outcome);
        }
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
        match self.backend.record(outcomes, Instant::now()).await {
            Ok(halted) if !halted.is_empty() => {
                // Their attempts still queued for Ruby must not start now.
                self.withdraw(&halted, false).await;
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "recording step outcomes failed"),
        }
    }

    /// Take back the attempts of `tasks` that no handler thread has taken yet (the backend settles
    /// them as their task's ending says). With `cancel_running` (a cancel), also interrupt the
    /// handlers running them; otherwise (a failed task) running attempts finish.
    async fn withdraw(&mut self, tasks: &[Uuid], cancel_running: bool) {
        let mut unstarted = Vec::new();
        for (event_id, flight) in self.registry.of_tasks(tasks) {
            if flight.phase.advance(Phase::Queued, Phase::Done) {
                if let Some(flight) = self.registry.take(event_id) {
                    unstarted.push(flight);
                }
            } else if cancel_running && flight.phase.advance(Phase::Running, Phase::Cancelled) {
                self.interrupt(event_id, &flight, InterruptReason::Cancelled);
            }
        }
        if !unstarted.is_empty() {
            self.shared
                .in_flight
                .fetch_sub(unstarted.len() as u64, Ordering::AcqRel);
            self.backend.release(unstarted).await;
        }
    }

    /// Ask the Ruby side to raise into the handler running `event_id` (unless the step said
    /// `on_timeout: wait`). A full queue means nobody is listening: the handler runs on.
    fn interrupt(&self, event_id: Uuid, flight: &InFlight, reason: InterruptReason) {
        if flight.on_timeout == OnTimeout::Wait {
            return;
        }
        let interrupt = StepInterrupt {
            event_id,
            task_uuid: flight.task_uuid,
            step_uuid: flight.step_uuid,
            step_name: Arc::clone(&flight.step_name),
            attempt: flight.attempt,
            timeout: flight.timeout,
            reason,
        };
        if self.interrupts.try_send(interrupt).is_err() {
            debug!(%event_id, "interrupt queue full: nobody raises into handlers");
        }
    }

    async fn sweep_timeouts(&mut self, st: &mut LoopState) {
        let now = Instant::now();
        if st.next_sweep.is_none_or(|at| at > now) {
            return;
        }
        let (expired, next) = self.registry.expired(now);
        st.next_sweep = next;
        let mut unstarted = Vec::new();
        for (event_id, flight) in expired {
            let timeout = fmt_secs(flight.timeout);
            if flight.phase.advance(Phase::Queued, Phase::Done) {
                // Never taken: nothing ran, so the attempt does not count. The step goes back to
                // the backend (on PostgreSQL, for any worker with a free thread).
                if let Some(flight) = self.registry.take(event_id) {
                    warn!(task_uuid = %flight.task_uuid, step = %flight.step_name, attempt = flight.attempt,
                          timeout_seconds = %timeout,
                          "step waited its whole timeout for a free handler thread; handed back unrun (the attempt does not count)");
                    unstarted.push(flight);
                }
            } else if now < flight.deadline() {
                // A handler thread took it after `expired` saw it queued: its timeout counts from
                // there, and the sweep must come back for it.
                let deadline = flight.deadline();
                st.next_sweep = Some(st.next_sweep.map_or(deadline, |at| at.min(deadline)));
            } else if flight.phase.advance(Phase::Running, Phase::TimedOut) {
                // The attempt is over, but its handler still runs: the next attempt waits for it to
                // return (the completion then records the timeout), so two never run at once.
                match flight.on_timeout {
                    OnTimeout::Raise => warn!(
                        task_uuid = %flight.task_uuid, step = %flight.step_name, attempt = flight.attempt,
                        timeout_seconds = %timeout,
                        "step attempt timed out; raising TaskerCore::StepTimeoutError in its handler, the next attempt starts when it returns"
                    ),
                    OnTimeout::Wait => warn!(
                        task_uuid = %flight.task_uuid, step = %flight.step_name, attempt = flight.attempt,
                        timeout_seconds = %timeout,
                        "step attempt timed out (on_timeout: wait); the next attempt starts when its handler returns, whose result is discarded"
                    ),
                }
                self.interrupt(event_id, &flight, InterruptReason::Timeout);
            }
        }
        self.release_unstarted(unstarted).await;
    }

    /// Claim as many ready attempts as the dispatch channel has room for.
    async fn fill(&mut self, st: &mut LoopState) {
        let room = self.dispatch_capacity.saturating_sub(self.dispatch.len());
        if room == 0 {
            return;
        }
        let claim_began = Instant::now();
        let claimed = match self.backend.claim(room, claim_began).await {
            Ok(claimed) => claimed,
            Err(e) => {
                // Recoverable (e.g. the database restarting): the next pass claims again.
                warn!(error = %e, "claiming ready steps failed; will retry");
                return;
            }
        };
        self.shared.metrics.observe_claim(claim_began.elapsed());
        for (event, mut flight) in claimed {
            flight.metrics = Some(self.shared.metrics.step(&event));
            flight.ready_at_ns = event.ready_at_ns;
            st.next_sweep = Some(
                st.next_sweep
                    .map_or(flight.deadline(), |at| at.min(flight.deadline())),
            );
            self.registry.insert(event.event_id, flight);
            self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = self.dispatch.try_send(event) {
                // Only the engine sends, and it sent no more than the room it saw.
                error!("dispatch channel refused an event: {e}");
            }
        }
    }

    /// Attempts still queued for Ruby (no handler thread took them) go back to the backend.
    async fn recall_queued(&mut self) {
        let mut unstarted = Vec::new();
        while let Ok(event) = self.recall.try_recv() {
            if let Some(flight) = self.registry.take(event.event_id) {
                unstarted.push(flight);
            }
        }
        self.release_unstarted(unstarted).await;
    }

    /// Attempts taken out of the registry that never ran go back to the backend; their attempts
    /// do not count.
    async fn release_unstarted(&mut self, unstarted: Vec<InFlight>) {
        if unstarted.is_empty() {
            return;
        }
        self.shared
            .in_flight
            .fetch_sub(unstarted.len() as u64, Ordering::AcqRel);
        self.backend.release(unstarted).await;
    }

    /// Stop taking new work; attempts still queued for Ruby go back to the backend.
    async fn begin_shutdown(&mut self, st: &mut LoopState) {
        if !st.accepting {
            return;
        }
        st.accepting = false;
        self.recall_queued().await;
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

/// Count an ended attempt in its step's metrics.
fn observe_outcome(flight: &InFlight, outcome: &AttemptOutcome) {
    let Some(metrics) = &flight.metrics else {
        return;
    };
    let ran_for = flight.phase.running_for();
    match outcome {
        AttemptOutcome::Completed(c) => metrics.ended(c.success, false, ran_for),
        AttemptOutcome::TimedOut => metrics.ended(false, true, ran_for),
        AttemptOutcome::Cancelled(Some(c)) => metrics.ended(c.success, false, ran_for),
        // Never ran: nothing to count.
        AttemptOutcome::Cancelled(None) => {}
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
