//! The data that crosses between the engine and the Ruby bridge: plain Rust, `Send`, no Ruby values.

use crate::metrics::StepMetrics;
use crate::template::{OnTimeout, StepDefinition};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The task a step belongs to; shared by every event of the task.
#[derive(Debug)]
pub struct TaskInfo {
    pub task_uuid: Uuid,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub version: Arc<str>,
    pub context: Arc<Value>,
}

/// One step attempt handed to a Ruby handler.
#[derive(Debug, Clone)]
pub struct StepExecutionEvent {
    pub event_id: Uuid,
    pub step_uuid: Uuid,
    pub task: Arc<TaskInfo>,
    pub definition: Arc<StepDefinition>,
    /// The number of this attempt: 1 on the first run.
    pub attempt: u32,
    /// Each dependency's name and result.
    pub dependency_results: Vec<(Arc<str>, Arc<Value>)>,
    /// When the step became ready to run (ns since the Unix epoch, CLOCK_REALTIME), so that
    /// Ruby can measure the hand-off latency with `Process.clock_gettime(CLOCK_REALTIME)`.
    pub ready_at_ns: u64,
}

/// Now, as ns since the Unix epoch (the clock `ready_at_ns` uses).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl StepExecutionEvent {
    pub fn task_uuid(&self) -> Uuid {
        self.task.task_uuid
    }
}

/// A completion as Ruby reports it (validated by the bridge).
#[derive(Debug, Clone)]
pub struct StepExecutionCompletionEvent {
    pub event_id: Uuid,
    pub task_uuid: Uuid,
    pub step_uuid: Uuid,
    pub success: bool,
    pub result: Value,
    pub metadata: Value,
    pub error_message: Option<String>,
    pub error_class: Option<String>,
    /// Whether a failure may be retried (default true).
    pub retryable: bool,
    pub retry_after: Option<Duration>,
    pub completed_at: Option<String>,
}

impl StepExecutionCompletionEvent {
    /// The failure as recorded on the step: `Class: message`, either part alone, or a default.
    pub fn failure_message(&self) -> String {
        match (&self.error_class, &self.error_message) {
            (Some(class), Some(m)) => format!("{class}: {m}"),
            (Some(class), None) => class.clone(),
            (None, Some(m)) => m.clone(),
            (None, None) => "handler reported failure".to_string(),
        }
    }
}

/// Where a dispatched attempt is. Shared by every copy of its [`InFlight`], so that the engine,
/// the handler thread taking it and the thread completing it agree without a lock: each
/// transition is one compare-and-swap, and exactly one side wins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// In the dispatch channel, not yet taken by a handler thread.
    Queued = 0,
    /// A handler thread took it: its handler runs.
    Running = 1,
    /// Its deadline passed while the handler ran: the attempt is over (recorded as timed out when
    /// the handler returns), and the next attempt waits for that return.
    TimedOut = 2,
    /// Its task was cancelled while the handler ran: recorded when the handler returns.
    Cancelled = 3,
    /// Completed, or handed back unrun: nothing more may happen to it.
    Done = 4,
}

#[derive(Debug, Default)]
pub struct AttemptPhase(AtomicU8, AtomicU64);

impl AttemptPhase {
    fn decode(value: u8) -> Phase {
        match value {
            0 => Phase::Queued,
            1 => Phase::Running,
            2 => Phase::TimedOut,
            3 => Phase::Cancelled,
            _ => Phase::Done,
        }
    }

    pub fn get(&self) -> Phase {
        Self::decode(self.0.load(Ordering::Acquire))
    }

    /// A handler thread began running the attempt now (for the step duration metric).
    pub fn mark_started(&self) {
        self.1.store(unix_ns(), Ordering::Relaxed);
    }

    /// How long the handler has run, if it started.
    pub fn running_for(&self) -> Option<Duration> {
        match self.1.load(Ordering::Relaxed) {
            0 => None,
            started => Some(Duration::from_nanos(unix_ns().saturating_sub(started))),
        }
    }

    /// Move to `Done` from wherever it is; the phase it was in, or `None` if already done.
    pub fn finish(&self) -> Option<Phase> {
        let previous = Self::decode(self.0.swap(Phase::Done as u8, Ordering::AcqRel));
        (previous != Phase::Done).then_some(previous)
    }

    /// Move from `from` to `to`; false if the attempt was not in `from`.
    pub fn advance(&self, from: Phase, to: Phase) -> bool {
        self.0
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// What the engine remembers about a dispatched attempt until its completion or timeout.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub task_uuid: Uuid,
    pub step_uuid: Uuid,
    /// Position of the step in its template (the memory backend's address for it).
    pub step_index: usize,
    pub step_name: Arc<str>,
    pub attempt: u32,
    pub deadline: Instant,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
    pub phase: Arc<AttemptPhase>,
    /// The step's metric series (set by the engine when it dispatches the attempt).
    pub metrics: Option<Arc<StepMetrics>>,
    /// When the step became ready (see [`StepExecutionEvent::ready_at_ns`]).
    pub ready_at_ns: u64,
}

impl InFlight {
    /// A new attempt of `definition`, claimed `now`, not yet taken by a handler thread.
    pub fn new(
        task_uuid: Uuid,
        step_uuid: Uuid,
        step_index: usize,
        definition: &StepDefinition,
        attempt: u32,
        now: Instant,
    ) -> Self {
        Self {
            task_uuid,
            step_uuid,
            step_index,
            step_name: Arc::clone(&definition.name),
            attempt,
            // A timeout is at most a day (template validation): no overflow.
            deadline: now + definition.timeout,
            timeout: definition.timeout,
            on_timeout: definition.on_timeout,
            phase: Arc::new(AttemptPhase::default()),
            metrics: None,
            ready_at_ns: 0,
        }
    }

    /// An attempt of a step its template does not have (a stored template changed under the same
    /// version): it is failed at once, never run.
    pub fn unknown_step(
        task_uuid: Uuid,
        step_uuid: Uuid,
        step_index: usize,
        attempt: u32,
        now: Instant,
    ) -> Self {
        Self {
            task_uuid,
            step_uuid,
            step_index,
            step_name: Arc::from(format!("#{step_index}")),
            attempt,
            deadline: now,
            timeout: Duration::ZERO,
            on_timeout: OnTimeout::Raise,
            phase: Arc::new(AttemptPhase::default()),
            metrics: None,
            ready_at_ns: 0,
        }
    }

    /// The message an attempt that outlived its timeout is recorded with.
    pub fn timeout_message(&self) -> String {
        format!(
            "TaskerCore::StepTimeoutError: attempt {} of step {} timed out after {}s",
            self.attempt,
            self.step_name,
            fmt_secs(self.timeout)
        )
    }
}

/// Seconds without a trailing `.000` for whole numbers.
pub fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s:.3}")
    }
}

/// Why an attempt ended.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    Completed(Box<StepExecutionCompletionEvent>),
    /// Past its timeout: never taken, or its handler has now returned (its result discarded).
    TimedOut,
    /// Its task was cancelled while it was out; what the handler reported, if it ran.
    Cancelled(Option<Box<StepExecutionCompletionEvent>>),
}

/// Why a running handler should be interrupted (see `WorkerSystemHandle::next_interrupt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptReason {
    Timeout,
    Cancelled,
}

impl InterruptReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A handler to interrupt: its attempt timed out or its task was cancelled while it ran.
#[derive(Debug, Clone)]
pub struct StepInterrupt {
    pub event_id: Uuid,
    pub task_uuid: Uuid,
    pub step_uuid: Uuid,
    pub step_name: Arc<str>,
    pub attempt: u32,
    pub timeout: Duration,
    pub reason: InterruptReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
}

impl TaskStatus {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "in_progress" => Self::InProgress,
            "complete" => Self::Complete,
            "error" => Self::Error,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InProgress => "in_progress",
            Self::Complete => "complete",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Self::Complete | Self::Error | Self::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Pending,
    Enqueued,
    InProgress,
    Complete,
    Error,
    WaitingForRetry,
    /// Will never run: another step of its task failed for good.
    Skipped,
    /// Will never run (or was interrupted): its task was cancelled.
    Cancelled,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Enqueued => "enqueued",
            Self::InProgress => "in_progress",
            Self::Complete => "complete",
            Self::Error => "error",
            Self::WaitingForRetry => "waiting_for_retry",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
        }
    }

    /// A step that will not run again unless its task is retried.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            Self::Complete | Self::Error | Self::Skipped | Self::Cancelled
        )
    }
}

/// A task and all of its steps, as `task_status` reports them.
#[derive(Debug, Clone)]
pub struct TaskSnapshot {
    pub task_uuid: Uuid,
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub status: TaskStatus,
    /// ns since the Unix epoch (`None` once only the final status is kept).
    pub created_at_ns: Option<u64>,
    pub completed_at_ns: Option<u64>,
    /// Empty when only the final status is still kept (see the memory backend's retention).
    pub steps: Vec<StepSnapshot>,
    pub steps_retained: bool,
}

#[derive(Debug, Clone)]
pub struct StepSnapshot {
    pub step_uuid: Uuid,
    pub name: String,
    pub status: StepStatus,
    pub attempts: u32,
    pub result: Option<Arc<Value>>,
    pub metadata: Option<Arc<Value>>,
    pub error_message: Option<String>,
    /// When the last attempt started and ended (ns since the Unix epoch).
    pub started_at_ns: Option<u64>,
    pub completed_at_ns: Option<u64>,
}
