//! `tasker_worker`: the workflow engine behind the `tasker_core` gem, in pure Rust.
//!
//! Templates (YAML DAGs) → tasks → ready steps → a dispatch channel that handler threads
//! (Ruby, through the bridge crate) take from → completions → retries, successors, task
//! completion. No Ruby here: `cargo test` exercises it all.

pub mod backend;
pub mod bootstrap;
pub mod config;
pub mod dispatch;
mod engine;
pub mod error;
pub mod events;
pub mod graph;
pub mod logging;
pub mod metrics;
pub mod status;
pub mod task_list;
pub mod template;
pub mod web;

pub use backend::memory::{GroupWait, LocalTasks, NewTask, TaskTable};
pub use bootstrap::{
    schedule_time, CompletionVerdict, TaskEndTake, WaitTicket, WorkerBootstrap, WorkerSystemHandle,
    MAX_RETRY_AFTER, MAX_SCHEDULE_AHEAD, MAX_SCHEDULE_BEHIND,
};
pub use config::{BackendKind, DeploymentMode, LogLevel, WorkerConfig};
pub use dispatch::{DispatchPort, InterruptPort, InterruptTake, Reply, Take};
pub use error::{EngineError, EngineResult};
pub use events::{
    InterruptReason, StepExecutionCompletionEvent, StepExecutionEvent, StepInterrupt, TaskSnapshot,
};
pub use status::{WorkerState, WorkerSystemStatus};
