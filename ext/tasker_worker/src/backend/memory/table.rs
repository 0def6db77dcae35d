//! The memory backend's tasks and steps, and every rule that changes them. One [`TaskTable`]
//! per worker, behind the lock of [`super::LocalTasks`]: the engine thread claims and records
//! through it, and callers' threads create tasks, read them and register waiters through it
//! directly, without a round trip to the engine. Each change a reader could see (a task created,
//! a step claimed, one outcome recorded, a cancel, a retry) is made within one lock section, so
//! a reader sees a task before or after it, never half of it.
//!
//! Retention: the last `task_retention` finished tasks are kept whole (steps, results, errors);
//! older ones shrink to their final status in a [`FinalStatusIndex`] of `task_index_retention`
//! more, so `wait_for_task` on a task created long ago still answers with how it ended. Memory is
//! bounded by both numbers, whatever the number of tasks run.

use super::index::FinalStatusIndex;
use crate::attempt::{AttemptOutcome, InFlight, MAX_RETRY_AFTER};
use crate::backend::{BackendGauges, SnapshotReply};
use crate::error::{EngineError, EngineResult};
use crate::events::{
    unix_ns, StepExecutionCompletionEvent, StepExecutionEvent, StepSnapshot, StepStatus, TaskInfo,
    TaskSnapshot, TaskStatus,
};
use crate::task_list::{TaskPage, TaskQuery, TaskSummary};
use crate::template::TaskTemplate;
use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, warn};
use uuid::Uuid;

struct Step {
    uuid: Uuid,
    status: StepStatus,
    attempts: u32,
    /// `attempts` when the task was last retried: the retry budget counts from here.
    attempts_base: u32,
    /// Dependencies not yet complete.
    waiting_on: usize,
    result: Option<Arc<Value>>,
    metadata: Option<Arc<Value>>,
    error_message: Option<String>,
    /// When it last became ready (see `StepExecutionEvent::ready_at_ns`).
    ready_at_ns: u64,
    started_at_ns: Option<u64>,
    completed_at_ns: Option<u64>,
}

pub(super) struct Task {
    pub(super) info: Arc<TaskInfo>,
    pub(super) template: Arc<TaskTemplate>,
    pub(super) status: TaskStatus,
    steps: Vec<Step>,
    /// Steps not complete.
    incomplete: usize,
    /// Steps with an attempt out (claimed, not yet recorded).
    running: usize,
    /// Set once the task will start no new step (a step failed for good: `Error`; cancelled:
    /// `Cancelled`). It becomes the task's status when no attempt is out any more.
    ending: Option<TaskStatus>,
    created_at_ns: u64,
    completed_at_ns: Option<u64>,
    /// Bumped each time the task finishes, so a retried task is not evicted by an old entry.
    finish_seq: u64,
    waiters: Vec<Waiter>,
}

impl Task {
    fn snapshot(&self) -> TaskSnapshot {
        TaskSnapshot {
            task_uuid: self.info.task_uuid,
            namespace: self.info.namespace.to_string(),
            name: self.info.name.to_string(),
            version: self.info.version.to_string(),
            status: self.status,
            created_at_ns: Some(self.created_at_ns),
            completed_at_ns: self.completed_at_ns,
            steps_retained: true,
            steps: self
                .steps
                .iter()
                .zip(&self.template.steps)
                .map(|(s, def)| StepSnapshot {
                    step_uuid: s.uuid,
                    name: def.name.to_string(),
                    status: s.status,
                    attempts: s.attempts,
                    result: s.result.clone(),
                    metadata: s.metadata.clone(),
                    error_message: s.error_message.clone(),
                    started_at_ns: s.started_at_ns,
                    completed_at_ns: s.completed_at_ns,
                })
                .collect(),
        }
    }

    /// Steps that have not started and now never will: `status` (skipped or cancelled).
    fn settle_unstarted(&mut self, status: StepStatus) {
        for step in &mut self.steps {
            if matches!(
                step.status,
                StepStatus::Pending | StepStatus::Enqueued | StepStatus::WaitingForRetry
            ) {
                step.status = status;
            }
        }
    }
}

/// Someone waiting for a task to finish.
pub enum Waiter {
    One(SnapshotReply),
    Group(Arc<GroupWait>),
}

impl Waiter {
    /// The engine stopped before the task finished: the waiter's wait ends with the engine gone.
    fn close(self) {
        if let Waiter::Group(group) = self {
            group.close();
        }
    }

    pub(super) fn deliver(self, snapshot: &TaskSnapshot) {
        match self {
            Waiter::One(reply) => {
                let _ = reply.try_send(Ok(snapshot.clone()));
            }
            Waiter::Group(group) => group.deliver(snapshot.clone()),
        }
    }
}

/// One caller waiting for many tasks (`wait_for_tasks`): the final statuses gather here, and the
/// caller is woken once, when the last one arrives, rather than once per task.
pub struct GroupWait {
    answers: Mutex<Vec<TaskSnapshot>>,
    /// Dropped (the caller's wait then ends with the engine gone) when the engine stops first.
    closer: Mutex<Option<Sender<()>>>,
    /// Answers still expected, plus one until the caller has registered them all
    /// ([`Self::registered`]), so that the count cannot reach zero half-way.
    left: AtomicUsize,
    done: Receiver<()>,
}

impl GroupWait {
    pub fn new() -> Arc<Self> {
        let (done, wait) = crossbeam_channel::bounded(1);
        Arc::new(Self {
            answers: Mutex::new(Vec::new()),
            closer: Mutex::new(Some(done)),
            left: AtomicUsize::new(1),
            done: wait,
        })
    }

    fn expect_one(&self) {
        self.left.fetch_add(1, Ordering::AcqRel);
    }

    /// Every task is registered: [`Self::done`] receives once all of them have answered.
    pub fn registered(&self) {
        self.count_down();
    }

    fn deliver(&self, snapshot: TaskSnapshot) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(snapshot);
        self.count_down();
    }

    fn count_down(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(done) = &*self.closer.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = done.try_send(());
            }
        }
    }

    /// Receives once every task registered has answered; disconnects if the engine stopped first.
    pub fn done(&self) -> &Receiver<()> {
        &self.done
    }

    fn close(&self) {
        self.closer.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The final statuses gathered so far, in the order the tasks finished.
    pub fn take_answers(&self) -> Vec<TaskSnapshot> {
        std::mem::take(&mut *self.answers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A task made outside the lock, ready to be inserted ([`TaskTable::prepare`]).
pub struct NewTask(Task, Option<Instant>);

impl NewTask {
    /// Its root steps become ready at `run_at`, not before (at once if that has passed). Until
    /// then they are `pending`, and so is the task. The wall-clock time is turned into this
    /// process's monotonic clock here: a later change of the system clock does not move it.
    pub fn scheduled_for(mut self, run_at: SystemTime) -> Self {
        let Ok(ahead) = run_at.duration_since(SystemTime::now()) else {
            return self;
        };
        // Callers bound `run_at` (see `schedule::MAX_SCHEDULE_AHEAD`); an unchecked one that
        // overflows the clock is held back as far as the clock goes, never a panic.
        let now = Instant::now();
        let due = now
            .checked_add(ahead.min(crate::schedule::MAX_SCHEDULE_AHEAD))
            .unwrap_or(now);
        let run_at_ns = run_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64);
        for step in &mut self.0.steps {
            if step.waiting_on == 0 {
                step.status = StepStatus::Pending;
                step.ready_at_ns = run_at_ns;
            }
        }
        self.1 = Some(due);
        self
    }
}

/// What a lock section leaves to send once the lock is released: a finished task's waiters and,
/// when someone observes task ends, the task end itself.
pub(super) struct Delivery {
    pub waiters: Vec<Waiter>,
    pub snapshot: TaskSnapshot,
    pub announce: bool,
}

pub struct TaskTable {
    tasks: HashMap<Uuid, Task>,
    ready: VecDeque<(Uuid, usize)>,
    /// Steps waiting out their backoff: (due, tie-breaker, task, step).
    retries: BinaryHeap<Reverse<(Instant, u64, Uuid, usize)>>,
    retry_seq: u64,
    /// Finished tasks in finishing order, with their `finish_seq`; the oldest lose their
    /// details past `retention`.
    finished: VecDeque<(Uuid, u64)>,
    retention: usize,
    index: FinalStatusIndex,
    /// Tasks that stopped starting steps during the current `record` call.
    halted: Vec<Uuid>,
    /// False once the worker shuts down: no task is created any more.
    accepting: bool,
    /// True once the engine has stopped: nothing will finish any more.
    closed: bool,
    /// Whether finished tasks are announced (someone subscribes to task events).
    pub(super) announce_ends: bool,
    /// Filled by `settle`, sent by [`super::LocalTasks`] after the lock is released.
    pub(super) deliveries: Vec<Delivery>,
}

impl TaskTable {
    pub fn new(retention: usize, index_retention: usize) -> Self {
        Self {
            tasks: HashMap::new(),
            ready: VecDeque::new(),
            retries: BinaryHeap::new(),
            retry_seq: 0,
            finished: VecDeque::new(),
            retention,
            index: FinalStatusIndex::new(index_retention),
            halted: Vec::new(),
            accepting: true,
            closed: false,
            announce_ends: false,
            deliveries: Vec::new(),
        }
    }

    /// Build a task of `template`, outside the lock: everything but inserting it.
    pub fn prepare(template: &Arc<TaskTemplate>, context: Value) -> NewTask {
        let task_uuid = Uuid::new_v4();
        let info = Arc::new(TaskInfo {
            task_uuid,
            namespace: Arc::from(template.namespace.as_str()),
            name: Arc::from(template.name.as_str()),
            version: Arc::from(template.version.as_str()),
            context: Arc::new(context),
        });
        let now_ns = unix_ns();
        let steps: Vec<Step> = template
            .dependencies
            .iter()
            .map(|deps| Step {
                uuid: Uuid::new_v4(),
                status: if deps.is_empty() {
                    StepStatus::Enqueued
                } else {
                    StepStatus::Pending
                },
                attempts: 0,
                attempts_base: 0,
                waiting_on: deps.len(),
                result: None,
                metadata: None,
                error_message: None,
                ready_at_ns: now_ns,
                started_at_ns: None,
                completed_at_ns: None,
            })
            .collect();
        let incomplete = steps.len();
        NewTask(
            Task {
                info,
                template: Arc::clone(template),
                status: TaskStatus::Pending,
                steps,
                incomplete,
                running: 0,
                ending: None,
                created_at_ns: now_ns,
                completed_at_ns: None,
                finish_seq: 0,
                waiters: Vec::new(),
            },
            None,
        )
    }

    /// Add prepared tasks, all or none; their uuids in order. Refused once the worker shuts down.
    pub fn insert(&mut self, tasks: Vec<NewTask>) -> EngineResult<Vec<Uuid>> {
        if !self.accepting {
            return Err(EngineError::ShuttingDown);
        }
        let mut uuids = Vec::with_capacity(tasks.len());
        for NewTask(task, due) in tasks {
            let task_uuid = task.info.task_uuid;
            for (i, step) in task.steps.iter().enumerate() {
                if step.waiting_on == 0 {
                    match due {
                        // Scheduled: waits in the same heap as backoffs (the engine sleeps until
                        // the earliest of them, see `next_retry`).
                        Some(due) => {
                            self.retry_seq += 1;
                            self.retries
                                .push(Reverse((due, self.retry_seq, task_uuid, i)));
                        }
                        None => self.ready.push_back((task_uuid, i)),
                    }
                }
            }
            self.tasks.insert(task_uuid, task);
            uuids.push(task_uuid);
        }
        Ok(uuids)
    }

    /// Whether steps are ready to be claimed now.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    fn unknown(task_uuid: Uuid) -> EngineError {
        EngineError::UnknownTask(format!(
            "{task_uuid}: never created on this worker, or finished so long ago that it is no \
             longer remembered (see task_retention and task_index_retention)"
        ))
    }

    /// Finish the task if nothing is left to wait for: every step complete, or an ending decided
    /// and no attempt out any more.
    fn settle(&mut self, task_uuid: Uuid) {
        let Some(task) = self.tasks.get_mut(&task_uuid) else {
            return;
        };
        if task.status.is_finished() || task.running > 0 {
            return;
        }
        let status = match task.ending {
            Some(ending) => ending,
            None if task.incomplete == 0 => TaskStatus::Complete,
            None => return,
        };
        task.status = status;
        task.completed_at_ns = Some(unix_ns());
        task.finish_seq += 1;
        if !task.waiters.is_empty() || self.announce_ends {
            self.deliveries.push(Delivery {
                waiters: std::mem::take(&mut task.waiters),
                snapshot: task.snapshot(),
                announce: self.announce_ends,
            });
        }
        self.finished.push_back((task_uuid, task.finish_seq));
        while self.finished.len() > self.retention {
            let Some((old, seq)) = self.finished.pop_front() else {
                break;
            };
            // A task retried since it was queued here is running again, or queued again later.
            if self
                .tasks
                .get(&old)
                .is_some_and(|t| t.finish_seq == seq && t.status.is_finished())
            {
                if let Some(task) = self.tasks.remove(&old) {
                    self.index.insert(&task);
                }
            }
        }
    }

    /// Stop starting steps of this task: what has not started is settled as `Skipped`
    /// (failure) or `Cancelled`; the engine withdraws its attempts still queued for Ruby.
    fn halt(&mut self, task_uuid: Uuid, ending: TaskStatus) {
        let Some(task) = self.tasks.get_mut(&task_uuid) else {
            return;
        };
        let first = task.ending.is_none();
        // A cancel outranks a failure that is still winding down; nothing outranks a cancel.
        if task.ending != Some(TaskStatus::Cancelled) {
            task.ending = Some(ending);
        }
        task.settle_unstarted(if ending == TaskStatus::Cancelled {
            StepStatus::Cancelled
        } else {
            StepStatus::Skipped
        });
        if first {
            self.halted.push(task_uuid);
        }
    }

    pub(super) fn record_one(&mut self, flight: InFlight, outcome: AttemptOutcome, now: Instant) {
        let Some(task) = self.tasks.get_mut(&flight.task_uuid) else {
            debug!(task_uuid = %flight.task_uuid, step = %flight.step_name, "outcome for a task no longer retained");
            return;
        };
        let step = &mut task.steps[flight.step_index];
        if step.status != StepStatus::InProgress || step.attempts != flight.attempt {
            warn!(
                task_uuid = %flight.task_uuid,
                step = %flight.step_name,
                attempt = flight.attempt,
                "outcome for an attempt that is no longer current; ignored"
            );
            return;
        }
        task.running -= 1;
        step.completed_at_ns = Some(unix_ns());
        let failure = match outcome {
            AttemptOutcome::Completed(c) if c.success => Some(Ok(c)),
            AttemptOutcome::Cancelled(Some(c)) if c.success => Some(Ok(c)),
            AttemptOutcome::Completed(c) => Some(Err((
                c.retryable,
                c.retry_after,
                c.failure_message(),
                Some(c.metadata),
            ))),
            AttemptOutcome::TimedOut => Some(Err((true, None, flight.timeout_message(), None))),
            AttemptOutcome::Cancelled(reported) => {
                step.status = StepStatus::Cancelled;
                step.error_message = Some(match reported {
                    Some(c) => format!("cancelled while running ({})", c.failure_message()),
                    None => "cancelled while running".to_string(),
                });
                None
            }
        };
        match failure {
            None => {}
            Some(Ok(completion)) => self.succeed(&flight, *completion),
            Some(Err((retryable, retry_after, message, metadata))) => {
                self.fail(&flight, retryable, retry_after, message, metadata, now)
            }
        }
        self.settle(flight.task_uuid);
    }

    fn succeed(&mut self, flight: &InFlight, completion: StepExecutionCompletionEvent) {
        let Some(task) = self.tasks.get_mut(&flight.task_uuid) else {
            return;
        };
        let step = &mut task.steps[flight.step_index];
        step.status = StepStatus::Complete;
        step.result = Some(Arc::new(completion.result));
        step.metadata = Some(Arc::new(completion.metadata));
        step.error_message = None;
        task.incomplete -= 1;
        if task.ending.is_some() {
            return;
        }
        for &next in &task.template.dependents[flight.step_index] {
            let successor = &mut task.steps[next];
            successor.waiting_on -= 1;
            if successor.waiting_on == 0 && successor.status == StepStatus::Pending {
                successor.status = StepStatus::Enqueued;
                successor.ready_at_ns = unix_ns();
                self.ready.push_back((flight.task_uuid, next));
            }
        }
    }

    fn fail(
        &mut self,
        flight: &InFlight,
        retryable: bool,
        retry_after: Option<Duration>,
        message: String,
        metadata: Option<Value>,
        now: Instant,
    ) {
        let Some(task) = self.tasks.get_mut(&flight.task_uuid) else {
            return;
        };
        let policy = &task.template.steps[flight.step_index].retry;
        let step = &mut task.steps[flight.step_index];
        step.metadata = metadata.map(Arc::new);
        if let Some(ending) = task.ending {
            // The task is already ending: no retry; the attempt's failure is kept.
            step.status = if ending == TaskStatus::Cancelled {
                StepStatus::Cancelled
            } else {
                StepStatus::Error
            };
            step.error_message = Some(message);
            return;
        }
        let used = step.attempts - step.attempts_base;
        if retryable && policy.retryable && used < policy.max_attempts {
            let delay = retry_after
                .unwrap_or_else(|| policy.delay_after(used))
                .min(MAX_RETRY_AFTER);
            step.status = StepStatus::WaitingForRetry;
            step.error_message = Some(message);
            self.retry_seq += 1;
            self.retries.push(Reverse((
                now + delay,
                self.retry_seq,
                flight.task_uuid,
                flight.step_index,
            )));
        } else {
            step.status = StepStatus::Error;
            step.error_message = Some(if !retryable || !policy.retryable {
                message
            } else {
                format!("{message} (gave up after {used} attempts)")
            });
            self.halt(flight.task_uuid, TaskStatus::Error);
        }
    }

    fn promote_due_retries(&mut self, now: Instant) {
        while let Some(Reverse((due, _, _, _))) = self.retries.peek() {
            if *due > now {
                break;
            }
            let Reverse((_, _, task_uuid, index)) = self.retries.pop().expect("peeked");
            if let Some(task) = self.tasks.get_mut(&task_uuid) {
                let step = &task.steps[index];
                // A backoff ran out, or a scheduled root step's time came.
                let due = step.status == StepStatus::WaitingForRetry
                    || (step.status == StepStatus::Pending && step.waiting_on == 0);
                if task.ending.is_none() && due {
                    task.steps[index].status = StepStatus::Enqueued;
                    task.steps[index].ready_at_ns = unix_ns();
                    self.ready.push_back((task_uuid, index));
                }
            }
        }
    }

    /// The task and all of its steps as they are now; for a task only the final-status index
    /// still knows, its final status.
    pub fn snapshot(&self, task_uuid: Uuid) -> EngineResult<TaskSnapshot> {
        match self.tasks.get(&task_uuid) {
            Some(task) => Ok(task.snapshot()),
            None => self
                .index
                .get(task_uuid)
                .ok_or_else(|| Self::unknown(task_uuid)),
        }
    }
}

/// What the engine thread does (claims, outcomes, releases, cancels, retries), and the waiters
/// callers register.
impl TaskTable {
    /// A finished (or unknown) task's answer at once; otherwise `reply` is registered to receive
    /// the task's final status, and `None` is returned.
    pub fn wait(
        &mut self,
        task_uuid: Uuid,
        reply: &SnapshotReply,
    ) -> Option<EngineResult<TaskSnapshot>> {
        match self.tasks.get_mut(&task_uuid) {
            Some(task) if !task.status.is_finished() && self.closed => {
                Some(Err(EngineError::NotInitialized))
            }
            Some(task) if !task.status.is_finished() => {
                task.waiters.push(Waiter::One(reply.clone()));
                None
            }
            _ => Some(self.snapshot(task_uuid)),
        }
    }

    /// The caller of [`Self::wait`] stopped waiting.
    pub fn forget_waiter(&mut self, task_uuid: Uuid, reply: &SnapshotReply) {
        if let Some(task) = self.tasks.get_mut(&task_uuid) {
            task.waiters
                .retain(|w| !matches!(w, Waiter::One(r) if r.same_channel(reply)));
        }
    }

    /// A finished (or unknown) task's answer; `None` while it runs.
    pub fn snapshot_if_finished(&self, task_uuid: Uuid) -> Option<EngineResult<TaskSnapshot>> {
        match self.tasks.get(&task_uuid) {
            Some(task) if !task.status.is_finished() => None,
            _ => Some(self.snapshot(task_uuid)),
        }
    }

    /// [`Self::wait`] for a task among many: its final status goes to `group`, which counts it as
    /// expected until then.
    pub fn wait_in_group(
        &mut self,
        task_uuid: Uuid,
        group: &Arc<GroupWait>,
    ) -> Option<EngineResult<TaskSnapshot>> {
        match self.tasks.get_mut(&task_uuid) {
            Some(task) if !task.status.is_finished() && self.closed => {
                Some(Err(EngineError::NotInitialized))
            }
            Some(task) if !task.status.is_finished() => {
                group.expect_one();
                task.waiters.push(Waiter::Group(Arc::clone(group)));
                None
            }
            _ => Some(self.snapshot(task_uuid)),
        }
    }

    /// The caller of [`Self::wait_in_group`] stopped waiting.
    pub fn forget_group(&mut self, task_uuid: Uuid, group: &Arc<GroupWait>) {
        if let Some(task) = self.tasks.get_mut(&task_uuid) {
            task.waiters
                .retain(|w| !matches!(w, Waiter::Group(g) if Arc::ptr_eq(g, group)));
        }
    }

    /// How many waiters a task has (0 for an unknown task).
    #[cfg(test)]
    pub(super) fn waiter_count(&self, task_uuid: Uuid) -> usize {
        self.tasks
            .get(&task_uuid)
            .map_or(0, |task| task.waiters.len())
    }

    /// Up to `max` ready attempts, marked in progress.
    pub(super) fn claim(
        &mut self,
        max: usize,
        now: Instant,
    ) -> Vec<(StepExecutionEvent, InFlight)> {
        self.promote_due_retries(now);
        let mut claimed = Vec::with_capacity(max.min(self.ready.len()));
        let now_ns = unix_ns();
        while claimed.len() < max {
            let Some((task_uuid, index)) = self.ready.pop_front() else {
                break;
            };
            let Some(task) = self.tasks.get_mut(&task_uuid) else {
                continue;
            };
            if task.ending.is_some() || task.steps[index].status != StepStatus::Enqueued {
                continue;
            }
            if task.status == TaskStatus::Pending {
                task.status = TaskStatus::InProgress;
            }
            let definition = Arc::clone(&task.template.steps[index]);
            let dependency_results = task.template.dependencies[index]
                .iter()
                .map(|&d| {
                    let result = task.steps[d]
                        .result
                        .clone()
                        .unwrap_or_else(|| Arc::new(Value::Null));
                    (Arc::clone(&task.template.steps[d].name), result)
                })
                .collect();
            task.running += 1;
            let step = &mut task.steps[index];
            step.status = StepStatus::InProgress;
            step.attempts += 1;
            step.started_at_ns = Some(now_ns);
            step.completed_at_ns = None;
            let flight =
                InFlight::new(task_uuid, step.uuid, index, &definition, step.attempts, now);
            let event = StepExecutionEvent {
                event_id: Uuid::new_v4(),
                step_uuid: step.uuid,
                task: Arc::clone(&task.info),
                definition,
                attempt: step.attempts,
                dependency_results,
                ready_at_ns: step.ready_at_ns,
            };
            claimed.push((event, flight));
        }
        claimed
    }

    /// The tasks that stopped starting steps since the last call.
    pub(super) fn take_halted(&mut self) -> Vec<Uuid> {
        std::mem::take(&mut self.halted)
    }

    pub(super) fn release(&mut self, unstarted: Vec<InFlight>) {
        let mut touched = Vec::new();
        for flight in unstarted {
            let Some(task) = self.tasks.get_mut(&flight.task_uuid) else {
                continue;
            };
            let step = &mut task.steps[flight.step_index];
            if step.status != StepStatus::InProgress || step.attempts != flight.attempt {
                continue;
            }
            // It never ran: this attempt does not count.
            step.attempts -= 1;
            step.started_at_ns = None;
            task.running -= 1;
            step.status = match task.ending {
                None => {
                    self.ready.push_front((flight.task_uuid, flight.step_index));
                    StepStatus::Enqueued
                }
                Some(TaskStatus::Cancelled) => StepStatus::Cancelled,
                Some(_) => StepStatus::Skipped,
            };
            touched.push(flight.task_uuid);
        }
        for task_uuid in touched {
            self.settle(task_uuid);
        }
    }

    pub(super) fn cancel_task(&mut self, task_uuid: Uuid) -> EngineResult<bool> {
        match self.tasks.get(&task_uuid) {
            None if self.index.get(task_uuid).is_some() => return Ok(false),
            None => return Err(Self::unknown(task_uuid)),
            Some(task) if task.status.is_finished() => return Ok(false),
            Some(_) => {}
        }
        self.halt(task_uuid, TaskStatus::Cancelled);
        self.settle(task_uuid);
        Ok(true)
    }

    pub(super) fn retry_task(&mut self, task_uuid: Uuid) -> EngineResult<()> {
        let Some(task) = self.tasks.get_mut(&task_uuid) else {
            return Err(match self.index.get(task_uuid) {
                Some(_) => EngineError::config(format!(
                    "task {task_uuid} finished too long ago to be retried: only its final status is \
                     still kept (raise task_retention to keep more tasks whole)"
                )),
                None => Self::unknown(task_uuid),
            });
        };
        if !matches!(task.status, TaskStatus::Error | TaskStatus::Cancelled) {
            return Err(EngineError::config(format!(
                "task {task_uuid} is {}: only a task that ended in error or was cancelled can be retried",
                if task.status.is_finished() {
                    task.status.as_str()
                } else {
                    "still running"
                }
            )));
        }
        task.status = TaskStatus::InProgress;
        task.ending = None;
        task.completed_at_ns = None;
        let now_ns = unix_ns();
        for i in 0..task.steps.len() {
            if task.steps[i].status == StepStatus::Complete {
                continue;
            }
            let waiting_on = task.template.dependencies[i]
                .iter()
                .filter(|&&d| task.steps[d].status != StepStatus::Complete)
                .count();
            let step = &mut task.steps[i];
            step.attempts_base = step.attempts;
            step.waiting_on = waiting_on;
            step.ready_at_ns = now_ns;
            if waiting_on == 0 {
                step.status = StepStatus::Enqueued;
                self.ready.push_back((task_uuid, i));
            } else {
                step.status = StepStatus::Pending;
            }
        }
        Ok(())
    }

    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retries.peek().map(|Reverse((due, _, _, _))| *due)
    }

    /// One page of the tasks held whole; those shrunk to a final status (see `FinalStatusIndex`)
    /// have no creation time to order them by.
    pub(super) fn list_tasks(&self, query: TaskQuery) -> TaskPage {
        query.page_of(self.tasks.values().map(|task| TaskSummary {
            task_uuid: task.info.task_uuid,
            namespace: task.info.namespace.to_string(),
            name: task.info.name.to_string(),
            version: task.info.version.to_string(),
            status: task.status,
            created_at_ns: task.created_at_ns,
            completed_at_ns: task.completed_at_ns,
        }))
    }

    /// Tasks by namespace and status, and ready and retry-waiting steps by namespace.
    pub(super) fn gauges(&self) -> BackendGauges {
        let mut tasks: HashMap<(&str, &'static str), u64> = HashMap::new();
        let mut steps: HashMap<&str, (u64, u64)> = HashMap::new();
        for task in self.tasks.values() {
            let namespace = &*task.info.namespace;
            *tasks.entry((namespace, task.status.as_str())).or_default() += 1;
            let counts = steps.entry(namespace).or_default();
            for step in &task.steps {
                match step.status {
                    StepStatus::Enqueued => counts.0 += 1,
                    StepStatus::WaitingForRetry => counts.1 += 1,
                    _ => {}
                }
            }
        }
        BackendGauges {
            tasks: tasks
                .into_iter()
                .map(|((namespace, status), n)| (namespace.to_string(), status, n))
                .collect(),
            steps: steps
                .into_iter()
                .map(|(namespace, (ready, waiting))| (namespace.to_string(), ready, waiting))
                .collect(),
        }
    }

    /// The engine stopped: tasks not finished by now never will. Their waiters are let go (their
    /// waits end with the engine gone), and later waits for them fail at once.
    pub(super) fn close(&mut self) {
        self.accepting = false;
        self.closed = true;
        for task in self.tasks.values_mut() {
            for waiter in task.waiters.drain(..) {
                waiter.close();
            }
        }
    }

    /// The worker shuts down: refuse new tasks from now on.
    pub(super) fn stop_accepting(&mut self) {
        self.accepting = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scheduled_task_stays_pending_until_its_time_then_its_root_steps_are_claimable() {
        let yaml = "namespace: n\nname: t\nversion: 1.0.0\nsteps:\n  - { name: a, handler: { callable: A } }\n  - { name: b, dependencies: [a], handler: { callable: A } }\n";
        let template = Arc::new(TaskTemplate::from_yaml(yaml, "t.yml".as_ref()).unwrap());
        let mut table = TaskTable::new(10, 10);
        let run_at = SystemTime::now() + Duration::from_secs(60);
        let new = TaskTable::prepare(&template, Value::Null).scheduled_for(run_at);
        let uuid = table.insert(vec![new]).unwrap()[0];

        assert!(table.claim(10, Instant::now()).is_empty());
        let snapshot = table.snapshot(uuid).unwrap();
        assert_eq!(snapshot.status, TaskStatus::Pending);
        assert!(snapshot
            .steps
            .iter()
            .all(|s| s.status == StepStatus::Pending));
        assert_eq!(
            table.next_retry().map(|due| due > Instant::now()),
            Some(true)
        );

        let claimed = table.claim(10, Instant::now() + Duration::from_secs(61));
        assert_eq!(claimed.len(), 1, "only the root step");
        assert_eq!(&*claimed[0].0.definition.name, "a");
        assert_eq!(table.snapshot(uuid).unwrap().status, TaskStatus::InProgress);
    }

    #[test]
    fn a_scheduled_task_cancelled_before_its_time_never_runs_and_a_past_time_runs_at_once() {
        let yaml = "namespace: n\nname: t\nversion: 1.0.0\nsteps:\n  - { name: a, handler: { callable: A } }\n";
        let template = Arc::new(TaskTemplate::from_yaml(yaml, "t.yml".as_ref()).unwrap());
        let mut table = TaskTable::new(10, 10);
        let later = TaskTable::prepare(&template, Value::Null)
            .scheduled_for(SystemTime::now() + Duration::from_secs(60));
        let past = TaskTable::prepare(&template, Value::Null)
            .scheduled_for(SystemTime::now() - Duration::from_secs(60));
        let uuids = table.insert(vec![later, past]).unwrap();

        assert_eq!(table.cancel_task(uuids[0]).ok(), Some(true));
        let claimed = table.claim(10, Instant::now() + Duration::from_secs(120));
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].1.task_uuid, uuids[1]);
        assert_eq!(
            table.snapshot(uuids[0]).unwrap().status,
            TaskStatus::Cancelled
        );
    }

    #[test]
    fn the_final_status_index_keeps_between_half_and_all_of_its_capacity() {
        let yaml = "namespace: n\nname: t\nversion: 1.0.0\nsteps:\n  - { name: a, handler: { callable: A } }\n";
        let template = Arc::new(TaskTemplate::from_yaml(yaml, "t.yml".as_ref()).unwrap());
        let mut backend = TaskTable::new(0, 1000);
        let uuids: Vec<Uuid> = (0..5000)
            .map(|_| {
                let new = TaskTable::prepare(&template, Value::Null);
                let uuid = backend.insert(vec![new]).unwrap()[0];
                let task = backend.tasks.get_mut(&uuid).unwrap();
                task.ending = Some(TaskStatus::Error);
                backend.settle(uuid);
                uuid
            })
            .collect();
        assert!(backend.tasks.is_empty(), "retention 0 keeps no task whole");
        let known = uuids
            .iter()
            .filter(|u| backend.index.get(**u).is_some())
            .count();
        assert!((500..=1000).contains(&known), "{known} known");
        // The most recent are the ones kept, with their final status.
        let last = backend.index.get(uuids[4999]).unwrap();
        assert_eq!(last.status, TaskStatus::Error);
        assert!(!last.steps_retained);
        assert!(backend.index.get(uuids[0]).is_none());
    }
}
