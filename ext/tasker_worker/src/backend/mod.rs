//! Where tasks and steps live. The engine loop is the same for every backend.

pub mod memory;
pub mod postgres;

use crate::attempt::{AttemptOutcome, InFlight};
use crate::error::{EngineError, EngineResult};
use crate::events::{StepExecutionEvent, TaskSnapshot};
use crate::metrics::Metrics;
use crate::task_list::{TaskPage, TaskQuery};
use crate::template::{TaskTemplate, TemplateKey};
use crossbeam_channel::Sender;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use uuid::Uuid;

pub type SnapshotReply = Sender<EngineResult<TaskSnapshot>>;
/// Where the new tasks' uuids go, in the order of their contexts.
pub type CreatedReply = Sender<EngineResult<Vec<Uuid>>>;

/// Storage and scheduling of tasks. Every method runs on the engine thread.
#[allow(async_fn_in_trait)]
pub trait Backend: Send + 'static {
    /// Connect, migrate, load: everything that can fail before the worker is "running".
    /// `inbox` lets background listeners wake the engine with a [`Notification`].
    async fn start(&mut self, inbox: NotificationSender) -> EngineResult<()>;

    /// Create one task per context, all of one template, in order; all or none (one transaction
    /// on a database). `template` is the locally loaded one, if any (a database backend may know
    /// more). `contexts` is never empty. With `run_at`, the root steps become ready at that time,
    /// not before; until then they are `pending`, and so is the task. `reply` is answered once
    /// the tasks are stored: a database backend may answer after this returns (the calls of
    /// many threads share a transaction).
    async fn create_tasks(
        &mut self,
        key: TemplateKey,
        template: Option<Arc<TaskTemplate>>,
        contexts: Vec<Value>,
        run_at: Option<SystemTime>,
        reply: CreatedReply,
    );

    /// Answer every `create_tasks` call still being stored; the engine calls it as it stops.
    async fn finish_creating(&mut self) {}

    async fn task_status(&mut self, task_uuid: Uuid) -> EngineResult<TaskSnapshot>;

    /// Answer `reply` when the task finishes (at once if it already has).
    async fn wait_for_task(&mut self, task_uuid: Uuid, reply: SnapshotReply);

    /// The caller of `wait_for_task` gave up (timeout, interrupt): drop `reply`.
    fn forget_waiter(&mut self, task_uuid: Uuid, reply: &SnapshotReply);

    /// Called on every pass of the engine loop (housekeeping, retrying failed writes).
    async fn tick(&mut self, _now: Instant) {}

    /// Up to `max` ready attempts, already marked in progress (attempts counted).
    async fn claim(
        &mut self,
        max: usize,
        now: Instant,
    ) -> EngineResult<Vec<(StepExecutionEvent, InFlight)>>;

    /// Record attempts that ended: results, retries with backoff, successors, task completion.
    /// A step that fails for good stops its task from starting more steps: the steps that have
    /// not started become `skipped`, and the task ends `error` once no attempt of it is out.
    /// Returns the tasks that stopped starting steps in this call, so that the engine withdraws
    /// their attempts still queued for Ruby (see [`Backend::release`]). A backend that writes off
    /// the engine loop (postgres) returns those its writes halted since the last call, and sends
    /// [`Notification::TasksHalted`] for those learned in between.
    async fn record(
        &mut self,
        outcomes: Vec<(InFlight, AttemptOutcome)>,
        now: Instant,
    ) -> EngineResult<Vec<Uuid>>;

    /// Attempts dispatched but never run (shutdown, or withdrawn from a task that stopped):
    /// the attempt does not count; the step is ready again, or settled as its task's ending says.
    async fn release(&mut self, unstarted: Vec<InFlight>);

    /// Stop the task: no step starts any more; those not started become `cancelled`; the task
    /// becomes `cancelled` once no attempt of it is out (the engine interrupts those that run).
    /// `Ok(false)` if it had already finished.
    async fn cancel_task(&mut self, task_uuid: Uuid) -> EngineResult<bool>;

    /// Run an `error` or `cancelled` task again from its unfinished steps (completed steps keep
    /// their results, attempts go on counting, each step gets its retry budget again).
    async fn retry_task(&mut self, task_uuid: Uuid) -> EngineResult<()>;

    /// The worker is shutting down: claim nothing more. A backend that claims ahead of the
    /// engine (postgres claims in its record transactions) releases what it still holds.
    async fn stop_claiming(&mut self) {}

    /// Claim again after `stop_claiming` (the worker was quiet, not stopping).
    async fn resume_claiming(&mut self) {}

    /// When `claim` may find new work without any message arriving (a retry falls due, a poll).
    fn next_wakeup(&self) -> Option<Instant>;

    /// Something outside the process happened (a NOTIFY, a reconnect).
    fn notify(&mut self, _notification: Notification) {}

    /// Whether claiming and recording happen in this process, without I/O. The engine then
    /// tunes for microsecond hand-offs: it polls its inbox briefly before it sleeps (see
    /// `engine::Spinner`). A database backend shares its cores with the database and other
    /// workers, so it does not.
    fn in_process(&self) -> bool {
        false
    }

    /// Queue depth and tasks by status for the metrics endpoint, when this process holds them
    /// (in-process backends). A database backend returns `None`: the web server reads them from
    /// the database itself, so that any one process reports the whole system.
    fn gauges(&self) -> Option<BackendGauges> {
        None
    }

    /// One page of tasks, newest first (see [`TaskQuery`]).
    async fn list_tasks(&mut self, _query: TaskQuery) -> EngineResult<TaskPage> {
        Err(EngineError::Internal(
            "this backend cannot list tasks".into(),
        ))
    }

    /// Where the backend reports what only it can time (database transactions).
    fn set_metrics(&mut self, _metrics: Arc<Metrics>) {}

    /// Connection pool (size, idle); (0, 0) without a database.
    fn pool_stats(&self) -> (u32, u32) {
        (0, 0)
    }
}

/// Counts by namespace, for `/metrics`.
#[derive(Debug, Default)]
pub struct BackendGauges {
    /// (namespace, task status, count).
    pub tasks: Vec<(String, &'static str, u64)>,
    /// (namespace, steps ready to be claimed, steps waiting for a retry's backoff).
    pub steps: Vec<(String, u64, u64)>,
}

/// Wake-ups from outside the engine thread.
#[derive(Debug)]
pub enum Notification {
    /// Steps became ready somewhere (another process, or a retry fell due there).
    StepsReady,
    /// Tasks finished somewhere.
    TasksFinished(Vec<Uuid>),
    /// Tasks stopped starting steps (here or in another process): a step of theirs failed for
    /// good, or they were `cancelled`. The engine withdraws their attempts still queued for Ruby
    /// and, for a cancel, interrupts the handlers running them.
    TasksHalted { tasks: Vec<Uuid>, cancelled: bool },
    /// The listener lost its connection and came back: notifications may have been missed.
    Reconnected,
    /// Work the backend runs off the engine loop (a database write) finished: its results are
    /// taken on the next `tick`.
    BackendWorkDone,
}

/// Where a backend's background work (listeners, writers) sends its [`Notification`]s: into the
/// engine's inbox, in order with everything else the engine is sent. The engine makes it (it
/// alone knows its inbox's message type), so that backends depend on this module, not on the engine.
#[derive(Clone)]
pub struct NotificationSender(Arc<dyn Fn(Notification) -> Result<(), EngineGone> + Send + Sync>);

/// The engine stopped: nothing receives notifications any more.
#[derive(Debug)]
pub struct EngineGone;

impl NotificationSender {
    pub fn new(
        send: impl Fn(Notification) -> Result<(), EngineGone> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(send))
    }

    pub fn send(&self, notification: Notification) -> Result<(), EngineGone> {
        (self.0)(notification)
    }
}
