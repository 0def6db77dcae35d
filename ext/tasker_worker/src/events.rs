//! The data that crosses between the engine and the Ruby bridge: plain Rust, `Send`, no Ruby values.

use crate::template::StepDefinition;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
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
