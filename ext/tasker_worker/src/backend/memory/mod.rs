//! The embedded backend: everything in one process.
//!
//! The tasks live in one [`TaskTable`] behind a lock ([`LocalTasks`]) that the engine thread and
//! callers' threads share. The engine claims and records through it; `create_task`,
//! `task_status` and `wait_for_task` go to it directly from the caller's thread, so they never
//! wait for the engine thread to wake up and answer. Every lock section is short (one task
//! created, one outcome recorded, one claim of at most the dispatch channel's room), and what a
//! section leaves to send (waiters to answer, task ends to announce) is sent after the lock is
//! released.

mod index;
mod table;
mod wait;

pub use table::{GroupWait, NewTask, TaskTable};
pub use wait::CallerThread;

use super::{Backend, BackendGauges, CreatedReply, NotificationSender, SnapshotReply};
use crate::attempt::{AttemptOutcome, InFlight};
use crate::error::EngineResult;
use crate::events::{StepExecutionEvent, TaskSnapshot};
use crate::task_list::{TaskPage, TaskQuery};
use crate::template::{TaskTemplate, TemplateKey};
use crossbeam_channel::Sender;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Instant, SystemTime};
use uuid::Uuid;

/// The memory backend's task table, shared by the engine thread and the threads that call the
/// task API.
pub struct LocalTasks {
    table: Mutex<TaskTable>,
    /// Set by the creator that woke the engine for new tasks, cleared by the engine just before it
    /// claims: creators that follow before the claim need not wake it again.
    wake_pending: AtomicBool,
    /// Where finished tasks are announced while someone observes them (see
    /// [`Self::set_announce_ends`]).
    task_ends: Sender<TaskSnapshot>,
}

impl LocalTasks {
    pub(crate) fn new(
        retention: usize,
        index_retention: usize,
        task_ends: Sender<TaskSnapshot>,
    ) -> Self {
        Self {
            table: Mutex::new(TaskTable::new(retention, index_retention)),
            wake_pending: AtomicBool::new(false),
            task_ends,
        }
    }

    /// Run `work` on the table if its lock is free at once; otherwise hand `work` back (a Ruby
    /// thread holding the GVL then waits for the lock with the GVL released, see [`Self::access`]).
    pub fn try_access<R, F: FnOnce(&mut TaskTable) -> R>(&self, work: F) -> Result<R, F> {
        match self.table.try_lock() {
            Ok(guard) => Ok(self.run(guard, work)),
            Err(TryLockError::Poisoned(poisoned)) => Ok(self.run(poisoned.into_inner(), work)),
            Err(TryLockError::WouldBlock) => Err(work),
        }
    }

    /// Run `work` on the table, waiting for its lock (never for long: no section is).
    pub fn access<R>(&self, work: impl FnOnce(&mut TaskTable) -> R) -> R {
        // A panic inside a section leaves the table as consistent as the section left it; the
        // engine reports the panic itself.
        let guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        self.run(guard, work)
    }

    fn run<R>(
        &self,
        mut guard: MutexGuard<'_, TaskTable>,
        work: impl FnOnce(&mut TaskTable) -> R,
    ) -> R {
        let result = work(&mut guard);
        let deliveries = std::mem::take(&mut guard.deliveries);
        drop(guard);
        for delivery in deliveries {
            for waiter in delivery.waiters {
                waiter.deliver(&delivery.snapshot);
            }
            if delivery.announce {
                let _ = self.task_ends.send(delivery.snapshot);
            }
        }
        result
    }

    /// Announce finished tasks on the task-ends channel from now on (`true`), or stop (`false`).
    pub fn set_announce_ends(&self, announce: bool) {
        self.access(|table| table.announce_ends = announce);
    }

    /// Tasks were just inserted: whether the caller must wake the engine to claim their steps
    /// (false while an earlier wake has not been acted on yet).
    pub fn needs_wake(&self) -> bool {
        !self.wake_pending.swap(true, Ordering::AcqRel)
    }
}

/// The engine's side of the memory backend.
pub struct MemoryBackend {
    tasks: Arc<LocalTasks>,
}

impl Drop for MemoryBackend {
    /// The engine has stopped (or panicked): waiters of unfinished tasks are let go.
    fn drop(&mut self) {
        self.tasks.access(TaskTable::close);
    }
}

impl MemoryBackend {
    pub fn new(tasks: Arc<LocalTasks>) -> Self {
        Self { tasks }
    }
}

/// New tasks, built outside the table's lock (their contexts checked by the caller first).
/// `run_at`: when their root steps become ready (see [`NewTask::scheduled_for`]).
pub fn prepare_tasks(
    template: &Arc<TaskTemplate>,
    contexts: Vec<Value>,
    run_at: Option<SystemTime>,
) -> Vec<NewTask> {
    contexts
        .into_iter()
        .map(|context| {
            let task = TaskTable::prepare(template, context);
            match run_at {
                Some(run_at) => task.scheduled_for(run_at),
                None => task,
            }
        })
        .collect()
}

impl Backend for MemoryBackend {
    async fn start(&mut self, _inbox: NotificationSender) -> EngineResult<()> {
        Ok(())
    }

    async fn create_tasks(
        &mut self,
        key: TemplateKey,
        template: Option<Arc<TaskTemplate>>,
        contexts: Vec<Value>,
        run_at: Option<SystemTime>,
        reply: CreatedReply,
    ) {
        let result = match template {
            Some(template) => {
                let prepared = prepare_tasks(&template, contexts, run_at);
                self.tasks.access(|table| table.insert(prepared))
            }
            None => Err(crate::error::EngineError::config(format!(
                "unknown template {key}"
            ))),
        };
        let _ = reply.try_send(result);
    }

    async fn task_status(&mut self, task_uuid: Uuid) -> EngineResult<TaskSnapshot> {
        self.tasks.access(|table| table.snapshot(task_uuid))
    }

    async fn wait_for_task(&mut self, task_uuid: Uuid, reply: SnapshotReply) {
        if let Some(answer) = self.tasks.access(|table| table.wait(task_uuid, &reply)) {
            let _ = reply.try_send(answer);
        }
    }

    fn forget_waiter(&mut self, task_uuid: Uuid, reply: &SnapshotReply) {
        self.tasks
            .access(|table| table.forget_waiter(task_uuid, reply));
    }

    async fn claim(
        &mut self,
        max: usize,
        now: Instant,
    ) -> EngineResult<Vec<(StepExecutionEvent, InFlight)>> {
        // Cleared before looking: a task inserted after the look wakes the engine again.
        self.tasks.wake_pending.store(false, Ordering::SeqCst);
        Ok(self.tasks.access(|table| table.claim(max, now)))
    }

    async fn record(
        &mut self,
        outcomes: Vec<(InFlight, AttemptOutcome)>,
        now: Instant,
    ) -> EngineResult<Vec<Uuid>> {
        // One section per outcome: readers never wait behind a whole batch.
        for (flight, outcome) in outcomes {
            self.tasks
                .access(|table| table.record_one(flight, outcome, now));
        }
        Ok(self.tasks.access(TaskTable::take_halted))
    }

    async fn release(&mut self, unstarted: Vec<InFlight>) {
        self.tasks.access(|table| table.release(unstarted));
    }

    async fn cancel_task(&mut self, task_uuid: Uuid) -> EngineResult<bool> {
        self.tasks.access(|table| table.cancel_task(task_uuid))
    }

    async fn retry_task(&mut self, task_uuid: Uuid) -> EngineResult<()> {
        self.tasks.access(|table| table.retry_task(task_uuid))
    }

    async fn stop_claiming(&mut self) {
        self.tasks.access(TaskTable::stop_accepting);
    }

    async fn list_tasks(&mut self, query: TaskQuery) -> EngineResult<TaskPage> {
        Ok(self.tasks.access(|table| table.list_tasks(query)))
    }

    fn gauges(&self) -> Option<BackendGauges> {
        Some(self.tasks.access(|table| table.gauges()))
    }

    fn in_process(&self) -> bool {
        true
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.tasks.access(|table| table.next_retry())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::EngineError;
    use crate::events::TaskStatus;
    use crossbeam_channel::TryRecvError;

    /// `n` new tasks of a one-step template.
    pub(super) fn new_tasks(local: &LocalTasks, n: usize) -> Vec<Uuid> {
        let yaml = "namespace: n\nname: t\nversion: 1.0.0\nsteps:\n  - { name: a, handler: { callable: A } }\n";
        let template = Arc::new(TaskTemplate::from_yaml(yaml, "t.yml".as_ref()).unwrap());
        let prepared = (0..n)
            .map(|_| TaskTable::prepare(&template, Value::Object(Default::default())))
            .collect();
        local.access(|table| table.insert(prepared)).unwrap()
    }

    #[test]
    fn a_group_wait_wakes_once_when_its_last_task_finishes() {
        let (ends, _) = crossbeam_channel::unbounded();
        let local = LocalTasks::new(100, 100, ends);
        let uuids = new_tasks(&local, 2);
        let group = GroupWait::new();
        for &uuid in &uuids {
            assert!(local
                .access(|table| table.wait_in_group(uuid, &group))
                .is_none());
        }
        group.registered();

        assert_eq!(
            local.access(|table| table.cancel_task(uuids[0])).ok(),
            Some(true)
        );
        assert_eq!(group.done().try_recv(), Err(TryRecvError::Empty));
        assert_eq!(
            local.access(|table| table.cancel_task(uuids[1])).ok(),
            Some(true)
        );

        assert_eq!(group.done().try_recv(), Ok(()));
        let mut answered: Vec<Uuid> = group.take_answers().iter().map(|s| s.task_uuid).collect();
        answered.sort();
        let mut expected = uuids.clone();
        expected.sort();
        assert_eq!(answered, expected);
    }

    #[test]
    fn waiters_are_let_go_when_the_engine_stops_and_later_waits_refused() {
        let (ends, _) = crossbeam_channel::unbounded();
        let local = LocalTasks::new(100, 100, ends);
        let uuid = new_tasks(&local, 1)[0];
        let group = GroupWait::new();
        let (reply, answer) = crossbeam_channel::bounded(1);
        assert!(local
            .access(|table| table.wait_in_group(uuid, &group))
            .is_none());
        assert!(local.access(|table| table.wait(uuid, &reply)).is_none());
        group.registered();
        drop(reply);

        local.access(TaskTable::close);

        assert_eq!(group.done().try_recv(), Err(TryRecvError::Disconnected));
        assert!(matches!(answer.try_recv(), Err(TryRecvError::Disconnected)));
        let (reply, _answer) = crossbeam_channel::bounded(1);
        assert!(matches!(
            local.access(|table| table.wait(uuid, &reply)),
            Some(Err(EngineError::NotInitialized))
        ));
        let status = local.access(|table| table.snapshot(uuid)).unwrap().status;
        assert_eq!(status, TaskStatus::Pending);
    }
}
