//! The embedded backend: everything in one process, owned by the engine thread (no locks).

use super::{Backend, SnapshotReply};
use crate::engine::EngineMessage;
use crate::error::{EngineError, EngineResult};
use crate::events::{
    unix_ns, AttemptOutcome, InFlight, StepExecutionEvent, StepSnapshot, StepStatus, TaskInfo,
    TaskSnapshot, TaskStatus,
};
use crate::template::{TaskTemplate, TemplateKey};
use serde_json::Value;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};
use uuid::Uuid;

struct Step {
    uuid: Uuid,
    status: StepStatus,
    attempts: u32,
    /// Dependencies not yet complete.
    waiting_on: usize,
    result: Option<Arc<Value>>,
    error_message: Option<String>,
    /// When it last became ready (see `StepExecutionEvent::ready_at_ns`).
    ready_at_ns: u64,
}

struct Task {
    info: Arc<TaskInfo>,
    template: Arc<TaskTemplate>,
    status: TaskStatus,
    steps: Vec<Step>,
    incomplete: usize,
    waiters: Vec<SnapshotReply>,
}

impl Task {
    fn snapshot(&self) -> TaskSnapshot {
        TaskSnapshot {
            task_uuid: self.info.task_uuid,
            namespace: self.info.namespace.to_string(),
            name: self.info.name.to_string(),
            version: self.info.version.to_string(),
            status: self.status,
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
                    error_message: s.error_message.clone(),
                })
                .collect(),
        }
    }
}

pub struct MemoryBackend {
    tasks: HashMap<Uuid, Task>,
    ready: VecDeque<(Uuid, usize)>,
    /// Steps waiting out their backoff: (due, tie-breaker, task, step).
    retries: BinaryHeap<Reverse<(Instant, u64, Uuid, usize)>>,
    retry_seq: u64,
    /// Finished tasks in finishing order; the oldest are forgotten past `retention`.
    finished: VecDeque<Uuid>,
    retention: usize,
}

impl MemoryBackend {
    pub fn new(retention: usize) -> Self {
        Self {
            tasks: HashMap::new(),
            ready: VecDeque::new(),
            retries: BinaryHeap::new(),
            retry_seq: 0,
            finished: VecDeque::new(),
            retention,
        }
    }

    fn create_one(&mut self, template: &Arc<TaskTemplate>, context: Value) -> Uuid {
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
                waiting_on: deps.len(),
                result: None,
                error_message: None,
                ready_at_ns: now_ns,
            })
            .collect();
        for (i, step) in steps.iter().enumerate() {
            if step.waiting_on == 0 {
                self.ready.push_back((task_uuid, i));
            }
        }
        let incomplete = steps.len();
        self.tasks.insert(
            task_uuid,
            Task {
                info,
                template: Arc::clone(template),
                status: TaskStatus::Pending,
                steps,
                incomplete,
                waiters: Vec::new(),
            },
        );
        task_uuid
    }

    fn unknown(task_uuid: Uuid) -> EngineError {
        EngineError::UnknownTask(format!(
            "{task_uuid}: never created on this worker, or finished and no longer retained (see task_retention)"
        ))
    }

    fn finish(&mut self, task_uuid: Uuid, status: TaskStatus) {
        let Some(task) = self.tasks.get_mut(&task_uuid) else {
            return;
        };
        task.status = status;
        if !task.waiters.is_empty() {
            let snapshot = task.snapshot();
            for waiter in task.waiters.drain(..) {
                let _ = waiter.try_send(Ok(snapshot.clone()));
            }
        }
        self.finished.push_back(task_uuid);
        while self.finished.len() > self.retention {
            if let Some(old) = self.finished.pop_front() {
                self.tasks.remove(&old);
            }
        }
    }

    fn record_one(&mut self, flight: InFlight, outcome: AttemptOutcome, now: Instant) {
        let Some(task) = self.tasks.get_mut(&flight.task_uuid) else {
            debug!(task_uuid = %flight.task_uuid, "completion for a task no longer retained");
            return;
        };
        let definition = Arc::clone(&task.template.steps[flight.step_index]);
        let step = &mut task.steps[flight.step_index];
        if step.status != StepStatus::InProgress || step.attempts != flight.attempt {
            warn!(step = %definition.name, attempt = flight.attempt, "outcome for an attempt that is no longer current");
            return;
        }
        let (retryable, retry_after, message) = match outcome {
            AttemptOutcome::Completed(c) if c.success => {
                step.status = StepStatus::Complete;
                step.result = Some(Arc::new(c.result));
                step.error_message = None;
                task.incomplete -= 1;
                if task.incomplete == 0 {
                    self.finish(flight.task_uuid, TaskStatus::Complete);
                    return;
                }
                if task.status == TaskStatus::Error {
                    return;
                }
                for &next in &task.template.dependents[flight.step_index] {
                    let successor = &mut task.steps[next];
                    successor.waiting_on -= 1;
                    if successor.waiting_on == 0 {
                        successor.status = StepStatus::Enqueued;
                        successor.ready_at_ns = unix_ns();
                        self.ready.push_back((flight.task_uuid, next));
                    }
                }
                return;
            }
            AttemptOutcome::Completed(c) => (c.retryable, c.retry_after, c.failure_message()),
            AttemptOutcome::TimedOut => (
                true,
                None,
                format!("timed out after {}s", fmt_secs(flight.timeout)),
            ),
        };
        let policy = &definition.retry;
        if retryable && policy.retryable && step.attempts < policy.max_attempts {
            let delay = retry_after.unwrap_or_else(|| policy.delay_after(step.attempts));
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
                format!("{message} (gave up after {} attempts)", step.attempts)
            });
            if task.status != TaskStatus::Error {
                self.finish(flight.task_uuid, TaskStatus::Error);
            }
        }
    }

    fn promote_due_retries(&mut self, now: Instant) {
        while let Some(Reverse((due, _, _, _))) = self.retries.peek() {
            if *due > now {
                break;
            }
            let Reverse((_, _, task_uuid, index)) = self.retries.pop().expect("peeked");
            if let Some(task) = self.tasks.get_mut(&task_uuid) {
                if task.status != TaskStatus::Error
                    && task.steps[index].status == StepStatus::WaitingForRetry
                {
                    task.steps[index].status = StepStatus::Enqueued;
                    self.ready.push_back((task_uuid, index));
                }
            }
        }
    }
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s:.3}")
    }
}

impl Backend for MemoryBackend {
    async fn start(&mut self, _inbox: UnboundedSender<EngineMessage>) -> EngineResult<()> {
        Ok(())
    }

    async fn create_tasks(
        &mut self,
        key: TemplateKey,
        template: Option<Arc<TaskTemplate>>,
        contexts: Vec<Value>,
    ) -> EngineResult<Vec<Uuid>> {
        let template =
            template.ok_or_else(|| EngineError::config(format!("unknown template {key}")))?;
        Ok(contexts
            .into_iter()
            .map(|context| self.create_one(&template, context))
            .collect())
    }

    async fn task_status(&mut self, task_uuid: Uuid) -> EngineResult<TaskSnapshot> {
        self.tasks
            .get(&task_uuid)
            .map(Task::snapshot)
            .ok_or_else(|| Self::unknown(task_uuid))
    }

    async fn wait_for_task(&mut self, task_uuid: Uuid, reply: SnapshotReply) {
        match self.tasks.get_mut(&task_uuid) {
            Some(task) if task.status.is_finished() => {
                let _ = reply.try_send(Ok(task.snapshot()));
            }
            Some(task) => task.waiters.push(reply),
            None => {
                let _ = reply.try_send(Err(Self::unknown(task_uuid)));
            }
        }
    }

    async fn claim(
        &mut self,
        max: usize,
        now: Instant,
    ) -> EngineResult<Vec<(StepExecutionEvent, InFlight)>> {
        self.promote_due_retries(now);
        let mut claimed = Vec::with_capacity(max.min(self.ready.len()));
        while claimed.len() < max {
            let Some((task_uuid, index)) = self.ready.pop_front() else {
                break;
            };
            let Some(task) = self.tasks.get_mut(&task_uuid) else {
                continue;
            };
            if task.status == TaskStatus::Error || task.steps[index].status != StepStatus::Enqueued
            {
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
            let step = &mut task.steps[index];
            step.status = StepStatus::InProgress;
            step.attempts += 1;
            let flight = InFlight {
                task_uuid,
                step_uuid: step.uuid,
                step_index: index,
                attempt: step.attempts,
                deadline: now + definition.timeout,
                timeout: definition.timeout,
            };
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
        Ok(claimed)
    }

    async fn record(
        &mut self,
        outcomes: Vec<(InFlight, AttemptOutcome)>,
        now: Instant,
    ) -> EngineResult<()> {
        for (flight, outcome) in outcomes {
            self.record_one(flight, outcome, now);
        }
        Ok(())
    }

    async fn release(&mut self, unstarted: Vec<InFlight>) {
        for flight in unstarted {
            if let Some(task) = self.tasks.get_mut(&flight.task_uuid) {
                let step = &mut task.steps[flight.step_index];
                if step.status == StepStatus::InProgress && step.attempts == flight.attempt {
                    // It never ran: this attempt does not count.
                    step.attempts -= 1;
                    step.status = StepStatus::Enqueued;
                    self.ready.push_front((flight.task_uuid, flight.step_index));
                }
            }
        }
    }

    fn in_process(&self) -> bool {
        true
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.retries.peek().map(|Reverse((due, _, _, _))| *due)
    }
}
