//! Engine errors. Each variant maps to one error class in each bridge; messages name no bridge's
//! API (a bridge that wants to say which call starts a worker says so itself).

use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error, Clone)]
pub enum EngineError {
    /// Bad configuration or template: the message names the key (or file and step) and the problem.
    #[error("{0}")]
    Configuration(String),
    /// The worker could not start, or one is already running.
    #[error("{0}")]
    Bootstrap(String),
    /// The worker could not start because something underneath failed (connecting to or
    /// migrating the database). The message is `context: source`; the bridges raise the class
    /// [`Self::Bootstrap`] maps to.
    #[error("{context}: {source}")]
    StartFailed {
        context: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
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
    /// Internal faults, and failures that have no error value to keep.
    #[error("{0}")]
    Internal(String),
    /// A database call failed. `context` says what was being done; the message is
    /// `context: source`, as the bridges show it (the same class as [`Self::Internal`]).
    /// `source` is shared so that one failure can answer many callers (a group commit); as an
    /// error source it downcasts to `Arc<sqlx::Error>`.
    #[error("{context}: {source}")]
    Backend {
        context: String,
        #[source]
        source: Arc<sqlx::Error>,
    },
}

pub type EngineResult<T> = Result<T, EngineError>;

impl EngineError {
    pub fn config(message: impl Into<String>) -> Self {
        Self::Configuration(message.into())
    }

    /// The worker cannot start: `source` failed while doing `context` (see [`Self::StartFailed`]).
    pub fn start_failed(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::StartFailed {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// A database failure while doing `context` (see [`Self::Backend`]).
    pub fn backend(context: impl Into<String>, source: sqlx::Error) -> Self {
        Self::Backend {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_database_failure_reads_as_before_and_keeps_its_cause() {
        let e = EngineError::backend("postgres", sqlx::Error::PoolTimedOut);
        assert_eq!(
            e.to_string(),
            format!("postgres: {}", sqlx::Error::PoolTimedOut)
        );
        let source = e.source().expect("the sqlx error is the source");
        let cause = source.downcast_ref::<Arc<sqlx::Error>>();
        assert!(matches!(
            cause.map(|c| &**c),
            Some(sqlx::Error::PoolTimedOut)
        ));
        // Cloning shares the cause (one failure answers every caller of a group commit).
        assert!(e.clone().source().is_some());
    }

    #[test]
    fn a_start_failure_reads_as_before_and_keeps_its_cause() {
        let e = EngineError::start_failed(
            "cannot connect to PostgreSQL at db",
            sqlx::Error::PoolTimedOut,
        );
        assert_eq!(
            e.to_string(),
            format!(
                "cannot connect to PostgreSQL at db: {}",
                sqlx::Error::PoolTimedOut
            )
        );
        let source = e.source().expect("the cause is the source");
        assert_eq!(source.to_string(), sqlx::Error::PoolTimedOut.to_string());
    }
}
