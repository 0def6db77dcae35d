//! Engine errors. Each variant maps to one error class in each bridge; messages name no bridge's
//! API (a bridge that wants to say which call starts a worker says so itself).

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// Bad configuration or template: the message names the key (or file and step) and the problem.
    #[error("{0}")]
    Configuration(String),
    /// The worker could not start, or one is already running.
    #[error("{0}")]
    Bootstrap(String),
    /// A call that needs a running worker was made without one.
    #[error("worker not initialized: no worker is running in this process")]
    NotInitialized,
    /// The worker is shutting down and takes no new tasks.
    #[error("the worker is shutting down: it takes no new tasks (start a worker to create tasks)")]
    ShuttingDown,
    /// A task uuid the engine does not know (never created, or finished and evicted).
    #[error("unknown task {0}")]
    UnknownTask(String),
    /// A completion that is malformed (missing or ill-typed fields).
    #[error("{0}")]
    InvalidArgument(String),
    /// Anything else: backend failures, internal faults.
    #[error("{0}")]
    Internal(String),
}

pub type EngineResult<T> = Result<T, EngineError>;

impl EngineError {
    pub fn config(message: impl Into<String>) -> Self {
        Self::Configuration(message.into())
    }
}
