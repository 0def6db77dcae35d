//! Reading a task and its steps back from the database.

use crate::error::EngineError;
use crate::events::{StepSnapshot, StepStatus, TaskSnapshot, TaskStatus};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use std::sync::Arc;
use uuid::Uuid;

/// A task and its steps as the database has them now (`None`: no such task).
pub(super) async fn read_snapshot(
    pool: &PgPool,
    task_uuid: Uuid,
) -> Result<Option<TaskSnapshot>, sqlx::Error> {
    let Some(task) = sqlx::query(
        "SELECT namespace, name, version, status,
                (extract(epoch FROM created_at) * 1e9)::int8 AS created_at_ns,
                (extract(epoch FROM finished_at) * 1e9)::int8 AS completed_at_ns
         FROM tasker_tasks WHERE task_uuid = $1",
    )
    .bind(task_uuid)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let steps = sqlx::query(
        "SELECT step_uuid, name, status, attempts, result, metadata, error_message,
                (extract(epoch FROM started_at) * 1e9)::int8 AS started_at_ns,
                (extract(epoch FROM completed_at) * 1e9)::int8 AS completed_at_ns
         FROM tasker_steps WHERE task_uuid = $1 ORDER BY step_index",
    )
    .bind(task_uuid)
    .fetch_all(pool)
    .await?;
    Ok(Some(TaskSnapshot {
        task_uuid,
        namespace: task.get("namespace"),
        name: task.get("name"),
        version: task.get("version"),
        status: task_status(task.get("status")),
        created_at_ns: unix_ns(&task, "created_at_ns"),
        completed_at_ns: unix_ns(&task, "completed_at_ns"),
        steps_retained: true,
        steps: steps
            .into_iter()
            .map(|row| StepSnapshot {
                step_uuid: row.get("step_uuid"),
                name: row.get("name"),
                status: step_status(row.get("status")),
                attempts: row.get::<i32, _>("attempts") as u32,
                result: row.get::<Option<Value>, _>("result").map(Arc::new),
                metadata: row.get::<Option<Value>, _>("metadata").map(Arc::new),
                error_message: row.get("error_message"),
                started_at_ns: unix_ns(&row, "started_at_ns"),
                completed_at_ns: unix_ns(&row, "completed_at_ns"),
            })
            .collect(),
    }))
}

/// The error for a task the database does not have: never created, or finished and deleted.
pub(super) fn deleted_task(task_uuid: Uuid) -> EngineError {
    EngineError::UnknownTask(format!(
        "{task_uuid}: no such task in the database (finished tasks are deleted after finished_task_ttl)"
    ))
}

/// A timestamp column read as nanoseconds since the Unix epoch (the snapshot's unit).
pub(super) fn unix_ns(row: &PgRow, column: &str) -> Option<u64> {
    row.get::<Option<i64>, _>(column)
        .and_then(|ns| u64::try_from(ns).ok())
}

pub(super) fn task_status(s: &str) -> TaskStatus {
    match s {
        "in_progress" => TaskStatus::InProgress,
        "complete" => TaskStatus::Complete,
        "error" => TaskStatus::Error,
        "cancelled" => TaskStatus::Cancelled,
        _ => TaskStatus::Pending,
    }
}

pub(super) fn step_status(s: &str) -> StepStatus {
    match s {
        "enqueued" => StepStatus::Enqueued,
        "in_progress" => StepStatus::InProgress,
        "complete" => StepStatus::Complete,
        "error" => StepStatus::Error,
        "waiting_for_retry" => StepStatus::WaitingForRetry,
        "skipped" => StepStatus::Skipped,
        "cancelled" => StepStatus::Cancelled,
        _ => StepStatus::Pending,
    }
}
