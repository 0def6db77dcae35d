//! SQL that several transactions share: claiming ready steps (the claim and the record
//! transactions), and locking, halting and settling tasks and announcing what finished or halted
//! (the record, release and cancel transactions).

use super::listen::{TASKS_FINISHED, TASKS_HALTED};
use super::ClaimScope;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

pub(super) async fn notify_finished(
    tx: &mut Transaction<'static, Postgres>,
    finished: &[Uuid],
) -> Result<(), sqlx::Error> {
    notify_tasks(tx, TASKS_FINISHED, "", finished).await
}

/// Announce tasks that stopped starting steps, so that the processes holding their attempts
/// withdraw the queued ones (and, for a cancel, interrupt the running ones).
pub(super) async fn notify_halted(
    tx: &mut Transaction<'static, Postgres>,
    tasks: &[Uuid],
    cancelled: bool,
) -> Result<(), sqlx::Error> {
    let kind = if cancelled { "cancelled:" } else { "error:" };
    notify_tasks(tx, TASKS_HALTED, kind, tasks).await
}

/// NOTIFY `channel` of `tasks`, as `<prefix><uuid>,<uuid>,...`.
async fn notify_tasks(
    tx: &mut Transaction<'static, Postgres>,
    channel: &str,
    prefix: &str,
    tasks: &[Uuid],
) -> Result<(), sqlx::Error> {
    // A NOTIFY payload holds < 8000 bytes: 200 uuids (37 bytes each with the comma) per message.
    for chunk in tasks.chunks(200) {
        let payload = chunk
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",");
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(format!("{prefix}{payload}"))
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Stop `tasks` starting steps (their row locked by the caller): `ending` is `error` or
/// `cancelled` (a cancel outranks a failure still winding down; nothing outranks a cancel). Their
/// steps that have not started become `skipped` (`cancelled`) and leave the hot table. Returns
/// the tasks whose ending this set.
pub(super) async fn halt_tasks(
    tx: &mut Transaction<'static, Postgres>,
    tasks: &[Uuid],
    ending: &str,
) -> Result<Vec<Uuid>, sqlx::Error> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "WITH halted AS (
           UPDATE tasker_tasks t SET ending = $2::text
           WHERE t.task_uuid = ANY($1) AND t.status IN ('pending', 'in_progress')
             AND (t.ending IS NULL OR ($2::text = 'cancelled' AND t.ending <> 'cancelled'))
           RETURNING t.task_uuid
         ), settled AS (
           UPDATE tasker_steps s
           SET status = CASE WHEN $2::text = 'cancelled' THEN 'cancelled' ELSE 'skipped' END
           FROM halted h
           WHERE s.task_uuid = h.task_uuid AND s.status IN ('pending', 'enqueued', 'waiting_for_retry')
           RETURNING s.step_uuid
         ), gone AS (
           DELETE FROM tasker_ready_steps r USING settled WHERE r.step_uuid = settled.step_uuid
         )
         SELECT task_uuid FROM halted",
    )
    .bind(tasks)
    .bind(ending)
    .fetch_all(&mut **tx)
    .await
}

/// Tasks that are ending and have no step in progress any more take their ending as their
/// status. Returns those that finished.
pub(super) async fn settle_tasks(
    tx: &mut Transaction<'static, Postgres>,
    tasks: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "UPDATE tasker_tasks t SET status = t.ending, finished_at = now()
         WHERE t.task_uuid = ANY($1) AND t.ending IS NOT NULL AND t.status IN ('pending', 'in_progress')
           AND NOT EXISTS (SELECT 1 FROM tasker_steps s WHERE s.task_uuid = t.task_uuid AND s.status = 'in_progress')
         RETURNING t.task_uuid",
    )
    .bind(tasks)
    .fetch_all(&mut **tx)
    .await
}

/// Lock the rows of `tasks`, in one order (every writer takes task rows first, then steps).
pub(super) async fn lock_tasks(
    tx: &mut Transaction<'static, Postgres>,
    tasks: &mut Vec<Uuid>,
) -> Result<(), sqlx::Error> {
    tasks.sort();
    tasks.dedup();
    sqlx::query(
        "SELECT 1 FROM tasker_tasks WHERE task_uuid = ANY($1) ORDER BY task_uuid FOR UPDATE",
    )
    .bind(&*tasks)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Claim up to $2 ready steps of namespaces $1 for worker $3: visibility pushed forward by the
/// lease ($4 seconds), attempt counted, task marked in progress. Returns what events are built
/// from, with the task's `ending`: a row of an ending task is claimable only once the worker that
/// ran its step died (see `build_events`).
pub(super) const CLAIM_SQL: &str = "WITH claimable AS (
               SELECT c.step_uuid FROM unnest($1::text[]) AS ns(namespace)
               CROSS JOIN LATERAL (
                 SELECT r.step_uuid, r.visible_at FROM tasker_ready_steps r
                 WHERE r.namespace = ns.namespace AND r.visible_at <= now()
                 ORDER BY r.visible_at LIMIT $2
                 FOR UPDATE SKIP LOCKED
               ) c
               ORDER BY c.visible_at LIMIT $2
             ), claimed AS (
               UPDATE tasker_ready_steps r
               SET visible_at = now() + make_interval(secs => $4), claimed_by = $3
               FROM claimable c WHERE r.step_uuid = c.step_uuid
               RETURNING r.step_uuid, r.timeout_ms
             ), bumped AS (
               UPDATE tasker_steps s
               SET attempts = s.attempts + 1, status = 'in_progress', started_at = now(), completed_at = NULL
               FROM claimed c WHERE s.step_uuid = c.step_uuid
               RETURNING s.step_uuid, s.task_uuid, s.step_index, s.attempts, s.attempt_base,
                         (extract(epoch FROM coalesce(s.ready_at, now())) * 1e9)::int8 AS ready_at_ns, c.timeout_ms
             ), started AS (
               UPDATE tasker_tasks t SET status = 'in_progress'
               WHERE t.task_uuid IN (SELECT task_uuid FROM bumped) AND t.status = 'pending'
             )
             SELECT b.*, t.namespace, t.name, t.version, t.context, t.ending
             FROM bumped b JOIN tasker_tasks t ON t.task_uuid = b.task_uuid";

pub(super) async fn claim_rows<'e, E>(
    executor: E,
    scope: &ClaimScope,
    max: usize,
) -> Result<Vec<PgRow>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    sqlx::query(CLAIM_SQL)
        .bind(&scope.namespaces)
        .bind(max as i64)
        .bind(&scope.worker_id)
        .bind(scope.lease_secs)
        .fetch_all(executor)
        .await
}
