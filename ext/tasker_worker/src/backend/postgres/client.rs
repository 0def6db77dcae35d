//! Calls made for a client (cancel, retry, status): retried while the connection or the server
//! is in trouble, and told apart by where their transaction failed.

use super::snapshot::task_status;
use super::statements::{halt_tasks, notify_finished, notify_halted, settle_tasks};
use crate::error::EngineError;
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tracing::debug;
use uuid::Uuid;

/// How long a client call (create, status, wait, cancel, retry) keeps trying after the connection it
/// used was closed by the server (a terminated session, a restart, a failover): sqlx drops such a
/// connection, and the next try gets a new one. A restarting server is back within about this long;
/// after it the call raises, naming the cause.
pub(super) const CLIENT_RETRY_FOR: Duration = Duration::from_secs(3);

/// The pauses between the tries of one client call.
pub(super) struct ClientRetry {
    pub(super) give_up: Instant,
    pub(super) pause: Duration,
}

impl ClientRetry {
    pub(super) fn new() -> Self {
        Self {
            give_up: Instant::now() + CLIENT_RETRY_FOR,
            pause: Duration::from_millis(10),
        }
    }

    /// Whether `e` is worth another try (the connection or the server, not the statement), and
    /// there is time left for one; then waits before it.
    pub(super) async fn again(&mut self, e: &sqlx::Error, what: &str) -> bool {
        if !is_transient(e) || Instant::now() + self.pause > self.give_up {
            return false;
        }
        debug!(error = %e, "{what} failed on a broken connection; trying again");
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(500));
        true
    }
}

/// Where a transaction failed: before COMMIT nothing was written, and it may be tried again; at
/// COMMIT the server may or may not have committed it.
pub(super) enum TxFailure {
    Before(sqlx::Error),
    AtCommit(sqlx::Error),
}

impl From<sqlx::Error> for TxFailure {
    fn from(e: sqlx::Error) -> Self {
        Self::Before(e)
    }
}

/// Whether a failed write may succeed unchanged later: the connection or the server is in
/// trouble, or a lock or serialization conflict. Anything else (a value the database rejects)
/// would fail forever, and is isolated instead.
pub(super) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().unwrap_or_default();
            // 08 connection, 25P03 idle-in-transaction timeout, 40 rollback (deadlock,
            // serialization), 53 resources, 55 object state (lock_not_available), 57 operator
            // intervention (shutdown, cancel), 58 system error.
            ["08", "40", "53", "55", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
                || code == "25P03"
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

pub(super) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// How a `retry_task` transaction failed: in the database (see [`TxFailure`]), or for a reason of
/// the engine's (an unknown task, one still running) that no second try changes.
pub(super) enum RetryFailure {
    Tx(TxFailure),
    Engine(EngineError),
}

impl From<sqlx::Error> for RetryFailure {
    fn from(e: sqlx::Error) -> Self {
        Self::Tx(TxFailure::Before(e))
    }
}

impl From<EngineError> for RetryFailure {
    fn from(e: EngineError) -> Self {
        Self::Engine(e)
    }
}

/// What a cancel found.
pub(super) enum Cancel {
    Unknown,
    AlreadyFinished,
    /// `finished`: no step was in progress, so the task is `cancelled` already.
    Cancelled {
        finished: bool,
    },
}

/// Cancel a task in one transaction, its row locked first: a completion of one of its steps is
/// recorded wholly before or wholly after.
pub(super) async fn cancel_transaction(
    pool: &PgPool,
    task_uuid: Uuid,
) -> Result<Cancel, TxFailure> {
    let mut tx = pool.begin().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM tasker_tasks WHERE task_uuid = $1 FOR UPDATE")
            .bind(task_uuid)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(status) = status else {
        return Ok(Cancel::Unknown);
    };
    if task_status(&status).is_finished() {
        return Ok(Cancel::AlreadyFinished);
    }
    halt_tasks(&mut tx, &[task_uuid], "cancelled").await?;
    let finished = settle_tasks(&mut tx, &[task_uuid]).await?;
    if finished.is_empty() {
        // Steps are in progress somewhere: their processes interrupt them.
        notify_halted(&mut tx, &[task_uuid], true).await?;
    }
    notify_finished(&mut tx, &finished).await?;
    tx.commit().await.map_err(TxFailure::AtCommit)?;
    Ok(Cancel::Cancelled {
        finished: !finished.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_retrying_can_cure_is_transient() {
        let io = sqlx::Error::Io(std::io::Error::other("reset"));
        assert!(is_transient(&io));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }
}
