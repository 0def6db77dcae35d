//! `tasker_worker`: the workflow engine behind the `tasker_core` gem, in pure Rust.
//!
//! Templates (YAML DAGs) → tasks → ready steps → a dispatch channel that handler threads
//! (Ruby, through the bridge crate) take from → completions → retries, successors, task
//! completion. No Ruby here: `cargo test` exercises it all.
//!
//! # Layout
//!
//! - [`bootstrap`]: starts the engine thread and is the handle the bridges call.
//! - `engine`: the engine loop and the messages it is sent (`EngineMessage`).
//! - [`dispatch`]: the hand-off to handler threads, and the registry of attempts out with them.
//! - [`backend`]: where tasks and steps live: the [`backend::Backend`] trait, the
//!   [`backend::Notification`]s a backend wakes the engine with, and one module per backend.
//! - [`attempt`]: one dispatched attempt (its in-flight record, its phase, how it ended).
//! - [`events`], [`template`], [`task_list`], [`error`], [`schedule`], [`metrics`], [`status`],
//!   [`config`]: the data the others share.
//! - [`web`], [`graph`], [`logging`]: the HTTP endpoint, task graphs, log output.
//!
//! Imports run one way: `bootstrap` → `web` → `engine` → {`dispatch`, `backend`} → {`attempt`,
//! `events`, `template`, `task_list`, `error`, …}. A backend never imports the engine or the
//! bootstrap: the engine hands it a [`backend::NotificationSender`], not its own message type.

pub mod attempt;
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
pub mod schedule;
pub mod status;
pub mod task_list;
pub mod template;
pub mod web;

pub use attempt::MAX_RETRY_AFTER;
pub use backend::memory::{CallerThread, GroupWait, LocalTasks, NewTask, TaskTable};
pub use bootstrap::{
    CompletionVerdict, TaskEndTake, WaitTicket, WorkerBootstrap, WorkerSystemHandle,
};
pub use config::{BackendKind, DeploymentMode, LogLevel, WorkerConfig};
pub use dispatch::{DispatchPort, InterruptPort, InterruptTake, Reply, Take};
pub use error::{EngineError, EngineResult};
pub use events::{
    InterruptReason, StepExecutionCompletionEvent, StepExecutionEvent, StepInterrupt, TaskSnapshot,
};
pub use schedule::{schedule_time, MAX_SCHEDULE_AHEAD, MAX_SCHEDULE_BEHIND};
pub use status::{WorkerState, WorkerSystemStatus};
